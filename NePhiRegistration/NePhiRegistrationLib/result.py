"""Engine results -> VTK objects and the summary text. numpy + vtk (both ship with Slicer); no slicer import.

The engine writes an ITK displacement field (LPS mm, on the fixed grid, resampling direction fixed -> moving).
Slicer loads it with its transforms logic (``AddTransform``, route A, ``sceneio.py``); this module is route B,
used as a fallback and to check the geometry in tests: the same field as a ``vtkImageData`` of RAS vectors plus
the grid direction matrix that ``vtkOrientedGridTransform`` needs. vtkOrientedGridTransform maps a RAS point p
to the continuous index ``inv(direction @ diag(spacing)) (p - origin)`` and adds the trilinearly interpolated
vector there - the same rule as ITK's DisplacementFieldTransform in LPS. Coordinates come from
:mod:`nephireg.geometry` (``Grid``, ``LPS_TO_RAS``); nothing here restates them.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from nephireg.geometry import LPS_TO_RAS, Grid
from NePhiRegistrationLib.i18n import _

# Jacobian heatmap: 0..2 centred on 1 (1 = volume preserved, <1 compression, >1 expansion, <=0 folding).
JACOBIAN_WINDOW = 2.0
JACOBIAN_LEVEL = 1.0
JACOBIAN_COLOR_NODE_ID = "vtkMRMLColorTableNodeFileDivergingBlueRed.txt"


def rasGeometry(grid: Grid) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(origin (3,) RAS mm, spacing (3,) mm, direction (3, 3) RAS, columns = i, j, k axes) of ``grid``."""
    origin = LPS_TO_RAS @ np.asarray(grid.origin, dtype=float)
    direction = LPS_TO_RAS @ grid.direction_matrix
    return origin, np.asarray(grid.spacing, dtype=float), direction


def displacementToRas(displacementLps: np.ndarray) -> np.ndarray:
    """(Z, Y, X, 3) LPS mm -> the same vectors in RAS mm (x and y negated)."""
    return np.asarray(displacementLps, dtype=np.float64) @ LPS_TO_RAS.T


def displacementToVtk(displacementLps: np.ndarray, grid: Grid):
    """``(vtkImageData, vtkMatrix4x4)`` for ``vtkOrientedGridTransform.SetDisplacementGridData`` and
    ``SetGridDirectionMatrix``: image origin/spacing/dimensions of ``grid`` in RAS (its own direction left
    identity, as Slicer's transform readers do), 3 double components = RAS displacement in mm."""
    import vtk
    from vtk.util import numpy_support

    field = np.asarray(displacementLps)
    if field.shape != tuple(grid.shape_zyx) + (3,):
        raise ValueError(f"displacement shape {field.shape} does not match grid {grid.shape_zyx} + (3,)")
    origin, spacing, direction = rasGeometry(grid)
    image = vtk.vtkImageData()
    image.SetOrigin(*origin)
    image.SetSpacing(*spacing)
    image.SetDimensions(*grid.size)
    # [k, j, i, c] in C order = i fastest: VTK's point order.
    vectors = numpy_support.numpy_to_vtk(np.ascontiguousarray(displacementToRas(field).reshape(-1, 3)), deep=True,
                                         array_type=vtk.VTK_DOUBLE)
    vectors.SetName("DisplacementRAS")
    image.GetPointData().SetScalars(vectors)
    matrix = vtk.vtkMatrix4x4()
    for row in range(3):
        for col in range(3):
            matrix.SetElement(row, col, float(direction[row, col]))
    return image, matrix


def readDisplacementTransform(path: str) -> Tuple[np.ndarray, Grid]:
    """(displacement (Z, Y, X, 3) LPS mm, grid) of an ITK displacement-field transform file (SimpleITK, which
    Slicer ships, imported here only). Composite files holding one displacement field are unwrapped."""
    import SimpleITK as sitk

    from nephireg.io import read_transform

    transform = read_transform(path)
    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        if composite.GetNumberOfTransforms() != 1:
            raise ValueError(f"{path}: expected one displacement field, found {composite.GetNumberOfTransforms()}")
        transform = composite.GetNthTransform(0)
    field = sitk.DisplacementFieldTransform(transform).GetDisplacementField()
    return sitk.GetArrayFromImage(field).astype(np.float64), Grid.of(field)


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "n/a" if isinstance(value, float) and not math.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


# Known metric keys, in display order, with their labels. Anything else the engine reports is listed after.
_LABELS = (
    ("folding_percent", "Folding (det J <= 0)", "%"),
    ("jacobian_min", "det J min", ""),
    ("jacobian_max", "det J max", ""),
    ("std_log_jacobian", "SD log det J", ""),
)


def summaryLines(metrics: Mapping[str, Any], seconds: Optional[float] = None) -> list:
    """Human-readable result summary: the run's warnings first, then folding %, det J range, similarity after each
    step (before -> pre-aligned -> after), the model used, runtime and any other metric.

    ``metrics``: flat metrics (:func:`manifestMetrics`), which also carry the manifest's ``warnings`` (a list of
    ``{code, message}``) and ``model`` (a dict or None), neither of them flattened.
    """
    lines = [_("Warning: {message} [{code}]").format(message=w.get("message", ""), code=w.get("code", ""))
             for w in metrics.get("warnings") or ()]
    shown = {"warnings", "model"}
    for key, label, unit in _LABELS:
        if key in metrics:
            lines.append(f"{_(label)}: {_fmt(metrics[key])}{unit}")
            shown.add(key)
    before = {k[: -len("_before")]: v for k, v in metrics.items() if k.endswith("_before")}
    for name, value in sorted(before.items()):
        after = metrics.get(name + "_after")
        if after is not None:
            steps = [_("{value} before").format(value=_fmt(value))]
            if metrics.get(name + "_prealigned") is not None:
                steps.append(_("{value} pre-aligned").format(value=_fmt(metrics[name + "_prealigned"])))
            steps.append(_("{value} after").format(value=_fmt(after)))
            lines.append(f"{name.replace('_', ' ')}: {' -> '.join(steps)}")
            shown.update({name + "_before", name + "_prealigned", name + "_after"})
    model = metrics.get("model")
    if isinstance(model, Mapping):
        use = ", ".join(str(model[k]) for k in ("anatomy", "modality") if model.get(k))
        preset = _(", preset {preset}").format(preset=model["preset"]) if model.get("preset") else ""
        details = f" ({use}{preset})" if use or preset else ""
        lines.append(_("Model: {name}").format(name=model.get("name", "")) + details)
    runtime = metrics.get("runtime_s", metrics.get("seconds", seconds))
    shown.update({"runtime_s", "seconds"})
    if runtime is not None:
        lines.append(_("Runtime: {seconds} s").format(seconds=_fmt(float(runtime))))
    for key in sorted(k for k in metrics if k not in shown and isinstance(metrics[k], (int, float, str))):
        lines.append(f"{key.replace('_', ' ')}: {_fmt(metrics[key])}")
    return lines


def manifestMetrics(manifest: Mapping[str, Any]) -> Dict[str, Any]:
    """The flat metrics of a result manifest (nested dicts flattened with ``_``), plus the manifest's ``warnings``
    and ``model`` as they are, when it has them (what :func:`summaryLines` shows besides the numbers)."""
    flat: Dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}_{k}" if prefix else str(k), v)
        else:
            flat[prefix] = value

    walk("", manifest.get("metrics", {}))
    for key in ("warnings", "model"):
        if manifest.get(key):
            flat[key] = manifest[key]
    return flat
