"""The engine of this working tree against the engine of an earlier commit, on the real lung pair, interleaved in
one run (issue 13: "half the time at the same accuracy" measured on one machine in one phase). Not a test.

    python Testing/benchmarks/bench_versions.py [--base 3fdf711] [--methods adam,nephi,nephi-io] [--repeats 3]
        [--out-json FILE]

The default base, 3fdf711, is the engine as it was before issue 13's work began (after the accuracy issue's preset
changes). It is checked out into a temporary git worktree (removed at the end); each run is the same command line
as ``bench_lung.py`` (``python -m nephireg register ... --preset lung-ct --device cpu --no-overview``) with that
version's package first on the child's PYTHONPATH, the versions alternating within each method and repeat, scored
by the same code (landmark errors and folding of the written transform, wall time, peak RSS, the engine's own
stage times). This VM's speed drifts by up to 2x within hours (docs/benchmarks.md, session 8): the ratio
new / base of one run is the figure to read, not either time alone. Needs ../shared/data and git.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lung  # noqa: E402  (this folder's benchmark: its command, runner and scoring)

DEFAULT_BASE = "3fdf711"


def run_version(engine: Path, method: str, out: Path, timeout_s: float) -> Dict[str, object]:
    """One registration by the engine in ``engine`` (the folder holding ``nephireg``), scored as bench_lung does."""
    out.mkdir(parents=True, exist_ok=True)
    record: Dict[str, object] = bench_lung.run_child(bench_lung.command_for(method, out), out / "log.txt",
                                                     timeout_s, engine=engine)
    if record["exit_code"] != 0:
        record["failure"] = record["log_tail"] or f"exit code {record['exit_code']}"
        return record
    manifest = json.loads((out / "result.json").read_text())
    record.update(bench_lung.score(out / manifest["files"]["transform"]))
    record["engine_timings_s"] = manifest.get("timings_s")
    return record


def ratios(runs: List[Dict[str, object]], methods: List[str]) -> Dict[str, Dict[str, object]]:
    """Per method: the medians of each version and new / base of the median wall times."""
    table = {}
    for method in methods:
        medians = {}
        for version in ("base", "new"):
            good = [r for r in runs if r["method"] == method and r["version"] == version and r["exit_code"] == 0]
            if good:
                medians[version] = {key: statistics.median(float(r[key]) for r in good)
                                    for key in ("wall_s", "mean_mm", "median_mm", "folding_percent", "peak_rss_gib")}
        if len(medians) == 2:
            medians["wall_new_over_base"] = round(medians["new"]["wall_s"] / medians["base"]["wall_s"], 3)
        table[method] = medians
    return table


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=DEFAULT_BASE, help="the commit to compare against")
    parser.add_argument("--methods", default="adam,nephi,nephi-io")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900.0, help="per run (s)")
    parser.add_argument("--out-json", type=Path)
    args = parser.parse_args(argv)
    if not bench_lung.FIXED.exists():
        print("skipped: data absent")
        return 0
    methods = [m for m in args.methods.split(",") if m]
    with tempfile.TemporaryDirectory(prefix="nephireg-versions-") as work:
        base_tree = Path(work) / "base"
        subprocess.run(["git", "-C", str(bench_lung.REPO), "worktree", "add", "--detach", str(base_tree), args.base],
                       check=True, capture_output=True)
        try:
            engines = {"base": base_tree / "NePhiRegistration", "new": bench_lung.REPO / "NePhiRegistration"}
            report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                      "command": " ".join(sys.argv), "base": args.base,
                      "new": subprocess.run(["git", "-C", str(bench_lung.REPO), "describe", "--always", "--dirty"],
                                            capture_output=True, text=True).stdout.strip(),
                      "speed_probe_s": bench_lung.speed_probe(), "runs": []}
            for repeat in range(args.repeats):
                for method in methods:
                    for version, engine in engines.items():
                        record = run_version(engine, method, Path(work) / f"{version}-{method}-{repeat}",
                                             args.timeout)
                        record.update(version=version, method=method, repeat=repeat)
                        record.pop("errors_mm", None)
                        report["runs"].append(record)
                        print(version, method, repeat, record["wall_s"], record.get("mean_mm"),
                              record.get("median_mm"), record.get("folding_percent"), flush=True)
        finally:
            subprocess.run(["git", "-C", str(bench_lung.REPO), "worktree", "remove", "--force", str(base_tree)],
                           capture_output=True)
    report["summary"] = ratios(report["runs"], methods)
    print(json.dumps(report["summary"], indent=1))
    if args.out_json:
        args.out_json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
