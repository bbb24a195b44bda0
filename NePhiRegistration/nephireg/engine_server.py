"""``nephireg serve``: an engine process that loads torch once and runs each ``register`` it is handed in a fork
of itself (the client side, the socket's place and the messages: :mod:`nephireg.engine_link`).

The server is one thread that never runs a torch operation (no OpenMP pool, no CUDA context, no lock held by
another thread to be copied into a fork: :func:`nephireg.forked.can_fork` before torch loads). Each run's fork
takes the client's standard streams, folder and environment and runs :func:`nephireg.cli.main` on its command
line (:func:`nephireg.engine_children.run_command_in_fork`); the server reaps it and sends the exit code. Runs are
independent processes: a crash or an out-of-memory kill ends that run only, and several clients may run at once.

Lifetime: until SIGINT/SIGTERM, or ``idle_exit_s`` without a run; then it cancels the runs still going (SIGTERM:
each cleans up as a cancelled command does), waits for them and removes its socket. Its socket lives in a folder
only this user may enter (created 0700, refused when another user could reach it), and each connection's peer
credentials are checked.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import stat
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from nephireg import engine_link
from nephireg.errors import Cancelled, InputError

REQUEST_TIMEOUT_S = 5.0  # a client sends its request as it connects; one that does not is dropped
STOP_WAIT_S = 30.0  # how long cancelled runs get to clean up when the server stops, before SIGKILL


@dataclass
class _Run:
    pid: int
    connection: Optional[socket.socket]  # None once the client has gone
    reader: Optional[engine_link.LineReader] = None
    signals_sent: List[int] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)


def prepare_socket_folder(path: str) -> None:
    """Create the socket's folder (0700) or check that only this user can reach it; :class:`InputError` naming it
    otherwise. A socket file already there: another server's (an error) or a stale one (removed)."""
    folder = os.path.dirname(path)
    if len(os.fsencode(path)) >= 104:  # sun_path is 104-108 bytes, the terminating NUL included
        raise InputError(f"engine server socket path too long for a Unix socket (max 103 bytes): {path}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise InputError(f"engine server folder must be a folder of this user that others cannot enter "
                         f"(mode 0700): {folder}")
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(existing.st_mode):
        raise InputError(f"engine server socket path exists and is not a socket: {path}")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:  # nobody listens: a server that was killed left it
        os.unlink(path)
    else:
        raise InputError(f"an engine server is already running at {path}")
    finally:
        probe.close()


