"""``nephireg demo``: register the built-in synthetic thorax pair (known deformation) and score the result."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np
import SimpleITK as sitk

from nephireg import io
from nephireg.errors import InputError
from nephireg.pipeline import register
from nephireg.progress import Reporter
from nephireg.protocol import RESULT_MANIFEST, write_manifest
from nephireg.synthetic import demo_pair, warp_error_mm

SCORE_POINTS = 4000


def run_demo(args: argparse.Namespace, reporter: Reporter, make_request: Callable[..., Any]) -> Dict[str, Any]:
    """Write the sample pair to ``args.out/inputs``, register it with ``args``' method and preset (lung-ct by
    default), and add the known-deformation error (mm) to the manifest."""
    out = Path(args.out)
    if (out / RESULT_MANIFEST).exists() and not args.overwrite:
        raise InputError("output folder already holds a result (result.json); use --overwrite to replace it", out)
    reporter.stage("sample", "Making the synthetic sample pair (thorax phantom, known smooth deformation)")
    fixed, moving, fixed_mask, _, truth, grid = demo_pair(seed=args.seed)
    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    paths = {name: str(inputs / f"{name}.nrrd") for name in ("fixed", "moving")}
    io.write_image(sitk.Cast(fixed, sitk.sitkInt16), paths["fixed"])
    io.write_image(sitk.Cast(moving, sitk.sitkInt16), paths["moving"])
    io.write_image(fixed_mask, inputs / "fixed_lungs.nrrd")
    manifest = register(make_request(args, paths["fixed"], paths["moving"], None, None), reporter)
    reporter.stage("score", "Scoring against the known deformation")
    transform = io.read_transform(out / manifest["files"]["transform"])
    mask = sitk.GetArrayFromImage(fixed_mask) > 0
    rng = np.random.default_rng(0)
    chosen = np.zeros(mask.size, dtype=bool)
    chosen[rng.choice(np.flatnonzero(mask), size=min(SCORE_POINTS, int(mask.sum())), replace=False)] = True
    sample = chosen.reshape(mask.shape)
    errors = warp_error_mm(transform, truth, grid, sample)
    before = warp_error_mm(sitk.Transform(3, sitk.sitkIdentity), truth, grid, sample)
    manifest["demo_error_mm"] = {"mean": float(errors.mean()), "median": float(np.median(errors)),
                                 "p95": float(np.percentile(errors, 95)), "max": float(errors.max()),
                                 "before_mean": float(before.mean()), "points": int(sample.sum())}
    manifest["files"] = {k: os.path.basename(v) for k, v in manifest["files"].items()}
    write_manifest(str(out), manifest)
    manifest["manifest_path"] = str((out / RESULT_MANIFEST).resolve())
    return manifest
