"""Tuning loop for the brain presets on the TUNING pair only: the ROBEX atlas T1 <-> the MNI152 template.

    python Testing/benchmarks/tune_brain.py --work DIR [--ants] \
        --config '{"method": "adam", "preset": "brain-mri", "options": {"regularization": 0.2}}' [--config ...]

The reported brain pair (MNI152 <-> the shared subject, bench_accuracy.py) is never used here. Both images get the
same label-free tissue classes (3-class Otsu of T1 inside the brain, brain_cases.otsu_classes); each config runs in
both directions in this process (``nephireg.pipeline.register``, one torch thread; the affine pre-alignment of each
direction is computed once and reused, since it does not depend on the deformable options), and every result is
appended to ``DIR/tuning.jsonl``: WM/GM Dice, folding % and the registration's own seconds. ``--ants`` adds ANTs
SyN (a child process, bench_accuracy.py's runner) as the reference. ``--synthetic`` adds a known-warp case on the
ROBEX atlas alone (fixed = the atlas, moving = the atlas through a smooth 4 mm warp of 20-40 mm wavelengths, seed 11;
not the reported synthetic-brain case, which warps the MNI152 template): mean ||v(phi(x)) + phi(x) - x|| in the brain.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_accuracy  # noqa: E402
import bench_lung  # noqa: E402
import brain_cases  # noqa: E402

DIRECTIONS = (("robex-atlas", "mni152-otsu"), ("mni152-otsu", "robex-atlas"))  # (fixed, moving)


def prepared(work: Path) -> Dict[str, brain_cases.BrainVolume]:
    volumes = {v.name: v for v in (brain_cases.robex_atlas(), brain_cases.template("otsu"))}
    for volume in volumes.values():
        brain_cases.write_volume(volume, work / "inputs")
    return volumes


def t1_path(work: Path, name: str) -> Path:
    return work / "inputs" / f"{name}_t1.nii.gz"


def cache_prealignment() -> None:
    """Reuse each direction's pre-alignment across configs (same images and preset give the same matrix)."""
    from nephireg import pipeline

    original, memo = pipeline.prealign_matrix, {}

    def cached(request, preset, inputs, reporter):
        key = (request.fixed, request.moving, preset.prealign, request.prealign)
        if key not in memo:
            memo[key] = original(request, preset, inputs, reporter)
        return memo[key]

    pipeline.prealign_matrix = cached


def tuning_pairs(work: Path, volumes, synthetic: Dict = None, directions=DIRECTIONS) -> List[tuple]:
    """(fixed name, moving name, fixed path, moving path, scorer) of every tuning case."""
    pairs = [(fixed, moving, t1_path(work, fixed), t1_path(work, moving),
              lambda t, f=fixed, m=moving: brain_cases.score(t, volumes[f], volumes[m]))
             for fixed, moving in directions]
    if synthetic:
        pairs.append(("robex-atlas", "robex-synthetic", synthetic["fixed"], synthetic["moving"], synthetic["scorer"]))
    return pairs


def run_config(config: Dict, work: Path, volumes, tag: str, synthetic: Dict = None,
               directions=DIRECTIONS) -> List[Dict]:
    pairs = tuning_pairs(work, volumes, synthetic, directions)
    rows = []
    for fixed, moving, fixed_path, moving_path, scorer in pairs:
        out = work / "runs" / f"{tag}-{fixed}-{moving}"
        started = time.perf_counter()
        manifest = _register(config, fixed_path, moving_path, out)
        seconds = time.perf_counter() - started
        rows.append({"config": config, "fixed": fixed, "moving": moving, "seconds": round(seconds, 1),
                     "timings_s": manifest.get("timings_s"), **scorer(sitk.ReadTransform(str(out / "transform.h5")))})
    return rows


def _register(config: Dict, fixed: Path, moving: Path, out: Path) -> Dict:
    from nephireg.inputs import Request
    from nephireg.pipeline import register

    return register(Request(fixed=str(fixed), moving=str(moving), out=str(out), method=config.get("method", "adam"),
                            preset=config.get("preset", "brain-mri"), options=dict(config.get("options", {})),
                            device="cpu", overwrite=True, write_warped=False, write_overview=False))


