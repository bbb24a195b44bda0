"""Tuning loop for the brain presets on the TUNING pair only: the ROBEX atlas T1 <-> the MNI152 template.

    python Testing/benchmarks/tune_brain.py --work DIR [--ants] \
        --config '{"method": "adam", "preset": "brain-mri", "options": {"regularization": 0.2}}' [--config ...]

The reported brain pair (MNI152 <-> the shared subject, bench_accuracy.py) is never used here. Both images get the
same label-free tissue classes (3-class Otsu of T1 inside the brain, brain_cases.otsu_classes); each config runs in
both directions in this process (``nephireg.pipeline.register``, one torch thread; the affine pre-alignment of each
direction is computed once and reused, since it does not depend on the deformable options), and every result is
appended to ``DIR/tuning.jsonl``: WM/GM Dice, folding % and the registration's own seconds. ``--ants`` adds ANTs
SyN (a child process, bench_accuracy.py's runner) as the reference.
"""

from __future__ import annotations

import argparse
import json
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


def run_config(config: Dict, work: Path, volumes, tag: str) -> List[Dict]:
    from nephireg.inputs import Request
    from nephireg.pipeline import register

    rows = []
    for fixed, moving in DIRECTIONS:
        out = work / "runs" / f"{tag}-{fixed}"
        started = time.perf_counter()
        manifest = register(Request(fixed=str(t1_path(work, fixed)), moving=str(t1_path(work, moving)), out=str(out),
                                    method=config.get("method", "adam"), preset=config.get("preset", "brain-mri"),
                                    options=dict(config.get("options", {})), device="cpu", overwrite=True,
                                    write_warped=False, write_overview=False))
        seconds = time.perf_counter() - started
        scores = brain_cases.score(sitk.ReadTransform(str(out / "transform.h5")), volumes[fixed], volumes[moving])
        rows.append({"config": config, "fixed": fixed, "moving": moving, "seconds": round(seconds, 1),
                     "timings_s": manifest.get("timings_s"), **scores})
    return rows


def run_ants(work: Path, volumes) -> List[Dict]:
    rows = []
    for fixed, moving in DIRECTIONS:
        case = bench_accuracy.Case(f"tune-{fixed}", "brain-mri", t1_path(work, fixed), t1_path(work, moving),
                                   lambda t, f=fixed, m=moving: brain_cases.score(t, volumes[f], volumes[m]), "")
        out = work / "runs" / f"ants-{fixed}"
        out.mkdir(parents=True, exist_ok=True)
        record = bench_lung.run_child(bench_accuracy.command_for("ants", case, out), out / "log.txt", 3600)
        scores = case.scorer(sitk.ReadTransform(str(out / "transform.h5"))) if record["exit_code"] == 0 else {}
        rows.append({"config": {"method": "ants"}, "fixed": fixed, "moving": moving, "seconds": record["wall_s"],
                     **scores})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--config", action="append", default=[], help="JSON: method, preset, options")
    parser.add_argument("--ants", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    work = Path(args.work)
    volumes = prepared(work)
    cache_prealignment()
    log = work / "tuning.jsonl"
    batches = [("ants", None)] if args.ants else []
    batches += [(f"c{int(time.time())}-{n}", json.loads(c)) for n, c in enumerate(args.config)]
    for tag, config in batches:
        rows = run_ants(work, volumes) if config is None else run_config(config, work, volumes, tag)
        mean = sum(r.get("dice_tissue_mean", 0.0) for r in rows) / len(rows)
        with open(log, "a") as sink:
            for row in rows:
                sink.write(json.dumps(row) + "\n")
        summary = [(r["fixed"][:5], r.get("dice_wm"), r.get("dice_gm"), r.get("folding_percent"), r["seconds"])
                   for r in rows]
        print(f"{json.dumps(config)}: mean tissue Dice {mean:.4f} {summary}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
