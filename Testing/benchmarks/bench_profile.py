"""Per-stage profile of our methods with each stage's floor on this CPU: what a stage costs, what the hardware
limit for the work it does is, and the distance between the two as a number.

    python Testing/benchmarks/bench_profile.py [--methods adam,nephi,nephi-io] [--repeats 3]
        [--case lung | --case brain --brain-dir DIR] [--out-json docs/benchmarks/profile.json] [--markdown FILE]

1. The machine: sustained memory bandwidth (a 256 MiB float32 tensor copied, bytes read + written, best of 5),
   float32 FLOP rate (2048^3 matrix product, best of 5), with all of torch's threads, and the rate of writing a
   128 MiB file into the temporary folder the runs write to (page cache, no fsync, best of 3).
2. Timing: each method runs in this process through ``nephireg.pipeline.register`` (after one warm-up run), with
   the stage timings of its manifest; medians over ``--repeats``. The engine's start-up (torch import) is timed
   in a fresh process (``python -c "import nephireg.pipeline"``), median of 3.
3. Work: one more run under two torch dispatch modes counts, per stage, the FLOPs (``torch.utils.flop_counter``:
   matrix products and convolutions) and the bytes every torch operation reads and writes (the sizes of its tensor
   inputs and outputs; views count nothing). The iterations come from the stage's progress steps. For that run the
   pipeline's second thread runs its tasks inline (dispatch modes are per thread). Stages in SimpleITK (reading,
   lung masks, pre-alignment, writing) are not torch: their bytes are the files read or written and the arrays
   SimpleITK fills, counted from the run's sizes; their FLOPs are not counted (n/a).
4. Floor of a stage = max(bytes / bandwidth + file bytes / file write rate, FLOPs / FLOP rate): the time the stage
   would take if every byte it moves streamed at the measured bandwidth, every file byte were written at the
   measured rate of the output's file system, and every FLOP ran at the measured rate. ``time / floor`` is the
   distance to that limit (memory-bound stages: bytes dominate; the NePhi networks: FLOPs).

The byte count is what this implementation moves (an op reading a whole volume to gather from it counts the
volume), not a lower bound of any algorithm: it says how far the code is from the machine, not from an ideal code.
Needs ../shared/data (the lung pair); ``--case brain`` needs the inputs bench_accuracy.py writes (its --work folder
holds ``brain-inputs/``). Exits 0 with "skipped: data absent" without them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "NePhiRegistration"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the command line sets it (nephireg.cli.main)

LUNG = REPO.parent / "shared" / "data" / "lung-ct-pair"
SIMPLEITK_STAGES = ("read", "masks", "preprocess", "prealign", "prepare", "write")


# -- the machine --------------------------------------------------------------------------------------------
def machine_rates(work: Path) -> Dict[str, float]:
    """Sustained memory bandwidth (GB/s, read + write), float32 matrix-product rate (GFLOP/s), and the rate at
    which a 128 MiB file is written into ``work``'s file system (GB/s; as the engine writes its outputs: through
    the page cache, no fsync; best of 3)."""
    import torch

    source = torch.rand(64 * 1024 * 1024)  # 256 MiB
    target = torch.empty_like(source)
    target.copy_(source)
    copies = []
    for _ in range(5):
        start = time.perf_counter()
        target.copy_(source)
        copies.append(time.perf_counter() - start)
    a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
    torch.mm(a, b)
    products = []
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        products.append(time.perf_counter() - start)
    block = os.urandom(128 * 1024 * 1024)
    writes = []
    for i in range(3):
        path = work / f"write-rate-{i}.bin"
        start = time.perf_counter()
        with open(path, "wb") as f:
            f.write(block)
        writes.append(time.perf_counter() - start)
        path.unlink()
    return {"bandwidth_gb_s": round(2 * source.numel() * 4 / min(copies) / 1e9, 2),
            "gflop_s": round(2 * 2048 ** 3 / min(products) / 1e9, 1), "threads": torch.get_num_threads(),
            "file_write_gb_s": round(len(block) / min(writes) / 1e9, 3)}


# -- counting the work of torch operations --------------------------------------------------------------------
def _tensor_bytes(value, seen) -> int:
    """Bytes of the tensors in ``value`` (nested lists/tuples), each storage once per op (``seen``); expanded
    tensors count their storage, not their broadcast size."""
    import torch

    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            return 0
        try:
            key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
            storage = value.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            return value.numel() * value.element_size()
        if key in seen:
            return 0
        seen.add(key)
        return min(value.numel() * value.element_size(), storage)
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in value)
    return 0


def byte_counter():
    """A TorchDispatchMode summing the bytes of every op's tensor inputs and (non-view) outputs in ``.bytes``."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class ByteCounter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not _is_view(func):
                seen = set()
                self.bytes += _tensor_bytes(list(args) + list((kwargs or {}).values()), seen)
                self.bytes += _tensor_bytes(out, seen)
            return out

    def _is_view(func) -> bool:
        schema = func._schema
        return any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns) or \
            func in (torch.ops.aten.detach.default, torch.ops.aten.lift_fresh.default)

    return ByteCounter()


