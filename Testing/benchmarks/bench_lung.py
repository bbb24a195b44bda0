"""Accuracy/speed benchmark on the real lung CT pair: our methods and the peers, measured in the same run.

    python Testing/benchmarks/bench_lung.py [--repeats N] [--methods adam,nephi,nephi-io,convexadam,elastix]
        [--out-json docs/benchmarks/lung.json] [--markdown docs/benchmarks.md] [--work DIR] [--verify-peers]

Every method runs as its own child process (ours through ``python -m nephireg register``, the peers through the
runner mode of this file) and writes an ITK transform fixed -> moving (resampling direction). The parent scores
every method alike: landmark error ||T(baseline_i) - followup_i|| (mm) with the transform read back by SimpleITK,
folding % = det(D T) <= 0 over the whole fixed grid (nephireg.jacobian on nephireg.io.displacement_of), wall time
of the child (median over repeats) and its peak RSS (os.wait4). Needs ../shared/data (relative to the repo root);
exits 0 with "skipped: data absent" when it is missing. Peer install: see Testing/benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "lung-ct-pair"
FIXED = DATA / "3DCT_lung_baseline.mha"
MOVING = DATA / "3DCT_lung_followup.mha"
LUNG_MASK = DATA / "3DCT_lung_baseline_mask.mha"  # scoring only (folding inside the lung); never given to methods
LANDMARKS = (DATA / "landmarks_baseline_51.txt", DATA / "landmarks_followup_51.txt")
# Our methods with options on top of the lung-ct preset, measured beside the defaults: name -> (method, options).
VARIANTS = {"nephi-io-300": ("nephi-io", {"iterations": 300})}
SERVER_SUFFIX = "@server"  # e.g. adam@server: the same command, run by an engine server ('nephireg serve')
SERVED = tuple(f"{m}{SERVER_SUFFIX}" for m in ("adam", "nephi", "nephi-io"))
OURS = ("adam", "nephi", "nephi-io") + tuple(VARIANTS) + SERVED
PEERS = ("convexadam", "elastix")
ALL_METHODS = ("adam", "nephi", "nephi-io") + tuple(VARIANTS) + PEERS  # the default: every cold command and peer
# The targets (ours) and the numbers it measured for the peers on a 2-core CPU (issues 2 and 3).
TARGETS = {
    "adam": "mean <= 1.35, median <= 1.0, folding <= 0.01 %, <= 20 s, <= 2 GB",
    "nephi": "clearly beat pre-alignment alone, <= 5 s",
    "nephi-io": "mean <= 1.45, folding 0.00 %, <= 90 s",
    "nephi-io-300": "more iterations: mean <= 1.35 (say how many, how long)",
    "convexadam": "issue measured: 1.65 mm, 2.6 % folding, 35 s",
    "elastix": "issue measured: 1.46 mm, 0 % folding, 68 s",
}


# -- peers (run inside the child process: ``bench_lung.py --peer NAME --peer-out DIR``) ---------------------
def run_convexadam(out: Path, fixed_path: Path = FIXED, moving_path: Path = MOVING) -> Dict[str, object]:
    """convexAdam with its defaults on the moving image resampled (identity, physical space) onto the fixed grid.

    convexAdam needs both images on one voxel grid; its output ``disp`` (Z, Y, X, 3) is in fixed-grid voxels along
    the array axes (z, y, x), meaning warped[idx] = moving[idx + disp[idx]] (its apply_convex). In physical LPS mm
    that is u = direction @ diag(spacing) @ disp_ijk, with disp_ijk = disp reversed to (i, j, k) order.
    """
    import SimpleITK as sitk
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt

    from nephireg.geometry import Grid
    from nephireg.io import write_transform

    fixed = sitk.ReadImage(str(fixed_path), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(moving_path), sitk.sitkFloat32)
    air = float(sitk.GetArrayViewFromImage(moving).min())
    moving_on_fixed = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, air)
    disp = convex_adam_pt(sitk.GetArrayFromImage(fixed), sitk.GetArrayFromImage(moving_on_fixed),
                          device=torch.device("cpu"))
    grid = Grid.of(fixed)
    u = disp[..., ::-1] @ grid.index_to_physical()[:3, :3].T
    write_transform(u, grid, out / "transform.h5")
    np.save(out / "disp_voxels.npy", disp.astype(np.float32))  # kept for --verify-peers
    import convexAdam
    return {"version": getattr(convexAdam, "__version__", _dist_version("convexAdam")),
            "parameters": "convex_adam_pt defaults (mind_r 1, mind_d 2, lambda 1.25, grid_sp 6, disp_hw 4, "
                          "80 Adam iterations, grid_sp_adam 2, ic True, no masks); moving resampled onto the "
                          "fixed grid by identity in physical space",
            "torch_threads": torch.get_num_threads()}


def run_elastix(out: Path, fixed_path: Path = FIXED, moving_path: Path = MOVING) -> Dict[str, object]:
    """itk-elastix, default 'affine' then default 'bspline' parameter maps, physical space (no resampling first).

    transformix's deformation field is T(x) - x in physical mm on the fixed grid (fixed -> moving), which is
    exactly the displacement an ITK DisplacementFieldTransform stores.
    """
    import itk
    import SimpleITK as sitk

    from nephireg.geometry import Grid
    from nephireg.io import write_transform

    fixed = itk.imread(str(fixed_path), itk.F)
    moving = itk.imread(str(moving_path), itk.F)
    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("affine"))
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("bspline"))
    _warped, result = itk.elastix_registration_method(fixed, moving, parameter_object=parameters,
                                                log_to_console=False, output_directory=str(out))
    field = itk.transformix_deformation_field(moving, result)
    grid = Grid.of(sitk.ReadImage(str(fixed_path)))
    field_grid = (tuple(int(s) for s in itk.size(field)), tuple(float(s) for s in itk.spacing(field)),
                  tuple(float(o) for o in itk.origin(field)))
    if field_grid[0] != grid.size or not np.allclose(field_grid[1], grid.spacing) \
            or not np.allclose(field_grid[2], grid.origin, atol=1e-3):
        raise RuntimeError(f"transformix field grid {field_grid} is not the fixed grid {grid}")
    write_transform(itk.array_from_image(field).astype(np.float64), grid, out / "transform.h5")
    return {"version": _dist_version("itk-elastix"),
            "parameters": "elastix default 'affine' + default 'bspline' parameter maps, no masks"}


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def peer_main(name: str, out: Path) -> int:
    started = time.perf_counter()
    info = {"convexadam": run_convexadam, "elastix": run_elastix}[name](out)
    info["method_s"] = round(time.perf_counter() - started, 2)
    (out / "result.json").write_text(json.dumps({"method": name, "files": {"transform": "transform.h5"},
                                                 "peer": info}, indent=1))
    return 0


# -- one measured child process ---------------------------------------------------------------------------
def command_for(method: str, out: Path) -> List[str]:
    if method in OURS:
        method = method.removesuffix(SERVER_SUFFIX)
        engine_method, options = VARIANTS.get(method, (method, {}))
        extra = [arg for key, value in options.items() for arg in ("--option", f"{key}={value}")]
        return [sys.executable, "-m", "nephireg", "register", "--fixed", str(FIXED), "--moving", str(MOVING),
                "--method", engine_method, "--preset", "lung-ct", "--device", "cpu", "--out", str(out), "--overwrite",
                "--progress", "none", "--no-overview"] + extra
    return [sys.executable, str(Path(__file__).resolve()), "--peer", method, "--peer-out", str(out)]


def _vm_hwm_kib(pid: int) -> int:
    """The process's peak resident set (VmHWM, KiB) from /proc, 0 when unavailable."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def child_environment(engine: Path = REPO / "NePhiRegistration") -> Dict[str, str]:
    """The runs' environment: ``engine`` (the folder holding the ``nephireg`` package) first on PYTHONPATH, and no
    engine server unless a run names one."""
    return dict(os.environ, NEPHIREG_SERVER="off",
                PYTHONPATH=os.pathsep.join(filter(None, [str(engine), os.environ.get("PYTHONPATH", "")])))


