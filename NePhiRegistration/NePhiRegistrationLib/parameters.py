"""The panel's state as a parameter node (saved with the scene, restored on load). Slicer only.

Field names equal the ``SlicerParameterName`` properties in ``Resources/UI/NePhiRegistration.ui`` (a pytest
checks both ways) and, for the options, the fields of :class:`settings.RegistrationSettings`.
"""

from typing import Annotated, Union

from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTransformNode,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

from nephireg import protocol
from NePhiRegistrationLib.settings import RegistrationSettings


@parameterNodeWrapper
class NePhiRegistrationParameterNode:
    # inputs
    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    # None must be in a union of node types, or the parameter node cannot hold "no mask" (Slicer's UnionSerializer)
    fixedMask: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None]
    movingMask: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None]
    method: Annotated[str, Choice(list(protocol.METHODS))] = "adam"
    preset: Annotated[str, Choice(list(protocol.PRESETS))] = "generic"
    # expert settings (0 = the preset's default)
    iterations: Annotated[int, WithinRange(0, 100000)] = 0
    regularization: Annotated[float, WithinRange(0.0, 100.0)] = 0.0
    gridSpacingMm: Annotated[float, WithinRange(0.0, 20.0)] = 0.0
    affinePrealignment: bool = True
    device: Annotated[str, Choice(list(protocol.DEVICES))] = "auto"
    # str, not Path: Path("") reads back as "." and the line edit would show "."; bound by widget.py, not connectGui
    modelPath: str = ""
    keepTemporaryFiles: bool = False
    keepEngineLoaded: bool = True
    # outputs
    outputTransform: vtkMRMLTransformNode
    createWarpedVolume: bool = False
    createJacobianVolume: bool = True
    applyTransformToMoving: bool = True
    showJacobianHeatmap: bool = True
    jacobianOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    importInverse: bool = False  # also load the inverse map (moving -> fixed) as a second transform node


def settingsFromParameterNode(node: NePhiRegistrationParameterNode) -> RegistrationSettings:
    """The engine options held by the parameter node."""
    model = str(node.modelPath or "")
    model = "" if model in ("", ".") else model  # "." = empty in scenes saved when this was a Path
    return RegistrationSettings(
        method=node.method,
        preset=node.preset,
        iterations=int(node.iterations),
        regularization=float(node.regularization),
        gridSpacingMm=float(node.gridSpacingMm),
        affinePrealignment=bool(node.affinePrealignment),
        device=node.device,
        modelPath=model,
        writeWarped=bool(node.createWarpedVolume),
        keepTemporaryFiles=bool(node.keepTemporaryFiles),
        keepEngineLoaded=bool(node.keepEngineLoaded),
    )