class StageCounter:
    """Wraps a reporter's stage boundaries: per stage, seconds, steps, torch bytes and FLOPs (deltas)."""

    def __init__(self, bytes_mode=None, flop_mode=None) -> None:
        from nephireg.progress import SilentReporter

        counter = self

        class Reporter(SilentReporter):
            def stage(self, name, message=""):
                counter._switch(name)
                super().stage(name, message)

            def step(self, step, total, loss=None):
                counter.steps[counter.current] = counter.steps.get(counter.current, 0) + 1  # one per iteration
                super().step(step, total, loss)

        self.reporter = Reporter()
        self.bytes_mode, self.flop_mode = bytes_mode, flop_mode
        self.current: Optional[str] = None
        self.steps: Dict[str, int] = {}
        self.bytes: Dict[str, int] = {}
        self.flops: Dict[str, int] = {}
        self._marks = (0, 0)

    def _totals(self):
        flops = self.flop_mode.get_total_flops() if self.flop_mode is not None else 0
        return (self.bytes_mode.bytes if self.bytes_mode is not None else 0), flops

    def _switch(self, name: Optional[str]) -> None:
        now = self._totals()
        if self.current is not None:
            self.bytes[self.current] = self.bytes.get(self.current, 0) + now[0] - self._marks[0]
            self.flops[self.current] = self.flops.get(self.current, 0) + now[1] - self._marks[1]
        self.current, self._marks = name, now

    def close(self) -> None:
        self._switch(None)


# -- runs ------------------------------------------------------------------------------------------------------
def request_for(case: str, method: str, out: Path, brain_dir: Optional[Path]):
    from nephireg.inputs import Request

    if case == "lung":
        return Request(fixed=str(LUNG / "3DCT_lung_baseline.mha"), moving=str(LUNG / "3DCT_lung_followup.mha"),
                       out=str(out), method=method, preset="lung-ct", device="cpu", overwrite=True,
                       write_overview=False)
    inputs = brain_dir / "brain-inputs"
    return Request(fixed=str(inputs / "subject_brain.nii.gz"), moving=str(inputs / "mni152_brain.nii.gz"),
                   out=str(out), method=method, preset="brain-mri", device="cpu", overwrite=True,
                   write_overview=False)


def timed_runs(request, repeats: int) -> List[Dict[str, float]]:
    from nephireg import pipeline

    pipeline.register(request)  # warm-up: caches, allocator, model load
    return [pipeline.register(request)["timings_s"] for _ in range(repeats)]


def counted_run(request) -> Dict[str, Any]:
    """One run under the counters, the pipeline's second thread inline; per stage steps, bytes, FLOPs, and the
    manifest (sizes for the SimpleITK stages)."""
    from concurrent.futures import Future

    from torch.utils.flop_counter import FlopCounterMode

    from nephireg import pipeline

    class Inline:  # the Background interface, tasks run at submit (dispatch modes are per thread)
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def check(self):  # never abandoned: the tasks have run by the time anything polls
            return None

        def submit(self, fn, *args):
            future: Future = Future()
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed over as the real Background does
                future.set_exception(exc)
            return future

    original = pipeline.Background
    pipeline.Background = Inline
    try:
        flops = FlopCounterMode(display=False)
        counting = byte_counter()
        stages = StageCounter(counting, flops)
        with flops, counting:
            manifest = pipeline.register(request, stages.reporter)
        stages.close()
    finally:
        pipeline.Background = original
    return {"steps": stages.steps, "bytes": stages.bytes, "flops": stages.flops, "manifest": manifest}