def run_child(cmd: List[str], log: Path, timeout_s: float, engine: Path = REPO / "NePhiRegistration",
              server: Optional[Path] = None) -> Dict[str, object]:
    """Run ``cmd``; wall seconds, exit status, peak RSS (GiB, from the child's rusage) and the log's tail.
    ``engine``: the folder holding the ``nephireg`` package the child imports (first on its PYTHONPATH);
    ``server``: the socket of the engine server the command is to use.

    This thread blocks in ``wait4`` (the wall time ends when the child does, not at the next poll: polling every
    50 ms added 0-50 ms to every run, 25 ms on average); a second thread samples the child's VmHWM every 50 ms and
    kills it at the timeout."""
    env = child_environment(engine)
    if server is not None:
        env["NEPHIREG_SERVER"] = str(server)
    with open(log, "wb") as sink:
        started = time.perf_counter()
        # cwd = the run's folder: transformix writes deformationField.nii into the working directory
        child = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=str(log.parent))
        high_water_kib = [0]
        ended = threading.Event()

        def watch() -> None:
            while not ended.wait(0.05):
                high_water_kib[0] = max(high_water_kib[0], _vm_hwm_kib(child.pid))
                if time.perf_counter() - started > timeout_s:
                    child.kill()
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        pid, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        ended.set()
        watcher.join()
        high_water_kib = high_water_kib[0]
    child.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting on a reaped pid
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    return {"wall_s": round(wall, 2), "exit_code": child.returncode,
            # CPU seconds of the child and its children (user + system): far less sensitive to other load than wall
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            # VmHWM (polled every 50 ms) is the child's own peak after exec; ru_maxrss is not reset by exec, so it
            # carries this (large) harness's RSS at fork time: used only where /proc is absent.
            "peak_rss_gib": round((high_water_kib or usage.ru_maxrss) / 1024 ** 2, 3),
            "timed_out": wall > timeout_s, "log_tail": " | ".join(tail)[-400:]}


