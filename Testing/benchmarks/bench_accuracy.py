"""Multi-case accuracy benchmark: our methods beside ANTs SyN, elastix and convexAdam, all in the same run.

    python Testing/benchmarks/bench_accuracy.py [--cases lung,brain-template-to-subject,...] [--methods adam,ants]
        [--out-json docs/benchmarks/accuracy.json] [--markdown docs/benchmarks.md] [--work DIR] [--verify-peers]

Cases (:data:`CASES`; none of them is used for tuning - the brain-mri preset is tuned on the ROBEX atlas <-> MNI152
pair of ``tune_brain.py``):

* ``lung``: the real lung CT pair, landmark error (bench_lung.py's scoring);
* ``brain-template-to-subject`` / ``brain-subject-to-template``: the MNI152 2009a template and the shared T1 subject,
  tissue and subcortical-structure Dice (brain_cases.py);
* ``synthetic-thorax`` / ``synthetic-brain``: a known smooth warp on an oblique, anisotropic grid
  (``nephireg.synthetic``), error ||v(phi(x)) + phi(x) - x|| inside the mask.

Every run is its own child process (ours: ``python -m nephireg register``; peers: the runner mode of this file),
one at a time, and writes an ITK transform fixed -> moving that the parent reads back with SimpleITK and scores
the same way for every method. Wall times are also given as ratios to ANTs SyN in the same case and run.
Peer install: ``pip install torch==2.13.0 convexAdam itk-elastix nilearn`` and antspyx (README.md here).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lung  # noqa: E402  (the lung pair, landmark scoring, child runner, convexAdam/elastix runners)
import brain_cases  # noqa: E402

REPO = bench_lung.REPO
sys.path.insert(0, str(REPO / "NePhiRegistration"))

# ours: name -> (engine method, preset or None for the case's preset)
OURS = {"adam": ("adam", None), "nephi-io": ("nephi-io", None), "adam-generic": ("adam", "generic"),
        "adam-mind-intensity": ("adam", None)}
# expert options on top of the preset's (JSON values): brain-mri's adam before the LNCC term (docs/adam-tuning.md)
OUR_OPTIONS = {"adam-mind-intensity": {"similarity": "mind+intensity"}}
PEERS = ("ants", "elastix", "convexadam")
ALL_METHODS = tuple(OURS) + PEERS
CASE_NAMES = ["lung", "brain-template-to-subject", "brain-subject-to-template", "synthetic-thorax", "synthetic-brain"]
SKIPPED = {("synthetic-thorax", "nephi-io"), ("synthetic-brain", "nephi-io")}  # (case, method): saves ~3 minutes
SYNTHETIC_POINTS = 4000  # mask voxels scored per synthetic case (a fixed-seed subsample: the scoring is per point)


@dataclass
class Case:
    name: str
    preset: str
    fixed: Path
    moving: Path
    scorer: Callable[[sitk.Transform], Dict[str, object]]
    description: str


# -- peers (run inside the child process) -----------------------------------------------------------------
def run_ants(out: Path, fixed_path: Path, moving_path: Path) -> Dict[str, object]:
    """antspyx ``registration(type_of_transform="SyN")`` with its defaults (centre-of-mass start, affine, then SyN).

    The forward transforms (warp, affine) are composed by ANTs itself into one displacement field on the fixed
    grid (``apply_transforms(..., compose=...)``): fixed -> moving, LPS mm, written as our ITK transform file.
    """
    import ants

    from nephireg.geometry import Grid
    from nephireg.io import write_transform

    fixed = ants.image_read(str(fixed_path))
    moving = ants.image_read(str(moving_path))
    result = ants.registration(fixed, moving, type_of_transform="SyN", outprefix=str(out / "ants_"))
    composed = ants.apply_transforms(fixed, moving, result["fwdtransforms"], compose=str(out / "ants_composed_"))
    field = sitk.ReadImage(composed, sitk.sitkVectorFloat64)
    grid = Grid.of(sitk.ReadImage(str(fixed_path)))
    if not bench_lung_grid_matches(Grid.of(field), grid):
        raise RuntimeError(f"ANTs composed field grid {Grid.of(field)} is not the fixed grid {grid}")
    write_transform(sitk.GetArrayFromImage(field), grid, out / "transform.h5")
    ants.image_write(result["warpedmovout"], str(out / "ants_warped.nii.gz"))  # kept for --verify-peers
    return {"version": ants.__version__, "parameters": "ants.registration type_of_transform='SyN', defaults",
            "itk_threads": os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "default (all cores)")}


def bench_lung_grid_matches(a, b) -> bool:
    return a.size == b.size and np.allclose(a.spacing, b.spacing) and np.allclose(a.origin, b.origin, atol=1e-3) \
        and np.allclose(a.direction, b.direction, atol=1e-6)


def peer_main(name: str, out: Path, fixed: Path, moving: Path) -> int:
    started = time.perf_counter()
    runner = {"ants": run_ants, "elastix": bench_lung.run_elastix, "convexadam": bench_lung.run_convexadam}[name]
    info = runner(out, fixed, moving)
    info["method_s"] = round(time.perf_counter() - started, 2)
    (out / "result.json").write_text(json.dumps({"method": name, "files": {"transform": "transform.h5"},
                                                 "peer": info}, indent=1))
    return 0


def verify_ants(out: Path, fixed: Path) -> Dict[str, float]:
    """ANTs' own warped image against SimpleITK resampling of the moving image through our transform file."""
    reference = sitk.ReadImage(str(fixed), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(out / "moving_copy.nii.gz"), sitk.sitkFloat32)
    ours = sitk.GetArrayFromImage(sitk.Resample(moving, reference, sitk.ReadTransform(str(out / "transform.h5")),
                                                sitk.sitkLinear, 0.0))
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "ants_warped.nii.gz"), sitk.sitkFloat32))
    scale = max(float(np.abs(theirs).max()), 1e-12)
    return {"warp_max_abs_diff_relative": round(float(np.abs(ours - theirs).max()) / scale, 5),
            "warp_mean_abs_diff_relative": round(float(np.abs(ours - theirs).mean()) / scale, 6)}