def written_bytes(request, manifest: Dict[str, Any]) -> int:
    """Bytes of the result files a run wrote."""
    return sum(os.path.getsize(Path(request.out) / name) for name in manifest["files"].values())


def simpleitk_bytes(stage: str, request, manifest: Dict[str, Any]) -> Optional[int]:
    """Bytes a SimpleITK stage moves in memory at least, from the run's own sizes: files read plus the arrays it
    fills (voxels x bytes); None for the pre-alignment (an iterative registration inside ITK). The files a stage
    writes are counted apart (:func:`written_bytes`), against the file system's write rate."""
    import numpy as np

    grid = manifest["inputs"]["fixed_grid"]
    fixed_voxels = int(np.prod(grid["size"]))
    if stage == "read":
        files = sum(os.path.getsize(p) for p in (request.fixed, request.moving))
        return 2 * files + 4 * 2 * fixed_voxels  # the files read, the images held, normalised copies (float32)
    if stage == "write":
        return written_bytes(request, manifest)  # the arrays copied into SimpleITK images
    if stage == "preprocess":
        return 2 * 2 * 4 * fixed_voxels  # each image read and its normalised float32 copy written
    if stage == "prepare":  # both images (and masks) read, resampled onto the working grid (float32)
        from nephireg.geometry import Grid

        spacing = manifest["parameters"]["preset_values"]["working_spacing_mm"]
        fixed = Grid(tuple(grid["size"]), tuple(grid["spacing"]), tuple(grid["origin"]), tuple(grid["direction"]))
        working = fixed.resampled(spacing) if spacing else fixed
        return 4 * (fixed_voxels + _voxels(request.moving)) + 4 * 4 * int(np.prod(working.size))
    return None  # masks, pre-alignment: iterative morphology / registration inside ITK


def _voxels(path: str) -> int:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    size = reader.GetSize()
    return int(size[0] * size[1] * size[2])


def profile(case: str, methods: List[str], repeats: int, brain_dir: Optional[Path], work: Path) -> Dict[str, Any]:
    rates = machine_rates(work)
    result: Dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "case": case,
                              "machine": {**rates, "cpu": platform.processor() or platform.machine(),
                                          "cores": os.cpu_count(), "loadavg_start": os.getloadavg()},
                              "startup_s": startup_seconds(), "methods": {}}
    bandwidth, flop_rate = rates["bandwidth_gb_s"] * 1e9, rates["gflop_s"] * 1e9
    disk = rates["file_write_gb_s"] * 1e9
    for method in methods:
        request = request_for(case, method, work / method, brain_dir)
        runs = timed_runs(request, repeats)
        counted = counted_run(request)
        rows = []
        for stage in runs[0]:
            if stage == "total":
                continue
            seconds = statistics.median(r.get(stage, 0.0) for r in runs)
            steps = counted["steps"].get(stage)
            torch_bytes, flops = counted["bytes"].get(stage, 0), counted["flops"].get(stage, 0)
            extra = simpleitk_bytes(stage, request, counted["manifest"]) if stage in SIMPLEITK_STAGES else 0
            moved = torch_bytes + (extra or 0)
            files = written_bytes(request, counted["manifest"]) if stage == "write" else 0
            floor = max(moved / bandwidth + files / disk, flops / flop_rate) if (moved or flops) else None
            rows.append({"stage": stage, "seconds": seconds, "iterations": steps, "bytes": moved, "file_bytes": files,
                         "torch_bytes": torch_bytes, "flops": flops, "floor_s": floor,
                         "bound": None if floor is None else ("FLOPs" if flops / flop_rate > moved / bandwidth
                                                              + files / disk else "files" if files / disk
                                                              > moved / bandwidth else "bytes"),
                         "distance": None if not floor else seconds / floor,
                         "simpleitk": stage in SIMPLEITK_STAGES})
        result["methods"][method] = {"stages": rows, "total_s": statistics.median(r["total"] for r in runs),
                                     "runs": runs}
    result["machine"]["loadavg_end"] = os.getloadavg()
    return result


