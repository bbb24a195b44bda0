"""``nephireg serve``: an engine process that loads torch once and runs each ``register`` it is handed in a fork
of itself (the client side, the socket's place and the messages: :mod:`nephireg.engine_link`).

The server is one thread that never runs a torch operation (no OpenMP pool, no CUDA context, no lock held by
another thread to be copied into a fork: :func:`nephireg.forked.can_fork` before torch loads). Each run's fork
starts its own session (the server's terminal and its signals are not the run's), takes the client's standard
streams, folder, environment, umask and niceness and runs :func:`nephireg.cli.main` on its command line
(:func:`nephireg.engine_children.run_command_in_fork`); the server reaps it and sends the exit code. Runs are
independent processes: a crash or an out-of-memory kill ends that run only, and several clients may run at once.

Signals: while it serves, SIGINT, SIGTERM and SIGHUP (as SIGTERM) are recorded, never raised, so no step of the loop
is cut in two (a fork without its record, a reaped run still listed); the loop stops at its next turn (the signal's
wakeup byte wakes it). Lifetime: until such a signal, ``idle_exit_s`` without a run, or the end of the process given
as ``exit_with`` (the application that owns the server: watched through a pidfd, so a reused pid cannot keep it
alive); then it stops listening (its socket removed), cancels the runs still going (SIGTERM: each cleans up as a
cancelled command does; SIGKILL after :data:`CANCEL_GRACE_S`, or ``cancel_grace_s``), sends their exit codes and
exits 0. A run whose client has gone is cancelled the same way: SIGTERM at once, SIGKILL if it is still going that
long after the client's first forwarded SIGINT/SIGTERM, or after the client went (no orphan keeps running). Its
socket lives in a folder only this user may enter (created 0700, refused when another user could reach it) and a
lock file there makes one server per socket; each connection's peer credentials are checked. A connection that
breaks the protocol is dropped alone.
"""

from __future__ import annotations

import math
import os
import select
import selectors
import signal
import socket
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from nephireg import engine_link
from nephireg.errors import InputError

REQUEST_TIMEOUT_S = 2.0  # a client sends its request as it connects; one that does not is dropped after this
CANCEL_GRACE_S = 30.0  # default: how long a cancelled run gets to clean up (server stopping, client gone), then SIGKILL
MAX_IDLE_EXIT_S = 1e6  # beyond this, a poll timeout overflows; 0 means "never"


@dataclass
class _Run:
    pid: int
    connection: Optional[socket.socket]  # None once the client has gone
    reader: Optional[engine_link.LineReader] = None
    started: float = field(default_factory=time.monotonic)
    kill_at: Optional[float] = None  # time.monotonic() of its SIGKILL, once cancelled because its client went away
    cancelled_at: Optional[float] = None  # time.monotonic() of the first SIGINT/SIGTERM its client forwarded


@dataclass
class _Pending:
    """A connection whose run is not started yet: its request (None until read), then its ``go``."""

    connection: socket.socket
    reader: engine_link.LineReader
    deadline: float  # time.monotonic() by which the next message must have come
    request: Optional[engine_link.RunRequest] = None


def check_idle_exit(seconds: float) -> float:
    """``seconds`` when it is a usable ``--idle-exit``; :class:`InputError` otherwise."""
    if not (math.isfinite(seconds) and 0 <= seconds <= MAX_IDLE_EXIT_S):
        raise InputError(f"--idle-exit must be 0 (never) or up to {MAX_IDLE_EXIT_S:g} seconds, not {seconds}")
    return seconds


def check_cancel_grace(seconds: float) -> float:
    """``seconds`` when it is a usable ``--cancel-grace``; :class:`InputError` otherwise."""
    if not (math.isfinite(seconds) and 0 <= seconds <= MAX_IDLE_EXIT_S):
        raise InputError(f"--cancel-grace must be 0 to {MAX_IDLE_EXIT_S:g} seconds, not {seconds}")
    return seconds