def error_message(method: str, out: Path, exit_code: int, timeout_s: float) -> str:
    """``--progress none`` prints no error; rerun (untimed) with ``--progress jsonl`` to read the error event."""
    cmd = [a if a != "none" else "jsonl" for a in command_for(method, out)]
    run_child(cmd, out / "log-jsonl.txt", timeout_s)
    for line in reversed((out / "log-jsonl.txt").read_text(errors="replace").splitlines()):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "error":
            return f"exit code {exit_code}: {event.get('message')}"
    return f"exit code {exit_code} (no message)"


# -- scoring (parent process, the same for every method) --------------------------------------------------
def score(transform_path: Path) -> Dict[str, object]:
    import SimpleITK as sitk

    return score_transform(sitk.ReadTransform(str(transform_path)))


def score_transform(transform) -> Dict[str, object]:
    """Landmark errors and folding of a SimpleITK transform (fixed -> moving) on the lung pair."""
    import SimpleITK as sitk

    from nephireg.geometry import Grid
    from nephireg.io import displacement_of
    from nephireg.jacobian import jacobian_determinant

    errors = landmark_errors(transform)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(FIXED))
    reader.ReadImageInformation()
    det = jacobian_determinant(displacement_of(transform, Grid.of(reader)), Grid.of(reader))
    lung = sitk.GetArrayFromImage(sitk.ReadImage(str(LUNG_MASK))) > 0 if LUNG_MASK.exists() else None
    return {"mean_mm": round(float(errors.mean()), 3), "median_mm": round(float(np.median(errors)), 3),
            "max_mm": round(float(errors.max()), 3), "count": int(errors.size),
            "folding_percent": round(float(100.0 * np.count_nonzero(det <= 0) / det.size), 4),
            "folding_lung_percent": None if lung is None else round(float(100.0 * np.mean(det[lung] <= 0)), 4),
            "errors_mm": [round(float(e), 3) for e in errors]}


