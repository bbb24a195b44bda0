"""Static checks of the Slicer module: .ui <-> code <-> parameter node, CMake lists, index entry, resources,
and every Slicer API name the module uses against the lists extracted from Slicer's source."""

import ast
import hashlib
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "NePhiRegistration"
LIB = MODULE / "NePhiRegistrationLib"
UI_FILE = MODULE / "Resources" / "UI" / "NePhiRegistration.ui"
SLICER_API = REPO.parent / "shared" / "slicer-api"
SLICER_SIDE = [MODULE / "NePhiRegistration.py"] + sorted(LIB.glob("*.py"))
sys.path.insert(0, str(MODULE))


def parse(path):
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


# -- the panel ---------------------------------------------------------------------------------------------------
def ui_widgets():
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui" and root.get("version") == "4.0"
    return {w.get("name"): w for w in root.iter("widget")}


def slicer_parameter_names():
    names = {}
    for _name, widget in ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                names[prop.find("string").text] = widget.get("class")
    return names


def parameter_fields():
    """{field: annotation source} of the @parameterNodeWrapper class."""
    tree = parse(LIB / "parameters.py")
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "NePhiRegistrationParameterNode")
    assert any(getattr(d, "id", None) == "parameterNodeWrapper" for d in cls.decorator_list)
    return {n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)}


