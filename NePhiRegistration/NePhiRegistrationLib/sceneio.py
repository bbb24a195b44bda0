"""Scene <-> files for one registration run, through the scene and module logics it is given (:class:`SceneLogics`).

Inside Slicer the logics are ``slicer.mrmlScene`` and the modules' logics (:func:`slicerLogics`); the tests pass the
same classes from Kitware's ``slicer-core`` wheel, so this code is tested on Slicer's own MRML and Logic libraries.

Inputs are written with temporary storage nodes that never enter the scene, so the user's nodes are not re-pointed
at temp files. A segmentation mask is exported in its own coordinates onto its volume's full stored grid, and every
node the export adds (label map, display node, colour table) is removed again. A moving volume under a linear
transform is registered starting from it (``--initial-transform``); the result then replaces that parent with the
composed map. Any other transform above an input, or above the output node, is refused with a clear message.

Results are read with the readers Slicer's own file dialogs use - the transforms logic's ``AddTransform`` and the
volumes logic's ``AddArchetypeVolume`` - not the IO manager (no File > Recent entries for deleted temp files, no
progress dialog). The grid transform is set to linear interpolation: the engine scored and warped with the
trilinear field, and Slicer's reader defaults to cubic (up to 0.1 mm apart between voxel centres). Loaded nodes
lose their storage nodes (the temp folder is deleted afterwards). The user's output node is written last; if
anything earlier fails, every node created so far is removed, so a failed import leaves the scene as it was.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import slicer
import vtk

from NePhiRegistrationLib.i18n import _
from NePhiRegistrationLib.result import (
    JACOBIAN_COLOR_NODE_ID,
    JACOBIAN_LEVEL,
    JACOBIAN_WINDOW,
    displacementToVtk,
    readDisplacementTransform,
)

RESULT_ATTRIBUTE = "NePhiRegistration.Result"  # set on every transform node a run writes
INITIAL_TRANSFORM_ROLE = "NePhiRegistration.InitialTransform"  # result -> the linear transform it started from
INITIAL_TRANSFORM_FILE = "initial-transform.tfm"


@dataclass
class SceneLogics:
    """The scene and the module logics the Lib works through (Slicer: :func:`slicerLogics`)."""

    scene: object  # vtkMRMLScene
    transforms: object  # vtkSlicerTransformLogic
    volumes: object  # vtkSlicerVolumesLogic
    segmentations: object  # vtkSlicerSegmentationsModuleLogic


def slicerLogics() -> SceneLogics:
    """The application's scene and logics (inside Slicer only)."""
    return SceneLogics(slicer.mrmlScene, slicer.modules.transforms.logic(), slicer.modules.volumes.logic(),
                       slicer.modules.segmentations.logic())


@dataclass
class ImportOptions:
    createWarpedVolume: bool = False
    createJacobianVolume: bool = True
    applyTransformToMoving: bool = True
    showJacobianHeatmap: bool = True
    jacobianOpacity: float = 0.5
    importInverse: bool = False  # the inverse map (files["inverse"], moving -> fixed) as a second transform node


@dataclass
class ResultNodes:
    transform: object = None  # vtkMRMLTransformNode
    warpedVolume: object = None  # vtkMRMLScalarVolumeNode or None
    jacobianVolume: object = None  # vtkMRMLScalarVolumeNode or None
    inverseTransform: object = None  # vtkMRMLTransformNode or None
    metrics: Dict[str, object] = field(default_factory=dict)


# -- which transforms a run may start from or replace ------------------------------------------------------------
def _isPreviousResult(transformNode, moving) -> bool:
    """A NePhi result of this same moving volume, itself under no transform (re-running replaces it)."""
    return (transformNode.GetAttribute(RESULT_ATTRIBUTE) == "1"
            and transformNode.GetNodeReferenceID(transformNode.GetMovingNodeReferenceRole()) == moving.GetID()
            and transformNode.GetParentTransformNode() is None)


def initialTransformNode(moving):
    """The linear transform a run of ``moving`` starts from (None = none): its parent when that is linear all the
    way to the world, or - when the parent is a previous NePhi result - the linear transform that result started
    from (still in the scene and still linear)."""
    parent = moving.GetParentTransformNode()
    if parent is None:
        return None
    if _isPreviousResult(parent, moving):
        earlier = parent.GetNodeReference(INITIAL_TRANSFORM_ROLE)
        return earlier if earlier is not None and earlier.IsTransformToWorldLinear() else None
    return parent if parent.IsTransformToWorldLinear() else None


