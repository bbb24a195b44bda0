"""The module's engine server (``engineserver.py``, issue 13's start-up in Slicer) with the real engine on a real MRML
scene (slicer-core): the first Register loads the engine itself and leaves a server behind; the next one runs in
it with the same result; a Cancel there lets the run clean up; the server stops with its owner and when asked.
Real processes throughout (the server, the clients, the runs)."""

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from slicer_scene import MODULE_DIR, node_ids

from NePhiRegistrationLib import engineserver

SUPPORTED = engineserver.supported  # the real one (fake_slicer turns the server off for the other tests)
pytestmark = [pytest.mark.skipif(not SUPPORTED(), reason="the engine server needs Linux with pidfds"),
              pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")]


def wait_for(condition, timeout: float = 90.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.05)


def settings(**changes):
    from NePhiRegistrationLib.settings import RegistrationSettings

    options = {"iterations": 5, "levels": [4], "coarse_iterations": 0}
    options.update(changes.pop("methodOptions", {}))
    chosen = {"method": "adam", "preset": "generic", "affinePrealignment": False, "device": "cpu",
              "writeWarped": False, "keepEngineLoaded": True, **changes}
    return RegistrationSettings(methodOptions=options, **chosen)


def run(env, chosen, logs=None):
    job = env.logic.RegistrationJob(env.fixed, env.moving, chosen, python=sys.executable, logics=env.logics,
                                    onLog=(logs.append if logs is not None else None))
    job.start()
    return job


def without_runtime(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key != "runtime_s"}


def test_the_second_register_runs_in_the_server_the_first_left_and_gets_the_same_result(fake_slicer, monkeypatch):
    monkeypatch.setattr(engineserver, "supported", SUPPORTED)
    first_logs, second_logs = [], []
    first = run(fake_slicer, settings(), first_logs)
    assert first.wait(interval=0.02).status.value == "succeeded", first.outcome.describe()
    assert not any(line.startswith("Engine server:") for line in first_logs)  # none yet: it loads torch itself
    server = engineserver._shared
    assert server is not None and server.running  # started after the run, not beside it
    wait_for(lambda: server.ready, what="the engine server to load")

    second = run(fake_slicer, settings(), second_logs)
    assert second.wait(interval=0.02).status.value == "succeeded", second.outcome.describe()
    assert f"Engine server: {server.socketPath}" in second_logs
    log = "\n".join(server.logTail(50))
    assert len(re.findall(r"^run \d+: nephireg register", log, re.M)) == 1 and "ended: exit 0" in log
    assert without_runtime(second.result.metrics) == without_runtime(first.result.metrics)  # the same run
    assert not Path(second.folder).exists()  # the temp folder removed as after any run
    assert engineserver._shared is server  # reused, not restarted

    # another environment (the GPU hidden for "cpu" here; "auto" shows it): not this server's, so the run loads
    # the engine itself, and the server is replaced by one for that environment after it
    other_logs = []
    other = run(fake_slicer, settings(device="auto"), other_logs)
    assert other.wait(interval=0.02).status.value == "succeeded", other.outcome.describe()
    assert not any(line.startswith("Engine server:") for line in other_logs)
    assert engineserver._shared is not server and not server.running and not Path(server.folder).exists()

    replacement = engineserver._shared
    engineserver.stopShared()
    assert not replacement.running and not Path(replacement.folder).exists() and engineserver._shared is None


def test_a_cancel_in_the_server_lets_the_run_clean_up_and_keeps_the_server(fake_slicer, monkeypatch):
    from nephireg.protocol import ExitCode

    server = loaded_server(monkeypatch)
    before = node_ids(fake_slicer.scene)
    logs = []
    job = run(fake_slicer, settings(methodOptions={"iterations": 100000}), logs)
    assert f"Engine server: {server.socketPath}" in logs
    wait_for(lambda: job.poll() or job.progress.stage == "optimise", what="the optimisation")
    time.sleep(0.3)
    started = time.monotonic()
    job.cancel()
    outcome = job.wait(interval=0.02)
    assert outcome.status.value == "cancelled" and time.monotonic() - started < engineserver.CANCEL_GRACE_S
    assert outcome.exitCode == int(ExitCode.CANCELLED)  # ended by itself, cleaned up, not killed
    log = "\n".join(server.logTail(50))
    assert re.search(rf"ended: exit {int(ExitCode.CANCELLED)} ", log), log
    assert node_ids(fake_slicer.scene) == before and not Path(job.folder).exists()
    assert server.ready  # still there for the next run
    engineserver.stopShared()


def loaded_server(monkeypatch) -> "engineserver.EngineServer":
    """The module's server for the runs of these tests, loaded (as after a first Register)."""
    monkeypatch.setattr(engineserver, "supported", SUPPORTED)
    server = engineserver.prepare(sys.executable, fake_slicer_environment())
    wait_for(lambda: server.ready, what="the engine server to load")
    return server


def fake_slicer_environment() -> dict:
    """The environment ``RegistrationJob`` gives a CPU run in these tests (Slicer's startup one: os.environ)."""
    from NePhiRegistrationLib import engine

    return engine.childEnvironment(dict(os.environ), device="cpu")


def test_the_server_stops_when_the_process_that_started_it_ends(tmp_path):
    # Slicer crashing or quitting: the server goes with it (--exit-with), whatever its idle time
    script = tmp_path / "owner.py"
    script.write_text(f"""
import os, sys, time
sys.path.insert(0, {str(MODULE_DIR)!r})
from NePhiRegistrationLib import engine, engineserver
server = engineserver.prepare(sys.executable, engine.childEnvironment(dict(os.environ), device="cpu"))
deadline = time.monotonic() + 90
while not server.ready and time.monotonic() < deadline:
    time.sleep(0.05)
print(server._proc.pid, server.folder, server.ready, flush=True)
os._exit(0)  # no cleanup: as a crash
""", encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    pid, folder, ready = done.stdout.split()
    assert ready == "True", done.stderr
    wait_for(lambda: not psutil.pid_exists(int(pid)) or psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE,
             timeout=30, what="the server to stop")
    assert "its owner, ended" in (Path(folder) / engineserver.LOG_NAME).read_text()
    assert not (Path(folder) / engineserver.SOCKET_NAME).exists()  # its socket removed as it stopped
    import shutil

    shutil.rmtree(folder)  # the folder itself is the owner's to remove (stop()); a crashed owner leaves it


def test_a_server_that_refuses_the_run_is_replaced_after_it(fake_slicer, monkeypatch):
    # the extension updated while Slicer runs: the server's engine is not the runs' any more; the run loads the
    # engine itself (the engine's own check), and the module replaces the server after it
    import nephireg

    server = loaded_server(monkeypatch)
    edited = Path(nephireg.__file__)
    before = edited.stat()
    os.utime(edited, ns=(before.st_atime_ns, time.time_ns() + 10 ** 12))  # "updated" (1000 s from now)
    try:
        logs = []
        job = run(fake_slicer, settings(), logs)
        assert job.wait(interval=0.02).status.value == "succeeded", job.outcome.describe()
    finally:
        os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns))
    refusal = f"engine server at {server.socketPath} was not used (it is another engine"
    assert any(refusal in line for line in logs), logs
    assert engineserver._shared is not None and engineserver._shared is not server and not server.running
    engineserver.stopShared()


