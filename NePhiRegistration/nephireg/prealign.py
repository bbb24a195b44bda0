"""Pre-alignment: a global transform that brings the moving image near the fixed one before deformable registration.

:func:`prealign` returns T, the map from fixed physical space to moving physical space (LPS mm, the resampling
direction ITK stores: ``moving(T(x))`` looks like ``fixed(x)``), as a plain SimpleITK transform that callers can
compose or read as a matrix. Modes (``nephireg.protocol.PREALIGN_MODES`` less "preset", which the pipeline
resolves from the preset):

* ``none``: identity (a zero :class:`sitk.TranslationTransform`);
* ``center``: translation between the field-of-view centres, or between the mask centroids when both masks are
  given;
* ``moments``: translation between the intensity centres of mass (inside the masks when given);
* ``rigid`` / ``affine``: SimpleITK's :class:`ImageRegistrationMethod` (correlation by default - the engine's
  pairs share a modality; Mattes mutual information in :class:`RegistrationSettings` for others - a two-level
  pyramid, regular-step gradient descent), started from the ``center`` translation and restricted to the
  (dilated) masks when given. Random metric sampling uses a fixed seed: the same pair gives the same transform
  (to about 1e-8, the order of the threads' sums).

Measured choices (docs/prealign.md): the default per preset and the registration settings below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from nephireg.geometry import Grid, apply_affine
from nephireg.preprocess import dilate
from nephireg.protocol import PREALIGN_MODES

MODES = tuple(m for m in PREALIGN_MODES if m != "preset")


@dataclass(frozen=True)
class RegistrationSettings:
    """Settings of the ``rigid`` / ``affine`` intensity registration (see docs/prealign.md for the measurements)."""

    metric: str = "correlation"  # "correlation" (same modality; measured best) | "mattes" (Mattes MI, any)
    histogram_bins: int = 32  # Mattes MI
    sampling_fraction: float = 0.25  # random share of the (masked) fixed voxels used per iteration ...
    max_samples: int = 30_000  # ... but at most this many per level (keeps large images to a few seconds)
    seed: int = 20240517  # fixed: the same pair gives the same transform
    shrink_factors: Tuple[int, ...] = (4, 2)  # pyramid levels, coarse to fine ...
    min_level_voxels: int = 24  # ... each reduced so that a level keeps at least this many voxels along every axis
    smoothing_mm: Tuple[float, ...] = (4.0, 2.0)  # Gaussian sigma per level, mm
    iterations: int = 100  # per level
    learning_rate_mm: float = 4.0  # first step, as a physical shift (mm)
    min_step_mm: float = 0.001  # stop when the step falls below this
    initial: str = "center"  # translation that starts the registration: "center" | "moments"
    mask_dilation_mm: float = 10.0  # masks grow by this before they restrict the metric, so their edges count


DEFAULT_SETTINGS = RegistrationSettings()


def prealign(
    fixed: sitk.Image,
    moving: sitk.Image,
    mode: str,
    fixed_mask: Optional[sitk.Image] = None,
    moving_mask: Optional[sitk.Image] = None,
    settings: RegistrationSettings = DEFAULT_SETTINGS,
    cancelled: Optional[Callable[[], bool]] = None,
) -> sitk.Transform:
    """The global transform T: fixed physical -> moving physical (LPS mm), such that ``moving(T(x)) ~ fixed(x)``.

    ``fixed`` / ``moving``: 3D scalar images, preset-normalised (about [0, 1]); any grids. Masks: {0, 1} images on
    their image's grid, or None. Returns a :class:`sitk.TranslationTransform` (none, center, moments), an
    :class:`sitk.Euler3DTransform` (rigid) or an :class:`sitk.AffineTransform` (affine); the last two have their
    centre at the fixed image's centre (mask centroid when a fixed mask is given). ``cancelled``: polled every
    optimiser iteration; when it turns true the registration stops early (the caller then raises).
    """
    if mode not in MODES:
        raise ValueError(f"unknown pre-alignment mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "none":
        return sitk.TranslationTransform(3)
    if mode in ("center", "moments"):
        return _translation(_offset(fixed, moving, mode, fixed_mask, moving_mask))
    offset = _offset(fixed, moving, settings.initial, fixed_mask, moving_mask)
    center = _mask_centroid(fixed_mask) if fixed_mask is not None else Grid.of(fixed).center_physical()
    transform = sitk.Euler3DTransform() if mode == "rigid" else sitk.AffineTransform(3)
    transform.SetCenter(tuple(float(c) for c in center))
    transform.SetTranslation(tuple(float(t) for t in offset))
    _register(fixed, moving, transform, fixed_mask, moving_mask, settings, cancelled)
    return transform


def _translation(offset_mm: np.ndarray) -> sitk.TranslationTransform:
    return sitk.TranslationTransform(3, tuple(float(v) for v in offset_mm))


def _offset(fixed: sitk.Image, moving: sitk.Image, how: str, fixed_mask: Optional[sitk.Image],
            moving_mask: Optional[sitk.Image]) -> np.ndarray:
    """(3,) mm: moving centre - fixed centre, the centres as ``how`` ("center" | "moments") says."""
    if how == "center":
        if fixed_mask is not None and moving_mask is not None:
            return _mask_centroid(moving_mask) - _mask_centroid(fixed_mask)
        return Grid.of(moving).center_physical() - Grid.of(fixed).center_physical()
    if how == "moments":
        return _intensity_centroid(moving, moving_mask) - _intensity_centroid(fixed, fixed_mask)
    raise ValueError(f"unknown initialisation {how!r}; choose center or moments")


def _mask_centroid(mask: sitk.Image) -> np.ndarray:
    """(3,) LPS mm: centroid of the nonzero voxels of ``mask``."""
    return _weighted_centroid(sitk.GetArrayViewFromImage(mask) > 0, mask, "mask")


def _intensity_centroid(image: sitk.Image, mask: Optional[sitk.Image]) -> np.ndarray:
    """(3,) LPS mm: centre of mass of the image's intensities (negative ones count as 0), inside ``mask`` if given."""
    weights = np.clip(sitk.GetArrayViewFromImage(image).astype(np.float64), 0.0, None)
    if mask is not None:
        weights = weights * (sitk.GetArrayViewFromImage(mask) > 0)
    return _weighted_centroid(weights, image, "image (inside its mask)" if mask is not None else "image")