def _harden(role: str, volume, parent) -> str:
    return _("The {role} volume '{volume}' is under the transform '{transform}'. The registration uses the voxels "
             "as stored, so that transform would be ignored or replaced. Harden it (Data module: right-click the "
             "volume > Harden transform) or remove it, then register again.").format(
        role=role, volume=volume.GetName(), transform=parent.GetName())


def inputTransformProblem(fixed, moving, outputTransform=None) -> str:
    """Why the transforms around a run block it ("" = none). The fixed volume must be under no transform; the
    moving volume under none, a linear one (the run starts from it) or its own previous result (replaced); the
    output node under none (the moving volume would be shown through parent o result)."""
    fixedParent = fixed.GetParentTransformNode()
    if fixedParent is not None:
        return _harden(_("fixed"), fixed, fixedParent)
    movingParent = moving.GetParentTransformNode()
    if (movingParent is not None and not _isPreviousResult(movingParent, moving)
            and not movingParent.IsTransformToWorldLinear()):
        return _harden(_("moving"), moving, movingParent)
    if outputTransform is not None and outputTransform.GetParentTransformNode() is not None:
        return _("The output transform '{output}' is under the transform '{parent}', so the moving volume would be "
                 "shown through both. Choose an output transform that is under no transform (or create a new "
                 "one).").format(output=outputTransform.GetName(),
                                 parent=outputTransform.GetParentTransformNode().GetName())
    return ""


def checkInputTransforms(fixed, moving, outputTransform=None) -> None:
    """Raise ValueError when :func:`inputTransformProblem` names a problem."""
    problem = inputTransformProblem(fixed, moving, outputTransform)
    if problem:
        raise ValueError(problem)


# -- inputs -> files ---------------------------------------------------------------------------------------------
def _writeWithStorage(logics: SceneLogics, storageClass: str, node, path: str) -> str:
    # A storage node that never enters the scene (CreateNodeByClass + UnRegister, as SlicerTotalSegmentator
    # does): the user's node keeps its own file name and the scene sees no add/remove events.
    storage = logics.scene.CreateNodeByClass(storageClass)
    try:
        storage.SetFileName(path)
        if storage.IsA("vtkMRMLVolumeArchetypeStorageNode"):
            storage.SetUseCompression(False)
        if not storage.WriteData(node):
            raise RuntimeError(_("Could not write {name} to {path}").format(name=node.GetName(), path=path))
    finally:
        storage.UnRegister(None)  # CreateNodeByClass hands Python an owning reference
    return path


def writeVolume(logics: SceneLogics, node, path: str) -> str:
    """Write a volume (scalar or label map) as uncompressed NRRD without touching the node's own storage."""
    return _writeWithStorage(logics, "vtkMRMLVolumeArchetypeStorageNode", node, path)


def writeInitialTransform(logics: SceneLogics, transformNode, path: str) -> str:
    """Write ``transformNode``'s transform to the world (linear) as an ITK file: Slicer's transform writer stores
    the resampling direction (FromParent: fixed -> moving) in LPS, as ``--initial-transform`` takes it."""
    toWorld = vtk.vtkMatrix4x4()
    transformNode.GetMatrixTransformToWorld(toWorld)
    flat = slicer.vtkMRMLLinearTransformNode()  # the whole chain as one node, outside the scene
    flat.SetMatrixTransformToParent(toWorld)
    flat.SetName(transformNode.GetName())
    return _writeWithStorage(logics, "vtkMRMLTransformStorageNode", flat, path)


def _colorNodeIDs(scene) -> set:
    nodes = scene.GetNodesByClass("vtkMRMLColorNode")
    return {nodes.GetItemAsObject(index).GetID() for index in range(nodes.GetNumberOfItems())}


