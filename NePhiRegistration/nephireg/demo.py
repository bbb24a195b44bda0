"""``nephireg demo``: register the built-in synthetic thorax pair (known deformation) and score the result."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np
import SimpleITK as sitk

from nephireg import io, validate
from nephireg.pipeline import register
from nephireg.progress import Reporter
from nephireg.protocol import RESULT_MANIFEST
from nephireg.synthetic import demo_pair, warp_error_mm

SCORE_POINTS = 4000
INPUT_FILES = {"demo_fixed": "inputs/fixed.nrrd", "demo_moving": "inputs/moving.nrrd",
               "demo_fixed_lungs": "inputs/fixed_lungs.nrrd"}  # manifest "files" keys -> names in the result


def run_demo(args: argparse.Namespace, reporter: Reporter, make_request: Callable[..., Any]) -> Dict[str, Any]:
    """Make the sample pair, register it with ``args``' method and preset (lung-ct by default), and add the
    known-deformation error (mm) to the manifest. The sample images are made in a private temporary folder and
    become part of the result (``OUT/inputs/``, listed in ``files``) only when the whole run succeeds."""
    out = Path(args.out)
    validate.check_output_folder(out, args.overwrite)
    validate.method_settings(make_request(args, "fixed.nrrd", "moving.nrrd", None, None))  # options, before work
    reporter.stage("sample", "Making the synthetic sample pair (thorax phantom, known smooth deformation)")
    fixed, moving, fixed_mask, _, truth, grid = demo_pair(seed=args.seed)
    private = Path(tempfile.mkdtemp(prefix="nephireg-demo-"))
    try:
        paths = {key: private / Path(name).name for key, name in INPUT_FILES.items()}
        io.write_image(sitk.Cast(fixed, sitk.sitkInt16), paths["demo_fixed"])
        io.write_image(sitk.Cast(moving, sitk.sitkInt16), paths["demo_moving"])
        io.write_image(fixed_mask, paths["demo_fixed_lungs"])

        def add_inputs_and_score(manifest: Dict[str, Any], staging: Path) -> None:
            reporter.stage("score", "Scoring against the known deformation")
            transform = io.read_transform(staging / manifest["files"]["transform"])
            manifest["demo_error_mm"] = _score(transform, truth, grid, fixed_mask)
            for key, name in INPUT_FILES.items():
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(paths[key], staging / name)
                manifest["files"][key] = name
            final = out.absolute()  # where the sample images will be, not the private folder they came from
            where = {"fixed": str(final / INPUT_FILES["demo_fixed"]), "moving": str(final / INPUT_FILES["demo_moving"])}
            manifest["inputs"].update(where)
            manifest["parameters"]["request"].update(where)

        request = make_request(args, str(paths["demo_fixed"]), str(paths["demo_moving"]), None, None)
        manifest = register(request, reporter, before_commit=add_inputs_and_score)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    manifest["manifest_path"] = str((out / RESULT_MANIFEST).resolve())
    return manifest


def _score(transform: sitk.Transform, truth: np.ndarray, grid, fixed_mask: sitk.Image) -> Dict[str, float]:
    """Error (mm) of ``transform`` against the known deformation at up to SCORE_POINTS voxels inside the lungs."""
    mask = sitk.GetArrayFromImage(fixed_mask) > 0
    rng = np.random.default_rng(0)
    chosen = np.zeros(mask.size, dtype=bool)
    chosen[rng.choice(np.flatnonzero(mask), size=min(SCORE_POINTS, int(mask.sum())), replace=False)] = True
    sample = chosen.reshape(mask.shape)
    errors = warp_error_mm(transform, truth, grid, sample)
    before = warp_error_mm(sitk.Transform(3, sitk.sitkIdentity), truth, grid, sample)
    return {"mean": float(errors.mean()), "median": float(np.median(errors)), "p95": float(np.percentile(errors, 95)),
            "max": float(errors.max()), "before_mean": float(before.mean()), "points": int(sample.sum())}