def serve(path: str, idle_exit_s: float, say: Callable[[str], None]) -> int:
    """Run the server at socket ``path`` until a signal or ``idle_exit_s`` seconds without a run (0: no limit)."""
    from nephireg.forked import can_fork

    if not can_fork():
        raise InputError("the engine server needs Linux and a process that has not loaded torch (it forks runs)")
    prepare_socket_folder(path)
    from nephireg.engine_children import ENGINE_MODULES
    from nephireg.signals import import_frozen

    started = time.monotonic()
    for name in ENGINE_MODULES:
        import_frozen(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        try:
            os.chmod(path, 0o600)
            listener.listen(16)
            say(f"engine server ready at {path} (engine loaded in {time.monotonic() - started:.1f} s); "
                f"'nephireg register' uses it (--no-server: not)")
            return _Server(listener, idle_exit_s, say).loop()
        finally:
            os.unlink(path)
    finally:
        listener.close()


class _Server:
    def __init__(self, listener: socket.socket, idle_exit_s: float, say: Callable[[str], None]) -> None:
        self._listener = listener
        self._idle_exit_s = idle_exit_s
        self._say = say
        self._runs: Dict[int, _Run] = {}
        self._last_activity = time.monotonic()  # the last connection or the end of the last run (idle exit)
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = os.pipe()  # SIGCHLD writes here (signal.set_wakeup_fd)
        for fd in (self._wake_read, self._wake_write):
            os.set_blocking(fd, False)

    def loop(self) -> int:
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        previous_wakeup = signal.set_wakeup_fd(self._wake_write)
        previous_child = signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes the selector
        try:
            while True:
                idle_for = time.monotonic() - self._last_activity
                if self._idle_exit_s > 0 and not self._runs and idle_for >= self._idle_exit_s:
                    self._say(f"engine server idle for {self._idle_exit_s:g} s: stopping")
                    return 0
                timeout = self._idle_exit_s - idle_for if self._idle_exit_s > 0 and not self._runs else None
                for key, _ in self._selector.select(timeout):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj == self._wake_read:
                        _drain(self._wake_read)
                    else:
                        self._from_client(key.data)
                self._reap()
        except Cancelled as exc:
            self._say(f"engine server stopping ({exc})")
            return 0
        finally:
            self._stop_runs()
            signal.signal(signal.SIGCHLD, previous_child)
            signal.set_wakeup_fd(previous_wakeup)
            self._selector.close()
            os.close(self._wake_read)
            os.close(self._wake_write)

    def _accept(self) -> None:
        try:
            connection, _ = self._listener.accept()
        except OSError:
            return
        self._last_activity = time.monotonic()
        reader = engine_link.LineReader(connection)
        run: Optional[_Run] = None
        try:
            connection.settimeout(REQUEST_TIMEOUT_S)
            if engine_link.peer_uid(connection) != os.getuid():
                raise engine_link.LinkError("a client of another user")
            message = reader.receive()
            if message is None or message.get("kind") != "run":
                raise engine_link.LinkError("no run request")
            argv, cwd, env, ident = engine_link.split_request(message)
            streams = reader.fds[:3]
            reason = self._refusal(argv, env, ident, streams)
            if reason:
                engine_link.send_message(connection, {"kind": "refused", "reason": reason})
                raise engine_link.LinkError(reason)
            run = self._fork(argv, cwd, env, streams, connection, reader)
            self._say(f"run {run.pid}: nephireg {' '.join(argv)}")
            engine_link.send_message(connection, {"kind": "started", "pid": run.pid})
        except (OSError, engine_link.LinkError):
            if run is None:
                connection.close()
            else:  # the client has gone already: its run is cancelled
                self._signal(run, signal.SIGTERM)
                self._drop_connection(run)
            return
        finally:
            for fd in reader.fds:  # the fork has its copies; the client's pipes must not stay open here
                os.close(fd)
            reader.fds.clear()
        connection.setblocking(False)
        self._selector.register(connection, selectors.EVENT_READ, run.pid)

    @staticmethod
    def _refusal(argv: List[str], env: Dict[str, str], ident: Dict[str, str], streams: List[int]) -> str:
        if not engine_link.wants_server(argv):
            return "only 'register' runs in the engine server"
        if ident != engine_link.identity():
            return f"it is another engine ({engine_link.identity()['version']}, {engine_link.identity()['package']})"
        theirs, ours = (engine_link.load_time_environment(e) for e in (env, os.environ))
        if theirs != ours:
            names = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            return f"its load-time environment differs: {', '.join(names)}"
        if len(streams) != 3:
            return "the standard streams did not come with the request"
        return ""

    def _fork(self, argv: List[str], cwd: str, env: Dict[str, str], streams: List[int],
              connection: socket.socket, reader: engine_link.LineReader) -> _Run:
        """The run's fork, recorded in one step with its creation (a stop signal in between would leave it
        uncancelled)."""
        from nephireg import signals
        from nephireg.engine_children import run_command_in_fork
        from nephireg.progress import flush_standard_streams

        flush_standard_streams()  # nothing buffered here may be written twice, once by the fork
        received = signals.received_count()
        server = os.getpid()
        with signals.deferred():
            pid = os.fork()
            if pid == 0:
                inherited = [self._listener.fileno(), self._wake_read, self._wake_write, self._selector.fileno()]
                inherited += [run.connection.fileno() for run in self._runs.values() if run.connection is not None]
                inherited.append(connection.fileno())

                def take_client() -> None:
                    _become_client(inherited, streams, cwd, env)

                run_command_in_fork(argv, received, server, take_client)
            run = self._runs[pid] = _Run(pid, connection, reader)
        return run

    def _from_client(self, pid: int) -> None:
        """A signal to forward, or the client's end of the connection (it has gone: its run is cancelled)."""
        run = self._runs.get(pid)
        if run is None or run.connection is None or run.reader is None:
            return
        try:
            while True:
                message = run.reader.receive()
                if message is None:
                    break
                signum = message.get("signum")
                if message.get("kind") == "signal" and signum in (signal.SIGINT, signal.SIGTERM):
                    self._signal(run, int(signum))
            self._signal(run, signal.SIGTERM)  # the client went away: nobody waits for this run
            self._drop_connection(run)
        except BlockingIOError:
            return
        except (OSError, engine_link.LinkError):
            self._signal(run, signal.SIGTERM)
            self._drop_connection(run)

    def _signal(self, run: _Run, signum: int) -> None:
        if run.pid in self._runs:  # not reaped yet: the pid is still this run's
            run.signals_sent.append(signum)
            try:
                os.kill(run.pid, signum)
            except ProcessLookupError:
                pass

    def _drop_connection(self, run: _Run) -> None:
        if run.connection is not None:
            try:
                self._selector.unregister(run.connection)
            except KeyError:  # not registered yet (the client went away before its run was announced)
                pass
            run.connection.close()
            run.connection = None
        if run.reader is not None:
            for fd in run.reader.fds:
                os.close(fd)
            run.reader = None

    def _reap(self) -> None:
        """Reap the runs that have ended; each one's exit code goes to its client, and one line to the log."""
        for pid in list(self._runs):
            try:
                done, status, usage = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: its code is lost (internal error)
                done, status, usage = pid, 1 << 8, None
            if done == 0:
                continue
            run = self._runs.pop(pid)
            self._last_activity = time.monotonic()
            code = os.waitstatus_to_exitcode(status)
            peak = f", peak RSS {usage.ru_maxrss / 1024:.0f} MiB" if usage is not None else ""
            self._say(f"run {pid} ended: exit {code} after {time.monotonic() - run.started:.2f} s{peak}")
            if run.connection is not None:
                try:
                    run.connection.setblocking(True)
                    engine_link.send_message(run.connection, {"kind": "exit", "code": code})
                except OSError:
                    pass
                self._drop_connection(run)

    def _stop_runs(self) -> None:
        """Cancel the runs still going and wait for them (SIGKILL after :data:`STOP_WAIT_S`)."""
        for run in list(self._runs.values()):
            self._signal(run, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_S
        while self._runs and time.monotonic() < deadline:
            time.sleep(0.05)
            self._reap()
        for run in list(self._runs.values()):
            self._signal(run, signal.SIGKILL)
        while self._runs:
            time.sleep(0.01)
            self._reap()


def _become_client(inherited: List[int], streams: List[int], cwd: str, env: Dict[str, str]) -> None:
    """In a run's fork: drop the server's descriptors and signal wiring, take the client's standard streams,
    folder and environment."""
    import tempfile

    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for fd in inherited:
        os.close(fd)
    for target, fd in enumerate(streams):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # the client's TMPDIR from now on


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