def synthetic_pair(work: Path, volumes) -> Dict:
    """The ROBEX atlas and the atlas warped by a known smooth displacement (files written once), and its scorer."""
    import numpy as np

    from nephireg import io
    from nephireg.geometry import Grid
    from nephireg.io import displacement_of
    from nephireg.jacobian import jacobian_determinant
    from nephireg.synthetic import deform, random_displacement, warp_error_mm

    atlas = volumes["robex-atlas"]
    grid = Grid.of(atlas.t1)
    truth = random_displacement(grid, amplitude_mm=4.0, sigma_mm=5.0, seed=11)
    paths = {"fixed": t1_path(work, "robex-atlas"), "moving": work / "inputs" / "robex-synthetic_t1.nii.gz"}
    if not paths["moving"].exists():
        io.write_image(deform(atlas.t1, truth, grid, default=0.0), paths["moving"])
    brain = sitk.GetArrayFromImage(atlas.brain) > 0
    chosen = np.zeros(brain.size, dtype=bool)
    chosen[np.random.default_rng(0).choice(np.flatnonzero(brain), 3000, replace=False)] = True
    chosen = chosen.reshape(brain.shape)

    def scorer(transform: sitk.Transform) -> Dict:
        errors = warp_error_mm(transform, truth, grid, chosen)
        det = jacobian_determinant(displacement_of(transform, grid), grid)
        return {"warp_error_mean_mm": round(float(errors.mean()), 3),
                "warp_error_p95_mm": round(float(np.percentile(errors, 95)), 3),
                "folding_percent": round(float(100.0 * np.mean(det <= 0)), 4)}

    return {**paths, "scorer": scorer}


def run_ants(work: Path, volumes, synthetic: Dict = None, directions=DIRECTIONS) -> List[Dict]:
    pairs = tuning_pairs(work, volumes, synthetic, directions)
    rows = []
    for fixed, moving, fixed_path, moving_path, scorer in pairs:
        case = bench_accuracy.Case(f"tune-{fixed}-{moving}", "brain-mri", fixed_path, moving_path, scorer, "")
        out = work / "runs" / f"ants-{fixed}-{moving}"
        out.mkdir(parents=True, exist_ok=True)
        record = bench_lung.run_child(bench_accuracy.command_for("ants", case, out), out / "log.txt", 3600)
        scores = scorer(sitk.ReadTransform(str(out / "transform.h5"))) if record["exit_code"] == 0 else {}
        rows.append({"config": {"method": "ants"}, "fixed": fixed, "moving": moving, "seconds": record["wall_s"],
                     "cpu_s": record["cpu_s"], **scores})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--config", action="append", default=[], help="JSON: method, preset, options")
    parser.add_argument("--ants", action="store_true")
    parser.add_argument("--synthetic", action="store_true", help="also the known-warp case on the ROBEX atlas")
    parser.add_argument("--only-synthetic", action="store_true", help="the known-warp case alone")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    work = Path(args.work)
    volumes = prepared(work)
    cache_prealignment()
    synthetic = synthetic_pair(work, volumes) if args.synthetic or args.only_synthetic else None
    log = work / "tuning.jsonl"
    batches = [("ants", None)] if args.ants else []
    batches += [(f"c{int(time.time())}-{os.getpid()}-{n}", json.loads(c)) for n, c in enumerate(args.config)]
    for tag, config in batches:
        directions = () if args.only_synthetic else DIRECTIONS
        if config is None:
            rows = run_ants(work, volumes, synthetic, directions)
        else:
            rows = run_config(config, work, volumes, tag, synthetic, directions)
        dice_rows = [r for r in rows if "dice_tissue_mean" in r]
        mean = sum(r["dice_tissue_mean"] for r in dice_rows) / max(len(dice_rows), 1)
        with open(log, "a") as sink:
            for row in rows:
                sink.write(json.dumps(row) + "\n")
        summary = [(r["fixed"][:5], r.get("dice_wm", r.get("warp_error_mean_mm")), r.get("dice_gm"),
                    r.get("folding_percent"), r["seconds"]) for r in rows]
        print(f"{json.dumps(config)}: mean tissue Dice {mean:.4f} {summary}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
