"""``nephireg serve`` and ``register`` through it (issue 13's start-up): the same run as a process of its own -
same events, same result, same exit codes - without torch's import; signals, a client or server that goes away,
a refused client and the server's lifetime. Real server processes, real commands, real signals."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_reliability_signals import assert_cancelled, until_stage, wait_for

from conftest import process_gone
from nephireg.engine_link import stopped_line
from nephireg.engine_server import REQUEST_TIMEOUT_S
from nephireg.protocol import ExitCode, parse_event_line

pytestmark = pytest.mark.skipif(not (sys.platform.startswith("linux") and hasattr(socket, "send_fds")),
                                reason="the engine server forks runs and passes descriptors (Linux)")

COMMON_ARGS = ["--method", "adam", "--preset", "lung-ct", "--prealign", "none", "--device", "cpu", "--no-overview",
               "--progress", "jsonl"]
RUN_ARGS = [*COMMON_ARGS, "--option", "iterations=4", "--option", "coarse_iterations=2"]


class Server:
    def __init__(self, folder: Path, *args: str, path: Path = None) -> None:
        self.path = path or folder / "engine" / "engine.sock"
        self.log = folder / "server.log"
        self.env = {**os.environ, "NEPHIREG_SERVER": str(self.path)}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "nephireg", "serve", *args], env=self.env,
                                         stdout=subprocess.DEVNULL, stderr=log)

    def wait_ready(self) -> "Server":
        wait_for(lambda: "engine server ready" in self.log.read_text() or self.proc.poll() is not None)
        assert self.proc.poll() is None, self.log.read_text()
        return self

    def runs(self) -> list:
        """The pids of the runs the server has started, in order."""
        return [int(pid) for pid in re.findall(r"^run (\d+): nephireg", self.log.read_text(), re.M)]

    def exit_of(self, pid: int) -> int:
        wait_for(lambda: f"run {pid} ended" in self.log.read_text())
        return int(re.search(rf"^run {pid} ended: exit (-?\d+)", self.log.read_text(), re.M).group(1))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Server(tmp_path_factory.mktemp("server"), "--idle-exit", "0").wait_ready()
    yield running
    assert running.stop() == 0, running.log.read_text()
    assert not running.path.exists()  # its socket removed


def register(env, *args, **popen):
    return subprocess.run([sys.executable, "-m", "nephireg", "register", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300, **popen)


def events(stdout: str) -> list:
    return [e for e in map(parse_event_line, stdout.splitlines()) if e]


def displacement(folder: Path) -> np.ndarray:
    transform = sitk.DisplacementFieldTransform(sitk.ReadTransform(str(folder / "transform.h5")))
    return sitk.GetArrayFromImage(transform.GetDisplacementField())


def test_a_run_in_the_server_is_the_run_a_process_of_its_own_makes(server, small_pair, tmp_path):
    own = register({**server.env, "NEPHIREG_SERVER": "off"}, "--fixed", small_pair["fixed"], "--moving",
                   small_pair["moving"], "--out", tmp_path / "own", *RUN_ARGS)
    assert own.returncode == 0, own.stderr
    before = server.runs()
    work = tmp_path / "work"
    work.mkdir()
    (work / "fixed.nrrd").write_bytes(Path(small_pair["fixed"]).read_bytes())
    (work / "moving.nrrd").write_bytes(Path(small_pair["moving"]).read_bytes())
    served = register(server.env, "--fixed", "fixed.nrrd", "--moving", "moving.nrrd", "--out", "out", *RUN_ARGS,
                      cwd=work)  # relative paths: the client's folder
    assert served.returncode == 0, served.stderr
    (pid,) = set(server.runs()) - set(before)  # it ran in a fork of the server
    assert server.exit_of(pid) == 0
    assert process_gone(pid)
    own_events, served_events = events(own.stdout), events(served.stdout)
    assert [e["event"] for e in served_events] == [e["event"] for e in own_events]
    assert [e.get("stage") for e in served_events] == [e.get("stage") for e in own_events]
    own_manifest = json.loads((tmp_path / "own" / "result.json").read_text())
    served_manifest = json.loads((work / "out" / "result.json").read_text())
    assert served_events[-1]["manifest"] == str(work / "out" / "result.json")
    assert served_manifest["metrics"]["folding_percent"] == own_manifest["metrics"]["folding_percent"]
    assert served_manifest["metrics"]["ncc_after"] == pytest.approx(own_manifest["metrics"]["ncc_after"], abs=1e-6)
    np.testing.assert_allclose(displacement(work / "out"), displacement(tmp_path / "own"), atol=1e-4)
    assert np.abs(displacement(work / "out")).max() > 1.0  # a real registration, not an empty field


def test_bad_input_gets_its_error_and_exit_code_through_the_server(server, tmp_path):
    before = server.runs()
    missing = tmp_path / "no such file.nrrd"
    done = register(server.env, "--fixed", missing, "--moving", missing, "--out", tmp_path / "out", *RUN_ARGS)
    assert done.returncode == ExitCode.BAD_INPUT
    last = events(done.stdout)[-1]
    assert last["event"] == "error" and str(missing) in last["message"]
    assert len(server.runs()) == len(before) + 1
    assert not (tmp_path / "out").exists()


def test_usage_errors_and_help_come_back_as_from_a_process_of_its_own(server, tmp_path):
    before = len(server.runs())
    bad = register(server.env, "--fixed", "x.nrrd")  # --moving and --out missing: argparse's exit 2
    assert bad.returncode == 2 and "the following arguments are required" in bad.stderr
    helped = subprocess.run([sys.executable, "-m", "nephireg", "register", "--help"], env=server.env,
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--no-server" in helped.stdout
    assert len(server.runs()) == before + 2  # both ran in the server


def test_a_run_killed_by_a_signal_ends_its_client_by_the_same_signal(server, small_pair, tmp_path):
    before = server.runs()
    client = _long_run(server, small_pair, tmp_path / "out")
    until_stage(client, "optimise")
    (pid,) = set(server.runs()) - set(before)
    os.kill(pid, signal.SIGKILL)  # as the out-of-memory killer would
    client.communicate(timeout=60)
    assert client.returncode == -signal.SIGKILL
    assert server.exit_of(pid) == -signal.SIGKILL
    assert server.proc.poll() is None


def test_two_clients_at_once_each_get_their_own_run(server, small_pair, tmp_path):
    before = server.runs()
    clients = [subprocess.Popen([sys.executable, "-m", "nephireg", "register", "--fixed", small_pair["fixed"],
                                 "--moving", small_pair["moving"], "--out", str(tmp_path / f"out{i}"), *RUN_ARGS],
                                env=server.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    outputs = [client.communicate(timeout=300) for client in clients]
    assert [client.returncode for client in clients] == [0, 0], outputs
    assert len(set(server.runs()) - set(before)) == 2
    np.testing.assert_allclose(displacement(tmp_path / "out0"), displacement(tmp_path / "out1"), atol=1e-4)


def test_silent_or_broken_clients_do_not_hold_up_the_server_or_the_others(server, small_pair, tmp_path):
    # Eight connections that never send their request: read one at a time with a 2 s wait each they would keep a
    # client from its answer for 16 s, past its 10 s limit, and it would fall back to a process of its own.
    silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(8)]
    for sock in silent:
        sock.connect(str(server.path))
    broken = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    broken.connect(str(server.path))
    broken.sendall(b"[" * 100000 + b"\n")  # too deep for json: must cost only this connection
    before = server.runs()
    try:
        done = register(server.env, "--fixed", small_pair["fixed"], "--moving", small_pair["moving"], "--out",
                        tmp_path / "out", *RUN_ARGS)
        assert done.returncode == 0, done.stderr
        assert "was not used" not in done.stderr
        assert len(server.runs()) == len(before) + 1
        assert server.proc.poll() is None
    finally:
        for sock in silent + [broken]:
            sock.close()


def _client_request(server, argv) -> dict:
    """The ``run`` message a real client of ``server`` sends for ``argv``."""
    describe = ("import json, os, nephireg.cli, nephireg.engine_link as link; nephireg.cli.set_engine_environment(); "
                "print(json.dumps([link.identity(), dict(os.environ), link.process_attributes()]))")
    ident, env, process = json.loads(subprocess.run([sys.executable, "-c", describe], env=server.env, check=True,
                                                    capture_output=True, text=True).stdout)  # as a client is
    return {"kind": "run", "argv": argv, "cwd": os.getcwd(), "env": env, "umask": 0o022, "process": process,
            "identity": ident}


def _ask(server, request, streams):
    """Connect, send ``request`` with the descriptors ``streams``; the connection once the server said ready."""
    from nephireg import engine_link

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(server.path))
    engine_link.send_message(sock, request, streams)
    assert engine_link.LineReader(sock).receive()["kind"] == "ready"
    return sock


def _ask_and_leave(server, small_pair, out, after: str) -> None:
    """A client that sends a real request and closes its connection once the server says ``after``."""
    from nephireg import engine_link

    argv = ["register", "--fixed", small_pair["fixed"], "--moving", small_pair["moving"], "--out", str(out),
            *RUN_ARGS]
    with open(os.devnull, "w") as sink:
        sock = _ask(server, _client_request(server, argv), [0, sink.fileno(), sink.fileno()])
    if after == "go":
        engine_link.send_message(sock, {"kind": "go"})
    sock.close()


def test_a_run_does_not_keep_the_streams_of_a_client_still_in_its_handshake(server, small_pair, tmp_path):
    # a run forked while another client waits between ready and go must not hold that client's pipes: they would
    # stay open for the run's whole life (the Slicer module would see its run as not over, and kill the holder)
    read_end, write_end = os.pipe()
    argv = ["register", "--fixed", small_pair["fixed"], "--moving", small_pair["moving"], "--out",
            str(tmp_path / "pending"), *RUN_ARGS]
    request = _client_request(server, argv)
    before = server.runs()
    pending = _ask(server, request, [0, write_end, write_end])  # no go yet: pending for up to 2 s
    asked = time.monotonic()
    os.close(write_end)
    client = _long_run(server, small_pair, tmp_path / "out")
    try:
        wait_for(lambda: set(server.runs()) - set(before))
        # forked while the other client was still pending (else this test would prove nothing)
        assert time.monotonic() - asked < REQUEST_TIMEOUT_S
        until_stage(client, "optimise")
        (pid,) = set(server.runs()) - set(before)
        inode = os.fstat(read_end).st_ino
        links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert f"pipe:[{inode}]" not in links
    finally:
        pending.close()
        client.kill()
        client.communicate(timeout=60)
        os.close(read_end)


@pytest.mark.parametrize("leaves_after", ["ready", "go"])
def test_a_client_that_leaves_during_the_handshake_starts_no_run_or_gets_it_cancelled(server, small_pair, tmp_path,
                                                                                     leaves_after):
    before = server.runs()
    out = tmp_path / "out"
    _ask_and_leave(server, small_pair, out, leaves_after)
    done = register(server.env, "--fixed", small_pair["fixed"], "--moving", small_pair["moving"], "--out",
                    tmp_path / "next", *RUN_ARGS)  # the server still serves
    assert done.returncode == 0, done.stderr and server.proc.poll() is None
    started = [pid for pid in server.runs() if pid not in before]
    if leaves_after == "ready":  # no go: nothing ran for it
        assert len(started) == 1
    else:  # its run was forked and, with nobody waiting, cancelled at once - a SIGTERM within a millisecond of
        # the fork, which CPython's after-fork code would drop were it not blocked across the fork
        assert len(started) == 2
        assert server.exit_of(started[0]) == ExitCode.CANCELLED
        wait_for(lambda: process_gone(started[0]))
        assert not out.exists()


def _long_run(server, small_pair, out, **popen):
    args = [*COMMON_ARGS, "--option", "iterations=100000", "--option", "coarse_iterations=0"]
    return subprocess.Popen([sys.executable, "-m", "nephireg", "register", "--fixed", small_pair["fixed"],
                             "--moving", small_pair["moving"], "--out", str(out), *args], env=server.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_client_cancels_the_run_in_the_server(server, small_pair, tmp_path, signum):
    before = server.runs()
    out = tmp_path / "out"
    client = _long_run(server, small_pair, out)
    until_stage(client, "optimise")
    (pid,) = set(server.runs()) - set(before)
    client.send_signal(signum)
    rest, err = client.communicate(timeout=120)
    assert_cancelled(client.returncode, events(rest), err)
    assert server.exit_of(pid) == ExitCode.CANCELLED
    assert not out.exists()
    assert server.proc.poll() is None  # the server goes on


def test_a_killed_client_cancels_its_run_instead_of_leaving_it_writing(server, small_pair, tmp_path):
    before = server.runs()
    out = tmp_path / "out"
    client = _long_run(server, small_pair, out)
    until_stage(client, "optimise")
    (pid,) = set(server.runs()) - set(before)
    client.kill()
    client.communicate(timeout=60)
    assert server.exit_of(pid) == ExitCode.CANCELLED  # SIGTERM from the server: the run's own clean-up
    wait_for(lambda: process_gone(pid))
    assert not out.exists()


def test_a_client_with_another_load_time_environment_runs_in_its_own_process(server, small_pair, tmp_path):
    before = server.runs()
    env = {**server.env, "OMP_NUM_THREADS": "1"}  # read when torch loads: a fork of the server cannot take it
    done = register(env, "--fixed", small_pair["fixed"], "--moving", small_pair["moving"], "--out",
                    tmp_path / "out", *RUN_ARGS)
    assert done.returncode == 0, done.stderr
    assert "was not used (its load-time environment differs: OMP_NUM_THREADS)" in done.stderr
    unused = register(server.env, "--fixed", small_pair["fixed"], "--moving", small_pair["moving"], "--out",
                      tmp_path / "out2", *RUN_ARGS, "--no-server")
    assert unused.returncode == 0, unused.stderr
    assert server.runs() == before
    assert (tmp_path / "out" / "result.json").exists() and (tmp_path / "out2" / "result.json").exists()


def test_a_second_server_at_the_same_socket_is_refused(server, tmp_path):
    done = subprocess.run([sys.executable, "-m", "nephireg", "serve"], env=server.env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == ExitCode.BAD_INPUT
    assert f"an engine server is already running at {server.path}" in done.stderr


def test_a_socket_folder_others_can_enter_is_refused(tmp_path):
    folder = tmp_path / "open"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    done = subprocess.run([sys.executable, "-m", "nephireg", "serve", "--socket", str(folder / "engine.sock")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == ExitCode.BAD_INPUT
    assert f"others cannot enter (mode 0700): {folder}" in done.stderr


def test_a_stale_socket_is_replaced_and_an_idle_server_stops_by_itself(tmp_path):
    path = tmp_path / "engine" / "engine.sock"
    path.parent.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # what a killed server leaves: a socket file nobody listens on
    stale.close()
    idle = Server(tmp_path, "--idle-exit", "1", path=path).wait_ready()
    assert idle.proc.wait(timeout=60) == 0
    assert "idle for 1 s: stopping" in idle.log.read_text()
    assert not path.exists()


def _own_server_with_a_run(small_pair, tmp_path):
    """A server of the test's own, with one long run in its optimisation: (server, client, run pid, out folder)."""
    running = Server(tmp_path, "--idle-exit", "0").wait_ready()
    out = tmp_path / "out"
    client = _long_run(running, small_pair, out)
    until_stage(client, "optimise")
    (pid,) = running.runs()
    return running, client, pid, out


