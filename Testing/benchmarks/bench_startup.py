"""Start-up of the engine and of the Slicer module's Register path, measured (issue 13). Not a test.

    python Testing/benchmarks/bench_startup.py [--repeats N]
        [--parts cli,env,register,importtime,overlap,batch,server,slicer]
        [--out-json docs/benchmarks/startup.json] [--markdown FILE] [--work DIR]

Every timing is a fresh process (or, for the Slicer part, a fresh engine process), the variants of one part
interleaved within each repeat, medians over the repeats. The machine may be shared: compare the numbers of one
run with each other (ratios), not with another run's.

* ``cli``: wall time from the exec to the exit of ``python -c pass``, ``python -c "import torch"``,
  ``python -c "import nephireg.pipeline"``, ``python -m nephireg --version``.
* ``env``: ``import torch`` under the child-environment options one might set for the engine process
  (``TORCH_DEVICE_BACKEND_AUTOLOAD=0``, ``PYTORCH_JIT=0``, one OpenMP/MKL thread) and the engine's own imports with
  ``PYTHONDONTWRITEBYTECODE=1`` and no bytecode cache (every run compiles nephireg) against a warm cache.
* ``register``: one real registration (``python -m nephireg register ... --method nephi --preset lung-ct --device cpu
  --progress jsonl`` on the shared lung pair): when (s since the exec) the ``start`` event, each ``stage`` event and
  the ``result`` event arrive, and the exit; plus the engine's own ``timings_s``.
* ``importtime``: ``-X importtime`` of that command: the top-level modules imported before torch starts loading.
* ``overlap``: what the prefetch (reading, lung masks, pre-alignment, resampling onto the working grid and the
  checks before registration, in a forked child and a thread while torch loads) buys: fresh processes that only
  ``import nephireg.pipeline``, only prefetch, do both as the command does (prefetch child + import), both with the
  prefetch in a thread of the process (as before session 7, and where the engine cannot fork), or both one after
  the other.
* ``batch``: ``nephireg batch`` of the lung pair ``BATCH_PAIRS`` times (each row its own output folder), per
  method of ``BATCH_METHODS``: the default children (forks of the batch with the engine loaded once) against
  ``--fresh-processes`` (a fresh interpreter per pair, as before), interleaved; the whole batch's wall time and its
  share per pair, and whether both modes wrote the same det J (bytes).
* ``server``: the ``register`` command of ``register`` as a command of its own and through a ``nephireg serve``
  started here (interleaved): the arrival of the same events; and how long the server took to load the engine.
* ``slicer``: the Slicer module's Register on Slicer's real libraries (trame-slicer ``SlicerApp`` scene as
  ``Testing/slicer_scene.py`` builds it; the lung pair loaded as volume nodes; ``RegistrationJob`` with
  ``python=sys.executable``, as the tests run it): writing the inputs, launch -> ``start`` event, ``start`` ->
  ``result``, ``result`` -> process outcome, the result import into the scene, the temp clean-up, and the total
  Register -> result in the scene. Variants: the module as it is (``module``: its engine server, started and
  loaded before the repeats, as after a first Register) and ``engine of its own`` (``keepEngineLoaded`` off: every
  Register loads torch, as before session 12); a run that did (not) go through the server as its variant says
  stops the benchmark.

``register``, ``overlap`` and ``slicer`` need ``../shared/data`` (relative to the repository root) and are skipped
with a message without it; ``slicer`` also needs the ``slicer-core``/``trame-slicer`` wheels.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "NePhiRegistration"
DATA = REPO.parent / "shared" / "data" / "lung-ct-pair"
FIXED = DATA / "3DCT_lung_baseline.mha"
MOVING = DATA / "3DCT_lung_followup.mha"
PARTS = ("cli", "env", "register", "importtime", "overlap", "batch", "server", "slicer")
BATCH_PAIRS = 4  # rows of the batch part (the lung pair each time, its own output folder each)
BATCH_METHODS = ("nephi", "adam")
METHOD, PRESET = "nephi", "lung-ct"

CLI_COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "import torch": ["-c", "import torch"],
    "import nephireg.pipeline": ["-c", "import nephireg.pipeline"],
    "nephireg --version": ["-m", "nephireg", "--version"],
}
TORCH_ENV_VARIANTS = {
    "as is": {},
    "TORCH_DEVICE_BACKEND_AUTOLOAD=0": {"TORCH_DEVICE_BACKEND_AUTOLOAD": "0"},
    "PYTORCH_JIT=0": {"PYTORCH_JIT": "0"},
    "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
}
# What a registration imports of the engine (nephi on lung-ct), for the bytecode-cache comparison.
ENGINE_IMPORTS = ("import nephireg.cli, nephireg.inputs, nephireg.lungmask, nephireg.prealign, nephireg.pipeline, "
                  "nephireg.methods.nephi")


def engine_env(extra: Optional[Dict[str, str]] = None, pythonpath: Path = MODULE_DIR) -> Dict[str, str]:
    """This process's environment with ``pythonpath`` first on PYTHONPATH, plus ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(pythonpath)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                              if p and p != str(pythonpath)])
    env.update(extra or {})
    return env


