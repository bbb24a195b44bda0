"""When a result is doubtful: the similarity after each step and the warnings a user can act on.

A registration that runs to the end can still be wrong. :func:`assess` measures, on the similarity region the run
used (the fixed mask, else the whole fixed image, on the fixed grid), the NCC of the normalised images before any
alignment (``ncc_before``), after the pre-alignment alone (``ncc_prealigned``) and after the deformable step
(``ncc_after``), reads the pre-alignment's linear part, compares the 48 axis orientations of the moving image and
measures the overlap pre-alignment leaves, and raises a warning (``reporter.warn(code, message)``) for each check
below that fails. The run still succeeds.

Each code is defined next to its check with its thresholds, named constants chosen by measurement
(docs/quality.md says on which cases). NePhi predict's identity test (:func:`check_identity_bias`) runs inside the
method, which holds the model; the model's intended use is checked there too (``model-preset-mismatch``, not here).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from nephireg import io
from nephireg.compose import affine_transform
from nephireg.geometry import Grid
from nephireg.preprocess import in_window
from nephireg.progress import Reporter, WarningsHeld

if TYPE_CHECKING:  # nephireg.inputs imports this module
    from nephireg.inputs import Inputs

HEADER_ADVICE = ("a header/orientation mismatch is the likely cause (voxels stored, say, LIA under a header that says "
                 "identity): check both images' direction matrices (SimpleITK's GetDirection(); in Slicer, Volumes > "
                 "Volume Information) and view them side by side: left, anterior and superior must agree")


def ncc(a: np.ndarray, b: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Global normalised cross-correlation of two arrays (inside ``mask`` if given), in [-1, 1]."""
    if mask is not None:
        a, b = a[mask], b[mask]
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / max(np.sqrt((a * a).sum() * (b * b).sum()), 1e-12))


# -- the pre-alignment's linear part A (fixed -> moving): reflection, rotation or scaling no anatomy makes -----------
PREALIGN_REFLECTION = "prealign-reflection"
PREALIGN_IMPLAUSIBLE = "prealign-implausible"
MAX_ROTATION_DEG = 30.0  # rotation of A's polar factor
SCALE_RANGE = (0.7, 1.4)  # singular values of A (per-axis scaling, moving mm per fixed mm)
MAX_ANISOTROPY = 1.25  # largest over smallest singular value (a shape change no anatomy makes between two scans)


def linear_part(matrix4: np.ndarray) -> Dict[str, Optional[float]]:
    """Determinant, rotation (degrees) and per-axis scalings of a 4x4's linear part A.

    A = U S V^T (SVD): the scalings are S, the rotation is the angle of the polar factor U V^T (None when A
    mirrors: no rotation explains it; None, not NaN, so that the manifest stays strict JSON).
    """
    linear = np.asarray(matrix4, dtype=float)[:3, :3]
    u, scales, vt = np.linalg.svd(linear)
    det = float(np.linalg.det(linear))
    angle = None
    if det > 0:
        angle = math.degrees(math.acos(float(np.clip((np.trace(u @ vt) - 1.0) / 2.0, -1.0, 1.0))))
    return {"prealign_determinant": det, "prealign_rotation_deg": angle,
            "prealign_scale_min": float(scales.min()), "prealign_scale_max": float(scales.max())}


def check_prealignment(linear: Dict[str, Optional[float]], reporter: Reporter) -> None:
    """Warn when the pre-alignment mirrors, or rotates or scales beyond what one anatomy between two scans does."""
    det = linear["prealign_determinant"]
    if det <= 0:
        reporter.warn(PREALIGN_REFLECTION,
                      f"the pre-alignment mirrors the moving image (determinant {det:.2f} < 0; so det J < 0 and the "
                      f"folding % counts the mirror): no anatomy does that between two scans; {HEADER_ADVICE}")
        return
    angle, low, high = (linear[k] for k in ("prealign_rotation_deg", "prealign_scale_min", "prealign_scale_max"))
    if angle > MAX_ROTATION_DEG or low < SCALE_RANGE[0] or high > SCALE_RANGE[1] or high > MAX_ANISOTROPY * low:
        reporter.warn(PREALIGN_IMPLAUSIBLE,
                      f"the pre-alignment rotates by {angle:.0f} degrees and scales by {low:.2f}-{high:.2f} (expected "
                      f"at most {MAX_ROTATION_DEG:.0f} degrees, scales within {SCALE_RANGE[0]}-{SCALE_RANGE[1]} and "
                      f"at most {MAX_ANISOTROPY}x apart): {HEADER_ADVICE}")