def test_a_stopped_server_cancels_its_runs_and_their_clients_say_so(small_pair, tmp_path):
    stopping, client, pid, out = _own_server_with_a_run(small_pair, tmp_path)
    started = time.monotonic()
    assert stopping.stop() == 0
    rest, err = client.communicate(timeout=120)
    assert time.monotonic() - started < 60
    assert client.returncode == ExitCode.CANCELLED
    assert events(rest)[-1]["kind"] == "cancelled"  # the run's own cancellation, written to the client's stdout
    assert stopping.exit_of(pid) == ExitCode.CANCELLED
    assert not out.exists() and not stopping.path.exists()


def test_the_run_writes_its_files_with_the_clients_umask(server, small_pair, tmp_path):
    modes = {}
    for name, env in (("own", {**server.env, "NEPHIREG_SERVER": "off"}), ("served", server.env)):
        done = register(env, "--fixed", small_pair["fixed"], "--moving", small_pair["moving"], "--out",
                        tmp_path / name, *RUN_ARGS, umask=0o077)
        assert done.returncode == 0, done.stderr
        modes[name] = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / name).iterdir()}
    assert modes["served"] == modes["own"]
    assert all(mode & 0o077 == 0 for mode in modes["served"].values())  # not the server's umask (022)


def test_a_killed_server_cancels_its_runs_and_a_new_one_takes_its_socket(small_pair, tmp_path):
    killed, client, pid, out = _own_server_with_a_run(small_pair, tmp_path)
    killed.proc.kill()  # no clean-up of its own: the runs are cancelled by their parent's death
    killed.proc.wait(timeout=60)
    rest, err = client.communicate(timeout=120)
    assert client.returncode == ExitCode.CANCELLED
    assert stopped_line(str(killed.path)) in err.splitlines()
    assert events(rest)[-1]["kind"] == "cancelled"
    assert killed.path.exists()  # its socket is left behind ...
    (tmp_path / "again").mkdir()
    again = Server(tmp_path / "again", "--idle-exit", "0", path=killed.path).wait_ready()  # ... and replaced
    try:  # (at once: the old server's runs do not hold its lock)
        wait_for(lambda: process_gone(pid))
        assert not out.exists()
        done = register(again.env, "--fixed", small_pair["fixed"], "--moving", small_pair["moving"], "--out",
                        tmp_path / "out2", *RUN_ARGS)
        assert done.returncode == 0, done.stderr
        assert len(again.runs()) == 1
    finally:
        assert again.stop() == 0