def test_ui_is_qt_designer_xml_with_a_qmrmlwidget_root():
    root = ET.parse(UI_FILE).getroot()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and root.find("class").text == top.get("name")
    declared = {c.find("class").text for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    assert {c for c in used if not c.startswith("Q")} <= declared, "custom widget classes must be declared"
    # every node selector gets the scene
    connections = root.iter("connection")
    receivers = {c.find("receiver").text for c in connections if c.find("slot").text.startswith("setMRMLScene")}
    selectors = {n for n, w in ui_widgets().items() if w.get("class") == "qMRMLNodeComboBox"}
    assert selectors == receivers


def test_node_selectors_offer_one_way_to_create_a_node():
    """addEnabled adds "Create new ..." to the list; a noneDisplay that also reads "Create new ..." would show it
    twice (the output selector's none entry already means: create a new transform)."""
    for name, widget in ui_widgets().items():
        if widget.get("class") != "qMRMLNodeComboBox":
            continue
        props = {p.get("name"): p for p in widget.findall("property")}
        add = props.get("addEnabled") is not None and props["addEnabled"].find("bool").text == "true"
        none_text = props["noneDisplay"].find("string").text if "noneDisplay" in props else ""
        assert not (add and none_text.lower().startswith("create new")), name
    output = {p.get("name"): p for p in ui_widgets()["outputTransformSelector"].findall("property")}
    assert output["noneDisplay"].find("string").text == "Create new transform"


def test_every_widget_name_the_code_uses_exists_in_the_ui():
    names = set(ui_widgets())
    used = set()
    for path in SLICER_SIDE:
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui":
                used.add(node.attr)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ui":
                used.add(node.attr)
    assert used, "no ui.<widget> uses found: the check is broken"
    assert used - names == set(), f"widgets used in code but missing in the .ui: {sorted(used - names)}"


# connectGui matches widgets by exact type (Slicer's guiConnectors.py); annotation -> widget classes it accepts
WIDGET_FOR = [
    (r"^bool$", {"QCheckBox", "QPushButton"}),
    (r"^Annotated\[str, Choice", {"QComboBox"}),
    (r"^Annotated\[int,", {"QSpinBox", "QSlider"}),
    (r"^Annotated\[float,", {"QDoubleSpinBox", "ctkSliderWidget"}),
    (r"^Path$", {"ctkPathLineEdit", "ctkDirectoryButton"}),
    (r"^(vtkMRML\w+|Union\[vtkMRML.*\])$", {"qMRMLNodeComboBox"}),
]


# parameters bound by widget.py instead of connectGui (a Path cannot be empty: Path("") reads back as ".")
MANUALLY_BOUND = {"modelPath": ("modelPathLineEdit", "ctkPathLineEdit", "str")}


def test_manually_bound_parameters_are_str_and_not_bound_by_connect_gui():
    widgets, fields = ui_widgets(), parameter_fields()
    for name, (widget, widget_class, annotation) in MANUALLY_BOUND.items():
        assert fields[name] == annotation and widgets[widget].get("class") == widget_class
        assert name not in slicer_parameter_names(), f"{name}: connectGui has no str connector for {widget_class}"
    source = (LIB / "widget.py").read_text()
    assert "modelPathLineEdit.currentPathChanged.connect" in source and "modelPathLineEdit.currentPath = " in source


def test_output_transform_selector_lists_every_transform_node_class():
    """nodeTypes vtkMRMLTransformNode alone hides linear/grid/B-spline nodes unless child types are shown."""
    def show_children(widget):
        prop = next(p for p in widget.findall("property") if p.get("name") == "showChildNodeTypes")
        return prop.find("bool").text == "true"

    selectors = {n: w for n, w in ui_widgets().items() if w.get("class") == "qMRMLNodeComboBox"}
    assert show_children(selectors.pop("outputTransformSelector"))
    assert not any(show_children(w) for w in selectors.values())  # volumes: no label maps among scalar volumes


def test_slicer_parameter_names_match_parameter_fields_and_widget_types():
    ui_names = slicer_parameter_names()
    fields = {k: v for k, v in parameter_fields().items() if k not in MANUALLY_BOUND}
    assert set(ui_names) == set(fields), (
        f"in .ui only: {sorted(set(ui_names) - set(fields))}; "
        f"in parameter node only: {sorted(set(fields) - set(ui_names))}")
    for name, annotation in fields.items():
        allowed = next((w for pattern, w in WIDGET_FOR if re.match(pattern, annotation)), None)
        assert allowed is not None, f"{name}: no GUI connector for {annotation}"
        assert ui_names[name] in allowed, f"{name}: {annotation} cannot bind to a {ui_names[name]}"
        if annotation.startswith("Union["):  # UnionSerializer cannot write None unless None is in the union
            assert annotation.endswith(", None]"), f"{name}: a union of nodes must include None"


def test_parameter_node_options_are_registration_settings():
    from NePhiRegistrationLib.settings import RegistrationSettings

    settings_fields = set(RegistrationSettings.__dataclass_fields__)
    options = {"method", "preset", "iterations", "regularization", "gridSpacingMm", "affinePrealignment", "device",
               "modelPath", "keepTemporaryFiles"}
    assert options <= set(parameter_fields()) and options <= settings_fields


# -- packaging ---------------------------------------------------------------------------------------------------
def cmake_list(text, variable):
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not found"
    items = [i for i in match.group(1).split() if not i.startswith("#")]
    return {i.replace("${MODULE_NAME}", "NePhiRegistration") for i in items}


def module_python_files():
    return {str(p.relative_to(MODULE)).replace("\\", "/") for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts}


def module_resources():
    found = [p for p in (MODULE / "Resources").rglob("*") if p.is_file()]
    found += [p for p in (MODULE / "nephireg" / "models").glob("*") if p.suffix in (".pt", ".json")]
    return {str(p.relative_to(MODULE)).replace("\\", "/") for p in found}


def test_module_cmake_lists_every_python_file_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text()
    scripts, resources = cmake_list(text, "MODULE_PYTHON_SCRIPTS"), cmake_list(text, "MODULE_PYTHON_RESOURCES")
    missing_scripts = sorted(module_python_files() - scripts)
    missing_resources = sorted(module_resources() - resources)
    message = ""
    if missing_scripts:
        message += "add to MODULE_PYTHON_SCRIPTS in NePhiRegistration/CMakeLists.txt:\n" + "\n".join(
            f"  {s}" for s in missing_scripts) + "\n"
    if missing_resources:
        message += "add to MODULE_PYTHON_RESOURCES in NePhiRegistration/CMakeLists.txt:\n" + "\n".join(
            f"  {s}" for s in missing_resources) + "\n"
    assert not message, message
    stale = sorted(i for i in scripts | resources if not (MODULE / i).is_file())
    assert not stale, f"listed in NePhiRegistration/CMakeLists.txt but absent: {stale}"
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def root_cmake_variable(name):
    match = re.search(rf'set\({name}\s+"([^"]*)"\)', (REPO / "CMakeLists.txt").read_text())
    assert match, f"{name} not set in the top-level CMakeLists.txt"
    return match.group(1)


def test_top_level_cmake_is_an_extension_and_index_entry_matches():
    text = (REPO / "CMakeLists.txt").read_text()
    for line in ("project(NePhiRegistration)", "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                 "add_subdirectory(NePhiRegistration)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                 "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text
    for name in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                 "EXTENSION_SCREENSHOTURLS"):
        assert root_cmake_variable(name)
    entry = json.loads((REPO / "NePhiRegistration.json").read_text())
    depends = root_cmake_variable("EXTENSION_DEPENDS").split(";")
    assert sorted(entry["build_dependencies"]) == sorted(depends) == ["PyTorch"]
    assert entry["category"] == root_cmake_variable("EXTENSION_CATEGORY") == "Registration"
    assert entry["build_subdirectory"] == "." and entry["$schema"].startswith("https://raw.githubusercontent.com/")
    assert entry["scm_url"].removesuffix(".git") in root_cmake_variable("EXTENSION_HOMEPAGE")
    # the icon and screenshot URLs point at files that exist in this repository
    for url in (root_cmake_variable("EXTENSION_ICONURL"), *root_cmake_variable("EXTENSION_SCREENSHOTURLS").split()):
        relative = url.split("/main/", 1)[1]
        assert (REPO / relative).is_file(), f"{url} -> {relative} is not in the repository"


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_icons_license_and_sample_data():
    assert png_size(MODULE / "Resources" / "Icons" / "NePhiRegistration.png") == (128, 128)
    assert png_size(REPO / "Resources" / "NePhiRegistration.png") == (128, 128)
    license_text = (REPO / "LICENSE.txt").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text
    from NePhiRegistrationLib import sampledata

    for _node, path, checksum in sampledata.sampleFiles():
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        assert checksum == f"SHA256:{digest}", f"{path}: update the checksum in sampledata.py to {digest}"
    assert (MODULE / "Resources" / "Icons" / "NePhiDemoPair.png").is_file()


# -- import hygiene ----------------------------------------------------------------------------------------------
PURE_PARTS = ["NePhiRegistrationLib", "NePhiRegistrationLib.settings", "NePhiRegistrationLib.engine",
              "NePhiRegistrationLib.runner", "NePhiRegistrationLib.progress", "NePhiRegistrationLib.availability",
              "NePhiRegistrationLib.result", "NePhiRegistrationLib.selftest", "NePhiRegistrationLib.demodata",
              "NePhiRegistrationLib.sampledata"]


def test_pure_parts_import_without_slicer_and_without_torch():
    import subprocess

    code = (f"import sys; sys.path.insert(0, {str(MODULE)!r}); import importlib\n"
            f"for name in {PURE_PARTS!r}: importlib.import_module(name)\n"
            "from NePhiRegistrationLib import availability; availability.methodAvailability()\n"
            "heavy = sorted(m for m in ('torch', 'slicer', 'qt', 'vtk', 'SimpleITK') if m in sys.modules)\n"
            "print(','.join(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"imported at file scope: {done.stdout.strip()}"


def test_no_torch_anywhere_and_nothing_runs_at_file_scope():
    for path in SLICER_SIDE:
        tree = parse(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "torch" for a in node.names), f"{path.name} imports torch"
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "torch", f"{path.name} imports torch"
        for stmt in tree.body:
            allowed = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)
            is_docstring = isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
            is_main = isinstance(stmt, ast.If) and "__name__" in ast.unparse(stmt.test)
            assert isinstance(stmt, allowed) or is_docstring or is_main, f"{path.name}:{stmt.lineno} runs at import"
            if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and isinstance(stmt.value, ast.Call):
                callee = ast.unparse(stmt.value.func)
                allowed_calls = ("Grid", "object", "os.path.join", "os.path.dirname", "_")  # _: a translation lookup
                assert callee in allowed_calls, f"{path.name}:{stmt.lineno} calls {callee}"


# -- Slicer API names --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api():
    if not SLICER_API.is_dir():
        pytest.skip(f"{SLICER_API} (lists of Slicer API names) is absent")

    def read(name):
        return set((SLICER_API / name).read_text().split())

    return {"util": read("slicer_util_names.txt"), "classes": read("class_names.txt"),
            "methods": read("cpp_method_names.txt")}


@pytest.fixture(scope="module")
def library_methods():
    """UpperCamel methods of the VTK classes the module uses and of SimpleITK (both ship with Slicer)."""
    import importlib

    names = set()
    for module in ("vtkCommonCore", "vtkCommonDataModel", "vtkCommonTransforms", "vtkCommonMath", "vtkFiltersHybrid"):
        mod = importlib.import_module(f"vtkmodules.{module}")
        for cls in dir(mod):
            if cls.startswith("vtk"):
                names.update(x for x in dir(getattr(mod, cls)) if x[:1].isupper())
    sitk = pytest.importorskip("SimpleITK")
    for cls in dir(sitk):
        names.add(cls)
        names.update(x for x in dir(getattr(sitk, cls)) if x[:1].isupper())
    return names


def own_names():
    names = set()
    for path in SLICER_SIDE:
        for node in ast.walk(parse(path)):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
    return names


OUR_PACKAGES = ("NePhiRegistrationLib", "nephireg")
CLASS_PREFIXES = ("vtk", "qMRML", "qSlicer")


def module_aliases(tree):
    """Names bound to imported modules other than slicer/vtk/SimpleITK (their calls are not Slicer API)."""
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in OUR_PACKAGES:
            aliases.update(a.asname or a.name for a in node.names if a.name[:1].islower())
    return aliases - {"slicer", "vtk", "SimpleITK", "sitk"}


def slicer_api_uses(path):
    """(kind, name, line) for every Slicer-facing name in one file."""
    tree = parse(path)
    skip = module_aliases(tree)
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "slicer.util":
            uses += [("util", a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "slicer":
            uses += [("classes", a.name, node.lineno) for a in node.names if a.name.startswith(("vtk", "q"))]
        elif isinstance(node, ast.Attribute):
            chain = ast.unparse(node)
            if chain.startswith("slicer.util.") and chain.count(".") == 2:
                uses.append(("util", node.attr, node.lineno))
            elif chain.startswith("slicer.") and chain.count(".") == 1 and node.attr.startswith(CLASS_PREFIXES):
                uses.append(("classes", node.attr, node.lineno))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            method = node.func.attr
            receiver = ast.unparse(node.func.value)
            if method[:1].isupper() and receiver.split(".")[0] not in skip:
                uses.append(("method", method, node.lineno))
            if method in ("AddNewNodeByClass", "GetFirstNodeByClass", "IsA") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and str(arg.value).startswith("vtkMRML"):
                    uses.append(("classes", arg.value, node.lineno))
    return uses


def test_every_slicer_api_name_exists(api, library_methods):
    own = own_names()
    unknown = []
    checked = 0
    for path in SLICER_SIDE:
        for kind, name, line in slicer_api_uses(path):
            checked += 1
            if kind == "util" and name not in api["util"]:
                unknown.append(f"{path.name}:{line} slicer.util.{name}")
            elif kind == "classes" and name not in api["classes"]:
                unknown.append(f"{path.name}:{line} slicer.{name}")
            elif kind == "method" and name not in api["methods"] | library_methods | own:
                unknown.append(f"{path.name}:{line} .{name}()")
    assert checked > 80, f"only {checked} API uses found: the parser is broken"
    assert not unknown, "names not in Slicer's API lists, VTK or SimpleITK:\n" + "\n".join(unknown)


def test_the_api_check_catches_a_made_up_name(api, tmp_path):
    fake = tmp_path / "fake.py"
    fake.write_text("import slicer\nslicer.util.updateGridTransformFromArray(n, a)\nn.SetGridDirectionMatrixz(m)\n")
    uses = slicer_api_uses(fake)
    assert ("util", "updateGridTransformFromArray", 2) in uses and "updateGridTransformFromArray" not in api["util"]
    assert ("method", "SetGridDirectionMatrixz", 3) in uses and "SetGridDirectionMatrixz" not in api["methods"]


def test_ui_loads_in_real_qt_with_every_parameter_name():
    """Qt's own loader (PySide6, when installed; Slicer's custom widgets become plain QWidgets) reads the file
    and sets every SlicerParameterName dynamic property."""
    import importlib.util
    import os
    import subprocess

    if importlib.util.find_spec("PySide6") is None:
        pytest.skip("PySide6 is not installed (optional: pip install pyside6-essentials)")
    code = (
        "from PySide6.QtWidgets import QApplication, QWidget\n"
        "from PySide6.QtUiTools import QUiLoader\n"
        "from PySide6.QtCore import QFile\n"
        "app = QApplication([])\n"
        f"f = QFile({str(UI_FILE)!r}); f.open(QFile.ReadOnly)\n"
        "w = QUiLoader().load(f)\n"
        "assert w is not None\n"
        "print(sorted(c.property('SlicerParameterName') for c in w.findChildren(QWidget)"
        " if c.property('SlicerParameterName')))\n")
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(sorted(set(parameter_fields()) - set(MANUALLY_BOUND)))


def test_lib_strings_are_translated_in_the_callers_context(monkeypatch):
    """``_()`` of the Lib translates as ``slicer.i18n.tr`` would in the calling file (Slicer's ``tr`` takes the context
    from its caller's file, so calling it from the wrapper would put every string in the wrapper's context)."""
    import types

    from NePhiRegistrationLib.i18n import _

    seen = []
    i18n = types.ModuleType("slicer.i18n")
    i18n.getContext = lambda source_file: seen.append(source_file) or "context-of-" + Path(source_file).stem
    i18n.translate = lambda context, text: f"{context}:{text}"
    assert _("Register") == "Register"  # outside Slicer: as is
    monkeypatch.setitem(sys.modules, "slicer.i18n", i18n)
    assert _("Register") == f"context-of-{Path(__file__).stem}:Register"
    assert seen == [__file__]