# -- cases ------------------------------------------------------------------------------------------------
def lung_case(work: Path) -> Case:
    return Case("lung", "lung-ct", bench_lung.FIXED, bench_lung.MOVING,
                lambda t: _without_errors(bench_lung.score_transform(t)),
                "real lung CT pair, 51 landmarks, ||T(baseline) - followup|| mm")


def _without_errors(scores: Dict[str, object]) -> Dict[str, object]:
    return {k: v for k, v in scores.items() if k != "errors_mm"}


def brain_cases_for(work: Path) -> List[Case]:
    folder = work / "brain-inputs"
    template, subject = brain_cases.template(), brain_cases.subject()
    paths = {v.name: brain_cases.write_volume(v, folder)["t1"] for v in (template, subject)}
    return [
        Case("brain-template-to-subject", "brain-mri", paths["subject"], paths["mni152"],
             lambda t: brain_cases.score(t, subject, template),
             "fixed = shared subject, moving = MNI152 template; template maps warped onto the subject's aseg"),
        Case("brain-subject-to-template", "brain-mri", paths["mni152"], paths["subject"],
             lambda t: brain_cases.score(t, template, subject),
             "fixed = MNI152 template, moving = shared subject; aseg classes warped onto the template's maps"),
    ]


def synthetic_cases(work: Path) -> List[Case]:
    from nephireg import io
    from nephireg.geometry import Grid
    from nephireg.synthetic import deform, demo_pair, random_displacement, rotation_direction

    folder = work / "synthetic-inputs"
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    fixed, moving, fixed_mask, _moving_mask, truth, grid = demo_pair(seed=5, oblique=True)
    cases.append(_synthetic("synthetic-thorax", "lung-ct", fixed, moving, fixed_mask, truth, grid, folder,
                            "thorax phantom (nephireg.synthetic, seed 5), oblique 2.0 x 2.2 x 3.0 mm grid, "
                            "affine + 6 mm smooth warp; error inside the lung mask"))
    template = brain_cases.template()
    source = Grid.of(template.t1)
    direction = rotation_direction((7.0, -5.0, 9.0))
    spacing = (1.6, 1.4, 2.2)  # a third of the template's voxels: keeps the peers' runs short
    size = tuple(int(round(e / s)) for e, s in zip(source.extent_mm(), spacing))
    centre = source.center_physical()
    half = np.asarray(direction).reshape(3, 3) @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2.0)
    grid = Grid(size, spacing, tuple(centre - half), direction)
    brain_fixed = io.resample_to(template.t1, grid)
    brain_mask = sitk.Cast(io.resample_to(sitk.Cast(template.brain, sitk.sitkFloat32), grid) >= 0.5, sitk.sitkUInt8)
    truth = random_displacement(grid, amplitude_mm=5.0, sigma_mm=10.0, seed=7)
    brain_moving = deform(brain_fixed, truth, grid, default=0.0)
    cases.append(_synthetic("synthetic-brain", "brain-mri", brain_fixed, brain_moving, brain_mask, truth, grid, folder,
                            "MNI152 template resampled onto an oblique 1.6 x 1.4 x 2.2 mm grid, 5 mm smooth warp "
                            "(wavelengths 40-80 mm); error inside the brain"))
    return cases


