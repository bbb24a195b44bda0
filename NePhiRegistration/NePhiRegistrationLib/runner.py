"""The engine's background process, without Qt: Popen + reader threads + a queue, drained by :meth:`poll`.

Standard library only (psutil used when present). Inside Slicer a ``qt.QTimer`` calls :meth:`EngineProcess.poll`
on the GUI thread (see ``widget.py``), so the GUI never blocks on the pipe and Cancel acts at once; scripts and
tests call :meth:`EngineProcess.wait`, which polls in a loop. stdout carries protocol events (one JSON object a
line, :mod:`nephireg.protocol`); stderr carries tracebacks and library warnings. Both feed the log tail shown
when a run fails; lines that are not protocol events are kept as log text, never fatal.

Cancel kills the whole process tree (the interpreter and anything it started), so no orphan keeps a GPU busy. A run
handed to the module's engine server (``cancelGraceS`` given: :mod:`NePhiRegistrationLib.engineserver`) is not in
that tree: its Cancel sends SIGTERM to the client, which forwards it to the run; the run cleans up and ends as a
cancelled command does, and the tree is killed only if it has not ended ``cancelGraceS`` seconds later. The outcome
is CANCELLED either way, once the process has exited.

A run is over only when nothing holds its output pipes any more: the served run writes to this process's pipes
(the client passed them on), as does anything the engine started. So after the process has exited, whatever still
holds them (:func:`pipeHolders`: on Linux, found through ``/proc``; the engine server itself spared) is killed -
after a cancel at once and again every :data:`HOLDER_SCAN_S` (a run the server forks a moment after its client was
killed), otherwise after :data:`PIPE_GRACE_S` - and the run finishes when the pipes close, so a run that outlived
its killed client does not write into a folder the caller removes next; holders that survive
:data:`HOLDER_TIMEOUT_S` of that are given up on: the outcome names them (``stillRunning``), and the caller keeps
the folder they may write into.
"""

from __future__ import annotations

import collections
import enum
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterable, List, Mapping, Optional, Sequence

from nephireg import protocol
from NePhiRegistrationLib.i18n import _

EventCallback = Callable[[Dict[str, Any]], None]
TextCallback = Callable[[str], None]

_EOF = object()  # a reader thread's last queue item
PIPE_GRACE_S = 5.0  # after the process exits, how long its pipes may stay open (held by a grandchild)
HOLDER_SCAN_S = 0.2  # while they stay open after a cancel, how often their holders are looked for (and killed)
HOLDER_TIMEOUT_S = 5.0  # holders still there this long after the first kill: finish anyway (never hang the run)
_WINDOWS_NO_WINDOW = 0x08000000  # CREATE_NO_WINDOW: no console window flashes up on Windows


class RunStatus(enum.Enum):
    NOT_STARTED = "not started"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class RunOutcome:
    """How a finished run ended. ``manifest`` (with absolute ``files``) only when it succeeded."""

    status: RunStatus
    exitCode: Optional[int] = None
    message: str = ""
    errorKind: str = ""
    logTail: List[str] = field(default_factory=list)
    manifest: Optional[Dict[str, Any]] = None
    seconds: float = 0.0
    stillRunning: List[int] = field(default_factory=list)  # pids that could not be stopped: their folder is kept

    @property
    def outOfMemory(self) -> bool:
        return self.status == RunStatus.FAILED and self.exitCode == int(protocol.ExitCode.OUT_OF_MEMORY)

    def describe(self) -> str:
        """One paragraph for the user: the message, then the last log lines."""
        text = self.message or self.status.value
        if self.status == RunStatus.FAILED and self.logTail:
            text += "\n\nLast lines of the engine log:\n" + "\n".join(self.logTail[-15:])
        return text


