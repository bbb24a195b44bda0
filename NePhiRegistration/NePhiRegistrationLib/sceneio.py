"""Scene <-> files for one registration run. Slicer only (imported by ``logic.py`` inside Slicer).

Inputs are written with temporary storage nodes of their own, so the user's nodes are not re-pointed at temp
files.
Results are imported with ``slicer.util.loadTransform`` / ``loadVolume`` (route A of SLICER.md), then copied
into fresh nodes without storage nodes (the temp folder is deleted afterwards; a node still pointing at it would
lose its data when the scene is saved). If any step fails, every node created so far is removed, so a failed
import leaves the scene as it was.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import slicer

from NePhiRegistrationLib.result import (
    JACOBIAN_COLOR_NODE_ID,
    JACOBIAN_LEVEL,
    JACOBIAN_WINDOW,
    displacementToVtk,
    readDisplacementTransform,
)


@dataclass
class ImportOptions:
    createWarpedVolume: bool = False
    createJacobianVolume: bool = True
    applyTransformToMoving: bool = True
    showJacobianHeatmap: bool = True
    jacobianOpacity: float = 0.5


@dataclass
class ResultNodes:
    transform: object = None  # vtkMRMLTransformNode
    warpedVolume: object = None  # vtkMRMLScalarVolumeNode or None
    jacobianVolume: object = None  # vtkMRMLScalarVolumeNode or None
    metrics: Dict[str, object] = field(default_factory=dict)


def writeVolume(node, path: str) -> str:
    """Write a volume (scalar or label map) as uncompressed NRRD without touching the node's own storage."""
    if node.GetParentTransformNode() is not None:
        logging.warning(f"NePhiRegistration: {node.GetName()} is under a transform; the registration uses its "
                        "untransformed voxels (harden the transform first to include it).")
    # A temporary storage node of its own (MONAIAuto3DSeg's pattern): the node's own storage keeps its file name.
    storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    try:
        storage.SetFileName(path)
        storage.SetUseCompression(False)
        if not storage.WriteData(node):
            raise RuntimeError(f"Could not write {node.GetName()} to {path}")
    finally:
        slicer.mrmlScene.RemoveNode(storage)
    return path


def writeMask(maskNode, referenceVolume, path: str) -> str:
    """A label map mask as is; a segmentation exported (visible segments) on the reference volume's grid."""
    if maskNode.IsA("vtkMRMLLabelMapVolumeNode"):
        return writeVolume(maskNode, path)
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "NePhiRegistrationTempMask")
    try:
        exported = slicer.modules.segmentations.logic().ExportVisibleSegmentsToLabelmapNode(
            maskNode, labelmap, referenceVolume)
        if not exported:
            raise RuntimeError(f"Could not export segmentation {maskNode.GetName()} to a label map")
        return writeVolume(labelmap, path)
    finally:
        slicer.mrmlScene.RemoveNode(labelmap)


def writeInputs(folder: str, fixed, moving, fixedMask=None, movingMask=None) -> Dict[str, Optional[str]]:
    """Write the inputs into ``folder``; returns the engine's file arguments."""
    paths = {
        "fixed": writeVolume(fixed, os.path.join(folder, "fixed.nrrd")),
        "moving": writeVolume(moving, os.path.join(folder, "moving.nrrd")),
        "fixedMask": None,
        "movingMask": None,
    }
    if fixedMask is not None:
        paths["fixedMask"] = writeMask(fixedMask, fixed, os.path.join(folder, "fixed-mask.nrrd"))
    if movingMask is not None:
        paths["movingMask"] = writeMask(movingMask, moving, os.path.join(folder, "moving-mask.nrrd"))
    return paths


def _detachStorage(node) -> None:
    """Forget the (temp) file a node was read from; saving the scene then writes it anew."""
    storage = node.GetStorageNode()
    if storage is not None:
        node.SetAndObserveStorageNodeID(None)
        slicer.mrmlScene.RemoveNode(storage)


def _loadVolume(path: str, name: str):
    node = slicer.util.loadVolume(path, {"name": slicer.mrmlScene.GenerateUniqueName(name), "show": False})
    _detachStorage(node)
    return node