def _synthetic(name, preset, fixed, moving, mask, truth, grid, folder: Path, description: str) -> Case:
    from nephireg import io
    from nephireg.synthetic import warp_error_mm

    paths = (folder / f"{name}_fixed.nii.gz", folder / f"{name}_moving.nii.gz")
    io.write_image(fixed, paths[0])
    io.write_image(moving, paths[1])
    inside = sitk.GetArrayFromImage(mask) > 0
    chosen = np.zeros(inside.size, dtype=bool)
    flat = np.flatnonzero(inside)
    chosen[np.random.default_rng(0).choice(flat, min(SYNTHETIC_POINTS, flat.size), replace=False)] = True
    chosen = chosen.reshape(inside.shape)

    def scorer(transform: sitk.Transform) -> Dict[str, object]:
        from nephireg.io import displacement_of
        from nephireg.jacobian import jacobian_determinant

        errors = warp_error_mm(transform, truth, grid, chosen)
        det = jacobian_determinant(displacement_of(transform, grid), grid)
        return {"mean_mm": round(float(errors.mean()), 3), "median_mm": round(float(np.median(errors)), 3),
                "p95_mm": round(float(np.percentile(errors, 95)), 3), "max_mm": round(float(errors.max()), 3),
                "count": int(errors.size), "folding_percent": round(float(100.0 * np.mean(det <= 0)), 4),
                "folding_mask_percent": round(float(100.0 * np.mean(det[inside] <= 0)), 4)}

    return Case(name, preset, paths[0], paths[1], scorer, description)


def build_cases(names: List[str], work: Path) -> List[Case]:
    cases: List[Case] = []
    if "lung" in names and bench_lung.FIXED.exists():
        cases.append(lung_case(work))
    if any(n.startswith("brain-") for n in names):
        reason = brain_cases.available()
        if reason:
            print(f"brain cases skipped: {reason}")
        else:
            cases += brain_cases_for(work)
    if any(n.startswith("synthetic-") for n in names):
        cases += synthetic_cases(work)
    return [c for c in cases if c.name in names]