# -- orientation: another axis orientation of the moving image matches far better than the headers' one -------------
ORIENTATION_MISMATCH = "orientation-mismatch"
ORIENTATION_SPACING_MM = 4.0  # the coarse grid on which the 48 axis orientations are compared (cheap: ~1e5 voxels)
MIN_ORIENTATION_GAIN = 0.05  # NCC of the best other orientation above the headers' and pre-alignment's ones ...
MIN_ORIENTATION_NCC = 0.5  # ... and that NCC itself at least this (unrelated images match no orientation well)


def axis_orientations() -> List[np.ndarray]:
    """The 48 signed axis permutations (3x3, det +-1): 24 rotations and 24 reflections, the identity first."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            matrix = np.zeros((3, 3))
            matrix[list(perm), range(3)] = signs
            out.append(matrix)
    out.sort(key=lambda m: not np.array_equal(m, np.eye(3)))
    return out


def _shrunk(image: sitk.Image) -> sitk.Image:
    """``image`` block-averaged to about :data:`ORIENTATION_SPACING_MM` per voxel (float32; no aliasing)."""
    factors = [max(1, int(round(ORIENTATION_SPACING_MM / s))) for s in image.GetSpacing()]
    return sitk.BinShrink(sitk.Cast(image, sitk.sitkFloat32), factors)


def _centroid(values_zyx: np.ndarray, grid: Grid, mask_zyx: Optional[np.ndarray]) -> np.ndarray:
    """(3,) LPS mm: intensity centroid of ``values_zyx`` on ``grid`` (negative values count as 0), inside the mask."""
    weights = np.clip(values_zyx, 0.0, None) * (1.0 if mask_zyx is None else mask_zyx)
    points = grid.physical_points().reshape(-1, 3)
    return (points * weights.reshape(-1, 1)).sum(0) / max(float(weights.sum()), 1e-12)


def _mask_on(mask: Optional[sitk.Image], grid: Grid) -> Optional[np.ndarray]:
    if mask is None:
        return None
    return sitk.GetArrayFromImage(io.resample_to(sitk.Cast(mask, sitk.sitkFloat32), grid)) > 0.5


def orientation_scores(inputs: Inputs, prealign: np.ndarray) -> Tuple[float, List[Tuple[np.ndarray, float]]]:
    """How well the moving image matches the fixed one as the headers and the pre-alignment orient it, and turned
    by each of the 47 other axis orientations.

    Each candidate linear map L turns the moving image about the intensity centroids (x -> c_m + L (x - c_f)); both
    images block-averaged to about :data:`ORIENTATION_SPACING_MM`, compared by NCC on the fixed image's coarse grid,
    inside the fixed mask when given. Returns (the better NCC of L = I (the headers) and L = the pre-alignment's
    linear part, [(P, NCC) for the 47 other signed axis permutations P]).
    """
    fixed, moving = _shrunk(inputs.fixed_norm), _shrunk(inputs.moving_norm)
    fixed_grid, moving_grid = Grid.of(fixed), Grid.of(moving)
    fixed_values = sitk.GetArrayFromImage(fixed).astype(np.float64)
    mask = _mask_on(inputs.fixed_mask, fixed_grid)
    fixed_centre = _centroid(fixed_values, fixed_grid, mask)
    moving_centre = _centroid(sitk.GetArrayFromImage(moving).astype(np.float64), moving_grid,
                              _mask_on(inputs.moving_mask, moving_grid))

    def score(linear: np.ndarray) -> float:
        map4 = np.eye(4)
        map4[:3, :3] = linear
        map4[:3, 3] = moving_centre - linear @ fixed_centre
        return ncc(fixed_values, sitk.GetArrayFromImage(io.resample_to(moving, fixed_grid, affine_transform(map4))),
                   mask)

    reference = max(score(np.eye(3)), score(np.asarray(prealign, dtype=float)[:3, :3]))
    return reference, [(matrix, score(matrix)) for matrix in axis_orientations()[1:]]


def check_orientation(reference: float, scores: List[Tuple[np.ndarray, float]], reporter: Reporter) -> None:
    """Warn when another axis orientation of the moving image matches the fixed image far better than the one its
    header and the pre-alignment give (an image stored, say, LIA under an identity header)."""
    # a rotation ties with its mirror image for a symmetric anatomy (a brain's left-right): name the rotation then
    matrix, best = max(scores, key=lambda s: (round(s[1], 2), np.linalg.det(s[0]) > 0))
    if best - reference < MIN_ORIENTATION_GAIN or best < MIN_ORIENTATION_NCC:
        return
    turn = "mirrored" if np.linalg.det(matrix) < 0 else "rotated"
    axes = ", ".join(f"{'+-'[int(matrix[r, c] < 0)]}{'xyz'[r]}" for c in range(3) for r in range(3) if matrix[r, c])
    reporter.warn(ORIENTATION_MISMATCH,
                  f"the moving image matches the fixed one far better {turn} (fixed x, y, z against moving {axes}: "
                  f"NCC {best:.2f}, against {reference:.2f} as the headers and the pre-alignment orient it): "
                  f"{HEADER_ADVICE}")


# -- overlap left by the pre-alignment ------------------------------------------------------------------------------
LOW_OVERLAP = "low-overlap"
MIN_OVERLAP = 0.6  # share of the fixed region that lands inside the moving region (its mask, else its field of view)


def overlap_share(fixed_region: Optional[np.ndarray], moving_inside: np.ndarray) -> float:
    """Share (0..1) of the fixed region's voxels (None: all) whose pre-aligned position is inside the moving region."""
    if fixed_region is None:
        return float(np.count_nonzero(moving_inside) / moving_inside.size)
    count = int(np.count_nonzero(fixed_region))
    return float(np.count_nonzero(moving_inside[fixed_region]) / count) if count else 0.0


