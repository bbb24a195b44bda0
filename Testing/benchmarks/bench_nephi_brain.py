"""Benchmark: NePhi models on the real inter-subject brain pair, both directions, through the real command line.

The pair: the MNI152 2009a symmetric template (nilearn wheel) <-> the shared T1 subject (``../shared/data/
brain-mri-t1``). Neither the subject nor the pair was seen by the brain model's training (docs/model-card-brain.md;
the template was, alone, under synthetic warps). Each run is ``python -m nephireg register --preset brain-mri``;
the written transform (fixed -> moving) carries the moving image's tissue masks onto the fixed grid (linear, >= 0.5)
and the tissue Dice against the fixed image's masks is printed, one JSON line per run and direction.

    python Testing/benchmarks/bench_nephi_brain.py --runs prealign nephi nephi:model=PATH [--directions t2s s2t]

A run is ``METHOD[:KEY=VALUE,...]`` (``--option`` values); ``prealign`` is the engine's pre-alignment alone
(``nephi-io`` with 0 iterations and no model: the identity deformable step).
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
from typing import Dict, List, Tuple

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
import brain_cases  # noqa: E402 - the benchmark's brain loading and scoring (Testing/benchmarks/brain_cases.py)

DIRECTIONS = {"t2s": ("subject", "mni152"), "s2t": ("mni152", "subject")}  # name -> (fixed, moving)


def run_spec(spec: str) -> Tuple[str, List[str]]:
    """``METHOD[:K=V,...]`` -> (method, --option values); ``prealign`` -> identity nephi-io."""
    method, _, rest = spec.partition(":")
    options = [o for o in rest.split(",") if o]
    if method == "prealign":
        return "nephi-io", ["iterations=0", *options]
    return method, options


def register(fixed: Path, moving: Path, method: str, options: List[str], out: Path, threads: int) -> Dict:
    cmd = [sys.executable, "-m", "nephireg", "register", "--fixed", str(fixed), "--moving", str(moving),
           "--method", method, "--preset", "brain-mri", "--device", "cpu", "--out", str(out), "--overwrite",
           "--progress", "none", "--no-overview"]
    for option in options:
        cmd += ["--option", option]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    manifest = json.loads((out / "result.json").read_text())
    manifest["wall_s"] = round(time.perf_counter() - started, 1)
    manifest["stderr_warnings"] = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    return manifest


def tissue_dice(fixed: brain_cases.BrainVolume, moving: brain_cases.BrainVolume, transform_path: Path
                ) -> Dict[str, float]:
    transform = sitk.ReadTransform(str(transform_path))
    out = {}
    for tissue in brain_cases.TISSUES:
        warped = brain_cases.warp_mask(moving.masks[tissue], fixed.t1, transform)
        out[f"{tissue}_dice"] = round(brain_cases.dice(warped, sitk.GetArrayViewFromImage(fixed.masks[tissue]) > 0),
                                      4)
    out["mean_dice"] = round(0.5 * (out["wm_dice"] + out["gm_dice"]), 4)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["prealign", "nephi"])
    parser.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=list(DIRECTIONS))
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for the engine process")
    args = parser.parse_args()
    reason = brain_cases.available()
    if reason:
        print(f"skipped: {reason}")
        return 0
    volumes = {"mni152": brain_cases.template(), "subject": brain_cases.subject()}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: brain_cases.write_volume(v, Path(tmp) / name)["t1"] for name, v in volumes.items()}
        for spec in args.runs:
            method, options = run_spec(spec)
            for direction in args.directions:
                fixed, moving = DIRECTIONS[direction]
                out = Path(tmp) / f"run-{len(os.listdir(tmp))}"
                manifest = register(paths[fixed], paths[moving], method, options, out, args.threads)
                scores = tissue_dice(volumes[fixed], volumes[moving], out / manifest["files"]["transform"])
                metrics = manifest["metrics"]
                print(json.dumps({"run": spec, "direction": direction, "fixed": fixed, "moving": moving,
                                  **scores, "wall_s": manifest["wall_s"],
                                  "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                                  "warnings": [w["code"] for w in manifest.get("warnings", [])]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