def test_a_server_older_than_the_engines_files_is_not_used(small_pair, tmp_path):
    import nephireg.protocol as edited

    older = Server(tmp_path, "--idle-exit", "0").wait_ready()
    source = Path(edited.__file__)
    times = source.stat()
    try:
        os.utime(source, ns=(times.st_atime_ns, time.time_ns() + 60 * 10**9))  # newer than any: as an edit would
        done = register(older.env, "--fixed", small_pair["fixed"], "--moving", small_pair["moving"], "--out",
                        tmp_path / "out", *RUN_ARGS)
    finally:
        os.utime(source, ns=(times.st_atime_ns, times.st_mtime_ns))
        older.stop()
    assert done.returncode == 0, done.stderr
    assert "the engine changed since the server started (package_modified_ns)" in done.stderr
    assert older.runs() == []


def test_a_run_that_outlives_its_killed_client_by_the_cancel_grace_is_killed(small_pair, tmp_path):
    # the SIGTERM a killed client's run gets may not end it (here it is stopped and cannot act on it): the server
    # kills it when the grace is over, so no orphan goes on computing (or holding a GPU) for nobody
    running = Server(tmp_path, "--idle-exit", "0", "--cancel-grace", "1").wait_ready()
    client = _long_run(running, small_pair, tmp_path / "out")
    until_stage(client, "optimise")
    (pid,) = running.runs()
    os.kill(pid, signal.SIGSTOP)
    client.kill()
    client.communicate(timeout=60)
    assert running.exit_of(pid) == -signal.SIGKILL
    said = f"run {pid}: still going 1 s after it was cancelled (its client went away): killed"
    assert said in running.log.read_text()
    assert running.proc.poll() is None and running.stop() == 0


