"""The engine's background process, without Qt: Popen + reader threads + a queue, drained by :meth:`poll`.

Standard library only (psutil used when present). Inside Slicer a ``qt.QTimer`` calls :meth:`EngineProcess.poll`
on the GUI thread (see ``widget.py``), so the GUI never blocks on the pipe and Cancel acts at once; scripts and
tests call :meth:`EngineProcess.wait`, which polls in a loop. stdout carries protocol events (one JSON object a
line, :mod:`nephireg.protocol`); stderr carries tracebacks and library warnings. Both feed the log tail shown
when a run fails; lines that are not protocol events are kept as log text, never fatal.

Cancel kills the whole process tree (the interpreter and anything it started), so no orphan keeps a GPU busy. A run
handed to the module's engine server (``cancelGraceS`` given: :mod:`NePhiRegistrationLib.engineserver`) is not in
that tree: its Cancel sends SIGTERM to the client, which forwards it to the run; the run cleans up and ends as a
cancelled command does, and the tree is killed only if it has not ended ``cancelGraceS`` seconds later (the server
then cancels the run itself). The outcome is CANCELLED either way, once the process has exited.
"""

from __future__ import annotations

import collections
import enum
import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence

from nephireg import protocol
from NePhiRegistrationLib.i18n import _

EventCallback = Callable[[Dict[str, Any]], None]
TextCallback = Callable[[str], None]

_EOF = object()  # a reader thread's last queue item
PIPE_GRACE_S = 5.0  # after the process exits, how long its pipes may stay open (held by a grandchild)
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
                 cancelGraceS: Optional[float] = None) -> None:
        self.command = [str(c) for c in command]
        self.cancelGraceS = cancelGraceS  # None: Cancel kills at once; else SIGTERM, then the kill this much later
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

    def cancel(self, force: bool = False) -> None:
        """Kill the process tree now (``force``, or no ``cancelGraceS``), or SIGTERM it and kill it
        ``cancelGraceS`` later if it has not ended (:meth:`poll`); the outcome becomes CANCELLED once it has
        exited (whatever the folder holds is ignored)."""
        if self._proc is None or self.outcome is not None:
            return
        self._cancelRequested = True
        if force or self.cancelGraceS is None or os.name == "nt":
            self._killAt = None
            killProcessTree(self._proc.pid)
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
            killProcessTree(self._proc.pid)  # it did not end in its grace after the SIGTERM
        if self.running and self._proc is not None and self._proc.poll() is not None:
            if self._exitedAt is None:
                self._exitedAt = time.monotonic()
            # Pipes drained - or held open by a leftover grandchild: do not wait for it forever.
            if self._openStreams == 0 or time.monotonic() - self._exitedAt > PIPE_GRACE_S:
                self._finish(self._proc.returncode)
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

    def _finish(self, returncode: int) -> None:
        if self._openStreams > 0:  # something the engine started still holds its pipes: end it with the run
            killProcessTree(self._proc.pid)
        for thread in self._threads:
            thread.join(timeout=1.0)
        seconds = time.monotonic() - self._started
        tail = list(self._tail)
        if self._cancelRequested or returncode == int(protocol.ExitCode.CANCELLED):
            outcome = RunOutcome(RunStatus.CANCELLED, returncode, _("Registration cancelled."), "cancelled", tail,
                                 seconds=seconds)
        elif returncode == 0:
            outcome = self._successOrMissingResult(returncode, tail, seconds)
        else:
            outcome = self._failure(returncode, tail, seconds)
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


def killProcessTree(pid: int) -> None:
    """Kill ``pid`` and every process it started (children first collected, so none is missed by
    re-parenting). psutil when available; else the process group (POSIX, the child leads its own session) or
    ``taskkill /T`` (Windows)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            parent = psutil.Process(pid)
            procs = parent.children(recursive=True) + [parent]
        except psutil.NoSuchProcess:
            procs = []
        for proc in procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=5)
    if os.name == "nt":
        if psutil is None:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True, check=False)
        return
    try:
        os.killpg(pid, signal.SIGKILL)  # anything left in the group (a grandchild that escaped the tree walk)
    except (ProcessLookupError, PermissionError):
        pass