def claim_socket(path: str) -> int:
    """Make the socket's folder (0700) or check that only this user can reach it, and take its lock (held while
    the returned descriptor is open); :class:`InputError` naming the path otherwise. Under the lock, a socket file
    already there is a stale one (its server has gone) and is removed."""
    import fcntl

    folder = os.path.dirname(path)
    if len(os.fsencode(path)) > engine_link.MAX_SOCKET_PATH_BYTES:
        raise InputError(f"engine server socket path too long for a Unix socket (max "
                         f"{engine_link.MAX_SOCKET_PATH_BYTES} bytes): {path}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise InputError(f"engine server folder must be a folder of this user that others cannot enter "
                         f"(mode 0700): {folder}")
    lock = os.open(os.path.join(folder, engine_link.LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise InputError(f"an engine server is already running at {path}") from None
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        return lock
    if not stat.S_ISSOCK(existing.st_mode):
        os.close(lock)
        raise InputError(f"engine server socket path exists and is not a socket: {path}")
    os.unlink(path)  # the lock is ours: whoever made it has gone
    return lock


def serve(path: str, idle_exit_s: float, say: Callable[[str], None], exit_with: Optional[int] = None,
          cancel_grace_s: Optional[float] = None) -> int:
    """Run the server at socket ``path`` until a signal, ``idle_exit_s`` seconds without a run (0: no limit) or the
    end of process ``exit_with``; a cancelled run is killed ``cancel_grace_s`` seconds (None:
    :data:`CANCEL_GRACE_S`) after its SIGTERM."""
    from nephireg.forked import can_fork

    check_idle_exit(idle_exit_s)
    cancel_grace_s = check_cancel_grace(CANCEL_GRACE_S if cancel_grace_s is None else cancel_grace_s)
    if not can_fork():
        raise InputError("the engine server needs Linux and a process that has not loaded torch (it forks runs)")
    owner = _watch_process(exit_with) if exit_with is not None else None
    _standard_streams_on_devnull()
    lock = claim_socket(path)
    try:
        engine = engine_link.identity(), engine_link.load_time_environment(os.environ)  # before anything loads
        from nephireg.engine_children import ENGINE_MODULES
        from nephireg.signals import import_frozen

        started = time.monotonic()
        for name in ENGINE_MODULES:
            import_frozen(name)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound: Optional[os.stat_result] = None
        try:
            listener.bind(path)
            bound = os.lstat(path)
            os.chmod(path, 0o600)
            listener.listen(16)
            say(f"engine server ready at {path} (engine loaded in {time.monotonic() - started:.1f} s); "
                f"'nephireg register' uses it (--no-server: not)")
            return _Server(listener, path, bound, lock, engine, idle_exit_s, say, owner, cancel_grace_s).loop()
        finally:
            listener.close()
            _unlink_if_ours(path, bound)
    finally:
        os.close(lock)
        if owner is not None:
            os.close(owner.fd)


@dataclass(frozen=True)
class _Owner:
    pid: int
    fd: int  # a pidfd: readable once the process has ended


def _watch_process(pid: int) -> _Owner:
    """A pidfd of ``pid`` (the server stops when it becomes readable); :class:`InputError` when there is no such
    process or this kernel has no pidfds (Linux 5.3 on)."""
    if pid <= 0:
        raise InputError(f"--exit-with must be a process id (a positive number), not {pid}")
    try:
        return _Owner(pid, os.pidfd_open(pid))
    except ProcessLookupError:
        raise InputError(f"--exit-with {pid}: no such process") from None
    except (AttributeError, OSError) as exc:
        raise InputError(f"--exit-with needs pidfds (Linux 5.3 or later): {exc}") from None


class _Server:
    def __init__(self, listener: socket.socket, path: str, bound: os.stat_result, lock: int, engine: Any,
                 idle_exit_s: float, say: Callable[[str], None], owner: Optional[_Owner] = None,
                 cancel_grace_s: float = CANCEL_GRACE_S) -> None:
        self._listener = listener
        self._owner = owner  # the process whose end stops the server, or None
        self._cancel_grace_s = cancel_grace_s
        self._lock = lock  # the socket's lock file: not for the forks (a run outliving the server would hold it)
        self._path, self._bound = path, bound
        self._identity, self._load_time_environment = engine
        self._process = engine_link.process_attributes()
        self._idle_exit_s = idle_exit_s
        self._say = say
        self._runs: Dict[int, _Run] = {}
        self._pending: Dict[socket.socket, _Pending] = {}
        self._last_activity = time.monotonic()  # the last connection or the end of the last run (idle exit)
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = os.pipe()  # every signal writes here (signal.set_wakeup_fd)
        for fd in (self._wake_read, self._wake_write):
            os.set_blocking(fd, False)

    def loop(self) -> int:
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        if self._owner is not None:
            self._selector.register(self._owner.fd, selectors.EVENT_READ, self._owner)
        from nephireg import signals

        previous_wakeup = signal.set_wakeup_fd(self._wake_write)
        previous = {signal.SIGCHLD: signal.signal(signal.SIGCHLD, lambda signum, frame: None),  # wakes the loop
                    signal.SIGHUP: signal.signal(signal.SIGHUP, _hangup_as_sigterm)}
        before = signals.received_count()
        with signals.held():  # SIGINT/SIGTERM recorded (by nephireg.signals, as a fork expects), not raised
            try:
                while signals.received_count() == before and not self._owner_ended():
                    idle_for = time.monotonic() - self._last_activity
                    busy = self._runs or self._pending
                    if self._idle_exit_s > 0 and not busy and idle_for >= self._idle_exit_s:
                        self._say(f"engine server idle for {self._idle_exit_s:g} s: stopping")
                        break
                    timeouts = [p.deadline - time.monotonic() for p in self._pending.values()]
                    if self._idle_exit_s > 0 and not busy:
                        timeouts.append(self._idle_exit_s - idle_for)
                    timeouts += [run.kill_at - time.monotonic() for run in self._runs.values() if run.kill_at]
                    for key, _ in self._selector.select(max(0.0, min(timeouts)) if timeouts else None):
                        if signals.received_count() != before:  # stopping: no new run from here on
                            break
                        if key.fileobj is self._listener:
                            self._accept()
                        elif key.fileobj == self._wake_read:
                            _drain(self._wake_read)
                        elif isinstance(key.data, _Owner):
                            break  # the loop's condition sees it
                        elif isinstance(key.data, _Pending):
                            self._from_pending(key.data)
                        else:
                            self._from_client(key.data)
                    self._expire_pending()
                    self._reap()
                    self._kill_abandoned()
                if signals.received_count() > before:
                    self._say(f"engine server stopping ({signal.Signals(signals.recorded()[before]).name})")
                elif self._owner_ended():
                    self._say(f"engine server stopping (process {self._owner.pid}, its owner, ended)")
                return 0
            finally:
                self._stop_listening()
                for pending in list(self._pending.values()):
                    self._drop_pending(pending)
                self._stop_runs()
                for signum, handler in previous.items():
                    signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
                signal.set_wakeup_fd(previous_wakeup)
                self._selector.close()
                os.close(self._wake_read)
                os.close(self._wake_write)

    def _owner_ended(self) -> bool:
        if self._owner is None:
            return False
        return bool(select.select([self._owner.fd], [], [], 0)[0])

    def _kill_abandoned(self) -> None:
        """SIGKILL for the runs cancelled because their client went away that are still going the cancel grace
        later."""
        now = time.monotonic()
        for run in self._runs.values():
            if run.kill_at is not None and run.kill_at <= now:
                self._say(f"run {run.pid}: still going {self._cancel_grace_s:g} s after it was cancelled (its client "
                          "went away): killed")
                self._signal(run, signal.SIGKILL)
                run.kill_at = None

    def _stop_listening(self) -> None:
        """No new clients from now on (they run the command themselves): the socket goes before runs are
        cancelled."""
        try:
            self._selector.unregister(self._listener)
        except (KeyError, ValueError):
            pass
        self._listener.close()
        _unlink_if_ours(self._path, self._bound)

    def _accept(self) -> None:
        """A new connection waits in the selector for its request (never read here blocking: one silent client
        must not hold up the others)."""
        try:
            connection, _ = self._listener.accept()
        except OSError:  # e.g. out of descriptors: wait a moment rather than spin on a readable listener
            time.sleep(0.1)
            return
        self._last_activity = time.monotonic()
        try:
            if engine_link.peer_uid(connection) != os.getuid():
                raise engine_link.LinkError("a client of another user")
            connection.setblocking(False)
            pending = _Pending(connection, engine_link.LineReader(connection), time.monotonic() + REQUEST_TIMEOUT_S)
            self._selector.register(connection, selectors.EVENT_READ, pending)
        except Exception:  # noqa: BLE001 - this connection only
            connection.close()
            return
        self._pending[connection] = pending

    def _from_pending(self, pending: _Pending) -> None:
        """The request (answered ``refused`` or ``ready``), then the client's ``go`` (the run is forked); the client
        gives up before ``go`` or not at all, so a run starts only when its client will not run it itself."""
        try:
            while True:
                message = pending.reader.receive()
                if message is None:
                    raise engine_link.LinkError("the client closed the connection")
                if pending.request is None:
                    if message.get("kind") != "run":
                        raise engine_link.LinkError("no run request")
                    request = engine_link.split_request(message)
                    reason = self._refusal(request, pending.reader.fds)
                    if reason:
                        self._send(pending.connection, {"kind": "refused", "reason": reason})
                        raise engine_link.LinkError(reason)
                    pending.request, pending.deadline = request, time.monotonic() + REQUEST_TIMEOUT_S
                    self._send(pending.connection, {"kind": "ready"})
                elif message.get("kind") == "go":
                    self._start(pending)
                    return
                else:
                    raise engine_link.LinkError("no go after ready")
        except BlockingIOError:  # the rest of the message has not come yet
            return
        except Exception:  # noqa: BLE001 - this connection only: a broken client must not stop the others' runs
            self._drop_pending(pending)

    def _start(self, pending: _Pending) -> None:
        """Fork the run of a client that said ``go``; its connection then carries signals and the exit code."""
        self._selector.unregister(pending.connection)
        del self._pending[pending.connection]
        request, reader, connection = pending.request, pending.reader, pending.connection
        try:
            run = self._fork(request, reader.fds[:3], reader.fds[3:], connection, reader)
        except OSError as exc:  # no memory or process slot for a fork: nothing ran, the client runs it itself
            try:
                self._send(connection, {"kind": "refused", "reason": f"fork failed: {exc}"})
            except OSError:
                pass
            _close_all(reader.fds)
            connection.close()
            return
        finally:
            _close_all(reader.fds)  # the fork has its copies; the client's pipes must not stay open here
        self._say(f"run {run.pid}: nephireg {' '.join(request.argv)}")
        try:
            self._send(connection, {"kind": "started", "pid": run.pid})
            self._selector.register(connection, selectors.EVENT_READ, run.pid)
        except Exception:  # noqa: BLE001 - the client has gone already: its run is cancelled
            self._abandon(run)

    def _expire_pending(self) -> None:
        now = time.monotonic()
        for pending in [p for p in self._pending.values() if p.deadline <= now]:
            self._drop_pending(pending)

    def _drop_pending(self, pending: _Pending) -> None:
        self._pending.pop(pending.connection, None)
        try:
            self._selector.unregister(pending.connection)
        except (KeyError, ValueError):
            pass
        _close_all(pending.reader.fds)
        pending.connection.close()

    @staticmethod
    def _send(connection: socket.socket, message: Dict[str, Any]) -> None:
        """A short message on a non-blocking connection (a few hundred bytes: the socket buffer takes it)."""
        connection.setblocking(True)
        connection.settimeout(REQUEST_TIMEOUT_S)
        try:
            engine_link.send_message(connection, message)
        finally:
            connection.setblocking(False)

    def _refusal(self, request: engine_link.RunRequest, fds: List[int]) -> str:
        if not engine_link.wants_server(request.argv):
            return "only 'register' runs in the engine server"
        if request.identity != self._identity:
            changed = sorted(k for k in set(request.identity) | set(self._identity)
                             if request.identity.get(k) != self._identity.get(k))
            return f"it is another engine, or the engine changed since the server started ({', '.join(changed)})"
        theirs = engine_link.load_time_environment(request.env)
        if theirs != self._load_time_environment:
            names = sorted(k for k in set(theirs) | set(self._load_time_environment)
                           if theirs.get(k) != self._load_time_environment.get(k))
            return f"its load-time environment differs: {', '.join(names)}"
        ours = {key: value for key, value in self._process.items() if key != "nice"}
        different = sorted(key for key, value in ours.items() if request.process.get(key) != value)
        if different:
            return f"its process attributes differ: {', '.join(different)}"
        if request.process["nice"] < self._process["nice"]:
            return "it runs at a higher priority (lower niceness) than the server"
        if len(fds) != 3:
            return "its three standard streams did not come with the request"
        return ""

    def _fork(self, request: engine_link.RunRequest, streams: List[int], extra: List[int],
              connection: socket.socket, reader: engine_link.LineReader) -> _Run:
        from nephireg import signals
        from nephireg.engine_children import run_command_in_fork
        from nephireg.progress import flush_standard_streams

        flush_standard_streams()  # nothing buffered here may be written twice, once by the fork
        received = signals.received_count()
        server = os.getpid()
        with signals.blocked():  # a signal sent to the fork at once is not lost (see signals.blocked)
            pid = os.fork()
            if pid == 0:
                inherited = [self._listener.fileno(), self._wake_read, self._wake_write, self._selector.fileno(),
                             self._lock]
                inherited += [self._owner.fd] if self._owner is not None else []
                inherited += [run.connection.fileno() for run in self._runs.values() if run.connection is not None]
                inherited += [p.connection.fileno() for p in self._pending.values()]
                # their standard streams too: a run holding another client's pipes would keep them open
                inherited += [fd for p in self._pending.values() for fd in p.reader.fds]
                inherited += [connection.fileno(), *extra]
                raise_niceness = request.process["nice"] - self._process["nice"]

                def take_client() -> None:
                    _become_client(inherited, streams, request, raise_niceness)

                run_command_in_fork(request.argv, received, server, take_client)
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
                    run.cancelled_at = run.cancelled_at or time.monotonic()
                    self._signal(run, int(signum))
        except BlockingIOError:
            return
        except Exception:  # noqa: BLE001 - a broken message: treated as the client gone
            pass
        self._abandon(run)

    def _abandon(self, run: _Run) -> None:
        """The client went away: nobody waits for this run. Cancelled (SIGTERM), then SIGKILL if still going the
        cancel grace later - counted from the client's own cancel where it forwarded one (a client that cancelled
        and was killed when its grace was over must not give the run a second grace)."""
        self._signal(run, signal.SIGTERM)
        now = time.monotonic()
        run.kill_at = min(now, run.cancelled_at or now) + self._cancel_grace_s
        self._drop_connection(run)

    def _signal(self, run: _Run, signum: int) -> None:
        if run.pid in self._runs:  # not reaped yet: the pid is still this run's
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
            _close_all(run.reader.fds)
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
            measured = (f", CPU {usage.ru_utime + usage.ru_stime:.2f} s, peak RSS {usage.ru_maxrss / 1024:.0f} MiB"
                        if usage is not None else "")
            self._say(f"run {pid} ended: exit {code} after {time.monotonic() - run.started:.2f} s{measured}")
            if run.connection is not None:
                try:
                    run.connection.setblocking(True)
                    engine_link.send_message(run.connection, {"kind": "exit", "code": code})
                except OSError:
                    pass
                self._drop_connection(run)

    def _stop_runs(self) -> None:
        """Cancel the runs still going and wait for them (SIGKILL after the cancel grace)."""
        for run in list(self._runs.values()):
            self._signal(run, signal.SIGTERM)
        deadline = time.monotonic() + self._cancel_grace_s
        while self._runs and time.monotonic() < deadline:
            time.sleep(0.05)
            self._reap()
        for run in list(self._runs.values()):
            self._signal(run, signal.SIGKILL)
        while self._runs:
            time.sleep(0.01)
            self._reap()


def _become_client(inherited: List[int], streams: List[int], request: engine_link.RunRequest,
                   raise_niceness: int) -> None:
    """In a run's fork: a session of its own; drop the server's descriptors and signal wiring; take the client's
    standard streams, folder, environment, umask and niceness."""
    import tempfile

    os.setsid()
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGCHLD, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    for fd in inherited:
        os.close(fd)
    for target, fd in enumerate(streams):  # each >= 3: the server's own 0-2 are always open
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request.cwd)
    os.umask(request.umask)
    if raise_niceness > 0:
        os.nice(raise_niceness)
    os.environ.clear()
    os.environ.update(request.env)
    time.tzset()
    tempfile.tempdir = None  # the client's TMPDIR from now on


def _hangup_as_sigterm(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal handler signature
    """The server's terminal closed: stop as on SIGTERM (recorded by :mod:`nephireg.signals`)."""
    signal.raise_signal(signal.SIGTERM)


def _standard_streams_on_devnull() -> None:
    """Open /dev/null on any of descriptors 0-2 that is closed, so that descriptors received later are >= 3."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)


def _unlink_if_ours(path: str, bound: Optional[os.stat_result]) -> None:
    """Remove the socket file if it is still the one this server bound (not a successor's)."""
    if bound is None:
        return
    try:
        info = os.lstat(path)
        if (info.st_dev, info.st_ino) == (bound.st_dev, bound.st_ino):
            os.unlink(path)
    except FileNotFoundError:
        pass


def _close_all(fds: List[int]) -> None:
    """Close and forget ``fds`` (each once, however often this is called)."""
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