def test_the_grace_of_a_run_whose_client_cancelled_and_was_then_killed_counts_from_the_cancel(small_pair, tmp_path):
    # the Slicer module's Cancel: SIGTERM to the client (forwarded), and the client killed when its own grace is over;
    # the run must not get a second grace from the client's death (it could write after the caller cleaned up)
    running = Server(tmp_path, "--idle-exit", "0", "--cancel-grace", "3").wait_ready()
    client = _long_run(running, small_pair, tmp_path / "out")
    until_stage(client, "optimise")
    (pid,) = running.runs()
    os.kill(pid, signal.SIGSTOP)  # it cannot act on the SIGTERM
    client.send_signal(signal.SIGTERM)
    time.sleep(3.5)  # the grace is over ...
    assert not process_gone(pid)  # ... but the client is still there: the run is its, not killed yet
    killed_at = time.monotonic()
    client.kill()
    client.communicate(timeout=60)
    assert running.exit_of(pid) == -signal.SIGKILL
    assert time.monotonic() - killed_at < 2.0  # at once, not 3 s after the client's death
    assert running.stop() == 0


def test_a_server_stops_when_the_process_it_exits_with_ends(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        running = Server(tmp_path, "--idle-exit", "0", "--exit-with", str(owner.pid)).wait_ready()
        owner.kill()
        owner.wait()
        assert running.proc.wait(timeout=30) == 0
        assert f"engine server stopping (process {owner.pid}, its owner, ended)" in running.log.read_text()
        assert not running.path.exists()
    finally:
        owner.kill()
    for value, message in (("0", "--exit-with must be a process id"), (str(owner.pid), "no such process")):
        done = subprocess.run([sys.executable, "-m", "nephireg", "serve", "--socket", str(tmp_path / "x" / "s.sock"),
                               "--exit-with", value], capture_output=True, text=True, timeout=60)
        assert done.returncode == ExitCode.BAD_INPUT and message in done.stderr, done.stderr