def _weighted_centroid(weights_zyx: np.ndarray, image: sitk.Image, what: str) -> np.ndarray:
    """(3,) LPS mm: the ``weights_zyx``-weighted mean of ``image``'s voxel centres (an affine map of the index)."""
    weights = np.asarray(weights_zyx, dtype=np.float64)
    total = float(weights.sum())
    if total <= 0.0:
        raise ValueError(f"cannot take a centre of mass: the {what} has no positive value")
    # Marginal sums keep this O(voxels) without building a (N, 3) index array.
    mean_ijk = [
        float((weights.sum(axis=tuple(a for a in range(3) if a != axis)) * np.arange(weights.shape[axis])).sum())
        / total
        for axis in (2, 1, 0)  # array axes [k, j, i] -> i, j, k
    ]
    return apply_affine(Grid.of(image).index_to_physical(), np.asarray(mean_ijk))


def _register(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, fixed_mask: Optional[sitk.Image],
              moving_mask: Optional[sitk.Image], settings: RegistrationSettings,
              cancelled: Optional[Callable[[], bool]] = None) -> None:
    """Optimise ``transform`` (in place) so that moving(T(x)) matches fixed(x), coarse level first.

    The pyramid is built here (block averaging, then a recursive Gaussian on the small image) rather than by
    ImageRegistrationMethod's own shrink/smoothing, whose discrete Gaussian on the full-resolution images cost
    seconds on a brain MRI before the first iteration.
    """
    for factor, sigma_mm in zip(_shrink_factors(fixed, settings), settings.smoothing_mm):
        level_fixed, level_fixed_mask = _level(fixed, fixed_mask, factor, sigma_mm, settings.mask_dilation_mm)
        level_moving, level_moving_mask = _level(moving, moving_mask, factor, sigma_mm, settings.mask_dilation_mm)
        method = _method(level_fixed, level_fixed_mask, level_moving_mask, settings)
        method.SetInitialTransform(transform, inPlace=True)
        if cancelled is not None:
            if cancelled():
                return
            method.AddCommand(sitk.sitkIterationEvent, lambda m=method: m.StopRegistration() if cancelled() else None)
        method.Execute(level_fixed, level_moving)


