"""The Slicer module's process runner driving real child processes (no Slicer, no Qt).

Fake children are small Python scripts written by the tests; one test runs the real engine on a tiny pair.
"""

import importlib.util
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "NePhiRegistration"
sys.path.insert(0, str(MODULE_DIR))

from NePhiRegistrationLib import engine  # noqa: E402
from NePhiRegistrationLib.progress import ProgressState  # noqa: E402
from NePhiRegistrationLib.runner import EngineProcess, RunStatus  # noqa: E402
from NePhiRegistrationLib.settings import RegistrationSettings  # noqa: E402

psutil = pytest.importorskip("psutil")


@pytest.fixture
def workdir(tmp_path):
    """A folder whose path has spaces and non-ASCII characters (as Slicer temp paths on some systems)."""
    folder = tmp_path / "temp dir ünïcödé 名前"
    folder.mkdir()
    return folder


def child(workdir: Path, body: str) -> list:
    script = workdir / "child script.py"
    script.write_text(textwrap.dedent(body), encoding="utf-8")
    return [sys.executable, str(script)]


def line(event: str, **fields) -> str:
    from nephireg.protocol import encode_event

    return encode_event(event, **fields)


def test_events_parsed_malformed_lines_ignored_and_manifest_read(workdir):
    out = workdir / "out"
    body = f"""
        import json, os, sys
        sys.path.insert(0, {str(MODULE_DIR)!r})
        from nephireg import protocol
        out = {str(out)!r}
        print("a stray library print")
        print("{{not json")
        print(json.dumps({{"v": 99, "event": "log", "message": "wrong protocol version"}}))
        print('{line("stage", stage="optimise", message="Optimising")}')
        print('{line("progress", stage="optimise", step=5, total=20, loss=0.5, elapsed_s=1.0, eta_s=3.0)}')
        print('{line("log", level="warning", message="über-warning")}')
        print("[1, 2, 3]")
        sys.stderr.write("a warning on stderr\\n")
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, "transform.h5"), "w").close()
        content = {{"files": {{"transform": "transform.h5"}}, "metrics": {{"folding_percent": 0.0}}}}
        manifest = protocol.write_manifest(out, content)
        print(protocol.encode_event("result", manifest=manifest, metrics={{"folding_percent": 0.0}}))
    """
    events, texts, state = [], [], ProgressState()

    def on_event(event):
        events.append(event)
        state.update(event)

    proc = EngineProcess(child(workdir, body), str(out), onEvent=on_event, onText=texts.append)
    proc.start()
    outcome = proc.wait(timeout=60)
    assert outcome.status == RunStatus.SUCCEEDED, outcome.describe()
    assert [e["event"] for e in events] == ["stage", "progress", "log", "result"]
    assert "a stray library print" in texts and "{not json" in texts and "a warning on stderr" in texts
    assert outcome.manifest["files"]["transform"] == os.path.join(str(out), "transform.h5")
    assert outcome.manifest["metrics"]["folding_percent"] == 0.0
    assert state.percent == 100 and "über-warning" in " ".join(state.logLines)


def test_failing_child_surfaces_error_message_and_log_tail(workdir):
    body = f"""
        import sys
        print("step one done")
        sys.stderr.write("Traceback (most recent call last):\\n  ValueError: boom\\n")
        print('{line("error", code=2, kind="InputError", message="fixed image is constant")}')
        sys.exit(2)
    """
    proc = EngineProcess(child(workdir, body), str(workdir / "out"))
    proc.start()
    outcome = proc.wait(timeout=60)
    assert outcome.status == RunStatus.FAILED
    assert outcome.exitCode == 2 and outcome.message == "fixed image is constant"
    assert outcome.errorKind == "InputError" and outcome.manifest is None
    described = outcome.describe()
    assert "ValueError: boom" in described and "step one done" in described


def test_crash_without_error_event_reports_exit_code_and_last_line(workdir):
    body = """
        import sys
        sys.stderr.write("Segmentation fault in a library\\n")
        sys.exit(139)
    """
    proc = EngineProcess(child(workdir, body), str(workdir / "out"))
    proc.start()
    outcome = proc.wait(timeout=60)
    assert outcome.status == RunStatus.FAILED and outcome.exitCode == 139
    assert "exit code 139" in outcome.message and "Segmentation fault" in outcome.message


def test_success_exit_without_manifest_is_a_failure(workdir):
    proc = EngineProcess(child(workdir, "print('nothing written')\n"), str(workdir / "out"))
    proc.start()
    outcome = proc.wait(timeout=60)
    assert outcome.status == RunStatus.FAILED and outcome.errorKind == "no-result"


