"""Benchmark: NePhi (predict, NePhi + IO) on the real lung CT pair through the real command line.

Runs ``python -m nephireg register --method {nephi,nephi-io} --preset lung-ct`` (no user masks), reads the written
transform back with SimpleITK, and scores the 51 landmark pairs: error_i = ||T(baseline_i) - followup_i|| (mm).
Prints one JSON line per run: mean/median/max error, folding %, wall seconds.

    python Testing/benchmarks/bench_nephi_lung.py [--runs nephi-io:200 nephi-io:1000 nephi] [--option k=v ...]

Needs ../shared/data (relative to the repo root); exits with a message when it is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "lung-ct-pair"


def landmark_errors(transform_path: Path) -> np.ndarray:
    import SimpleITK as sitk

    from nephireg.io import read_points

    transform = sitk.ReadTransform(str(transform_path))
    baseline = read_points(DATA / "landmarks_baseline_51.txt")
    followup = read_points(DATA / "landmarks_followup_51.txt")
    mapped = np.array([transform.TransformPoint(tuple(float(v) for v in p)) for p in baseline])
    return np.linalg.norm(mapped - followup, axis=1)


def run(method: str, iterations: int, options, out: Path, threads: int = 0) -> dict:
    cmd = [sys.executable, "-m", "nephireg", "register", "--fixed", str(DATA / "3DCT_lung_baseline.mha"),
           "--moving", str(DATA / "3DCT_lung_followup.mha"), "--method", method, "--preset", "lung-ct",
           "--device", "cpu", "--out", str(out), "--overwrite", "--progress", "none", "--no-overview"]
    if iterations:
        cmd += ["--iterations", str(iterations)]
    for option in options:
        cmd += ["--option", option]
    started = time.perf_counter()
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - started
    manifest = json.loads((out / "result.json").read_text())
    errors = landmark_errors(out / manifest["files"]["transform"])
    return {"method": method, "iterations": iterations, "options": list(options), "wall_s": round(wall, 1),
            "mean_mm": round(float(errors.mean()), 3), "median_mm": round(float(np.median(errors)), 3),
            "max_mm": round(float(errors.max()), 3), "pairs": int(errors.size),
            "threads": threads or None, "metrics": manifest.get("metrics"), "timings_s": manifest.get("timings_s")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["nephi-io:200", "nephi"])
    parser.add_argument("--option", action="append", default=[])
    parser.add_argument("--threads", type=int, default=0,
                        help="OMP_NUM_THREADS for the engine process (1 is faster on a busy shared CPU)")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"skipped: {DATA} is absent")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.runs:
            method, _, iters = spec.partition(":")
            result = run(method, int(iters or 0), args.option, Path(tmp) / spec.replace(":", "_"),
                         args.threads)
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