def check_overlap(share: float, reporter: Reporter) -> None:
    if share < MIN_OVERLAP:
        reporter.warn(LOW_OVERLAP,
                      f"after pre-alignment only {100 * share:.0f} % of the fixed region lies inside the moving "
                      f"image's region (expected at least {100 * MIN_OVERLAP:.0f} %): the images may show different "
                      "parts of the body, or the pre-alignment failed; check the fields of view and try another "
                      "--prealign")


# -- the deformable step: similarity worse than pre-alignment alone, or almost unchanged ----------------------------
DEFORMABLE_WORSE = "deformable-worse"
NCC_WORSE_TOLERANCE = 0.002  # ncc_after below ncc_prealigned by more than this: the deformable step made it worse
DEFORMABLE_LITTLE_GAIN = "deformable-little-gain"
MIN_NCC_GAIN_SHARE = 0.05  # of the room left after pre-alignment (1 - ncc_prealigned): less is "almost nothing" ...
MIN_NCC_ROOM = 0.02  # ... unless pre-alignment left less room than this (then nothing more can be gained)


def check_deformable_gain(before: float, prealigned: float, after: float, reporter: Reporter) -> None:
    """Warn when the deformable step lowered the similarity reached by pre-alignment alone, or barely raised it.

    When the result is anti-correlated (``after`` < 0: inverted contrast, e.g. T1 against T2, or another modality)
    a better alignment makes the NCC more negative, so the checks compare magnitudes.
    """
    if after < 0:
        before, prealigned, after = abs(before), abs(prealigned), abs(after)
    if after < prealigned - NCC_WORSE_TOLERANCE:
        reporter.warn(DEFORMABLE_WORSE,
                      f"the deformable step made the similarity worse: NCC {prealigned:.3f} after pre-alignment alone, "
                      f"{after:.3f} after the deformable step (before any alignment: {before:.3f}); the pre-alignment "
                      "alone may be the better result - try another method, or a model trained for this anatomy")
        return
    room = 1.0 - prealigned
    if room >= MIN_NCC_ROOM and after - prealigned < MIN_NCC_GAIN_SHARE * room:
        reporter.warn(DEFORMABLE_LITTLE_GAIN,
                      f"the deformable step gained almost nothing: NCC {prealigned:.3f} after pre-alignment alone, "
                      f"{after:.3f} after it ({100 * (after - prealigned) / room:.1f} % of the room left, expected at "
                      f"least {100 * MIN_NCC_GAIN_SHARE:.0f} %); check that the method and preset suit these images")