def landmark_errors(transform) -> np.ndarray:
    """(n,) mm: ||T(baseline_i) - followup_i|| for a SimpleITK transform T (fixed -> moving)."""
    from nephireg.io import read_points
    from nephireg.prealign import landmark_errors as errors

    return errors(transform, *(read_points(p) for p in LANDMARKS))


def verify_convexadam(out: Path, fixed_path: Path = FIXED, moving_path: Path = MOVING) -> Dict[str, float]:
    """Compare convexAdam's own warp (its apply_convex) with SimpleITK resampling through our converted transform."""
    import SimpleITK as sitk
    from convexAdam.apply_convex import apply_convex

    fixed = sitk.ReadImage(str(fixed_path), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(moving_path), sitk.sitkFloat32)
    air = float(sitk.GetArrayViewFromImage(moving).min())
    on_fixed = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, air)
    disp = np.load(out / "disp_voxels.npy").astype(np.float64)
    theirs = apply_convex(disp, on_fixed)
    ours = sitk.GetArrayFromImage(sitk.Resample(on_fixed, fixed, sitk.ReadTransform(str(out / "transform.h5")),
                                                sitk.sitkLinear, air))
    # Compare where the mapped point lies inside the grid: outside, map_coordinates pads with 0, ITK with ``air``.
    target = np.indices(disp.shape[:3]).transpose(1, 2, 3, 0) + disp
    inside = np.all((target >= 0) & (target <= np.array(disp.shape[:3]) - 1), axis=-1)
    diff = np.abs(theirs - ours)[inside]
    return {"warp_max_abs_diff_hu": round(float(diff.max()), 5), "compared_fraction": round(float(inside.mean()), 4)}


def verify_elastix(out: Path) -> Dict[str, float]:
    """Map the baseline landmarks with transformix (elastix's own point mapping) and compare with our transform."""
    import itk
    import SimpleITK as sitk

    from nephireg.io import read_points, write_points

    baseline = read_points(LANDMARKS[0])
    write_points(baseline, out / "baseline.pts")
    parameters = itk.ParameterObject.New()
    files = sorted(out.glob("TransformParameters.*.txt"))
    for f in files:
        parameters.AddParameterFile(str(f))
    moving = itk.imread(str(MOVING), itk.F)
    transformix = itk.TransformixFilter.New(Input=moving, TransformParameterObject=parameters)
    transformix.SetFixedPointSetFileName(str(out / "baseline.pts"))
    transformix.SetOutputDirectory(str(out))
    transformix.SetLogToConsole(False)
    transformix.UpdateLargestPossibleRegion()
    theirs = []
    for line in (out / "outputpoints.txt").read_text().splitlines():
        part = line.split("OutputPoint = [")[1].split("]")[0]
        theirs.append([float(v) for v in part.split()])
    transform = sitk.ReadTransform(str(out / "transform.h5"))
    ours = np.array([transform.TransformPoint(tuple(float(v) for v in p)) for p in baseline])
    gap = np.linalg.norm(np.asarray(theirs) - ours, axis=1)
    return {"landmark_max_gap_mm": round(float(gap.max()), 4), "landmark_mean_gap_mm": round(float(gap.mean()), 4)}


