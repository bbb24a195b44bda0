"""Preparing a pair (no torch): preset intensities, mask dilation and cropping, the working grid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk

from nephireg.binary_morphology import ball_radius_voxels
from nephireg.geometry import Grid
from nephireg.presets import Preset

MAX_WORKING_VOXELS = 6_000_000  # larger working grids are coarsened (the output stays on the full fixed grid)


def normalise_with_window(image: sitk.Image, preset: Preset, mask: Optional[sitk.Image] = None
                          ) -> Tuple[sitk.Image, Tuple[float, float]]:
    """Float32 intensities mapped to about [0, 1] as the preset says, and the (low, high) window used.

    ``window``: clamp to ``preset.window`` (e.g. HU) and scale linearly. ``percentile``: clamp to the
    ``preset.percentiles`` of the voxels inside ``mask`` (or of all voxels) and scale linearly.
    """
    values = sitk.GetArrayFromImage(image).astype(np.float32)
    if preset.intensity == "window":
        low, high = preset.window
    elif preset.intensity == "percentile":
        sample = values[sitk.GetArrayViewFromImage(mask) > 0] if mask is not None else values
        low, high = np.percentile(sample, preset.percentiles)
        if high <= low:
            low, high = float(sample.min()), float(sample.max())
    else:
        raise ValueError(f"unknown intensity mode {preset.intensity!r}")
    window = (low, high)  # as they are: numpy scalars (percentiles) make the scaling below float64, as it always was
    out = sitk.GetImageFromArray(in_window(values, window))
    out.CopyInformation(image)
    return out, window


def in_window(values: np.ndarray, window: Tuple[float, float]) -> np.ndarray:
    """float32 ``values`` clamped to ``window`` (low, high) and scaled to [0, 1] (any shape)."""
    low, high = window
    return ((np.clip(values, low, high) - low) / max(float(high - low), 1e-12)).astype(np.float32)


def dilate(mask: sitk.Image, radius_mm: float) -> sitk.Image:
    """Binary dilation of a {0, 1} mask by a ball of ``radius_mm`` (per-axis voxel radius from the spacing)."""
    if radius_mm <= 0:
        return mask
    # ITK's boundary-following dilation: a 6 mm ball on a CT's own grid has hundreds of offsets
    return sitk.BinaryDilate(mask, ball_radius_voxels(radius_mm, mask.GetSpacing()), sitk.sitkBall, 0, 1)


def working_grid(fixed: Grid, spacing_mm: float, max_voxels: int = MAX_WORKING_VOXELS) -> Grid:
    """The fixed grid's field of view and direction at isotropic ``spacing_mm`` (coarsened to ``max_voxels``)."""
    grid = fixed.resampled([spacing_mm] * 3)
    count = float(np.prod(np.asarray(grid.size, dtype=float)))  # float: a huge field of view must not overflow
    if count > max_voxels:
        grid = fixed.resampled([spacing_mm * (count / max_voxels) ** (1.0 / 3.0)] * 3)
    return grid


def crop_to_mask(grid: Grid, mask: sitk.Image, margin_mm: float) -> Grid:
    """The part of ``grid`` (the mask's own grid) covering the mask's bounding box plus ``margin_mm``."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    box = stats.GetBoundingBox(1)  # (i0, j0, k0, ni, nj, nk)
    margin = np.ceil(margin_mm / np.asarray(grid.spacing)).astype(int)
    start = np.maximum(np.asarray(box[:3]) - margin, 0)
    stop = np.minimum(np.asarray(box[:3]) + np.asarray(box[3:]) + margin, np.asarray(grid.size))
    origin = grid.index_to_physical()[:3, :3] @ start + np.asarray(grid.origin)
    return Grid(tuple(int(n) for n in stop - start), grid.spacing, tuple(float(o) for o in origin), grid.direction)


@dataclass
class WorkingImages:
    """The pair on the grid a method works on, as numpy (Z, Y, X) float32 arrays (the moving image and mask
    resampled through the pre-alignment); masks in {0, 1} or None. What :func:`nephireg.pipeline.prepare` turns
    into tensors; computed in SimpleITK alone, so the command line does it while torch loads."""

    grid: Grid
    fixed: np.ndarray
    moving: np.ndarray
    fixed_mask: Optional[np.ndarray]
    moving_mask: Optional[np.ndarray]


def working_grid_of(inputs, preset: Preset) -> Grid:
    """The grid a method works on for :class:`nephireg.inputs.Inputs` ``inputs``: the fixed image's field of view
    (cropped to its mask if the preset says) at the preset's working spacing."""
    region = Grid.of(inputs.fixed)
    if preset.crop_margin_mm is not None and inputs.fixed_mask is not None:
        region = crop_to_mask(region, inputs.fixed_mask, preset.crop_margin_mm)
    return working_grid(region, preset.working_spacing_mm)


def working_images(inputs, preset: Preset, prealign: np.ndarray) -> WorkingImages:
    """``inputs``' normalised images and regions on :func:`working_grid_of`, the moving ones through ``prealign``
    (4x4 LPS mm, fixed -> moving); images multiplied by their masks when the preset says."""
    from nephireg.compose import affine_transform

    grid = working_grid_of(inputs, preset)
    transform = affine_transform(prealign)
    fixed = on_grid(inputs.fixed_norm, grid, None)
    moving = on_grid(inputs.moving_norm, grid, transform)
    fixed_mask = on_grid(inputs.fixed_region, grid, None, is_mask=True) if inputs.fixed_region is not None else None
    moving_mask = (on_grid(inputs.moving_region, grid, transform, is_mask=True)
                   if inputs.moving_region is not None else None)
    if preset.mask_images:
        fixed = fixed * fixed_mask if fixed_mask is not None else fixed
        moving = moving * moving_mask if moving_mask is not None else moving
    return WorkingImages(grid, fixed, moving, fixed_mask, moving_mask)


def on_grid(image: sitk.Image, grid: Grid, transform: Optional[sitk.Transform], is_mask: bool = False) -> np.ndarray:
    """``image`` resampled linearly onto ``grid`` (through ``transform``, fixed -> image space), (Z, Y, X) float32.

    Masks are resampled linearly and thresholded at 0.5, which keeps them faithful under downsampling.
    """
    from nephireg import io

    source = sitk.Cast(image, sitk.sitkFloat32) if is_mask else image
    array = sitk.GetArrayFromImage(io.resample_to(source, grid, transform, linear=True, default=0.0))
    array = array.astype(np.float32, copy=False)
    return (array >= 0.5).astype(np.float32) if is_mask else array