# -- one measured run -------------------------------------------------------------------------------------
def command_for(method: str, case: Case, out: Path) -> List[str]:
    if method in OURS:
        engine_method, preset = OURS[method]
        return [sys.executable, "-m", "nephireg", "register", "--fixed", str(case.fixed), "--moving", str(case.moving),
                "--method", engine_method, "--preset", preset or case.preset, "--device", "cpu", "--out", str(out),
                "--overwrite", "--progress", "none", "--no-overview",
                *[f"--option={key}={json.dumps(value)}" for key, value in OUR_OPTIONS.get(method, {}).items()]]
    return [sys.executable, str(Path(__file__).resolve()), "--peer", method, "--peer-out", str(out),
            "--peer-fixed", str(case.fixed), "--peer-moving", str(case.moving)]


def one_run(method: str, case: Case, out: Path, timeout_s: float, verify: bool) -> Dict[str, object]:
    out.mkdir(parents=True, exist_ok=True)
    record: Dict[str, object] = {"case": case.name, "method": method,
                                 **bench_lung.run_child(command_for(method, case, out), out / "log.txt", timeout_s)}
    if record["exit_code"] != 0:
        record["failure"] = (f"killed after the --timeout of {timeout_s:.0f} s" if record["timed_out"]
                             else record["log_tail"] or f"exit code {record['exit_code']}")
        return record
    manifest = json.loads((out / "result.json").read_text())
    record.update(case.scorer(sitk.ReadTransform(str(out / manifest["files"]["transform"]))))
    if method in OURS:
        record["engine_metrics"] = manifest.get("metrics")
        record["engine_timings_s"] = manifest.get("timings_s")
        record["options"] = manifest.get("parameters", {}).get("options")
    else:
        record["peer"] = manifest.get("peer")
        if verify and method == "ants":
            sitk.WriteImage(sitk.ReadImage(str(case.moving)), str(out / "moving_copy.nii.gz"))
            record["verify"] = verify_ants(out, case.fixed)
    return record


# -- report -----------------------------------------------------------------------------------------------
def ratios_to_ants(runs: List[Dict[str, object]]) -> None:
    """Add ``wall_ratio_to_ants`` and ``cpu_ratio_to_ants`` to every successful run (same case)."""
    ants = {r["case"]: r for r in runs if r["method"] == "ants" and r.get("exit_code") == 0}
    for r in runs:
        if r.get("exit_code") == 0 and r["case"] in ants:
            for key in ("wall_s", "cpu_s"):
                if r.get(key) and ants[r["case"]].get(key):
                    r[key.replace("_s", "_ratio_to_ants")] = round(float(r[key]) / float(ants[r["case"]][key]), 3)


def _columns(case: str) -> List[str]:
    if case.startswith("brain-"):
        return ["dice_wm", "dice_gm", "dice_tissue_mean"] + [f"dice_{s}" for s in brain_cases.STRUCTURES] \
            + ["folding_percent", "folding_brain_percent"]
    if case == "lung":
        return ["mean_mm", "median_mm", "max_mm", "folding_percent", "folding_lung_percent"]
    return ["mean_mm", "median_mm", "p95_mm", "max_mm", "folding_percent", "folding_mask_percent"]


def _label(method: str, case_preset: str) -> str:
    if method in OURS:
        engine_method, preset = OURS[method]
        options = "".join(f", {key}={value}" for key, value in OUR_OPTIONS.get(method, {}).items())
        return f"`{engine_method}`, {preset or case_preset} preset{options}"
    return {"ants": "ANTs SyN (antspyx defaults)", "elastix": "elastix affine + B-spline (defaults)",
            "convexadam": "convexAdam (defaults)"}[method]