class EngineProcess:
    """One run of ``command``. Call :meth:`start`, then :meth:`poll` regularly (or :meth:`wait`)."""

    def __init__(self, command: Sequence[str], outDir: str, env: Optional[Mapping[str, str]] = None,
                 cwd: Optional[str] = None, onEvent: Optional[EventCallback] = None,
                 onText: Optional[TextCallback] = None, logTailLines: int = 60,
                 cancelGraceS: Optional[float] = None, spare: Sequence[int] = ()) -> None:
        self.command = [str(c) for c in command]
        self.cancelGraceS = cancelGraceS  # None: Cancel kills at once; else SIGTERM, then the kill this much later
        # never killed as pipe holders: these pids and their sessions (the engine server, which holds a client's
        # pipes a moment, and its fresh forks before they start their own session)
        self.spare = set(spare)
        self.outDir = outDir
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.onEvent = onEvent
        self.onText = onText
        self.status = RunStatus.NOT_STARTED
        self.outcome: Optional[RunOutcome] = None
        self.lastError: Optional[Dict[str, Any]] = None
        self._tail: Deque[str] = collections.deque(maxlen=logTailLines)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._proc: Optional[subprocess.Popen] = None
        self._threads: List[threading.Thread] = []
        self._openStreams = 0
        self._cancelRequested = False
        self._killAt: Optional[float] = None  # time.monotonic() of the kill that follows a SIGTERM cancel
        self._started = 0.0
        self._exitedAt: Optional[float] = None
        self._killingSince: Optional[float] = None  # when killing what holds the pipes began
        self._lastScan = 0.0
        self._pipeInodes: List[int] = []

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("this engine process was already started")
        kwargs: Dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = _WINDOWS_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True  # own process group: cancel can kill the whole group
        self._started = time.monotonic()
        self._proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, env=self.env, cwd=self.cwd, **kwargs)
        self.status = RunStatus.RUNNING
        self._pipeInodes = [os.fstat(stream.fileno()).st_ino for stream in (self._proc.stdout, self._proc.stderr)]
        for stream, name in ((self._proc.stdout, "stdout"), (self._proc.stderr, "stderr")):
            thread = threading.Thread(target=self._read, args=(stream, name), daemon=True,
                                      name=f"nephireg-{name}-reader")
            thread.start()
            self._threads.append(thread)
        self._openStreams = 2

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self.status == RunStatus.RUNNING

    @property
    def cancelRequested(self) -> bool:
        return self._cancelRequested

    def cancel(self, force: bool = False) -> None:
        """Kill the process tree now (``force``, or no ``cancelGraceS``), or SIGTERM it and kill it
        ``cancelGraceS`` later if it has not ended (:meth:`poll`); the outcome becomes CANCELLED once it has
        exited (whatever the folder holds is ignored)."""
        if self._proc is None or self.outcome is not None:
            return
        self._cancelRequested = True
        if self._proc.poll() is not None:  # exited (and reaped: its pid may be another's now); poll() ends the rest
            return
        if force or self.cancelGraceS is None or os.name == "nt":
            self._killAt = None
            killProcessTree(self._proc.pid, wait=False)  # the pipes' end is the sign it has gone: no wait here
        elif self._killAt is None:
            self._killAt = time.monotonic() + self.cancelGraceS
            try:
                self._proc.send_signal(signal.SIGTERM)  # the client forwards it to the run in the server
            except OSError:
                pass

    # -- draining -------------------------------------------------------------------------------------------
    def poll(self) -> List[Dict[str, Any]]:
        """Handle every line read so far (callbacks run on the caller's thread); finish the run when the
        process has exited and both pipes are drained. Returns the protocol events handled."""
        events = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _EOF:
                self._openStreams -= 1
                continue
            event = self._handleLine(*item)
            if event is not None:
                events.append(event)
        if self._killAt is not None and time.monotonic() >= self._killAt and self._proc.poll() is None:
            self._killAt = None
            killProcessTree(self._proc.pid, wait=False)  # it did not end in its grace after the SIGTERM
        if self.running and self._proc is not None and self._proc.poll() is not None:
            self._afterExit()
        return events

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> RunOutcome:
        """Poll until the run ends (blocking). On ``timeout`` seconds the run is cancelled."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.outcome is None:
            self.poll()
            if self.outcome is not None:
                break
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                deadline = None
            time.sleep(interval)
        return self.outcome

    # -- internals ------------------------------------------------------------------------------------------
    def _read(self, stream, name: str) -> None:
        try:
            for raw in iter(stream.readline, b""):
                # bytes + explicit UTF-8: a non-UTF-8 locale (Windows code pages) cannot break the reader
                self._queue.put((name, raw.decode("utf-8", errors="replace").rstrip("\r\n")))
        except (OSError, ValueError):
            pass  # pipe closed under us (process killed)
        finally:
            self._queue.put(_EOF)

    def _handleLine(self, stream: str, line: str) -> Optional[Dict[str, Any]]:
        event = protocol.parse_event_line(line) if stream == "stdout" else None
        if event is None:
            if line.strip():
                self._tail.append(line)
                if self.onText:
                    self.onText(line)
            return None
        if event["event"] == protocol.Event.LOG.value:
            self._tail.append(f"[{event.get('level', 'info')}] {event.get('message', '')}")
        elif event["event"] == protocol.Event.ERROR.value:
            self.lastError = event
            self._tail.append(f"[error] {event.get('message', '')}")
        if self.onEvent:
            self.onEvent(event)
        return event

    def _afterExit(self) -> None:
        """The process has exited: finish once its pipes are closed; kill what still holds them (a served run whose
        client was killed, a grandchild) from a cancel on, or once they have stayed open :data:`PIPE_GRACE_S`."""
        now = time.monotonic()
        if self._exitedAt is None:
            self._exitedAt = now
        if self._openStreams == 0:
            self._finish(self._proc.returncode)
            return
        if not (self._cancelRequested or now - self._exitedAt > PIPE_GRACE_S):
            return
        if self._killingSince is None:
            self._killingSince = now
            if not sys.platform.startswith("linux") and os.name != "nt":  # no /proc: the exited process's group
                _killGroup(self._proc.pid)
        if now - self._lastScan >= HOLDER_SCAN_S:
            self._lastScan = now
            for pid in self._holders():
                killProcessTree(pid, wait=False)  # never blocks the GUI thread: the pipes' end is the sign
        if now - self._killingSince > HOLDER_TIMEOUT_S:
            left = pipeHolders(self._pipeInodes)  # the spared too: a fork they make could still write
            if left:
                self._tail.append(f"processes {left} still wrote to the engine's output {HOLDER_TIMEOUT_S:g} s after "
                                  "they were killed")
            self._finish(self._proc.returncode, stillRunning=left)

    def _holders(self) -> List[int]:
        return [pid for pid in pipeHolders(self._pipeInodes, skipSessions=self.spare) if pid not in self.spare]

    def _finish(self, returncode: int, stillRunning: Sequence[int] = ()) -> None:
        for thread in self._threads:
            thread.join(timeout=1.0 if self._openStreams == 0 else 0.0)
        seconds = time.monotonic() - self._started
        tail = list(self._tail)
        if self._cancelRequested or returncode == int(protocol.ExitCode.CANCELLED):
            outcome = RunOutcome(RunStatus.CANCELLED, returncode, _("Registration cancelled."), "cancelled", tail,
                                 seconds=seconds)
        elif returncode == 0:
            outcome = self._successOrMissingResult(returncode, tail, seconds)
        else:
            outcome = self._failure(returncode, tail, seconds)
        outcome.stillRunning = list(stillRunning)
        self.outcome = outcome
        self.status = outcome.status

    def _successOrMissingResult(self, returncode: int, tail: List[str], seconds: float) -> RunOutcome:
        try:
            manifest = protocol.read_manifest(self.outDir)
        except (OSError, ValueError) as exc:
            message = _("The engine finished but left no readable result ({error}).").format(error=exc)
            return RunOutcome(RunStatus.FAILED, returncode, message,
                              "no-result", tail, seconds=seconds)
        return RunOutcome(RunStatus.SUCCEEDED, returncode, _("Registration finished."), "", tail, manifest, seconds)

    def _failure(self, returncode: int, tail: List[str], seconds: float) -> RunOutcome:
        if self.lastError is not None:
            message = (str(self.lastError.get("message", ""))
                       or _("The engine failed (exit code {code}).").format(code=returncode))
            kind = str(self.lastError.get("kind", "error"))
        else:
            last = next((line for line in reversed(tail) if line.strip()), "")
            message = (_("The engine stopped with exit code {code}: {line}").format(code=returncode, line=last) if last
                       else _("The engine stopped with exit code {code}.").format(code=returncode))
            kind = "crash" if returncode < 0 else "error"
        return RunOutcome(RunStatus.FAILED, returncode, message, kind, tail, seconds=seconds)


def pipeHolders(inodes: Sequence[int], skipSessions: Iterable[int] = ()) -> List[int]:
    """The pids of this user's processes outside this process's session (and ``skipSessions``) that hold the write
    end of a pipe of ``inodes`` (Linux: ``/proc/PID/fd``, ``fdinfo``); empty elsewhere. The writers of a run's
    output pipes are the run and what it started, wherever they are in the process tree (a run in the engine server
    is the server's child, not the client's), each in a session that is not the application's: the engine is
    started in a session of its own. Not holders: a process with only a read end, or a fork of the application that
    caught a write end in the moment before a ``Popen`` closed it (same session); skip the engine server's session
    (``skipSessions``): a fresh fork of it holds the pipes of clients still in their handshake until it has started
    a session of its own."""
    if not os.path.isdir("/proc/self/fd"):
        return []
    links = {f"pipe:[{inode}]" for inode in inodes}
    skipped = {os.getsid(0), *skipSessions}
    holders = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.getsid(int(entry)) in skipped:
                continue
            fds = os.listdir(f"/proc/{entry}/fd")  # another user's: PermissionError
            if any(os.readlink(f"/proc/{entry}/fd/{fd}") in links and _writeEnd(entry, fd) for fd in fds):
                holders.append(int(entry))
        except OSError:  # not ours, or it ended while being read
            continue
    return holders


def _writeEnd(pid: str, fd: str) -> bool:
    with open(f"/proc/{pid}/fdinfo/{fd}") as info:
        flags = next((line.split()[1] for line in info if line.startswith("flags:")), "0")
    return int(flags, 8) & os.O_ACCMODE == os.O_WRONLY


def killProcessTree(pid: int, wait: bool = True) -> None:
    """Kill ``pid`` and every process it started (children first collected, so none is missed by
    re-parenting), and ``pid``'s process group where it leads one. psutil when available (waiting up to 5 s for
    them to end with ``wait``); else ``pid`` and its group (POSIX: the engine leads its own session) or
    ``taskkill /T`` (Windows)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            parent = psutil.Process(pid)
            procs = parent.children(recursive=True) + [parent]
        except psutil.Error:  # gone, or not ours to inspect
            procs = []
        for proc in procs:
            try:
                proc.kill()
            except psutil.Error:
                pass
        if wait:
            psutil.wait_procs(procs, timeout=5)
    if os.name == "nt":
        if psutil is None:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True, check=False)
        return
    if psutil is None:
        try:
            os.kill(pid, signal.SIGKILL)  # a holder that leads no group
        except (ProcessLookupError, PermissionError):
            pass
    _killGroup(pid)  # anything left in its group (a grandchild that escaped the tree walk)


def _killGroup(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