def test_out_of_memory_exit_code_is_flagged(workdir):
    body = f"""
        import sys
        print('{line("error", code=4, kind="OutOfMemory", message="CUDA out of memory")}')
        sys.exit(4)
    """
    proc = EngineProcess(child(workdir, body), str(workdir / "out"))
    proc.start()
    outcome = proc.wait(timeout=60)
    assert outcome.outOfMemory and outcome.status == RunStatus.FAILED


def test_cancel_kills_the_whole_process_tree_and_yields_no_result(workdir):
    out = workdir / "out"
    pid_file = workdir / "grandchild.pid"
    body = f"""
        import os, subprocess, sys, time
        sys.path.insert(0, {str(MODULE_DIR)!r})
        from nephireg import protocol
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(grandchild.pid))
        print('{line("stage", stage="optimise", message="slow")}', flush=True)
        for step in range(1, 1000):
            time.sleep(0.05)
            print(protocol.encode_event("progress", stage="optimise", step=step, total=1000), flush=True)
            if step == 20:  # a partial result folder must not be taken as a result
                os.makedirs({str(out)!r}, exist_ok=True)
                protocol.write_manifest({str(out)!r}, {{"files": {{}}, "metrics": {{}}}})
    """
    events = []
    proc = EngineProcess(child(workdir, body), str(out), onEvent=events.append)
    proc.start()
    deadline = time.monotonic() + 60
    while not any(e["event"] == "progress" and e["step"] >= 25 for e in events):
        proc.poll()
        assert time.monotonic() < deadline, "the slow child never reported progress"
        time.sleep(0.02)
    grandchild_pid = int(pid_file.read_text())
    assert psutil.pid_exists(grandchild_pid)
    started = time.monotonic()
    proc.cancel()
    outcome = proc.wait(timeout=30)
    assert time.monotonic() - started < 10
    assert outcome.status == RunStatus.CANCELLED and outcome.manifest is None
    for pid in (proc.pid, grandchild_pid):
        gone = not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert gone, f"process {pid} survived the cancel"


def test_wait_timeout_cancels(workdir):
    proc = EngineProcess(child(workdir, "import time\ntime.sleep(60)\n"), str(workdir / "out"))
    proc.start()
    outcome = proc.wait(timeout=1.0)
    assert outcome.status == RunStatus.CANCELLED


def test_child_environment_puts_module_first_and_hides_gpu_for_cpu():
    env = engine.childEnvironment({"PYTHONPATH": "/elsewhere", "HOME": "/home/x"}, device="cpu",
                                  moduleDir="/mod dir/NePhiRegistration")
    assert env["PYTHONPATH"].split(os.pathsep) == ["/mod dir/NePhiRegistration", "/elsewhere"]
    assert env["CUDA_VISIBLE_DEVICES"] == "-1" and env["PYTHONUNBUFFERED"] == "1" and env["HOME"] == "/home/x"
    assert env["NEPHIREG_SERVER"] == "off"  # never a server the user started: only the module's own
    assert engine.childEnvironment({}, server="/run/e.sock")["NEPHIREG_SERVER"] == "/run/e.sock"
    assert "CUDA_VISIBLE_DEVICES" not in engine.childEnvironment({}, device="auto")
    assert engine.engineCommand("/py", ["register"]) == ["/py", "-m", "nephireg", "register"]


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_real_engine_on_a_tiny_pair(workdir):
    """The real ``python -m nephireg register`` through the runner: events, manifest, files."""
    import numpy as np
    import SimpleITK as sitk

    from nephireg.geometry import Grid
    from nephireg.synthetic import deform, random_displacement, thorax_phantom

    grid = Grid((24, 24, 20), (3.0, 3.0, 3.5), (-36.0, -36.0, -35.0), tuple(np.eye(3).ravel()))
    fixed, _ = thorax_phantom(grid, 0)
    moving = deform(fixed, random_displacement(grid, amplitude_mm=3.0, sigma_mm=10.0, seed=1), grid)
    sitk.WriteImage(fixed, str(workdir / "fixed.nrrd"))
    sitk.WriteImage(moving, str(workdir / "moving.nrrd"))
    out = workdir / "result dir"
    settings = RegistrationSettings(method="adam", preset="generic", iterations=5, device="cpu",
                                    methodOptions={"levels": [2], "coarse_iterations": 0})
    args = settings.engineArguments(str(workdir / "fixed.nrrd"), str(workdir / "moving.nrrd"), str(out))
    command = engine.engineCommand(sys.executable, args)
    state = ProgressState()
    proc = EngineProcess(command, str(out), env=engine.childEnvironment(os.environ, "cpu"), cwd=str(workdir),
                         onEvent=state.update)
    proc.start()
    outcome = proc.wait(timeout=240)
    assert outcome.status == RunStatus.SUCCEEDED, outcome.describe()
    files = outcome.manifest["files"]
    transform = sitk.ReadTransform(files["transform"])
    jacobian = sitk.ReadImage(files["jacobian"])
    assert jacobian.GetSize() == grid.size and sitk.GetArrayViewFromImage(jacobian).min() > 0
    assert np.all(np.isfinite(transform.TransformPoint((0.0, 0.0, 0.0))))
    metrics = outcome.manifest["metrics"]
    assert metrics["folding_percent"] == 0.0 and 0 < metrics["jacobian_min"] <= 1 <= metrics["jacobian_max"]
    assert state.percent == 100 and state.device == "cpu"