# -- the benchmark ----------------------------------------------------------------------------------------
def one_run(method: str, out: Path, timeout_s: float, verify: bool,
            engine: Path = REPO / "NePhiRegistration") -> Dict[str, object]:
    """One run of ``method`` into ``out``, scored; ``engine``: the folder of the ``nephireg`` the child imports."""
    out.mkdir(parents=True, exist_ok=True)
    served = method.endswith(SERVER_SUFFIX)
    if served and SERVER.path is None:
        raise RuntimeError(f"{method} needs the engine server (started by _run)")
    runs_before = SERVER.runs_ended() if served else 0
    record: Dict[str, object] = {"method": method, **run_child(command_for(method, out), out / "log.txt", timeout_s,
                                                               engine=engine, server=SERVER.path if served else None)}
    if served:  # the run is the server's fork: its CPU and peak RSS are in the server's log (the client's: ~0)
        ended = SERVER.run_ended(runs_before)
        if ended is None:
            record["exit_code"] = record["exit_code"] or -1
            record["failure"] = "the engine server did not run it (the command ran in its own process)"
            return record
        record["client_peak_rss_gib"], record["client_cpu_s"] = record["peak_rss_gib"], record["cpu_s"]
        record["cpu_s"], record["peak_rss_gib"] = ended
    if record["exit_code"] != 0:
        record["failure"] = record["log_tail"] or f"exit code {record['exit_code']}"
        if record["timed_out"]:
            record["failure"] = f"killed after the --timeout of {timeout_s:.0f} s"
        elif method in OURS and not record["log_tail"]:
            record["failure"] = error_message(method, out, record["exit_code"], timeout_s)
        return record
    manifest = json.loads((out / "result.json").read_text())
    record.update(score(out / manifest["files"]["transform"]))
    if method in OURS:
        record["engine_metrics"] = manifest.get("metrics")
        record["engine_timings_s"] = manifest.get("timings_s")
    else:
        record["peer"] = manifest.get("peer")
        if verify:
            record["verify"] = (verify_convexadam if method == "convexadam" else verify_elastix)(out)
    return record


class BenchServer:
    """The engine server for the ``@server`` methods: ``nephireg serve`` with the runs' environment, its log in the
    work folder."""

    def __init__(self) -> None:
        self.path: Optional[Path] = None
        self.log: Optional[Path] = None

    @contextmanager
    def running(self, work: Path, env: Optional[Dict[str, str]] = None) -> Iterator[None]:
        """The server while the block runs; ``env``: its environment (default: the runs', :func:`child_environment`;
        a client is refused by a server whose load-time environment differs)."""
        folder = Path(tempfile.mkdtemp(prefix="nephireg-bench-"))  # short: a socket path has ~100 bytes
        self.path, self.log = folder / "engine.sock", work / "server.log"
        with open(self.log, "w") as sink:
            server = subprocess.Popen([sys.executable, "-m", "nephireg", "serve", "--socket", str(self.path),
                                       "--idle-exit", "0"], env=env or child_environment(), stderr=sink)
        try:
            deadline = time.monotonic() + 120
            while "engine server ready" not in self.log.read_text():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the engine server did not start: {self.log.read_text()}")
                time.sleep(0.05)
            yield
        finally:
            server.terminate()
            server.wait(timeout=120)
            shutil.rmtree(folder, ignore_errors=True)
            self.path = None

    _ENDED = re.compile(r"^run \d+ ended: exit -?\d+ after [\d.]+ s, CPU ([\d.]+) s, peak RSS (\d+) MiB$", re.M)

    def runs_ended(self) -> int:
        return len(self._ENDED.findall(self.log.read_text()))

    def run_ended(self, before: int) -> Optional[tuple]:
        """(CPU s, peak RSS GiB) of the run that ended after ``before`` others; None when none did."""
        deadline = time.monotonic() + 5  # the log line is written as the client is told the exit code
        while time.monotonic() < deadline:
            found = self._ENDED.findall(self.log.read_text())
            if len(found) > before:
                cpu, peak = found[before]
                return round(float(cpu), 2), round(int(peak) / 1024, 3)
            time.sleep(0.05)
        return None


SERVER = BenchServer()


def summarise(runs: List[Dict[str, object]]) -> Dict[str, object]:
    """Medians over the successful repeats of one method; the failure message when none succeeded."""
    good = [r for r in runs if r.get("exit_code") == 0]
    if not good:
        return {"failure": runs[-1].get("failure", "failed"), "repeats_ok": 0, "repeats": len(runs)}
    keys = ("mean_mm", "median_mm", "max_mm", "folding_percent", "folding_lung_percent", "wall_s", "peak_rss_gib")
    summary = {k: round(statistics.median(float(r[k]) for r in good), 4) for k in keys if r_has(good, k)}
    summary.update(count=good[0]["count"], repeats_ok=len(good), repeats=len(runs),
                   error_pair_20_mm=good[0]["errors_mm"][20])
    return summary