# -- folding ----------------------------------------------------------------------------------------------------------
FOLDING = "folding"
MAX_FOLDING_PERCENT = 0.5  # % of fixed-grid voxels with det J <= 0


def check_folding(folding_percent: float, reporter: Reporter) -> None:
    if folding_percent > MAX_FOLDING_PERCENT:
        reporter.warn(FOLDING,
                      f"the transform folds {folding_percent:.2f} % of the fixed grid (det J <= 0; expected at most "
                      f"{MAX_FOLDING_PERCENT} %): it is not invertible there; raise --regularization or check the "
                      "jacobian map for where it folds")


# -- NePhi predict's identity test (the model on the fixed image registered to itself should not move) --------------
MODEL_IDENTITY_BIAS = "model-identity-bias"
MAX_IDENTITY_MEAN_MM = 2.0  # mean |u| of that field over the fixed mask, else over the fixed image's foreground
FOREGROUND = 0.05  # normalised intensity above which a voxel is foreground (without a mask)


def identity_mean_mm(length_mm: np.ndarray, fixed: np.ndarray, mask: Optional[np.ndarray]) -> float:
    """Mean of ``length_mm`` (|u| of the identity test's field) over ``mask``, else where ``fixed`` (normalised
    intensities) is foreground, else everywhere; all (Z, Y, X) on one grid."""
    region = mask if mask is not None and mask.any() else fixed > FOREGROUND
    return float(length_mm[region].mean() if region.any() else length_mm.mean())


def check_identity_bias(mean_mm: float, reporter: Reporter) -> None:
    """NePhi predict's identity test: ``mean_mm`` = mean |u| of the model's field for the fixed image registered to
    itself (the right answer is 0)."""
    if mean_mm > MAX_IDENTITY_MEAN_MM:
        reporter.warn(MODEL_IDENTITY_BIAS,
                      f"the model moves the fixed image registered to itself by {mean_mm:.1f} mm on average (expected "
                      f"at most {MAX_IDENTITY_MEAN_MM} mm, ideally 0): a bias the images do not explain, likely an "
                      "anatomy or intensity range the model was not trained on; use nephi-io or adam, or a model "
                      "trained for these images")


def moving_inside(inputs: Inputs, grid: Grid, prealign: np.ndarray) -> np.ndarray:
    """(Z, Y, X) bool on ``grid`` (the fixed grid): the voxels whose pre-aligned position lies inside the moving
    mask, else inside the moving image's field of view."""
    if inputs.moving_mask is not None:
        region = sitk.Cast(inputs.moving_mask > 0, sitk.sitkUInt8)
    else:
        region = sitk.Image(inputs.moving.GetSize(), sitk.sitkUInt8) + 1
        region.CopyInformation(inputs.moving)
    inside = io.resample_to(region, grid, affine_transform(prealign), linear=False, default=0)
    return sitk.GetArrayFromImage(inside) > 0


@dataclass
class BeforeRegistration:
    """What :func:`assess` measures before the deformable step (it needs only the inputs and the pre-alignment, so
    the command line measures it while torch loads): its metrics and the warnings of its checks, held in order."""

    metrics: Dict[str, Any]  # ncc_before, ncc_prealigned, similarity_region, overlap_prealigned, the linear part,
    # orientation_ncc_gain
    warnings: List[Tuple[str, str]]  # (code, message)


