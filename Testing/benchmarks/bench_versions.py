"""The engine of this working tree against the engine of an earlier commit, on the real lung pair, interleaved in
one run (issue 13: "half the time at the same accuracy" measured on one machine in one phase). Not a test.

    python Testing/benchmarks/bench_versions.py [--base 3fdf711] [--methods adam,nephi,nephi-io] [--repeats 3]
        [--out-json FILE]

The default base, 3fdf711, is the engine as it was before issue 13's work began (after the accuracy issue's preset
changes). It is checked out into a temporary git worktree (removed at the end); each run is the same command line
as ``bench_lung.py`` (``python -m nephireg register ... --preset lung-ct --device cpu --no-overview``) with that
version's package first on the child's PYTHONPATH, the versions alternating within each method and repeat, scored
by the same code (landmark errors and folding of the written transform, wall time, peak RSS, the engine's own
stage times). The order alternates between repeats (base first, then new first); the old tree's bytecode is
compiled before the first run. This VM's speed drifts by up to 2x within hours (docs/benchmarks.md, session 8):
the ratios new / base of one run are the figures to read, not either time alone; interleaving reduces the drift
between the versions, it does not remove it (the paired ratios' spread says by how much). Needs ../shared/data
and git.
"""

from __future__ import annotations

import argparse
import contextlib
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


def ratios(runs: List[Dict[str, object]], methods: List[str]) -> Dict[str, Dict[str, object]]:
    """Per method: the medians of each version, new / base of the median wall times, and the paired ratios (the
    new run over the base run of the same repeat: the drift between repeats cancels in each) with their median,
    min and max, and how many runs succeeded."""
    table: Dict[str, Dict[str, object]] = {}
    for method in methods:
        medians: Dict[str, object] = {}
        good = {version: {r["repeat"]: r for r in runs if r["method"] == method and r["version"] == version
                          and r["exit_code"] == 0} for version in ("base", "new")}
        for version, by_repeat in good.items():
            tried = sum(1 for r in runs if r["method"] == method and r["version"] == version)
            medians[f"{version}_ok"] = f"{len(by_repeat)} of {tried}"
            if by_repeat:
                medians[version] = {key: statistics.median(float(r[key]) for r in by_repeat.values())
                                    for key in ("wall_s", "mean_mm", "median_mm", "folding_percent", "peak_rss_gib")}
        if "base" in medians and "new" in medians:
            medians["wall_new_over_base"] = round(medians["new"]["wall_s"] / medians["base"]["wall_s"], 3)
            paired = [good["new"][k]["wall_s"] / good["base"][k]["wall_s"] for k in good["new"] if k in good["base"]]
            medians["paired_wall_ratios"] = [round(x, 3) for x in paired]
            medians["paired_wall_ratio_median_min_max"] = [round(statistics.median(paired), 3),
                                                           round(min(paired), 3), round(max(paired), 3)]
        table[method] = medians
    return table


def _interleaved(args: argparse.Namespace, methods: List[str], engines: Dict[str, Path], work: Path,
                 report: Dict[str, object]) -> None:
    """The runs, versions alternating within each method and repeat. ``METHOD@server`` runs the new engine in its
    engine server and the base as the plain command (a server is newer than the base)."""
    for repeat in range(args.repeats):
        for method in methods:
            order = ("base", "new") if repeat % 2 == 0 else ("new", "base")  # ABBA: no fixed first place
            for version in order:
                run_as = method.removesuffix(bench_lung.SERVER_SUFFIX) if version == "base" else method
                record = bench_lung.one_run(run_as, work / f"{version}-{method}-{repeat}", args.timeout,
                                            verify=False, engine=engines[version])
                record.update(version=version, method=method, repeat=repeat)
                record.pop("errors_mm", None)
                report["runs"].append(record)
                print(version, method, repeat, record["wall_s"], record.get("mean_mm"), record.get("median_mm"),
                      record.get("folding_percent"), flush=True)
                if args.out_json:  # every run kept even if the benchmark is interrupted later
                    args.out_json.write_text(json.dumps(report, indent=1) + "\n")


def _git(*args: str) -> str:
    """``git -C REPO args``: its output; raises with git's own message when it fails."""
    done = subprocess.run(["git", "-C", str(bench_lung.REPO), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


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
    sys.path.insert(0, str(bench_lung.REPO / "NePhiRegistration"))  # the scoring uses this tree's nephireg
    with tempfile.TemporaryDirectory(prefix="nephireg-versions-") as work:
        base_tree = Path(work) / "base"
        _git("worktree", "add", "--detach", str(base_tree), args.base)
        try:
            # bytecode compiled before the first run, as the working tree's already is
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(base_tree / "NePhiRegistration")],
                           check=True)
            engines = {"base": base_tree / "NePhiRegistration", "new": bench_lung.REPO / "NePhiRegistration"}
            report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                      "command": " ".join(sys.argv), "base": args.base, "new": _git("describe", "--always", "--dirty"),
                      "new_uncommitted": _git("status", "--porcelain", "--untracked-files=no").splitlines(),
                      "speed_probe_s": bench_lung.speed_probe(), "runs": []}
            served = set(methods) & set(bench_lung.SERVED)
            with bench_lung.SERVER.running(Path(work)) if served else contextlib.nullcontext():
                _interleaved(args, methods, engines, Path(work), report)
        finally:
            subprocess.run(["git", "-C", str(bench_lung.REPO), "worktree", "remove", "--force", str(base_tree)],
                           capture_output=True)
            subprocess.run(["git", "-C", str(bench_lung.REPO), "worktree", "prune"], capture_output=True)
    report["summary"] = ratios(report["runs"], methods)
    print(json.dumps(report["summary"], indent=1))
    if args.out_json:
        args.out_json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