def served_runs(server) -> list:
    """The pids of the runs the server has started, in order (its log)."""
    return [int(pid) for pid in re.findall(r"^run (\d+): nephireg", "\n".join(server.logTail(200)), re.M)]


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def long_served_job(env, server, logs=None, onFinished=None):
    """A served ``adam`` run in its optimisation (100000 steps: it ends only when cancelled), and its run's pid."""
    job = env.logic.RegistrationJob(env.fixed, env.moving, settings(methodOptions={"iterations": 100000}),
                                    python=sys.executable, logics=env.logics, onFinished=onFinished,
                                    onLog=(logs.append if logs is not None else None))
    before = served_runs(server)
    job.start()
    wait_for(lambda: job.poll() or job.progress.stage == "optimise", what="the optimisation")
    (pid,) = set(served_runs(server)) - set(before)
    return job, pid


@pytest.mark.parametrize("how", ["closing the module", "a run that does not end in its grace"])
def test_a_run_cut_short_in_the_server_is_gone_before_its_temp_folder_is_removed(fake_slicer, monkeypatch, how):
    # the client is killed (at once, or when its grace is over) while the run, the server's child, is stuck (here
    # stopped: it cannot act on the SIGTERM it gets); the server would kill it only its own 10 s later, so the
    # runner must: the run must not outlive the job and write into a folder that is being removed
    server = loaded_server(monkeypatch)  # --cancel-grace 10
    monkeypatch.setattr(engineserver, "CANCEL_GRACE_S", 1.5)  # the runner's grace only, shorter than the server's
    before = node_ids(fake_slicer.scene)
    seen = {}
    job, pid = long_served_job(fake_slicer, server, onFinished=lambda j: seen.update(
        run_gone=gone(pid), folder=Path(j.folder).exists()))
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    if how == "closing the module":
        job.cancel(wait=True)
        assert job.done  # finished within cancel(): the panel is being cleaned up
    else:
        job.cancel()
        job.wait(interval=0.02)
    took = time.monotonic() - started
    assert job.outcome.status.value == "cancelled"
    assert seen == {"run_gone": True, "folder": False}  # gone before the job removed its folder
    assert took < (3.0 if how == "closing the module" else 1.5 + 3.0), took
    assert node_ids(fake_slicer.scene) == before and not Path(job.folder).exists()
    assert server.ready and not server.inUse  # the server lives on for the next run (it reaped the killed run)
    engineserver.stopShared()


def test_a_server_in_use_is_not_replaced_by_another_jobs_run(fake_slicer, monkeypatch):
    # a second job of another environment (its own engine) finishing beside a served run would replace the server
    # after it: not while the first job's run is in it
    server = loaded_server(monkeypatch)
    job, pid = long_served_job(fake_slicer, server)
    other = run(fake_slicer, settings(device="auto"))
    assert other.wait(interval=0.02).status.value == "succeeded", other.outcome.describe()
    assert engineserver._shared is server and server.running and not gone(pid)  # the served run goes on
    assert job.poll() is None and not job.done
    job.cancel()
    assert job.wait(interval=0.02).status.value == "cancelled"
    assert not server.inUse
    engineserver.stopShared()


def test_a_server_that_stops_during_a_run_is_a_failure_not_a_cancel(fake_slicer, monkeypatch):
    from NePhiRegistrationLib import logic

    server = loaded_server(monkeypatch)
    before = node_ids(fake_slicer.scene)
    logs = []
    job, pid = long_served_job(fake_slicer, server, logs)
    server._proc.kill()  # e.g. the out-of-memory killer: its runs end with it (their parent-death signal)
    outcome = job.wait(interval=0.02)
    assert outcome.status.value == "failed" and outcome.errorKind == "engine-server", outcome.describe()
    assert outcome.message == logic.SERVER_STOPPED
    assert f"nephireg: the engine server at {server.socketPath} stopped during the run (its run was cancelled)" in logs
    assert gone(pid) and node_ids(fake_slicer.scene) == before and not Path(job.folder).exists()
    engineserver.stopShared()
