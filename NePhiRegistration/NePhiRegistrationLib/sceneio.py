"""Scene <-> files for one registration run. Slicer only (imported by ``logic.py`` inside Slicer).

Inputs are written with temporary storage nodes of their own (never added to the scene), so the user's nodes are
not re-pointed at temp files; a segmentation mask is exported on its volume's full grid and every helper node of
the export is removed again. A volume under a transform the run would ignore or replace is refused with a clear
message (:func:`checkInputTransforms`).
Results are imported with ``slicer.util.loadTransform`` / ``loadVolume`` (route A of SLICER.md); the loaded
transform object is handed to the output node and the volumes lose their storage nodes (the temp folder is
deleted afterwards; a node still pointing at it would lose its data when the scene is saved). The user's output
node is written last; if any earlier step fails, every node created so far is removed, so a failed import
leaves the scene as it was.
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


RESULT_ATTRIBUTE = "NePhiRegistration.Result"  # set on every transform node a run writes


def _parentProblem(volume, role: str, moving=None) -> str:
    """Why ``volume``'s parent transform blocks a run ("" = none). The engine registers the voxels as stored, so a
    user's transform above an input would be ignored (fixed) or silently replaced (moving). Only a previous NePhi
    result of this same moving volume may be replaced (re-running with other settings)."""
    parent = volume.GetParentTransformNode()
    if parent is None:
        return ""
    if (moving is not None and parent.GetAttribute(RESULT_ATTRIBUTE) == "1"
            and parent.GetNodeReferenceID(parent.GetMovingNodeReferenceRole()) == moving.GetID()
            and parent.GetParentTransformNode() is None):
        return ""
    return (f"The {role} volume '{volume.GetName()}' is under the transform '{parent.GetName()}'. The registration "
            "uses the voxels as stored, so that transform would be ignored or replaced. Harden it (Data module: "
            "right-click the volume > Harden transform) or remove it, then register again.")


def checkInputTransforms(fixed, moving) -> None:
    """Raise ValueError when the fixed or moving volume is under a transform the run would ignore or replace."""
    problem = _parentProblem(fixed, "fixed") or _parentProblem(moving, "moving", moving)
    if problem:
        raise ValueError(problem)


def writeVolume(node, path: str) -> str:
    """Write a volume (scalar or label map) as uncompressed NRRD without touching the node's own storage."""
    # A storage node that never enters the scene (CreateNodeByClass + UnRegister, as SlicerTotalSegmentator
    # does): the user's node keeps its own file name and the scene sees no add/remove events.
    storage = slicer.mrmlScene.CreateNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    try:
        storage.SetFileName(path)
        storage.SetUseCompression(False)
        if not storage.WriteData(node):
            raise RuntimeError(f"Could not write {node.GetName()} to {path}")
    finally:
        storage.UnRegister(None)  # CreateNodeByClass hands Python an owning reference
    return path


def _exportedNodeIDs(labelmap) -> List[str]:
    """IDs of the display and colour nodes the segmentation export added for ``labelmap``."""
    ids = []
    for index in range(labelmap.GetNumberOfDisplayNodes()):
        display = slicer.mrmlScene.GetNodeByID(labelmap.GetNthDisplayNodeID(index))
        if display is None:
            continue
        ids.append(display.GetID())
        if display.GetColorNodeID():
            color = slicer.mrmlScene.GetNodeByID(display.GetColorNodeID())
            # only the "<name>_ColorTable" the export made, never a shared colour node (e.g. GenericAnatomyColors)
            if color is not None and color.GetName() == f"{labelmap.GetName()}_ColorTable":
                ids.append(color.GetID())
    return ids


def writeMask(maskNode, referenceVolume, path: str) -> str:
    """A label map mask as is; a segmentation's visible segments exported on the reference volume's full grid
    (the engine rejects a mask whose size/origin differ from its image). Every node the export adds (label map,
    its display node, its ``<name>_ColorTable``) is removed again, also when the export fails."""
    if maskNode.IsA("vtkMRMLLabelMapVolumeNode"):
        return writeVolume(maskNode, path)
    if maskNode.GetDisplayNode() is None:  # the export reads the visible segments from the display node
        raise ValueError(f"The segmentation '{maskNode.GetName()}' has no display node; show it once in the "
                         "Segmentations module (or use a label map mask).")
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "NePhiRegistrationTempMask")
    try:
        exported = slicer.modules.segmentations.logic().ExportVisibleSegmentsToLabelmapNode(
            maskNode, labelmap, referenceVolume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        if not exported:
            raise RuntimeError(f"Could not export segmentation {maskNode.GetName()} to a label map")
        return writeVolume(labelmap, path)
    finally:
        extra = _exportedNodeIDs(labelmap)
        slicer.mrmlScene.RemoveNode(labelmap)
        for nodeID in extra:
            node = slicer.mrmlScene.GetNodeByID(nodeID)
            if node is not None:
                slicer.mrmlScene.RemoveNode(node)


def writeInputs(folder: str, fixed, moving, fixedMask=None, movingMask=None) -> Dict[str, Optional[str]]:
    """Write the inputs into ``folder``; returns the engine's file arguments. Raises ValueError (before writing
    anything) when an input volume is under a transform the run would ignore or replace."""
    checkInputTransforms(fixed, moving)
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
    conversion, ``result.displacementToVtk``) if that reader fails. The loaded node is removed at once; the
    transform object it held is returned as is (no DeepCopy: a second copy of the grid would double the memory)."""
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
        return loaded.GetTransformFromParent()  # our reference keeps it alive after the node is gone
    finally:
        _detachStorage(loaded)
        slicer.mrmlScene.RemoveNode(loaded)


def importResult(manifest: Dict, fixed, moving, outputTransform=None, options: Optional[ImportOptions] = None,
                 metrics: Optional[Dict] = None) -> ResultNodes:
    """Bring a finished run into the scene. ``outputTransform`` None = create a new node.

    Everything that can fail (reading the files, loading the volumes) happens before the user's output node is
    written, so a failed import leaves that node (and the scene) as it was."""
    options = options or ImportOptions()
    files = manifest["files"]
    if options.applyTransformToMoving:  # the moving volume may have been put under a transform during the run
        checkInputTransforms(fixed, moving)
    created: List = []
    try:
        result = ResultNodes(metrics=dict(metrics or {}))
        transform = _readTransform(files["transform"])
        if options.createWarpedVolume and files.get("warped") and os.path.exists(files["warped"]):
            result.warpedVolume = _loadVolume(files["warped"], f"{moving.GetName()} warped")
            created.append(result.warpedVolume)
        if options.createJacobianVolume or options.showJacobianHeatmap:
            result.jacobianVolume = _loadVolume(files["jacobian"], f"{moving.GetName()} Jacobian determinant")
            created.append(result.jacobianVolume)
            styleJacobian(result.jacobianVolume)
        target = outputTransform
        if target is None:
            target = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLGridTransformNode", slicer.mrmlScene.GenerateUniqueName(
                f"{moving.GetName()} to {fixed.GetName()} (NePhi)"))
            created.append(target)
    except Exception:
        for node in created:
            slicer.mrmlScene.RemoveNode(node)
        raise
    # last: the user's node changes only once everything else is in place
    target.SetAndObserveTransformFromParent(transform)
    target.SetNodeReferenceID(target.GetMovingNodeReferenceRole(), moving.GetID())
    target.SetNodeReferenceID(target.GetFixedNodeReferenceRole(), fixed.GetID())
    target.SetAttribute(RESULT_ATTRIBUTE, "1")
    result.transform = target
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