def before_registration(inputs: Inputs, grid: Grid, prealign: np.ndarray) -> BeforeRegistration:
    """The similarity before any alignment and after the pre-alignment, the pre-alignment's linear part and overlap
    and the orientation check (arguments as :func:`assess`'s)."""
    held = WarningsHeld()
    fixed_norm = sitk.GetArrayViewFromImage(inputs.fixed_norm)
    mask = fixed_mask_array(inputs)

    def ncc_through(transform: Optional[sitk.Transform]) -> float:  # one full-grid copy alive at a time
        return ncc(fixed_norm, normalised_warped(inputs, grid, transform), mask)

    metrics: Dict[str, Any] = {
        "ncc_before": ncc_through(None),
        "ncc_prealigned": ncc_through(affine_transform(prealign)),
        "similarity_region": "fixed mask" if mask is not None else "whole fixed image",
        "overlap_prealigned": overlap_share(mask, moving_inside(inputs, grid, prealign)),
    }
    metrics.update(linear_part(prealign))
    reference, scores = orientation_scores(inputs, prealign)
    metrics["orientation_ncc_gain"] = max(score for _, score in scores) - reference
    check_orientation(reference, scores, held)
    check_prealignment(metrics, held)
    check_overlap(metrics["overlap_prealigned"], held)
    return BeforeRegistration(metrics, held.held)


def assess(inputs: Inputs, grid: Grid, prealign: np.ndarray, warped_norm: np.ndarray, folding_percent: float,
           reporter: Reporter, before: Optional[BeforeRegistration] = None) -> Dict[str, Any]:
    """Per-step similarity, the pre-alignment's linear part and overlap, as metrics; warns for each failed check.

    ``inputs``: the run's :class:`nephireg.inputs.Inputs`; ``grid``: the fixed image's grid; ``prealign``: the 4x4
    pre-alignment (fixed -> moving, LPS mm); ``warped_norm``: (Z, Y, X) the normalised moving image resampled
    through the final transform onto ``grid``; ``before``: :func:`before_registration` of these, if already measured.
    """
    before = before or before_registration(inputs, grid, prealign)
    for code, message in before.warnings:
        reporter.warn(code, message)
    first = {key: before.metrics[key] for key in ("ncc_before", "ncc_prealigned")}
    metrics: Dict[str, Any] = {**first, "ncc_after": ncc(sitk.GetArrayViewFromImage(inputs.fixed_norm), warped_norm,
                                                         fixed_mask_array(inputs))}
    metrics.update(before.metrics)
    check_deformable_gain(metrics["ncc_before"], metrics["ncc_prealigned"], metrics["ncc_after"], reporter)
    if metrics["prealign_determinant"] > 0:  # under a mirror det J < 0 everywhere: the reflection warning says so
        check_folding(folding_percent, reporter)
    return metrics


def normalised_warped(inputs: Inputs, grid: Grid, transform: Optional[sitk.Transform] = None,
                      warped: Optional[sitk.Image] = None) -> np.ndarray:
    """(Z, Y, X) float32 on ``grid``: the moving image warped as the output is (:func:`nephireg.io.warp_image`;
    ``warped`` when already computed) and mapped to [0, 1] by the intensity window of ``inputs.moving_norm``; the
    similarity before, after pre-alignment and after registration are all measured on it. Without that window
    (inputs built by hand): ``moving_norm`` resampled (the same but where trilinear interpolation straddles the
    window's ends)."""
    if inputs.moving_window is None:
        return sitk.GetArrayFromImage(io.resample_to(inputs.moving_norm, grid, transform))
    warped = warped if warped is not None else io.warp_image(inputs.moving, grid, transform)
    return in_window(sitk.GetArrayViewFromImage(warped), inputs.moving_window)


def fixed_mask_array(inputs: Inputs) -> Optional[np.ndarray]:
    """(Z, Y, X) bool: ``inputs``' fixed mask on the fixed grid, or None without one (the similarity region is then
    the whole fixed image)."""
    return sitk.GetArrayViewFromImage(inputs.fixed_mask) > 0 if inputs.fixed_mask is not None else None