def wall_s(args: List[str], env: Dict[str, str]) -> float:
    """Seconds from the exec of ``python *args`` to its exit (output discarded; a failure raises)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - started


def medians(samples: Dict[str, List[float]]) -> Dict[str, Dict[str, Any]]:
    return {name: {"median_s": round(statistics.median(values), 3), "runs_s": [round(v, 3) for v in values]}
            for name, values in samples.items() if values}


# -- part cli ------------------------------------------------------------------------------------------------
def part_cli(repeats: int) -> Dict[str, Any]:
    samples: Dict[str, List[float]] = {name: [] for name in CLI_COMMANDS}
    env = engine_env()
    for _ in range(repeats):
        for name, args in CLI_COMMANDS.items():
            samples[name].append(wall_s(args, env))
    return medians(samples)


# -- part env ------------------------------------------------------------------------------------------------
def _move_caches(root: Path, away: bool) -> None:
    """Rename every ``__pycache__`` under ``root`` to ``__pycache__.off`` (away) or back."""
    old, new = ("__pycache__", "__pycache__.off") if away else ("__pycache__.off", "__pycache__")
    for folder in sorted(root.rglob(old), key=lambda p: len(p.parts), reverse=True):
        folder.rename(folder.with_name(new))


def part_env(repeats: int, work: Path) -> Dict[str, Any]:
    torch_samples: Dict[str, List[float]] = {name: [] for name in TORCH_ENV_VARIANTS}
    copy = work / "engine-copy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(MODULE_DIR / "nephireg", copy / "nephireg", ignore=shutil.ignore_patterns("__pycache__", "*.pt"))
    cached_env = {k: v for k, v in engine_env(pythonpath=copy).items() if k != "PYTHONDONTWRITEBYTECODE"}
    no_cache_env = engine_env({"PYTHONDONTWRITEBYTECODE": "1"}, pythonpath=copy)
    wall_s(["-c", ENGINE_IMPORTS], cached_env)  # writes the cache
    bytecode: Dict[str, List[float]] = {"PYTHONDONTWRITEBYTECODE=1, no cache (compiles)": [], "bytecode cache": []}
    for _ in range(repeats):
        for name, extra in TORCH_ENV_VARIANTS.items():
            torch_samples[name].append(wall_s(["-c", "import torch"], engine_env(extra)))
        _move_caches(copy, away=True)
        bytecode["PYTHONDONTWRITEBYTECODE=1, no cache (compiles)"].append(wall_s(["-c", ENGINE_IMPORTS], no_cache_env))
        _move_caches(copy, away=False)
        bytecode["bytecode cache"].append(wall_s(["-c", ENGINE_IMPORTS], cached_env))
    shutil.rmtree(copy, ignore_errors=True)
    return {"import torch": medians(torch_samples), "engine imports": medians(bytecode)}


# -- part register -------------------------------------------------------------------------------------------
def register_command(out: Path, extra: Optional[List[str]] = None) -> List[str]:
    return ["-m", "nephireg", "register", "--fixed", str(FIXED), "--moving", str(MOVING), "--method", METHOD,
            "--preset", PRESET, "--device", "cpu", "--progress", "jsonl", "--overwrite", "--out", str(out),
            *(extra or [])]


def timeline(args: List[str], env: Dict[str, str]) -> Dict[str, Any]:
    """Arrival (s since the exec) of the start event, the first event of each stage, the result event, and the
    exit of ``python *args`` (a registration with ``--progress jsonl``)."""
    errors = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full stderr pipe would stall the child
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
    arrivals: Dict[str, float] = {}
    stages: List[str] = []
    for line in proc.stdout:
        now = time.perf_counter() - started
        try:
            event = json.loads(line)
        except ValueError:
            continue
        kind = event.get("event")
        if kind == "stage" and event["stage"] not in arrivals:
            stages.append(event["stage"])
            arrivals[event["stage"]] = now
        elif kind in ("start", "result", "error"):
            arrivals[kind] = now
    code = proc.wait()
    arrivals["exit"] = time.perf_counter() - started
    errors.seek(0)
    stderr = errors.read()
    errors.close()
    if code != 0:
        raise RuntimeError(f"register exited {code}: {stderr[-2000:]}")
    return {"arrivals_s": arrivals, "stages": stages}


def part_register(repeats: int, work: Path) -> Dict[str, Any]:
    runs = []
    for index in range(repeats):
        out = work / f"register-{index}"
        run = timeline(register_command(out), engine_env())
        run["timings_s"] = json.loads((out / "result.json").read_text())["timings_s"]
        runs.append(run)
        shutil.rmtree(out, ignore_errors=True)
    keys = ["start"] + runs[0]["stages"] + ["result", "exit"]
    arrival = {key: round(statistics.median(r["arrivals_s"][key] for r in runs), 3) for key in keys}
    derived = {
        "command to start event": arrival["start"],
        "start event to result event": round(statistics.median(
            r["arrivals_s"]["result"] - r["arrivals_s"]["start"] for r in runs), 3),
        "result event to exit": round(statistics.median(
            r["arrivals_s"]["exit"] - r["arrivals_s"]["result"] for r in runs), 3),
        "engine timings_s total": round(statistics.median(r["timings_s"]["total"] for r in runs), 3),
    }
    stage_keys = [k for k in runs[0]["timings_s"] if k != "total"]
    stage_s = {k: round(statistics.median(r["timings_s"].get(k, 0.0) for r in runs), 3) for k in stage_keys}
    return {"median_arrival_s": arrival, "derived_s": derived, "median_timings_s": stage_s, "runs": runs}


# -- part batch ----------------------------------------------------------------------------------------------
def part_batch(repeats: int, work: Path) -> Dict[str, Any]:
    csv_path = work / "batch.csv"
    csv_path.write_text("id,fixed,moving\n" + "".join(f"pair-{n},{FIXED},{MOVING}\n" for n in range(BATCH_PAIRS)))
    modes = {"forks of the loaded engine (default)": [], "--fresh-processes": ["--fresh-processes"]}
    results: Dict[str, Any] = {}
    for method in BATCH_METHODS:
        samples: Dict[str, List[float]] = {mode: [] for mode in modes}
        same_det = True
        for index in range(repeats):
            order = list(modes) if index % 2 == 0 else list(modes)[::-1]
            outputs = {}
            for mode in order:
                out = work / f"batch-{method}-{index}-{'fresh' if modes[mode] else 'fork'}"
                samples[mode].append(wall_s(["-m", "nephireg", "batch", "--csv", str(csv_path), "--out-root",
                                             str(out), *modes[mode], "--", "--method", method, "--preset", PRESET,
                                             "--device", "cpu"], engine_env()))
                outputs[mode] = out
            dets = [(outputs[mode] / "pair-0" / "jacobian.nrrd").read_bytes() for mode in modes]
            same_det = same_det and dets[0] == dets[1]
            for out in outputs.values():
                shutil.rmtree(out, ignore_errors=True)
        summary = medians(samples)
        for value in summary.values():
            value["per_pair_s"] = round(value["median_s"] / BATCH_PAIRS, 3)
        fork, fresh = (summary[mode]["median_s"] for mode in modes)
        results[method] = {"pairs": BATCH_PAIRS, "modes": summary, "fork_over_fresh": round(fork / fresh, 3),
                           "same_det_j_bytes": same_det}
    return results


# -- part server ---------------------------------------------------------------------------------------------
def part_server(repeats: int, work: Path) -> Dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_lung import BenchServer

    server = BenchServer()
    with server.running(work, engine_env({"NEPHIREG_SERVER": "off"})):
        loaded = float(server.log.read_text().split("engine loaded in ")[1].split(" s")[0])
        variants = {"a command of its own": "off", "through nephireg serve": str(server.path)}
        runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name in variants}
        for index in range(repeats):
            for name in (list(variants) if index % 2 == 0 else list(variants)[::-1]):
                out = work / f"server-{index}-{'own' if variants[name] == 'off' else 'served'}"
                runs[name].append(timeline(register_command(out), engine_env({"NEPHIREG_SERVER": variants[name]})))
                shutil.rmtree(out, ignore_errors=True)
        if server.runs_ended() != repeats:
            raise RuntimeError(f"the server ran {server.runs_ended()} of the {repeats} runs meant for it")
    keys = ["start"] + runs["a command of its own"][0]["stages"] + ["result", "exit"]
    return {"engine_loaded_in_s": loaded,
            "median_arrival_s": {name: {key: round(statistics.median(r["arrivals_s"][key] for r in value), 3)
                                        for key in keys} for name, value in runs.items()},
            "runs": runs}


# -- part importtime -----------------------------------------------------------------------------------------
def part_importtime(work: Path, top: int = 15) -> Dict[str, Any]:
    """The modules ``register`` imports (top level, cumulative us) before the first torch module is loaded.
    Without the data, the same command on absent files (it still loads torch, then reports the bad input)."""
    out = work / "importtime"
    args = register_command(out)
    if not DATA.is_dir():
        args = [a.replace(str(DATA), str(work / "absent")) for a in args]
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], env=engine_env(), capture_output=True,
                          text=True)
    shutil.rmtree(out, ignore_errors=True)
    before: List[Dict[str, Any]] = []
    all_lines = [line for line in proc.stderr.splitlines() if line.startswith("import time:") and "|" in line]
    for line in all_lines[1:]:  # the first is the header
        _, cumulative_us, name = line.split("|")
        name = name.rstrip()[1:]  # one space, then two per nesting level
        if name.strip().split(".")[0] == "torch":
            break
        depth = (len(name) - len(name.lstrip())) // 2
        if depth == 0:
            before.append({"module": name.strip(), "cumulative_ms": round(int(cumulative_us) / 1000, 1)})
    before.sort(key=lambda e: -e["cumulative_ms"])
    return {"before_torch_total_ms": round(sum(e["cumulative_ms"] for e in before), 1), "top": before[:top],
            "data": DATA.is_dir()}


# -- part overlap -------------------------------------------------------------------------------------------
OVERLAP_CHILD = """
import sys
from nephireg.inputs import Request, prefetch_inputs
from nephireg.progress import SilentReporter
mode = sys.argv[1]
request = Request(fixed={fixed!r}, moving={moving!r}, out={out!r}, method={method!r}, preset={preset!r}, device="cpu")