def startup_seconds(repeats: int = 3) -> Dict[str, float]:
    """Fresh-process seconds: the interpreter alone, and importing the engine's pipeline (torch with it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "NePhiRegistration")}

    def median_of(code: str) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, env=env)
            times.append(time.perf_counter() - start)
        return round(statistics.median(times), 3)

    return {"python": median_of("pass"), "import_pipeline": median_of("import nephireg.pipeline")}


# -- report ----------------------------------------------------------------------------------------------------
def markdown(result: Dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"### Per-stage profile and floors, {result['case']} ({result['date']})", "",
             f"Machine: {m['cores']} cores, measured {m['bandwidth_gb_s']} GB/s memory bandwidth (copy, read + "
             f"write), {m['gflop_s']} GFLOP/s float32 (matrix product), {m['threads']} torch threads, "
             f"{m['file_write_gb_s']:.2f} GB/s writing a file to the output's file system; load "
             f"average {m['loadavg_start'][0]:.2f} at the start, {m['loadavg_end'][0]:.2f} at the end. Start-up in "
             f"a fresh process: interpreter {result['startup_s']['python']:.2f} s, `import nephireg.pipeline` "
             f"(torch) {result['startup_s']['import_pipeline']:.2f} s (floor: none we control).", ""]
    for method, data in result["methods"].items():
        lines += [f"**{method}** (in-process total {data['total_s']:.2f} s, median of {len(data['runs'])})", "",
                  "| stage | time (s) | iterations | bytes moved (GB) | GFLOP | per iteration (GB, GFLOP) | floor (s) "
                  "| bound | time / floor |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in data["stages"]:
            if r["seconds"] < 0.005 and not r["bytes"]:
                continue
            floor = "n/a" if r["floor_s"] is None else f"{r['floor_s']:.3f}"
            distance = "n/a" if r["distance"] is None else f"{r['distance']:.0f}x"
            note = " (SimpleITK: files + arrays)" if r["simpleitk"] and r["bytes"] else ""
            if r.get("file_bytes"):
                note = f" (+ {r['file_bytes'] / 1e9:.2f} GB of files at the file system's rate)"
            flops = "n/a" if r["simpleitk"] and not r["flops"] else f"{r['flops'] / 1e9:.2f}"
            per = ""
            if (r["iterations"] or 0) > 1:
                per = f"{r['bytes'] / r['iterations'] / 1e9:.3f}, {r['flops'] / r['iterations'] / 1e9:.3f}"
            lines.append(f"| {r['stage']}{note} | {r['seconds']:.3f} | {r['iterations'] or ''} | "
                         f"{r['bytes'] / 1e9:.2f} | {flops} | {per} | {floor} | {r['bound'] or ''} | {distance} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="adam,nephi,nephi-io")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", choices=("lung", "brain"), default="lung")
    parser.add_argument("--brain-dir", type=Path, help="bench_accuracy.py --work folder (holds brain-inputs/)")
    parser.add_argument("--out-json", type=Path)
    parser.add_argument("--markdown", type=Path, help="write the section to this file (never docs by default)")
    args = parser.parse_args(argv)
    if args.case == "lung" and not LUNG.is_dir():
        print(f"skipped: data absent ({LUNG})")
        return 0
    if args.case == "brain" and (args.brain_dir is None or not (args.brain_dir / "brain-inputs").is_dir()):
        print("skipped: data absent (--brain-dir DIR/brain-inputs from bench_accuracy.py --work DIR)")
        return 0
    with tempfile.TemporaryDirectory(prefix="nephireg-profile-") as work:
        result = profile(args.case, args.methods.split(","), args.repeats, args.brain_dir, Path(work))
    text = markdown(result)
    print(text)
    if args.out_json:
        args.out_json.write_text(json.dumps(result, indent=1, default=float) + "\n")
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