def markdown(report: Dict[str, object]) -> str:
    lines = [MARK_START, "## Multi-case accuracy benchmark (`bench_accuracy.py`)", "",
             f"{report['label']}" if report.get("label") else "", "",
             f"- Date (UTC): {report['date']}; machine: {report['machine']['nproc']} CPU cores, "
             f"{report['machine']['cpu_model']}; torch {report['machine']['torch']}; antspyx "
             f"{report['machine']['antspyx']}, itk-elastix {report['machine']['itk-elastix']}, convexAdam "
             f"{report['machine']['convexAdam']}",
             f"- Load average at start {report['loadavg_start']}, at end {report['loadavg_end']} (1/5/15 min). The "
             "machine was shared with other jobs: compare wall times through the ratios to ANTs SyN (same case, "
             "same run), not as absolute seconds.",
             f"- Command: `{report['command']}`",
             "- Every method writes an ITK transform fixed -> moving; the harness reads it back with SimpleITK and "
             "scores all methods alike. Each run is its own process, one at a time. None of these cases was used "
             "for tuning (the brain presets were tuned on the ROBEX atlas <-> MNI152 pair, `tune_brain.py`).", ""]
    for case in report["cases"]:
        runs = [r for r in report["runs"] if r["case"] == case["name"]]
        columns = _columns(case["name"])
        lines += [f"### {case['name']}", "", f"{case['description']}; our preset `{case['preset']}`.", "",
                  "| method | " + " | ".join(c.replace("dice_", "").replace("_percent", " %") for c in columns)
                  + " | wall (s) | wall / ANTs | CPU (s) | CPU / ANTs | peak mem (GiB) |",
                  "|---" * (len(columns) + 6) + "|"]
        for r in runs:
            name = _label(r["method"], case["preset"])
            if r.get("exit_code") != 0:
                lines.append(f"| {name} | failed: {str(r.get('failure', ''))[:160].replace('|', '/')} |"
                             + " |" * (len(columns) + 4))
                continue
            values = [_fmt(r.get(c)) for c in columns]
            lines.append(f"| {name} | " + " | ".join(values) + f" | {r['wall_s']:.1f} | "
                         f"{_fmt(r.get('wall_ratio_to_ants'), 2)} | {_fmt(r.get('cpu_s'), 1)} | "
                         f"{_fmt(r.get('cpu_ratio_to_ants'), 2)} | {r['peak_rss_gib']:.2f} |")
        lines.append("")
    lines += [f"Raw runs (engine metrics, options, stage timings, peer details): `{report['json_path']}`.", "",
              MARK_END]
    return "\n".join(line for n, line in enumerate(lines) if line or (n and lines[n - 1])) + "\n"


def _fmt(value, digits: Optional[int] = None) -> str:
    if value is None:
        return "n/a"
    if digits is None:
        digits = 4 if isinstance(value, float) and abs(value) < 1 else 3
    return f"{value:.{digits}f}"


MARK_START, MARK_END = "<!-- bench_accuracy: start -->", "<!-- bench_accuracy: end -->"


def write_markdown(path: Path, section: str) -> None:
    """Put ``section`` into ``path`` between the markers (replacing an earlier one), else at the top."""
    text = path.read_text() if path.exists() else ""
    if MARK_START in text and MARK_END in text:
        before, rest = text.split(MARK_START, 1)
        text = before + section.rstrip("\n") + rest.split(MARK_END, 1)[1]
    else:
        text = section + "\n" + text
    path.write_text(text)