def _exportReference(logics: SceneLogics, maskNode, referenceVolume):
    """A scene volume with ``referenceVolume``'s stored grid (its image shared, not copied) under the mask's own
    parent transform: the export then maps the segments in their own coordinates, so neither a transform above
    the mask nor one above the volume (a previous result, a pre-alignment) shifts the exported mask."""
    reference = logics.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "NePhiRegistrationTempReference")
    matrix = vtk.vtkMatrix4x4()
    referenceVolume.GetIJKToRASMatrix(matrix)
    reference.SetIJKToRASMatrix(matrix)
    reference.SetAndObserveImageData(referenceVolume.GetImageData())
    reference.SetAndObserveTransformNodeID(maskNode.GetTransformNodeID())
    return reference


def writeMask(logics: SceneLogics, maskNode, referenceVolume, path: str) -> str:
    """A label map mask as is; a segmentation's visible segments exported on the reference volume's full grid
    (the engine rejects a mask whose size/origin differ from its image). Every node the export adds (label map,
    display node, colour tables - ``<segmentation>_ColorTable`` on Slicer 5.10+) is removed again, also when the
    export fails. A segmentation with no visible segment is refused (the export would take all of them)."""
    if maskNode.IsA("vtkMRMLLabelMapVolumeNode"):
        return writeVolume(logics, maskNode, path)
    display = maskNode.GetDisplayNode()
    if display is None:  # the export reads the visible segments from the display node
        raise ValueError(_("The segmentation '{name}' has no display node; show it once in the Segmentations "
                           "module (or use a label map mask).").format(name=maskNode.GetName()))
    visibleIDs = vtk.vtkStringArray()
    display.GetVisibleSegmentIDs(visibleIDs)
    visible = [visibleIDs.GetValue(index) for index in range(visibleIDs.GetNumberOfValues())]
    if not visible:
        raise ValueError(_("The segmentation '{name}' has no visible segment; show the segments to use as the "
                           "mask.").format(name=maskNode.GetName()))
    scene = logics.scene
    colorsBefore = _colorNodeIDs(scene)
    added = [scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "NePhiRegistrationTempMask")]
    try:
        added.append(_exportReference(logics, maskNode, referenceVolume))
        exported = logics.segmentations.ExportSegmentsToLabelmapNode(
            maskNode, visible, added[0], added[1], slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        if not exported:
            raise RuntimeError(_("Could not export segmentation {name} to a label map").format(
                name=maskNode.GetName()))
        return writeVolume(logics, added[0], path)
    finally:
        labelmap = added[0]
        displayIDs = [labelmap.GetNthDisplayNodeID(i) for i in range(labelmap.GetNumberOfDisplayNodes())]
        for node in added:
            scene.RemoveNode(node)
        newColors = _colorNodeIDs(scene) - colorsBefore
        for nodeID in displayIDs + sorted(newColors):
            node = scene.GetNodeByID(nodeID)
            if node is not None:
                scene.RemoveNode(node)


def writeInputs(logics: SceneLogics, folder: str, fixed, moving, fixedMask=None, movingMask=None,
                outputTransform=None) -> Dict[str, Optional[str]]:
    """Write the inputs into ``folder``; returns the engine's file arguments (``initialTransform``: the moving
    volume's linear parent, or None). Raises ValueError (before writing anything) when a transform around the
    run blocks it (:func:`inputTransformProblem`)."""
    checkInputTransforms(fixed, moving, outputTransform)
    paths = {
        "fixed": writeVolume(logics, fixed, os.path.join(folder, "fixed.nrrd")),
        "moving": writeVolume(logics, moving, os.path.join(folder, "moving.nrrd")),
        "fixedMask": None,
        "movingMask": None,
        "initialTransform": None,
    }
    if fixedMask is not None:
        paths["fixedMask"] = writeMask(logics, fixedMask, fixed, os.path.join(folder, "fixed-mask.nrrd"))
    if movingMask is not None:
        paths["movingMask"] = writeMask(logics, movingMask, moving, os.path.join(folder, "moving-mask.nrrd"))
    initial = initialTransformNode(moving)
    if initial is not None:
        paths["initialTransform"] = writeInitialTransform(logics, initial, os.path.join(folder, INITIAL_TRANSFORM_FILE))
    return paths


# -- files -> scene ----------------------------------------------------------------------------------------------
def _detachStorage(scene, node) -> None:
    """Forget the (temp) file a node was read from; saving the scene then writes it anew."""
    storage = node.GetStorageNode()
    if storage is not None:
        node.SetAndObserveStorageNodeID(None)
        scene.RemoveNode(storage)


def _loadVolume(logics: SceneLogics, path: str, name: str):
    """A scalar volume read by the volumes logic; it makes ``name`` unique itself (so no second "_1")."""
    node = logics.volumes.AddArchetypeVolume(path, name, 0)
    if node is None:
        raise RuntimeError(_("Could not read the volume {path}").format(path=path))
    _detachStorage(logics.scene, node)
    return node


def _linear(transform):
    """Trilinear interpolation on a grid transform (the field the engine scored); other transforms as they are."""
    if transform is not None and transform.IsA("vtkOrientedGridTransform"):
        transform.SetInterpolationModeToLinear()
    return transform


def readTransform(logics: SceneLogics, path: str):
    """The file's resampling transform as a VTK transform (RAS), linearly interpolated: read by the transforms
    logic (Slicer's ITK reader); our conversion (``result.displacementToVtk``) if that reader fails. The loaded
    node is removed at once; the transform object it held is returned as is (no copy of the grid)."""
    loaded = logics.transforms.AddTransform(path, logics.scene)
    if loaded is None:
        logging.warning(f"NePhiRegistration: the transforms logic could not read {path}; converting the "
                        "displacement field directly")
        displacement, grid = readDisplacementTransform(path)
        image, direction = displacementToVtk(displacement, grid)
        transform = slicer.vtkOrientedGridTransform()
        transform.SetGridDirectionMatrix(direction)
        transform.SetDisplacementGridData(image)
        return _linear(transform)
    try:
        return _linear(loaded.GetTransformFromParent())  # our reference keeps it alive after the node is gone
    finally:
        _detachStorage(logics.scene, loaded)
        logics.scene.RemoveNode(loaded)


def _newTransformNode(scene, name: str, transform, fixedRole, movingRole):
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", scene.GenerateUniqueName(name))
    node.SetAndObserveTransformFromParent(transform)
    node.SetNodeReferenceID(node.GetMovingNodeReferenceRole(), movingRole.GetID())
    node.SetNodeReferenceID(node.GetFixedNodeReferenceRole(), fixedRole.GetID())
    return node


def importResult(logics: SceneLogics, manifest: Dict, fixed, moving, outputTransform=None,
                 options: Optional[ImportOptions] = None, metrics: Optional[Dict] = None) -> ResultNodes:
    """Bring a finished run into the scene. ``outputTransform`` None = create a new node.

    Everything that can fail (reading the files, loading the volumes) happens before the user's output node is
    written, so a failed import leaves that node (and the scene) as it was. The moving volume's linear parent (the
    run's initial transform) is replaced by the result, which holds the composed map."""
    options = options or ImportOptions()
    files = manifest["files"]
    scene = logics.scene
    checkInputTransforms(fixed, moving, outputTransform)  # transforms may have been changed during the run
    initial = initialTransformNode(moving)
    created: List = []
    try:
        result = ResultNodes(metrics=dict(metrics or {}))
        transform = readTransform(logics, files["transform"])
        if options.createWarpedVolume and files.get("warped") and os.path.exists(files["warped"]):
            result.warpedVolume = _loadVolume(logics, files["warped"], f"{moving.GetName()} warped")
            created.append(result.warpedVolume)
        if options.createJacobianVolume or options.showJacobianHeatmap:
            result.jacobianVolume = _loadVolume(logics, files["jacobian"], f"{moving.GetName()} Jacobian determinant")
            created.append(result.jacobianVolume)
            styleJacobian(result.jacobianVolume)
        if options.importInverse:
            if not files.get("inverse"):
                raise RuntimeError(_("The engine wrote no inverse transform (result.json lists none)."))
            result.inverseTransform = _newTransformNode(scene, f"{fixed.GetName()} to {moving.GetName()} (NePhi "
                                                        "inverse)", readTransform(logics, files["inverse"]),
                                                        fixedRole=moving, movingRole=fixed)
            created.append(result.inverseTransform)
        target = outputTransform
        if target is None:
            target = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", scene.GenerateUniqueName(
                f"{moving.GetName()} to {fixed.GetName()} (NePhi)"))
            created.append(target)
    except Exception:
        for node in created:
            scene.RemoveNode(node)
        raise
    # last: the user's node changes only once everything else is in place
    target.SetAndObserveTransformFromParent(transform)
    target.SetNodeReferenceID(target.GetMovingNodeReferenceRole(), moving.GetID())
    target.SetNodeReferenceID(target.GetFixedNodeReferenceRole(), fixed.GetID())
    target.SetNodeReferenceID(INITIAL_TRANSFORM_ROLE, initial.GetID() if initial is not None else None)
    target.SetAttribute(RESULT_ATTRIBUTE, "1")
    result.transform = target
    showResult(scene, result, fixed, moving, options)
    return result