def r_has(runs: List[Dict[str, object]], key: str) -> bool:
    return all(r.get(key) is not None for r in runs)


def machine() -> Dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(), "convexAdam": _dist_version("convexAdam"),
            "itk-elastix": _dist_version("itk-elastix"), "speed_probe_s": speed_probe()}


SPEED_PROBES = {"import_torch": "import torch",
                "fresh_600mb": "import numpy; [numpy.ones(7_500_000) for _ in range(10)]"}
"""Fresh processes whose time tells the VM's phase: this 2-core VM drifts by up to 2x within hours (memory a process
touches for the first time cost ~7 us a page in its slow phase), most for short runs (docs/benchmarks.md, session 8)."""


def speed_probe(repeats: int = 3) -> Dict[str, float]:
    """Median seconds of each :data:`SPEED_PROBES` snippet in a fresh interpreter (minus an empty one's start)."""
    def seconds(code: str) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        return time.perf_counter() - started

    empty = statistics.median(seconds("pass") for _ in range(repeats))
    return {name: round(statistics.median(seconds(code) for _ in range(repeats)) - empty, 3)
            for name, code in SPEED_PROBES.items()}


def identity_error() -> Dict[str, float]:
    import SimpleITK as sitk
    errors = landmark_errors(sitk.Transform())
    return {"mean_mm": round(float(errors.mean()), 3), "median_mm": round(float(np.median(errors)), 3),
            "max_mm": round(float(errors.max()), 3)}


def markdown(report: Dict[str, object]) -> str:
    m, s = report["machine"], report["summary"]
    lines = [
        "# Benchmark: lung CT pair (real data)", "",
        f"**{report['label']}**" if report.get("label") else "", "",
        f"Fixed `{FIXED.name}`, moving `{MOVING.name}`, 51 landmark pairs; before registration the mean landmark "
        f"error is {report['identity']['mean_mm']} mm (max {report['identity']['max_mm']} mm). Every method writes "
        "an ITK transform fixed -> moving; the harness reads it back with SimpleITK and scores all methods alike: "
        "landmark error ||T(baseline) - followup||, folding = det(D T) <= 0 over the whole fixed grid, wall time of "
        "the whole child process (read, register, write), peak RSS of that process. Ours: default `lung-ct` preset, "
        "no user masks. Peers: their defaults (see Testing/benchmarks/README.md).", "",
        f"- Date (UTC): {report['date']}; repeats: {report['repeats']} (medians shown)",
        f"- Machine: {m['nproc']} CPU cores, {m['cpu_model']}; torch {m['torch']} ({m['torch_threads']} threads); "
        f"convexAdam {m['convexAdam']}, itk-elastix {m['itk-elastix']}",
        "- VM speed probe (fresh processes, s): "
        + (", ".join(f"{name} {value}" for name, value in (m.get("speed_probe_s") or {}).items()) or "not measured")
        + " (import_torch: about 1.0 in session 7's fast phase, 1.5-2.1 in session 8's slow one)",
        f"- Load average at start: {report['loadavg_start']} (1/5/15 min), at end: {report['loadavg_end']}. The "
        "machine is shared: other processes may have been running, which inflates wall times.",
        f"- Command: `{report['command']}`", "",
        "| method | mean (mm) | median (mm) | max (mm) | pair 20 (mm, 0-based) | folding % | folding % in lung "
        "| wall (s) | peak mem (GiB) | target / issue's numbers |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, row in s.items():
        target = TARGETS.get(method, "")
        if "failure" in row:
            failure = str(row["failure"]).replace("|", "/")[:200]
            lines.append(f"| {method} | failed: {failure} | | | | | | | | {target} |")
            continue
        lines.append(f"| {method} | {row['mean_mm']:.2f} | {row['median_mm']:.2f} | {row['max_mm']:.2f} | "
                     f"{row['error_pair_20_mm']:.1f} | {row['folding_percent']:.3f} | "
                     f"{_fmt(row.get('folding_lung_percent'), 3)} | "
                     f"{row['wall_s']:.1f} | "
                     f"{row['peak_rss_gib']:.2f} | {target} |")
    lines += ["", "Raw runs (every repeat, per-landmark errors, engine metrics): "
              f"`{report.get('json_path', 'docs/benchmarks/lung.json')}`.", ""]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))  # no empty paragraphs (e.g. without --label)