def _shrink_factors(fixed: sitk.Image, settings: RegistrationSettings) -> list:
    """The pyramid's factors, reduced for small images (a 30-voxel axis shrunk 4 times leaves too little to fit
    an affine to; the level then only smooths)."""
    largest = max(1, min(fixed.GetSize()) // settings.min_level_voxels)
    return [max(1, min(int(f), largest)) for f in settings.shrink_factors]


def _level(image: sitk.Image, mask: Optional[sitk.Image], factor: int, sigma_mm: float, dilation_mm: float
           ) -> Tuple[sitk.Image, Optional[sitk.Image]]:
    """``image`` block-averaged ``factor`` times coarser along each axis (sitk.BinShrink keeps the physical
    geometry right), then smoothed by ``sigma_mm``; ``mask`` block-averaged the same way, thresholded at 0.5 and
    dilated by ``dilation_mm`` (on the coarse grid: a 10 mm ball on a full brain MRI costs seconds)."""
    level_image = sitk.Cast(image, sitk.sitkFloat32)
    if factor > 1:
        level_image = sitk.BinShrink(level_image, [int(factor)] * 3)
    if sigma_mm > 0:
        level_image = sitk.SmoothingRecursiveGaussian(level_image, sigma_mm)
    level_mask = None
    if mask is not None:
        level_mask = sitk.Cast(mask, sitk.sitkUInt8)
        if factor > 1:
            shrunk = sitk.BinShrink(sitk.Cast(mask, sitk.sitkFloat32), [int(factor)] * 3)
            level_mask = sitk.Cast(shrunk >= 0.5, sitk.sitkUInt8)
        level_mask = _grown(level_mask, dilation_mm)
    return level_image, level_mask


def _method(fixed: sitk.Image, fixed_mask: Optional[sitk.Image], moving_mask: Optional[sitk.Image],
            settings: RegistrationSettings) -> sitk.ImageRegistrationMethod:
    """One level's registration: metric, random sampling with the fixed seed, masks, optimiser."""
    method = sitk.ImageRegistrationMethod()
    _set_metric(method, settings)
    voxels = float(np.prod(fixed.GetSize()))
    if fixed_mask is not None:
        voxels = max(float(np.count_nonzero(sitk.GetArrayViewFromImage(fixed_mask))), 1.0)
        method.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        method.SetMetricMovingMask(moving_mask)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(min(settings.sampling_fraction, settings.max_samples / voxels), settings.seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=settings.learning_rate_mm,
        minStep=settings.min_step_mm,
        numberOfIterations=settings.iterations,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8,
    )
    # Parameter scales from physical shifts: one step moves any voxel by about learning_rate mm, whatever the
    # parameter (angle, matrix entry or translation).
    method.SetOptimizerScalesFromPhysicalShift()
    return method


def _grown(mask: sitk.Image, radius_mm: float) -> sitk.Image:
    """uint8 {0, 1} ``mask`` dilated by a ball of ``radius_mm`` (per-axis voxel radius from the spacing)."""
    return dilate(sitk.Cast(mask > 0, sitk.sitkUInt8), radius_mm)


def _set_metric(method: sitk.ImageRegistrationMethod, settings: RegistrationSettings) -> None:
    if settings.metric == "mattes":
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    elif settings.metric == "correlation":
        method.SetMetricAsCorrelation()
    else:
        raise ValueError(f"unknown metric {settings.metric!r}; choose mattes or correlation")


def landmark_errors(transform: sitk.Transform, fixed_points: np.ndarray, moving_points: Sequence) -> np.ndarray:
    """(n,) mm: ||T(fixed_i) - moving_i|| for corresponding (n, 3) LPS points (the evaluation convention)."""
    mapped = np.array([transform.TransformPoint(tuple(float(v) for v in p)) for p in np.asarray(fixed_points)])
    return np.linalg.norm(mapped - np.asarray(moving_points, dtype=float), axis=1)


Prealignment = Tuple[str, np.ndarray]
"""``(mode, 4x4 matrix)``: the pre-alignment a run used (fixed -> moving, LPS mm)."""


def prealignment_of(request, preset, inputs, stage: Callable[[str, str], None],
                    cancelled: Callable[[], bool]) -> Prealignment:
    """The pre-alignment mode a run uses and its 4x4 matrix, for a :class:`nephireg.inputs.Request`, its
    :class:`nephireg.presets.Preset` and read :class:`nephireg.inputs.Inputs`. An initial transform file replaces
    the automatic pre-alignment. ``stage(name, message)`` announces the work; ``cancelled()`` stops it early (the
    caller then raises)."""
    from nephireg.compose import affine_matrix
    from nephireg.errors import InputError
    from nephireg.initial import INITIAL_MODE

    if inputs.initial is not None:  # checked with the request (validate.check_initial_transform)
        return INITIAL_MODE, inputs.initial
    mode = preset.prealign if request.prealign == "preset" else request.prealign
    if mode not in PREALIGN_MODES or mode == "preset":
        raise InputError(f"unknown pre-alignment {mode!r}; choose one of {', '.join(PREALIGN_MODES)}")
    if mode == "none":
        return mode, np.eye(4)
    stage("prealign", f"Pre-alignment ({mode})")
    transform = prealign(inputs.fixed_norm, inputs.moving_norm, mode, *inputs.prealignment_masks(),
                         cancelled=cancelled)
    return mode, affine_matrix(transform)
