"""Every Slicer name the module uses exists in Slicer (the lists in ``../shared/slicer-api``, extracted from
Slicer's and vtkAddon's source) or in VTK: ``slicer.util.X``, ``slicer.vtkX`` / ``slicer.qX`` classes, class names
given as strings (``AddNewNodeByClass("vtkMRML...")``) and every UpperCamel method call. Code that only runs inside
the Slicer application cannot be run here; this catches a misspelt or invented API before it ships. Skipped, with
the reason, without the lists (a fresh clone) or without vtk.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
API = REPO.parent / "shared" / "slicer-api"
MODULE_FILES = [REPO / "NePhiRegistration" / "NePhiRegistration.py",
                *sorted((REPO / "NePhiRegistration" / "NePhiRegistrationLib").glob("*.py"))]


def python_names(tree: ast.AST) -> set:
    """Names a file binds by importing anything but slicer and vtk (calls on them are not Slicer's)."""
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] != "vtk")
        elif isinstance(node, ast.ImportFrom) and node.module not in ("slicer", "vtk"):
            bound.update(a.asname or a.name for a in node.names)
    return bound - {"slicer"}


def names(file: str) -> set:
    path = API / file
    if not path.is_file():
        pytest.skip(f"needs the Slicer API name lists at {API} (../shared, absent on a fresh clone)")
    return set(path.read_text().split())


@pytest.fixture(scope="module")
def vtk_methods() -> set:
    vtk = pytest.importorskip("vtk", reason="needs vtk")
    found = set()
    for name in dir(vtk):
        if name.startswith("vtk"):
            found.update(dir(getattr(vtk, name)))
    return found


def uses(path: Path):
    """(kind, name, line) of every Slicer-looking use in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    python = python_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            inner = node.value
            if isinstance(inner.value, ast.Name) and inner.value.id == "slicer" and inner.attr == "util":
                yield "util", node.attr, node.lineno
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer":
            if node.attr[:3] in ("vtk",) or (node.attr[:1] == "q" and node.attr[1:2].isupper()):
                yield "class", node.attr, node.lineno
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("vtkMRML") \
                and node.value.isidentifier():
            yield "class", node.value, node.lineno
        if isinstance(node, ast.ImportFrom) and node.module == "slicer":
            for alias in node.names:
                if alias.name.startswith("vtk"):
                    yield "class", alias.name, node.lineno
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr[:1].isupper():
            owner = node.func.value
            root = owner
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(owner, ast.Name) and owner.id[:1].isupper():
                continue  # a class's own name (a Python class of ours)
            if isinstance(root, ast.Name) and root.id in python and not isinstance(owner, ast.Call):
                continue  # a Python module's attribute (sceneio.ImportOptions, qt.QTimer, psutil.Process, ...)
            yield "method", node.func.attr, node.lineno


def test_every_slicer_name_the_module_uses_exists(vtk_methods):
    util, classes, methods = names("slicer_util_names.txt"), names("class_names.txt"), names("cpp_method_names.txt")
    missing, checked = [], 0
    for path in MODULE_FILES:
        for kind, name, line in uses(path):
            checked += 1
            known = {"util": name in util, "class": name in classes or name.startswith("vtkMRMLColorTableNodeFile"),
                     "method": name in methods or name in vtk_methods}[kind]
            if not known:
                missing.append(f"{path.name}:{line} {kind} {name}")
    assert checked > 80  # the parse found the module's Slicer calls
    assert not missing, "not in Slicer or VTK: " + ", ".join(missing)


def test_the_check_catches_an_invented_name(tmp_path, vtk_methods):
    util, methods = names("slicer_util_names.txt"), names("cpp_method_names.txt")
    bad = tmp_path / "bad.py"
    bad.write_text("import slicer\nslicer.util.updateGridTransformFromArray(n, a)\nnode.SetAndObserveGridData(x)\n")
    found = list(uses(bad))
    assert ("util", "updateGridTransformFromArray", 2) in found and "updateGridTransformFromArray" not in util
    assert ("method", "SetAndObserveGridData", 3) in found
    assert "SetAndObserveGridData" not in methods and "SetAndObserveGridData" not in vtk_methods