# -- display -----------------------------------------------------------------------------------------------------
def styleJacobian(volume) -> None:
    """Diverging colours over 0..2 centred on 1 (blue = compression, red = expansion)."""
    volume.CreateDefaultDisplayNodes()
    display = volume.GetDisplayNode()
    display.SetAndObserveColorNodeID(JACOBIAN_COLOR_NODE_ID)
    display.AutoWindowLevelOff()
    display.SetWindowLevel(JACOBIAN_WINDOW, JACOBIAN_LEVEL)
    display.SetInterpolate(False)


def setSliceLayers(scene, background=None, foreground=None, foregroundOpacity: Optional[float] = None) -> None:
    """Set every slice view's layers (what ``slicer.util.setSliceViewerLayers`` does, on the given scene)."""
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for index in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(index)
        if background is not None:
            composite.SetBackgroundVolumeID(background.GetID())
        if foreground is not None:
            composite.SetForegroundVolumeID(foreground.GetID())
        if foregroundOpacity is not None:
            composite.SetForegroundOpacity(foregroundOpacity)


def showResult(scene, result: ResultNodes, fixed, moving, options: ImportOptions) -> None:
    if options.applyTransformToMoving:
        moving.SetAndObserveTransformNodeID(result.transform.GetID())
    if options.showJacobianHeatmap and result.jacobianVolume is not None:
        setSliceLayers(scene, background=fixed, foreground=result.jacobianVolume,
                       foregroundOpacity=options.jacobianOpacity)
    else:
        setSliceLayers(scene, background=fixed, foreground=moving, foregroundOpacity=0.5)