def _readTransform(path: str):
    """The file's resampling transform as a VTK transform (RAS): route A, Slicer's own ITK reader; route B (our
    conversion, ``result.displacementToVtk``) if that reader fails."""
    try:
        loaded = slicer.util.loadTransform(path)
    except Exception as exc:
        logging.warning(f"NePhiRegistration: loadTransform failed ({exc}); converting the displacement field directly")
        displacement, grid = readDisplacementTransform(path)
        image, direction = displacementToVtk(displacement, grid)
        transform = slicer.vtkOrientedGridTransform()
        transform.SetGridDirectionMatrix(direction)
        transform.SetDisplacementGridData(image)
        return transform
    try:
        source = loaded.GetTransformFromParent()
        transform = source.MakeTransform()
        transform.DeepCopy(source)
        return transform
    finally:
        _detachStorage(loaded)
        slicer.mrmlScene.RemoveNode(loaded)


def _transformInto(path: str, target, name: str, created: List):
    """Put the file's transform into ``target`` (or a new grid transform node)."""
    transform = _readTransform(path)
    if target is None:
        target = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLGridTransformNode",
                                                    slicer.mrmlScene.GenerateUniqueName(name))
        created.append(target)
    target.SetAndObserveTransformFromParent(transform)
    return target


def importResult(manifest: Dict, fixed, moving, outputTransform=None, options: Optional[ImportOptions] = None,
                 metrics: Optional[Dict] = None) -> ResultNodes:
    """Bring a finished run into the scene. ``outputTransform`` None = create a new node."""
    options = options or ImportOptions()
    files = manifest["files"]
    created: List = []
    try:
        result = ResultNodes(metrics=dict(metrics or {}))
        result.transform = _transformInto(files["transform"], outputTransform,
                                          f"{moving.GetName()} to {fixed.GetName()} (NePhi)", created)
        result.transform.SetNodeReferenceID(result.transform.GetMovingNodeReferenceRole(), moving.GetID())
        result.transform.SetNodeReferenceID(result.transform.GetFixedNodeReferenceRole(), fixed.GetID())
        if options.createWarpedVolume and files.get("warped") and os.path.exists(files["warped"]):
            result.warpedVolume = _loadVolume(files["warped"], f"{moving.GetName()} warped")
            created.append(result.warpedVolume)
        if options.createJacobianVolume or options.showJacobianHeatmap:
            result.jacobianVolume = _loadVolume(files["jacobian"], f"{moving.GetName()} Jacobian determinant")
            created.append(result.jacobianVolume)
            styleJacobian(result.jacobianVolume)
    except Exception:
        for node in created:
            slicer.mrmlScene.RemoveNode(node)
        raise
    showResult(result, fixed, moving, options)
    return result


def styleJacobian(volume) -> None:
    """Diverging colours over 0..2 centred on 1 (blue = compression, red = expansion)."""
    volume.CreateDefaultDisplayNodes()
    display = volume.GetDisplayNode()
    display.SetAndObserveColorNodeID(JACOBIAN_COLOR_NODE_ID)
    display.AutoWindowLevelOff()
    display.SetWindowLevel(JACOBIAN_WINDOW, JACOBIAN_LEVEL)
    display.SetInterpolate(False)


def showResult(result: ResultNodes, fixed, moving, options: ImportOptions) -> None:
    if options.applyTransformToMoving:
        moving.SetAndObserveTransformNodeID(result.transform.GetID())
    if options.showJacobianHeatmap and result.jacobianVolume is not None:
        slicer.util.setSliceViewerLayers(background=fixed, foreground=result.jacobianVolume,
                                         foregroundOpacity=options.jacobianOpacity)
    else:
        slicer.util.setSliceViewerLayers(background=fixed, foreground=moving, foregroundOpacity=0.5)


def setJacobianOpacity(opacity: float) -> None:
    slicer.util.setSliceViewerLayers(foregroundOpacity=opacity)


def showTransformGrid(transformNode, fixed, visible: bool = True) -> None:
    """Show the displacement as a deformed grid over the fixed volume in the slice views (and 3D)."""
    transformNode.CreateDefaultDisplayNodes()
    display = transformNode.GetDisplayNode()
    display.SetAndObserveRegionNode(fixed)
    display.SetVisualizationMode(slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID)
    display.SetVisibility2D(visible)
    display.SetVisibility(visible)
