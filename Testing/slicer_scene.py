"""Real MRML scenes for the Slicer-side tests, from Kitware's ``slicer-core`` and ``trame-slicer`` wheels.

``trame_slicer.core.SlicerApp`` builds a scene the way Slicer's application does (application logic, colour,
volumes, segmentations logics); the transforms logic is registered here as Slicer registers it. Slicer's file
colour tables (the heatmap's ``DivergingBlueRed``) are not in the wheel: :func:`new_app` loads them from
``../shared/slicer-colorfiles`` when asked, and skips the test with the reason when that folder is absent.
Tests needing these packages (Python >= 3.10; the ``test`` extras install them) skip with the reason without them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "NePhiRegistration"
COLOR_FILES = REPO.parent / "shared" / "slicer-colorfiles"

if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))


def require_slicer_core() -> None:
    """Skip (with the reason) where Slicer's core libraries are not installed."""
    pytest.importorskip("slicer_core", reason="needs slicer-core (pip install -e '.[test]', Python >= 3.10)")
    pytest.importorskip("trame_slicer", reason="needs trame-slicer (pip install -e '.[test]', Python >= 3.10)")


def load_sceneio():
    """``NePhiRegistrationLib.sceneio`` bound to the real ``slicer`` package (another test may have imported it
    under a stand-in ``slicer`` for Qt-only code)."""
    import importlib

    require_slicer_core()
    for name in ("NePhiRegistrationLib.sceneio",):
        module = sys.modules.get(name)
        if module is not None and not hasattr(getattr(module, "slicer", None), "vtkMRMLScene"):
            del sys.modules[name]
    return importlib.import_module("NePhiRegistrationLib.sceneio")


def new_app(color_files: bool = False) -> SimpleNamespace:
    """``app`` (trame-slicer SlicerApp), ``scene`` and ``logics`` (``sceneio.SceneLogics``) of a fresh scene."""
    require_slicer_core()
    import slicer
    from trame_slicer.core import SlicerApp

    sceneio = load_sceneio()
    app = SlicerApp()
    transforms = app.register_module_logic(slicer.vtkSlicerTransformLogic(), logic_name="Transforms")
    if color_files:
        if not (COLOR_FILES / "share" / "ColorFiles").is_dir():
            pytest.skip(f"needs Slicer's colour files at {COLOR_FILES} (../shared, absent on a fresh clone)")
        app.app_logic.SetHomeDirectory(str(COLOR_FILES.resolve()))
        app.app_logic.SetShareDirectory("share")
        colors = slicer.vtkSlicerColorLogic()
        colors.SetMRMLApplicationLogic(app.app_logic)
        colors.SetMRMLScene(app.scene)
        colors.AddDefaultColorNodes()
        # kept alive with the app: a colour logic that is destroyed removes its default colour nodes again
        app.app_logic.SetModuleLogic("Colors", colors)
        app.file_color_logic = colors
    logics = sceneio.SceneLogics(app.scene, transforms, app.volumes_logic, app.segmentations_logic)
    return SimpleNamespace(app=app, scene=app.scene, logics=logics, sceneio=sceneio)


def add_volume(scene, array_kji: np.ndarray, ijk_to_ras: np.ndarray, name: str,
               class_name: str = "vtkMRMLScalarVolumeNode"):
    """A volume node holding ``array_kji`` ([k, j, i]) with the 4x4 ``ijk_to_ras`` (what
    ``slicer.util.addVolumeFromArray`` does, on the given scene)."""
    import vtk
    from vtk.util import numpy_support

    array = np.ascontiguousarray(array_kji)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = numpy_support.numpy_to_vtk(array.reshape(-1), deep=True)
    image.GetPointData().SetScalars(scalars)
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetIJKToRASMatrix(matrix4(ijk_to_ras))
    node.SetAndObserveImageData(image)
    node.CreateDefaultDisplayNodes()
    return node


def matrix4(array: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row, column]))
    return matrix


def array_of(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def add_segmentation(scene, segmentations_logic, mask_kji: np.ndarray, ijk_to_ras: np.ndarray, name: str = "mask",
                     transform_id: Optional[str] = None):
    """A segmentation with one segment drawn where ``mask_kji`` is 1 (imported from a label map, as a user's
    drawing would be stored), shown (display node), optionally under a transform."""
    labelmap = add_volume(scene, mask_kji.astype(np.uint8), ijk_to_ras, f"{name} label", "vtkMRMLLabelMapVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation.CreateDefaultDisplayNodes()
    if not segmentations_logic.ImportLabelmapToSegmentationNode(labelmap, segmentation):
        raise RuntimeError("label map import failed")
    for index in range(labelmap.GetNumberOfDisplayNodes()):
        scene.RemoveNode(scene.GetNodeByID(labelmap.GetNthDisplayNodeID(index)))
    scene.RemoveNode(labelmap)
    if transform_id:
        segmentation.SetAndObserveTransformNodeID(transform_id)
    return segmentation


def node_ids(scene) -> set:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