def setJacobianOpacity(scene, opacity: float) -> None:
    setSliceLayers(scene, foregroundOpacity=opacity)


def showTransformGrid(transformNode, fixed, visible: bool = True) -> None:
    """Show the displacement as a deformed grid over the fixed volume in the slice views (and 3D)."""
    transformNode.CreateDefaultDisplayNodes()
    display = transformNode.GetDisplayNode()
    display.SetAndObserveRegionNode(fixed)
    display.SetVisualizationMode(slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID)
    display.SetVisibility2D(visible)
    display.SetVisibility(visible)


def holdsTransform(node) -> bool:
    """True when a transform node already holds something other than identity (a result, a user's matrix). A fresh
    grid or B-spline node (its displacement grid or coefficient image holds no point, or only zeros) holds
    nothing."""
    if node.IsLinear():
        matrix = vtk.vtkMatrix4x4()
        node.GetMatrixTransformToParent(matrix)
        return any(abs(matrix.GetElement(r, c) - (1.0 if r == c else 0.0)) > 1e-9 for r in range(4) for c in range(4))
    transform = node.GetTransformFromParent()
    if transform is None:
        return False
    if transform.IsA("vtkOrientedGridTransform") or transform.IsA("vtkGridTransform"):
        return _nonZero(transform.GetDisplacementGrid())
    if transform.IsA("vtkOrientedBSplineTransform") or transform.IsA("vtkBSplineTransform"):
        return _nonZero(transform.GetCoefficientData())
    return True


def _nonZero(image) -> bool:
    """True when ``image`` has point scalars with a value other than 0 (a fresh node's grid is 1 zero voxel)."""
    scalars = image.GetPointData().GetScalars() if image is not None else None
    if scalars is None:
        return False
    return any(scalars.GetRange(component) != (0.0, 0.0) for component in range(scalars.GetNumberOfComponents()))


def defaultFixedVolume(scene):
    """The first plain scalar volume (the class the fixed-volume selector lists: no label map, vector volume or
    other subclass), or None."""
    volumes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    for index in range(volumes.GetNumberOfItems()):
        node = volumes.GetItemAsObject(index)
        if node.GetClassName() == "vtkMRMLScalarVolumeNode":
            return node
    return None