def machine() -> Dict[str, object]:
    info = bench_lung.machine()
    info["antspyx"] = bench_lung._dist_version("antspyx")
    return info


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    names = CASE_NAMES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(names), help="comma-separated: " + ",".join(names))
    parser.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated: " + ",".join(ALL_METHODS))
    parser.add_argument("--out-json", default="docs/benchmarks/accuracy.json")
    parser.add_argument("--markdown", default="docs/benchmarks.md")
    parser.add_argument("--work", default=None, help="folder for inputs and runs (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run before it is killed")
    parser.add_argument("--verify-peers", action="store_true", help="check ANTs' converted transform against its warp")
    parser.add_argument("--label", default="")
    parser.add_argument("--render", metavar="JSON", help="only rewrite --markdown from a results JSON of this script")
    parser.add_argument("--previous", action="append", default=[], metavar="JSON",
                        help="results JSON of an earlier invocation whose runs join this report (marked by invocation)")
    parser.add_argument("--peer", choices=PEERS, help=argparse.SUPPRESS)
    parser.add_argument("--peer-out", help=argparse.SUPPRESS)
    parser.add_argument("--peer-fixed", help=argparse.SUPPRESS)
    parser.add_argument("--peer-moving", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    if args.peer:
        return peer_main(args.peer, Path(args.peer_out), Path(args.peer_fixed), Path(args.peer_moving))
    if args.render:  # rewrite the markdown (and, with --previous, the merged JSON) from a results JSON
        report = json.loads(Path(args.render).read_text())
        report["label"] = args.label or report.get("label", "")
        if not args.previous:
            write_markdown(REPO / args.markdown, markdown(report))
            return 0
        return finish(report, args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        print(f"unknown method(s) {unknown}; choose from {ALL_METHODS}", file=sys.stderr)
        return 2
    with bench_lung.work_folder(args.work, "bench_accuracy_") as work:
        return _run(args, argv, methods, work)


def _run(args, argv, methods, work: Path) -> int:
    cases = build_cases([c.strip() for c in args.cases.split(",") if c.strip()], work)
    if not cases:
        print("skipped: no case has its data")
        return 0
    report: Dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(shlex.quote(a) for a in ["python", "Testing/benchmarks/bench_accuracy.py",
                                                     *(sys.argv[1:] if argv is None else argv)]),
        "label": args.label, "methods": methods, "machine": machine(),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "cases": [{"name": c.name, "preset": c.preset, "description": c.description, "fixed": str(c.fixed),
                   "moving": str(c.moving)} for c in cases], "runs": []}
    print(f"work folder {work}; load average {report['loadavg_start']}", flush=True)
    for case in cases:
        for method in (m for m in methods if (case.name, m) not in SKIPPED):
            record = one_run(method, case, work / case.name / method, args.timeout, args.verify_peers)
            report["runs"].append(record)
            shown = {k: v for k, v in record.items() if k not in ("engine_metrics", "engine_timings_s", "options",
                                                                   "peer", "log_tail")}
            print(f"{case.name} {method}: {json.dumps(shown)}", flush=True)
    report["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    for r in report["runs"]:
        r["invocation"] = report["date"]
    return finish(report, args)


def merge(report: Dict[str, object], previous_paths: List[str]) -> None:
    """Add the runs (and cases) of earlier invocations' JSONs, unless ``report`` measured the same case and method."""
    for previous in previous_paths:
        earlier = json.loads(Path(previous).read_text())
        done = {(r["case"], r["method"]) for r in report["runs"]}
        report["runs"] += [dict(r, invocation=r.get("invocation", earlier["date"])) for r in earlier["runs"]
                           if (r["case"], r["method"]) not in done]
        known = {c["name"] for c in report["cases"]}
        report["cases"] += [c for c in earlier["cases"] if c["name"] not in known]
        report.setdefault("previous", []).append({k: earlier.get(k) for k in ("date", "command", "loadavg_start",
                                                                             "loadavg_end")})


def finish(report: Dict[str, object], args: argparse.Namespace) -> int:
    """Merge ``--previous``, order, add the ratios to ANTs, write the JSON and the markdown section."""
    merge(report, args.previous)
    order = {m: n for n, m in enumerate(ALL_METHODS)}
    report["runs"].sort(key=lambda r: order.get(r["method"], len(order)))
    case_order = {c: n for n, c in enumerate(CASE_NAMES)}
    report["cases"].sort(key=lambda c: case_order.get(c["name"], len(case_order)))
    ratios_to_ants(report["runs"])
    report["json_path"] = args.out_json
    out_json = REPO / args.out_json
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(REPO / args.markdown, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