def _fmt(value: Optional[float], digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated: " + ",".join(ALL_METHODS))
    parser.add_argument("--out-json", default="docs/benchmarks/lung.json")
    parser.add_argument("--markdown", default="docs/benchmarks.md")
    parser.add_argument("--work", default=None, help="folder for the runs' outputs (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run before it is killed")
    parser.add_argument("--verify-peers", action="store_true",
                        help="also check each peer's converted transform against the peer's own warp/point mapping")
    parser.add_argument("--label", default="", help="a line printed above the table (e.g. 'development run')")
    parser.add_argument("--render", metavar="JSON", help="only rewrite --markdown from a results JSON of this script")
    parser.add_argument("--peer", choices=PEERS, help=argparse.SUPPRESS)
    parser.add_argument("--peer-out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    if args.peer:
        return peer_main(args.peer, Path(args.peer_out))
    if args.render:
        (REPO / args.markdown).write_text(markdown(json.loads(Path(args.render).read_text())))
        return 0
    missing = [p for p in (FIXED, MOVING, *LANDMARKS) if not p.exists()]
    if missing:
        print(f"skipped: data absent ({missing[0]})")
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(ALL_METHODS) - set(SERVED))
    if unknown:
        print(f"unknown method(s) {unknown}; choose from {ALL_METHODS}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO / "NePhiRegistration"))
    with work_folder(args.work, "bench_lung_") as work:
        return _run(args, argv, methods, work)


@contextmanager
def work_folder(given: Optional[str], prefix: str) -> Iterator[Path]:
    """``given`` (kept), or a temporary folder that goes with the block: the runs' outputs are GBs."""
    if given:
        yield Path(given)
        return
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args, argv, methods, work: Path) -> int:
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
              "command": " ".join(shlex.quote(a) for a in ["python", "Testing/benchmarks/bench_lung.py",
                                                           *(sys.argv[1:] if argv is None else argv)]),
              "label": args.label, "repeats": args.repeats, "methods": methods,
              "loadavg_start": [round(v, 2) for v in os.getloadavg()], "machine": machine(),
              "identity": identity_error(), "runs": []}
    print(f"work folder {work}; load average {report['loadavg_start']}", flush=True)
    with SERVER.running(work) if set(methods) & set(SERVED) else contextlib.nullcontext():
        _repeats(args, methods, work, report)
    report["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    report["summary"] = {m: summarise([r for r in report["runs"] if r["method"] == m]) for m in methods}
    out_json = REPO / args.out_json
    out_json.parent.mkdir(parents=True, exist_ok=True)
    report["json_path"] = args.out_json
    out_json.write_text(json.dumps(report, indent=1) + "\n")
    (REPO / args.markdown).parent.mkdir(parents=True, exist_ok=True)
    (REPO / args.markdown).write_text(markdown(report))
    print(markdown(report))
    return 0


def _repeats(args, methods: List[str], work: Path, report: Dict[str, object]) -> None:
    for repeat in range(args.repeats):  # interleave methods so load drifts hit all of them alike
        for method in methods:
            record = one_run(method, work / f"{method}-{repeat}", args.timeout, args.verify_peers)
            record["repeat"] = repeat
            report["runs"].append(record)
            shown = {k: record.get(k) for k in ("mean_mm", "median_mm", "max_mm", "folding_percent", "wall_s",
                                                "peak_rss_gib", "verify", "failure") if k in record}
            print(f"{method} #{repeat}: {json.dumps(shown)}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