def prefetch():
    return prefetch_inputs(request)

def take(prefetched):  # waits for the prefetch (read, masks, pre-alignment, working grid, checks before)
    reporter = SilentReporter()
    prefetched.result(reporter)
    prefetched.prealignment(reporter)
    prefetched.working_images(reporter)
    prefetched.before_registration()

if mode == "import":
    import nephireg.pipeline
elif mode == "prefetch":
    take(prefetch())
elif mode == "both (as the command)":
    prefetched = prefetch()
    import nephireg.pipeline
    take(prefetched)
elif mode == "both, prefetch in a thread":
    import nephireg.inputs
    nephireg.inputs.can_fork = lambda: False  # the prefetch as before session 7 (and where forking is not allowed)
    prefetched = prefetch()
    import nephireg.pipeline
    take(prefetched)
else:
    take(prefetch())
    import nephireg.pipeline
"""
OVERLAP_MODES = ("import", "prefetch", "both (as the command)", "both, prefetch in a thread", "one after the other")


def part_overlap(repeats: int, work: Path) -> Dict[str, Any]:
    script = work / "overlap_child.py"
    script.write_text(OVERLAP_CHILD.format(fixed=str(FIXED), moving=str(MOVING), out=str(work / "overlap-out"),
                                           method=METHOD, preset=PRESET))
    samples: Dict[str, List[float]] = {mode: [] for mode in OVERLAP_MODES}
    for _ in range(repeats):
        for mode in OVERLAP_MODES:
            samples[mode].append(wall_s([str(script), mode], engine_env()))
    return medians(samples)


# -- part slicer ---------------------------------------------------------------------------------------------
class Marks:
    """Named time stamps (s since :meth:`reset`)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.at: Dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.at.setdefault(name, time.perf_counter() - self.t0)

    def timed(self, name: str, function: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            self.mark(f"{name} begin")
            try:
                return function(*args, **kwargs)
            finally:
                self.mark(f"{name} end")
        return wrapper


# "module": as the panel runs it (its engine server, started and loaded before the repeats, as after a first Register);
# "engine of its own": keepEngineLoaded off, every Register loads torch (the module before session 12)
SLICER_VARIANTS = {"module": {"keepEngineLoaded": True}, "engine of its own": {"keepEngineLoaded": False}}


def _slicer_scene(work: Path):
    """A trame-slicer scene as the tests build it, with Slicer's temp folder and startup environment replaced."""
    sys.path.insert(0, str(REPO / "Testing"))
    import slicer
    from slicer_scene import new_app

    counter = iter(range(10 ** 6))

    def temp_directory(key="__SlicerTemp__", tempDir=None, includeDateTime=True):
        path = work / f"{key}{next(counter)}"
        path.mkdir(parents=True)
        return str(path)

    slicer.util.tempDirectory = temp_directory
    slicer.util.startupEnvironment = lambda: dict(os.environ)
    return new_app()


def part_slicer(repeats: int, work: Path) -> Dict[str, Any]:
    import importlib

    app = _slicer_scene(work)
    logic = importlib.import_module("NePhiRegistrationLib.logic")
    from NePhiRegistrationLib import sceneio
    from NePhiRegistrationLib.runner import EngineProcess
    from NePhiRegistrationLib.settings import RegistrationSettings

    fixed = app.logics.volumes.AddArchetypeVolume(str(FIXED), "baseline", 0)
    moving = app.logics.volumes.AddArchetypeVolume(str(MOVING), "followup", 0)
    marks = Marks()
    originals = {name: getattr(sceneio, name) for name in ("writeInputs", "importResult")}
    for name, function in originals.items():
        setattr(sceneio, name, marks.timed(name, function))

    def factory(command, outDir, onEvent=None, **kwargs):
        def on_event(event):
            marks.mark(f"event {event.get('event')}")
            if onEvent is not None:
                onEvent(event)
        marks.mark("launch")
        return EngineProcess(command, outDir, onEvent=on_event, **kwargs)

    samples: Dict[str, Dict[str, List[float]]] = {name: {} for name in SLICER_VARIANTS}
    from nephireg import engine_link
    from NePhiRegistrationLib import engine, engineserver

    server = engineserver.prepare(sys.executable, engine.childEnvironment(os.environ, device="cpu"))
    served = server is not None
    if served:
        deadline = time.monotonic() + 120
        while not server.ready and time.monotonic() < deadline:
            time.sleep(0.05)
    try:
        for _ in range(repeats):
            for variant, options in SLICER_VARIANTS.items():
                settings = RegistrationSettings(method=METHOD, preset=PRESET, device="cpu", **options)
                marks.reset()
                logs: List[str] = []
                job = logic.RegistrationJob(fixed, moving, settings, python=sys.executable, processFactory=factory,
                                            logics=app.logics, onFinished=lambda job: marks.mark("finished"),
                                            onLog=logs.append)
                job._cleanup = marks.timed("cleanup", job._cleanup)
                job.start()
                outcome = job.wait(interval=0.01)  # the panel polls every 0.1 s; 0.01 s here for the time stamps
                if outcome.status.value != "succeeded":
                    raise RuntimeError(f"Register failed: {outcome.describe()}")
                through_server = (any(line.startswith("Engine server:") for line in logs) and not any(
                    engine_link.is_refusal_line(line, server.socketPath) for line in logs))
                if through_server != (served and settings.keepEngineLoaded):
                    raise RuntimeError(f"{variant}: the engine server was {'' if through_server else 'not '}used")
                at = marks.at
                spans = {
                    "write inputs": at["writeInputs end"] - at["writeInputs begin"],
                    "launch -> start event": at["event start"] - at["launch"],
                    "start -> result event": at["event result"] - at["event start"],
                    "result event -> outcome": at["importResult begin"] - at["event result"],
                    "import result": at["importResult end"] - at["importResult begin"],
                    "temp clean-up": at["cleanup end"] - at["cleanup begin"],
                    "Register -> result in scene": at["importResult end"],
                    "Register -> finished": at["finished"],
                    "engine write stage (timings_s)": outcome.manifest["timings_s"]["write"],
                    "engine total (timings_s)": outcome.manifest["timings_s"]["total"],
                }
                for key, value in spans.items():
                    samples[variant].setdefault(key, []).append(value)
                _remove_result(app.scene, job.result, moving)
    finally:
        for name, function in originals.items():
            setattr(sceneio, name, function)
        engineserver.stopShared()
    return {variant: medians(values) for variant, values in samples.items()}


def _remove_result(scene, result, moving) -> None:
    moving.SetAndObserveTransformNodeID(None)
    for node in (result.transform, result.warpedVolume, result.jacobianVolume, result.inverseTransform):
        if node is not None:
            scene.RemoveNode(node)


# -- report --------------------------------------------------------------------------------------------------
def markdown(results: Dict[str, Any]) -> str:
    lines = [f"### Start-up measured {results['date']} (`bench_startup.py --repeats {results['repeats']}`; "
             f"{results['machine']}; load average {results['load_average_start'][0]:.1f} at the start, "
             f"{results['load_average_end'][0]:.1f} at the end)", ""]
    if "cli" in results:
        base = results["cli"]["python -c pass"]["median_s"]
        lines += ["| command (fresh process, exec -> exit) | median (s) | vs `python -c pass` |", "|---|---|---|"]
        lines += [f"| `{name}` | {v['median_s']:.3f} | {v['median_s'] / base:.1f}x |"
                  for name, v in results["cli"].items()]
        lines.append("")
    if "env" in results:
        torch_base = results["env"]["import torch"]["as is"]["median_s"]
        lines += ["| child environment | `import torch` median (s) | ratio |", "|---|---|---|"]
        lines += [f"| {name} | {v['median_s']:.3f} | {v['median_s'] / torch_base:.2f} |"
                  for name, v in results["env"]["import torch"].items()]
        engine = results["env"]["engine imports"]
        cached = engine["bytecode cache"]["median_s"]
        lines += ["", "| engine imports (nephi run's modules) | median (s) | ratio |", "|---|---|---|"]
        lines += [f"| {name} | {v['median_s']:.3f} | {v['median_s'] / cached:.2f} |" for name, v in engine.items()]
        lines.append("")
    if "register" in results:
        reg = results["register"]
        lines += [f"`nephireg register` ({METHOD}, {PRESET}, cpu, lung pair): event arrival, s since the exec "
                  "(medians)", "", "| event | arrival (s) |", "|---|---|"]
        lines += [f"| {key} | {value:.3f} |" for key, value in reg["median_arrival_s"].items()]
        lines += ["", "| span | s |", "|---|---|"]
        lines += [f"| {key} | {value:.3f} |" for key, value in reg["derived_s"].items()]
        lines += ["", "Engine `timings_s` (medians): " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                                     reg["median_timings_s"].items()), ""]
    if "importtime" in results:
        imp = results["importtime"]
        lines += [f"`-X importtime` of that command, top-level modules imported before torch starts loading "
                  f"(total {imp['before_torch_total_ms']:.0f} ms):", "", "| module | cumulative (ms) |", "|---|---|"]
        lines += [f"| {e['module']} | {e['cumulative_ms']:.1f} |" for e in imp["top"]]
        lines.append("")
    if "overlap" in results:
        alone = results["overlap"]["import"]["median_s"]
        lines += ["Prefetch and torch import, fresh processes (exec -> exit), lung pair:", "",
                  "| process | median (s) | vs import alone |", "|---|---|---|"]
        lines += [f"| {name} | {v['median_s']:.3f} | {v['median_s'] / alone:.2f} |"
                  for name, v in results["overlap"].items()]
        lines.append("")
    if "batch" in results:
        lines += [f"`nephireg batch` of the lung pair, {PRESET}, cpu, interleaved, medians:", "",
                  "| method | children | batch wall (s) | per pair (s) | forks / fresh | same det J |",
                  "|---|---|---|---|---|---|"]
        for method, entry in results["batch"].items():
            for mode, value in entry["modes"].items():
                lines.append(f"| `{method}` x {entry['pairs']} | {mode} | {value['median_s']:.2f} | "
                             f"{value['per_pair_s']:.2f} | {entry['fork_over_fresh']:.2f} | "
                             f"{'yes' if entry['same_det_j_bytes'] else 'NO'} |")
        lines.append("")
    if "server" in results:
        arrivals = results["server"]["median_arrival_s"]
        names = list(arrivals)
        lines += [f"`nephireg register` ({METHOD}, {PRESET}, cpu, lung pair) as a command of its own and through "
                  f"`nephireg serve` (which loaded the engine in {results['server']['engine_loaded_in_s']:.1f} s, "
                  "once): event arrival, s since the exec (medians)", "",
                  "| event | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for key in arrivals[names[0]]:
            lines.append(f"| {key} | " + " | ".join(f"{arrivals[n][key]:.3f}" for n in names) + " |")
        lines.append("")
    if "slicer" in results:
        variants = list(results["slicer"])
        keys = list(results["slicer"][variants[0]])
        lines += ["Slicer module Register on Slicer's libraries (slicer-core, trame-slicer scene), lung pair, "
                  f"{METHOD}/{PRESET}/cpu, medians (s):", "",
                  "| span | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
        for key in keys:
            lines.append(f"| {key} | " + " | ".join(f"{results['slicer'][v][key]['median_s']:.3f}"
                                                   for v in variants) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"any of {','.join(PARTS)}")
    parser.add_argument("--out-json", type=Path, help="write the results here (JSON)")
    parser.add_argument("--markdown", type=Path, help="write the markdown section here (default: stdout)")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "repeats": args.repeats,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
    }
    try:
        for part in parts:
            if part in ("register", "overlap", "batch", "server", "slicer") and not DATA.is_dir():
                print(f"{part}: skipped: {DATA} absent")
                continue
            print(f"{part} ...", file=sys.stderr, flush=True)
            if part == "cli":
                results["cli"] = part_cli(args.repeats)
            elif part == "env":
                results["env"] = part_env(args.repeats, work)
            elif part == "register":
                results["register"] = part_register(args.repeats, work)
            elif part == "importtime":
                results["importtime"] = part_importtime(work)
            elif part == "overlap":
                results["overlap"] = part_overlap(args.repeats, work)
            elif part == "batch":
                results["batch"] = part_batch(args.repeats, work)
            elif part == "server":
                results["server"] = part_server(args.repeats, work)
            elif part == "slicer":
                try:
                    import slicer_core  # noqa: F401
                    import trame_slicer  # noqa: F401
                except ImportError as exc:
                    print(f"slicer: skipped: {exc} (pip install -e '.[test]')")
                    continue
                results["slicer"] = part_slicer(args.repeats, work / "slicer")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    results["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
