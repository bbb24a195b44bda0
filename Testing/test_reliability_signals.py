"""Issue 11, class 3: SIGINT/SIGTERM at any stage - from the first lines of the process to the writing of the
result - give exit 3 and a ``cancelled`` error event, never exit 0 or a result; batch forwards them to its child.
Real signals to real child processes; the progress events say which stage a child is in."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import CancelOnCall, process_gone
from nephireg.errors import Cancelled, describe_failure
from nephireg.fields import evaluate_on_grid
from nephireg.geometry import Grid
from nephireg.prealign import prealign
from nephireg.protocol import ExitCode, parse_event_line

needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads signal masks from /proc")


def smooth_volume(shape, seed):
    noise = sitk.GetImageFromArray(np.random.default_rng(seed).random(shape).astype(np.float32))
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, 3.0))


def shifted_pair(folder: Path, shape) -> dict:
    """A smooth volume of ``shape`` (Z, Y, X) and itself shifted by 2 voxels, written as NRRD: {"fixed", "moving"}."""
    base = smooth_volume(shape, 0)
    paths = {}
    for name, array in (("fixed", base), ("moving", np.roll(base, 2, axis=1))):
        paths[name] = str(folder / f"{name}.nrrd")
        sitk.WriteImage(sitk.GetImageFromArray(array), paths[name])
    return paths


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    """128 x 128 x 96 voxels of 1 mm: writing its result takes long enough to be interrupted."""
    return shifted_pair(tmp_path_factory.mktemp("big"), (96, 128, 128))


def start(*args, **popen):
    return subprocess.Popen([sys.executable, "-m", "nephireg", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a SIGTERM handler installed (its SigCgt mask, from /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt")), 16)
    return bool(mask & (1 << (signal.SIGTERM - 1)))


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def until_stage(proc, stage):
    """Read events until ``stage`` begins; returns them."""
    seen = []
    for line in proc.stdout:
        event = parse_event_line(line)
        if event:
            seen.append(event)
            if event["event"] == "stage" and event["stage"] == stage:
                return seen
    raise AssertionError(f"the run ended before stage {stage}: {seen}")


def finish(proc, signum):
    """Send ``signum``, wait; returns (exit code, events after the signal, stderr, seconds to exit)."""
    sent = time.monotonic()
    proc.send_signal(signum)
    rest, err = proc.communicate(timeout=120)
    return proc.returncode, [e for e in map(parse_event_line, rest.splitlines()) if e], err, time.monotonic() - sent


def assert_cancelled(code, evs, err):
    assert code == ExitCode.CANCELLED, err
    assert evs[-1]["event"] == "error" and evs[-1]["kind"] == "cancelled", evs[-1:]
    assert not any(e["event"] == "result" for e in evs)
    assert "Traceback" not in err


@needs_proc
def test_a_signal_in_the_first_moments_cancels_cleanly(big_pair, tmp_path):
    out = tmp_path / "out"
    proc = start("register", "--fixed", big_pair["fixed"], "--moving", big_pair["moving"], "--out", out,
                 "--progress", "jsonl")
    wait_for(lambda: catches_sigterm(proc.pid))  # the handlers are in place: long before argparse and torch
    code, evs, err, _ = finish(proc, signal.SIGTERM)
    assert_cancelled(code, evs, err)
    assert evs[0]["event"] == "start"  # the protocol's first line still comes first
    assert not out.exists()


@pytest.mark.parametrize("stage, args", [
    ("prealign", ["--prealign", "affine", "--option", "iterations=2"]),
    ("field", ["--prealign", "none", "--option", "iterations=2", "--option", "coarse_iterations=0"]),
])
def test_a_signal_during_a_stage_cancels_within_it(big_pair, tmp_path, stage, args):
    out = tmp_path / "out"
    proc = start("register", "--fixed", big_pair["fixed"], "--moving", big_pair["moving"], "--out", out,
                 "--progress", "jsonl", *args)
    until_stage(proc, stage)
    code, evs, err, seconds = finish(proc, signal.SIGINT)
    assert_cancelled(code, evs, err)
    assert not [e for e in evs if e["event"] == "stage" and e["stage"] == "write"]  # stopped in the stage
    assert not out.exists()
    assert seconds < 30


def test_a_signal_while_writing_keeps_the_old_result(big_pair, tmp_path):
    out = tmp_path / "out"
    base = ["register", "--fixed", big_pair["fixed"], "--moving", big_pair["moving"], "--out", out,
            "--prealign", "none", "--option", "iterations=1", "--option", "coarse_iterations=0", "--progress",
            "jsonl", "--no-overview"]
    from nephireg.cli import main

    assert main([str(a) for a in base]) == ExitCode.SUCCESS  # the old result, made in this process (faster)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = start(*base, "--overwrite")  # with the overview: writing takes longer than the signal's way here
    until_stage(proc, "write")
    code, evs, err, _ = finish(proc, signal.SIGTERM)
    assert_cancelled(code, evs, err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old result intact, no staging left


def _children(pid: int):
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _runs_the_engine(pid: int) -> bool:
    """The child has exec'd the engine (a fresh interpreter, not the batch's fork) and installed its handlers."""
    try:
        return b"register" in Path(f"/proc/{pid}/cmdline").read_bytes() and catches_sigterm(pid)
    except OSError:
        return False


def _is_the_batchs_fork(pid: int, batch: int, running: bool) -> bool:
    """The child is a copy of the batch (its command line), with our handlers; ``running``: it has started threads
    of its own (the registration runs: a fork holds one thread only)."""
    try:
        same = Path(f"/proc/{pid}/cmdline").read_bytes() == Path(f"/proc/{batch}/cmdline").read_bytes()
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return False
    return same and catches_sigterm(pid) and (threads > 1 or not running)


@needs_proc
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("children", ["fork, at once", "fork, running", "fresh interpreter"])
def test_batch_forwards_the_signal_to_its_child_and_exits_3(tmp_path, signum, children):
    base = smooth_volume((16, 16, 16), 1)
    for name, array in (("f", base), ("m", np.roll(base, 1, axis=0))):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / f"{name}.nrrd"))
    (tmp_path / "pairs.csv").write_text("id,fixed,moving\nA,f.nrrd,m.nrrd\nB,f.nrrd,m.nrrd\n")
    fresh = ["--fresh-processes"] if children == "fresh interpreter" else []
    proc = subprocess.Popen([sys.executable, "-m", "nephireg", "batch", "--csv", tmp_path / "pairs.csv",
                             "--out-root", tmp_path / "runs", *fresh, "--", "--option", "iterations=100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if fresh:
        ready = lambda child: _runs_the_engine(child)  # noqa: E731
    else:  # the batch's default on Linux: the engine loaded once, each pair in a fork of the batch
        ready = lambda child: _is_the_batchs_fork(child, proc.pid, running=children == "fork, running")  # noqa: E731
    wait_for(lambda: _children(proc.pid) and ready(_children(proc.pid)[0]))
    child = _children(proc.pid)[0]
    code, _, err, seconds = finish(proc, signum)
    assert code == ExitCode.CANCELLED and "Traceback" not in err, err
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # the child ended with it: no orphan writing a result later
    assert not list((tmp_path / "runs").rglob("result.json"))
    assert seconds < 30


@needs_proc
def test_a_killed_batch_cancels_its_forked_child_instead_of_leaving_it_writing(tmp_path):
    """SIGKILL cannot be forwarded: the fork learns of its batch's death (PR_SET_PDEATHSIG) as a SIGTERM, cancels,
    and leaves neither a result nor its staging folder."""
    base = smooth_volume((16, 16, 16), 1)
    for name, array in (("f", base), ("m", np.roll(base, 1, axis=0))):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / f"{name}.nrrd"))
    (tmp_path / "pairs.csv").write_text("id,fixed,moving\nA,f.nrrd,m.nrrd\n")
    proc = subprocess.Popen([sys.executable, "-m", "nephireg", "batch", "--csv", tmp_path / "pairs.csv",
                             "--out-root", tmp_path / "runs", "--", "--option", "iterations=100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: _children(proc.pid) and _is_the_batchs_fork(_children(proc.pid)[0], proc.pid, running=True))
    child = _children(proc.pid)[0]
    proc.kill()
    proc.communicate(timeout=60)
    wait_for(lambda: process_gone(child), timeout=30)
    assert not list((tmp_path / "runs").rglob("result.json"))
    assert not [p for p in (tmp_path / "runs").rglob("*") if ".partial" in p.name]


def test_affine_prealignment_stops_at_the_next_iteration_when_cancelled():
    grid = Grid((40, 40, 40), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    fixed = sitk.GetImageFromArray(smooth_volume(grid.shape_zyx, 2))
    fixed.SetSpacing(grid.spacing)
    moving = sitk.GetImageFromArray(np.roll(sitk.GetArrayFromImage(fixed), 3, axis=2))
    moving.CopyInformation(fixed)
    polls = []
    prealign(fixed, moving, "affine", cancelled=lambda: polls.append(1) or len(polls) > 3)
    assert 4 <= len(polls) <= 5  # 3 iterations, the 4th stops; the next level is not started
    everything = []
    prealign(fixed, moving, "affine", cancelled=lambda: everything.append(1) and False)
    assert len(everything) > 10  # uncancelled, it runs its iterations (polled at each)


def test_field_evaluation_checks_cancel_between_chunks():
    """A field evaluated point by point (a neural field; a dense one on other axes) checks between chunks."""
    grid = Grid((32, 32, 32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))

    class PointField:
        def displacement_mm(self, points_mm):
            return torch.zeros_like(points_mm)

    cancel = CancelOnCall(3)
    with pytest.raises(Cancelled):
        evaluate_on_grid(PointField(), grid, torch.device("cpu"), chunk_points=32 * 32, cancel=cancel)
    assert cancel.calls == 3  # one check per slab of 1024 points, not one at the end


def test_one_mapping_from_failures_to_exit_codes():
    cpu_oom = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)")
    assert describe_failure(cpu_oom)[:2] == (ExitCode.OUT_OF_MEMORY, "out-of-memory")
    assert describe_failure(MemoryError())[0] == ExitCode.OUT_OF_MEMORY
    full = OSError(errno.ENOSPC, "No space left on device", "/data/out/transform.h5")
    assert describe_failure(full) == (ExitCode.BAD_INPUT, "bad-input",
                                      "/data/out/transform.h5: No space left on device")
    assert describe_failure(KeyboardInterrupt())[0] == ExitCode.CANCELLED
    code, kind, message = describe_failure(ZeroDivisionError("x"))
    assert (code, kind) == (ExitCode.INTERNAL_ERROR, "internal") and "ZeroDivisionError" in message


def test_a_cancel_while_a_module_loads_does_not_wait_for_it(tmp_path, monkeypatch):
    """Loading torch takes a second or more: the command line imports it in a helper thread and polls."""
    from nephireg import signals

    (tmp_path / "slow_to_load.py").write_text("import time\ntime.sleep(3.0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    asked = time.monotonic()

    def cancel_after_a_moment():
        if time.monotonic() - asked > 0.3:
            raise Cancelled()

    with pytest.raises(Cancelled):
        signals.import_polling("slow_to_load", cancel_after_a_moment)
    assert time.monotonic() - asked < 1.5  # not the 3 s of the import
    assert signals.import_polling("json", lambda: None).dumps([1]) == "[1]"


@needs_proc
def test_a_signal_while_torch_loads_cancels_cleanly(big_pair, tmp_path):
    out = tmp_path / "out"
    proc = start("register", "--fixed", big_pair["fixed"], "--moving", big_pair["moving"], "--out", out,
                 "--progress", "jsonl")
    wait_for(lambda: "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text())  # torch's libraries are loading
    code, evs, err, _ = finish(proc, signal.SIGTERM)
    assert_cancelled(code, evs, err)
    assert [e["event"] for e in evs][0] == "start" and not out.exists()


@pytest.fixture(scope="module")
def slow_prefetch_pair(tmp_path_factory):
    """160 x 256 x 256 voxels: reading and pre-aligning them (``--prealign affine``) keeps the command line's
    prefetch child busy for 1.5-2 s on a 2-core CPU, long after a signal sent as it starts."""
    return shifted_pair(tmp_path_factory.mktemp("slow"), (160, 256, 256))


@needs_proc
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_while_the_prefetch_child_reads_leaves_no_process_behind(slow_prefetch_pair, tmp_path, signum):
    """The command line reads the inputs in a forked child while torch loads (nephireg.forked): a cancelled run
    kills and reaps it before it exits (SIGTERM: exit 3, as always), and a killed run takes it along (SIGKILL: the
    child's death signal) - in both cases long before the child's own work would have ended."""
    out = tmp_path / "out"
    # Standard error to a file, not a pipe: the child inherits it, and waiting for a pipe's end would wait for the
    # child's (its standard output is /dev/null).
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "nephireg", "register", "--fixed", slow_prefetch_pair["fixed"],
                                 "--moving", slow_prefetch_pair["moving"], "--out", str(out), "--progress", "jsonl",
                                 "--prealign", "affine"], stdout=subprocess.PIPE, stderr=stderr, text=True)
        wait_for(lambda: _children(proc.pid))  # the prefetch child is forked before torch loads
        child = _children(proc.pid)[0]
        proc.send_signal(signum)
        rest, _ = proc.communicate(timeout=120)
    err = (tmp_path / "stderr.txt").read_text()
    if signum == signal.SIGTERM:
        assert_cancelled(proc.returncode, [e for e in map(parse_event_line, rest.splitlines()) if e], err)
        assert process_gone(child)  # killed and reaped by the engine itself before it exited
    else:
        assert proc.returncode == -signal.SIGKILL
        wait_for(lambda: process_gone(child), timeout=1.0)  # its own work would go on for 1.5 s and more
    assert not out.exists()


def test_a_signal_while_a_single_file_is_published_does_not_interrupt_it(tmp_path, monkeypatch):
    """warp/jacobian/train: a signal during the renames that publish the file (the commit point) is recorded,
    never raised half-way (which would leave the output and its staged copy, and report a cancel)."""
    from nephireg import resultdir, signals

    publish = resultdir._publish_file

    def signalled_publish(staged, target, overwrite):
        os.kill(os.getpid(), signal.SIGTERM)  # handled at once, in the middle of publishing
        publish(staged, target, overwrite)

    monkeypatch.setattr(resultdir, "_publish_file", signalled_publish)
    target = tmp_path / "w.txt"
    with signals.interrupting():
        with resultdir.staged_file(target, overwrite=False) as staged:
            staged.write_text("complete")
    assert target.read_text() == "complete" and [p.name for p in tmp_path.iterdir()] == ["w.txt"]
    with pytest.raises(Cancelled):  # outside the held renames a signal still cancels
        with signals.interrupting():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.0)


def test_a_signal_while_a_child_is_started_is_raised_once_the_start_is_complete():
    """batch: ``signals.deferred`` lets a step finish (a child started and its handle kept) and raises at its end;
    without a signal it raises nothing, and outside ``interrupting`` it only records."""
    from nephireg import signals

    steps = []
    with pytest.raises(Cancelled):
        with signals.interrupting():
            with signals.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)  # the handler has run: recorded, not raised here
                steps.append("completed")
            steps.append("not reached")
    assert steps == ["completed"]
    with signals.interrupting():
        with signals.deferred():
            steps.append("quiet")
    assert steps[-1] == "quiet"


def test_a_fork_keeps_only_the_signals_received_after_it():
    """An engine child of batch: what the batch recorded before the fork is not the child's; what came after is."""
    from nephireg import signals

    with signals.interrupting():
        with signals.held():
            os.kill(os.getpid(), signal.SIGTERM)  # the batch's own, before the fork
            time.sleep(0.1)
            before_fork = signals.received_count()
            os.kill(os.getpid(), signal.SIGINT)  # arrives "after the fork"
            time.sleep(0.1)
    cancels = []
    previous = {signum: signal.getsignal(signum) for signum in signals.SIGNALS}
    try:
        signals.reset_after_fork(before_fork)
        assert signals.received_count() == 1
        with signals.cooperative(lambda: cancels.append("cancel")):  # the child's run: cancelled at once
            pass
        assert cancels == ["cancel"]
        signals.reset_after_fork(signals.received_count())  # nothing after this "fork"
        with signals.cooperative(lambda: cancels.append("again")):
            pass
        assert cancels == ["cancel"]
    finally:
        signals.reset_after_fork(signals.received_count())
        for signum, handler in previous.items():  # reset_after_fork installed the command line's handlers
            signal.signal(signum, handler)


def test_a_failed_write_stage_stops_the_second_threads_polling_task():
    """The write stage's second thread computes the inverse while files are written; when writing fails, the
    inverse stops at its next check instead of running to its end before the error is reported."""
    import time

    from nephireg.background import Background

    outcome = []

    def long_task(check):
        for _ in range(500):  # 5 s at most: a test that cannot hang
            try:
                check()
            except Cancelled:
                outcome.append("stopped")
                return
            time.sleep(0.01)
        outcome.append("ran to its end")

    with pytest.raises(OSError):
        with Background() as background:
            background.submit(long_task, background.check)
            time.sleep(0.05)
            raise OSError(28, "No space left on device")
    assert outcome == ["stopped"]
