"""Progress reporting and cancellation for long engine runs.

Methods call ``reporter.stage(...)`` when a stage begins and ``reporter.step(...)`` every iteration;
``step`` raises :class:`nephireg.errors.Cancelled` once cancellation was requested (by a signal handler in the
CLI, or by a library caller), so every loop stops promptly. Events follow :mod:`nephireg.protocol`.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, TextIO, Tuple

from nephireg.errors import Cancelled
from nephireg.protocol import Event, encode_event

EventSink = Callable[[Event, Dict[str, Any]], None]


def say(text: str, stream: Optional[TextIO] = None) -> None:
    """Print one line for a person (stdout by default), best effort: a closed pipe or a full device
    (``| head``, ``/dev/full``) never fails a command whose outputs are written."""
    try:
        print(text, file=stream or sys.stdout, flush=True)
    except (OSError, ValueError, AttributeError):
        pass


def flush_standard_streams() -> None:
    """Flush stdout and stderr, best effort (no stream, or a closed pipe: nothing to save), before the process
    leaves by ``os._exit`` or forks (what is buffered must be written once, and not lost)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass


class Reporter:
    """Base reporter: keeps stage timings, the cancel flag and ETA; subclasses decide where events go."""

    def __init__(self) -> None:
        self._cancel = threading.Event()
        self.started = time.perf_counter()
        self.stage_name: Optional[str] = None
        self._stage_started = self.started
        self.stage_seconds: Dict[str, float] = {}
        self.warnings: List[Dict[str, str]] = []  # every warn() of the run, in order: the manifest's "warnings"
        self.output_lost = False  # a stream write failed; later events are dropped (see _write)

    # -- cancellation ---------------------------------------------------------------------------------------
    def request_cancel(self) -> None:
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def check_cancel(self) -> None:
        if self._cancel.is_set():
            raise Cancelled()

    # -- events -----------------------------------------------------------------------------------------------
    def stage(self, name: str, message: str = "") -> None:
        self._close_stage()
        self.check_cancel()
        self.stage_name = name
        self._stage_started = time.perf_counter()
        self.emit(Event.STAGE, {"stage": name, "message": message or name})

    def step(self, step: int, total: int, loss: Optional[float] = None) -> None:
        """Iteration ``step`` (1-based) of ``total`` in the current stage."""
        self.check_cancel()
        now = time.perf_counter()
        in_stage = now - self._stage_started
        eta = in_stage / step * (total - step) if step > 0 else None
        if loss is not None and not math.isfinite(loss):
            loss = None
        self.emit(Event.PROGRESS, {"stage": self.stage_name, "step": step, "total": total,
                                   "loss": None if loss is None else round(float(loss), 6),
                                   "elapsed_s": round(now - self.started, 3),
                                   "eta_s": None if eta is None else round(eta, 2)})

    def log(self, message: str, level: str = "info") -> None:
        self.emit(Event.LOG, {"level": level, "message": message})

    def warn(self, code: str, message: str) -> None:
        """A ``warning`` event the user can act on; kept in :attr:`warnings` for the result manifest."""
        entry = {"code": code, "message": message}
        self.warnings.append(entry)
        self.emit(Event.WARNING, dict(entry))

    def finish(self) -> Dict[str, float]:
        """Close the last stage and return seconds per stage."""
        self._close_stage()
        return dict(self.stage_seconds)

    def _close_stage(self) -> None:
        if self.stage_name is not None:
            elapsed = time.perf_counter() - self._stage_started
            self.stage_seconds[self.stage_name] = round(self.stage_seconds.get(self.stage_name, 0.0) + elapsed, 3)
            self.stage_name = None

    def emit(self, event: Event, fields: Dict[str, Any]) -> None:  # pragma: no cover - overridden
        pass

    def _write(self, stream: TextIO, text: str) -> None:
        """Progress output is best effort: a closed, broken or full stream (``| head -1``, ``/dev/full``) is
        dropped from then on and the run goes on; the result folder and the exit code are what count."""
        if self.output_lost:
            return
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError, AttributeError):
            self.output_lost = True


class WarningsHeld:
    """A stand-in reporter for work on another thread: keeps its ``warn(code, message)`` calls, to be emitted by
    the caller's own reporter on the caller's thread (:meth:`replay`), in order."""

    def __init__(self) -> None:
        self.held: List[Tuple[str, str]] = []

    def warn(self, code: str, message: str) -> None:
        self.held.append((code, message))

    def replay(self, reporter: Reporter) -> None:
        for code, message in self.held:
            reporter.warn(code, message)


class SilentReporter(Reporter):
    """No output (library use); still honours cancellation."""


class QuietReporter(Reporter):
    """No progress (``--progress none``), but warnings and errors still reach the user on ``stream`` (stderr)."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        super().__init__()
        self.stream = stream

    def emit(self, event: Event, fields: Dict[str, Any]) -> None:
        if event == Event.ERROR:
            self._write(self.stream, f"error: {fields.get('message')}\n")
        elif event == Event.WARNING or (event == Event.LOG and fields.get("level") == "warning"):
            self._write(self.stream, f"warning: {fields.get('message')}\n")


class CallbackReporter(Reporter):
    """Calls ``callback(event, fields)`` for every event (library use, tests)."""

    def __init__(self, callback: EventSink) -> None:
        super().__init__()
        self.callback = callback

    def emit(self, event: Event, fields: Dict[str, Any]) -> None:
        self.callback(event, fields)


class JsonlReporter(Reporter):
    """One protocol line per event on ``stream`` (stdout for the Slicer module), flushed at once."""

    def __init__(self, stream: TextIO = sys.stdout) -> None:
        super().__init__()
        self.stream = stream
        self._lock = threading.Lock()

    def emit(self, event: Event, fields: Dict[str, Any]) -> None:
        with self._lock:
            self._write(self.stream, encode_event(event, **fields) + "\n")


class TerminalReporter(Reporter):
    """A human progress bar on a terminal (stderr), one line per stage."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30) -> None:
        super().__init__()
        self.stream = stream
        self.width = width
        self._open_line = False
        self._last_draw = 0.0

    def emit(self, event: Event, fields: Dict[str, Any]) -> None:
        if event == Event.PROGRESS:
            self._draw(fields)
            return
        self._end_line()
        if event == Event.STAGE:
            line = f"[{fields['stage']}] {fields['message']}\n"
        elif event == Event.LOG:
            prefix = "warning: " if fields["level"] == "warning" else ""
            line = f"  {prefix}{fields['message']}\n"
        elif event == Event.WARNING:
            line = f"  warning: {fields['message']}\n"
        elif event == Event.RESULT:
            line = f"done: {fields.get('manifest')}\n"
        elif event == Event.ERROR:
            line = f"error: {fields.get('message')}\n"
        else:
            return
        self._write(self.stream, line)

    def _draw(self, fields: Dict[str, Any]) -> None:
        now = time.perf_counter()
        step, total = fields["step"], fields["total"]
        if step < total and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        done = int(self.width * step / max(total, 1))
        bar = "#" * done + "-" * (self.width - done)
        loss = "" if fields["loss"] is None else f" loss {fields['loss']:.4f}"
        eta = "" if fields["eta_s"] is None else f" eta {fields['eta_s']:.0f}s"
        self._write(self.stream, f"\r  |{bar}| {step}/{total}{loss}{eta}   ")
        self._open_line = True

    def _end_line(self) -> None:
        if self._open_line:
            self._write(self.stream, "\n")
            self._open_line = False