def test_a_grandchild_holding_the_pipe_does_not_hang_the_run(workdir, monkeypatch):
    from NePhiRegistrationLib import runner

    monkeypatch.setattr(runner, "PIPE_GRACE_S", 0.5)
    body = """
        import subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(20)"])  # inherits stdout, outlives us
        sys.exit(2)
    """
    proc = EngineProcess(child(workdir, body), str(workdir / "out"))
    proc.start()
    started = time.monotonic()
    outcome = proc.wait(timeout=15)
    assert outcome.status == RunStatus.FAILED and outcome.exitCode == 2
    assert time.monotonic() - started < 10
    time.sleep(0.2)
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if "time.sleep(20)" in " ".join(p.info["cmdline"] or [])]
    assert not [p for p in leftovers if p.status() != psutil.STATUS_ZOMBIE], "the orphan outlived the run"


def escaping_child(workdir: Path) -> tuple:
    """A child that leaves a grandchild outside its process tree (re-parented to init, a session of its own) with
    its stdout, as a run in the engine server is; the grandchild's pid goes to the returned file."""
    pidfile = workdir / "escaped.pid"
    body = f"""
        import os, sys, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:  # re-parented to init: outside this process's tree, its stdout still the pipe
                open({str(pidfile)!r}, "w").write(str(os.getpid()))
                time.sleep(60)
            os._exit(0)
        print('{line("stage", stage="optimise", message="slow")}', flush=True)
        time.sleep(60)
    """
    return child(workdir, body), pidfile


def start_until_written(command: list, workdir: Path, pidfile: Path, **options):
    """The started process once it has sent an event and the process it started has written its pid to
    ``pidfile``; returns the process and that pid."""
    events = []
    proc = EngineProcess(command, str(workdir / "out"), onEvent=events.append, **options)
    proc.start()
    deadline = time.monotonic() + 30
    while not (events and pidfile.exists() and pidfile.read_text()):
        proc.poll()
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.02)
    return proc, int(pidfile.read_text())


def start_escaping(workdir: Path, **options):
    command, pidfile = escaping_child(workdir)
    proc, escaped = start_until_written(command, workdir, pidfile, **options)
    assert escaped not in [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    return proc, escaped


def process_gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pipe holders are found through /proc (Linux)")
@pytest.mark.parametrize("with_psutil", [True, False])
def test_a_cancel_kills_what_writes_to_the_runs_pipes_outside_its_process_tree(workdir, monkeypatch, with_psutil):
    # as a run in the engine server (a child of the server, in a session of its own): not in the client's tree,
    # but it holds the pipes; after a cancel it is killed at once, not PIPE_GRACE_S later, and before the outcome
    from NePhiRegistrationLib import runner

    monkeypatch.setattr(runner, "PIPE_GRACE_S", 30.0)
    proc, escaped = start_escaping(workdir)
    if not with_psutil:
        monkeypatch.setitem(sys.modules, "psutil", None)  # "import psutil" raises ImportError: the fallback path
    started = time.monotonic()
    proc.cancel()
    outcome = proc.wait(timeout=20)
    monkeypatch.undo()
    assert outcome.status == RunStatus.CANCELLED and time.monotonic() - started < 5
    assert process_gone(escaped)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pipe holders are found through /proc (Linux)")
def test_the_spared_server_and_processes_with_only_a_read_end_or_in_this_session_are_not_killed(workdir,
                                                                                               monkeypatch):
    from NePhiRegistrationLib import runner

    monkeypatch.setattr(runner, "HOLDER_TIMEOUT_S", 1.0)
    proc, escaped = start_escaping(workdir)
    proc.spare.add(escaped)  # as the engine server, which holds a client's pipes a moment (never killed)
    bystanders = []
    write_end = os.open(f"/proc/{proc.pid}/fd/1", os.O_WRONLY)  # the client's stdout: the pipe's write end
    for kind in ("read end, own session", "read end", "write end, this session"):  # forks of this process
        pid = os.fork()
        if pid == 0:
            if kind == "read end, own session":
                os.setsid()
            if kind != "write end, this session":
                os.close(write_end)
            time.sleep(30)
            os._exit(0)
        bystanders.append(pid)
    os.close(write_end)
    try:
        assert sorted(runner.pipeHolders(proc._pipeInodes)) == sorted([proc.pid, escaped])  # not the bystanders
        proc.cancel()
        outcome = proc.wait(timeout=20)
        assert outcome.status == RunStatus.CANCELLED
        assert f"processes [{escaped}] still wrote to the engine's output" in outcome.logTail[-1]  # given up on
        assert outcome.stillRunning == [escaped]  # the caller keeps the folder
        assert not process_gone(escaped) and not any(process_gone(pid) for pid in bystanders)
    finally:
        for pid in [escaped, *bystanders]:
            os.kill(pid, 9)
        for pid in bystanders:
            os.waitpid(pid, 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pipe holders are found through /proc (Linux)")
def test_a_writer_that_appears_after_the_cancel_is_killed_too(workdir):
    # the engine server (spared) forks the run a moment after its client was killed, then lets go of the pipes
    # itself: only a scan after the first one finds that run
    spared, late = workdir / "spared.pid", workdir / "late.pid"
    body = f"""
        import os, time
        client = os.getpid()

        def client_gone():
            try:
                with open(f"/proc/{{client}}/stat") as stat:
                    return stat.read().rsplit(")", 1)[1].split()[0] in "ZX"
            except OSError:
                return True

        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:  # "the server": spared by the runner
                open({str(spared)!r}, "w").write(str(os.getpid()))
                while not client_gone():
                    time.sleep(0.01)
                time.sleep(0.5)
                if os.fork() == 0:  # "the run", forked late, in a session of its own
                    os.setsid()
                    open({str(late)!r}, "w").write(str(os.getpid()))
                    time.sleep(60)
                time.sleep(0.2)
                os._exit(0)  # lets go of the pipes: only the late run holds them now
            os._exit(0)
        print('{line("stage", stage="optimise", message="slow")}', flush=True)
        time.sleep(60)
    """
    proc, server = start_until_written(child(workdir, body), workdir, spared)
    proc.spare.add(server)
    started = time.monotonic()
    proc.cancel()
    outcome = proc.wait(timeout=20)
    assert outcome.status == RunStatus.CANCELLED and outcome.stillRunning == []
    assert late.exists() and process_gone(int(late.read_text()))  # it appeared, and was killed
    assert time.monotonic() - started < runner_module().HOLDER_TIMEOUT_S  # by a rescan, not given up on


def runner_module():
    from NePhiRegistrationLib import runner

    return runner


@pytest.mark.skipif(os.name == "nt", reason="a SIGTERM cancel is for runs in the engine server (Linux)")
def test_a_cancel_with_a_grace_lets_the_run_clean_up_and_kills_one_that_does_not_end(workdir):
    # cancelGraceS (a run in the module's engine server): SIGTERM first, so the client forwards it and the run
    # cleans up; the tree is killed only if it has not ended when the grace is over
    cleaned = workdir / "cleaned up"
    polite = f"""
        import signal, sys, time
        def stop(signum, frame):
            open({str(cleaned)!r}, "w").close()
            sys.exit(3)
        signal.signal(signal.SIGTERM, stop)
        print('{line("stage", stage="optimise", message="slow")}', flush=True)
        time.sleep(60)
    """
    stubborn = f"""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print('{line("stage", stage="optimise", message="slow")}', flush=True)
        time.sleep(60)
    """
    for body, grace, seconds in ((polite, 30.0, (0.0, 10.0)), (stubborn, 1.0, (0.9, 10.0))):
        events = []
        proc = EngineProcess(child(workdir, body), str(workdir / "out"), onEvent=events.append, cancelGraceS=grace)
        proc.start()
        wait_until = time.monotonic() + 30
        while not events:
            proc.poll()
            assert time.monotonic() < wait_until, "the child never started"
            time.sleep(0.02)
        started = time.monotonic()
        proc.cancel()
        assert proc.outcome is None  # not at once: the run ends by itself (or at the end of its grace)
        outcome = proc.wait(timeout=30)
        took = time.monotonic() - started
        assert outcome.status == RunStatus.CANCELLED and seconds[0] <= took < seconds[1], (body, took)
        if body is polite:
            assert outcome.exitCode == 3 and cleaned.exists()
    # force (the module closing): at once, whatever the grace
    proc = EngineProcess(child(workdir, stubborn), str(workdir / "out"), cancelGraceS=30.0)
    proc.start()
    time.sleep(0.5)
    started = time.monotonic()
    proc.cancel(force=True)
    assert proc.wait(timeout=10).status == RunStatus.CANCELLED and time.monotonic() - started < 5
