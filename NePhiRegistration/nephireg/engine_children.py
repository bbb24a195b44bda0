"""How ``nephireg batch`` runs one registration per pair: each in its own process, so that a crash or an
out-of-memory kill ends that pair only.

Where it can (:func:`can_fork_loaded`: Linux, this process single-threaded and reaping its own children), the
batch loads the engine (torch: 1-2 s on a 2-core CPU) once and forks a copy of itself per pair, which runs
``register`` from its first line with torch already in memory. Elsewhere, or with ``--fresh-processes``, each
pair starts a fresh interpreter (``python -m nephireg register ...``) and pays the import itself.

A forked child is the command line without its interpreter start: it records signals as a fresh process does
(:func:`nephireg.signals.reset_after_fork`), runs :func:`nephireg.cli.main`, flushes its streams and leaves by
``os._exit`` (the batch's own exit handlers are not its to run). The batch never runs a torch operation itself, so
no thread pool exists in it to be copied half-started.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import traceback
from typing import List, Optional, Protocol

from nephireg.protocol import ExitCode


def can_fork_loaded() -> bool:
    """Whether :func:`start` may fork a copy of this process: Linux (where forking a process that has imported torch
    but run nothing is safe), ``os.fork``, one Python thread, and children reaped by this process (a SIGCHLD set to
    be ignored would have the kernel reap them, and a pid waited for could then belong to another process)."""
    return (sys.platform.startswith("linux") and hasattr(os, "fork") and threading.active_count() == 1
            and signal.getsignal(signal.SIGCHLD) in (signal.SIG_DFL, None))


def load_engine() -> None:
    """Import what a registration imports, once, with the cyclic garbage collector paused and what it made frozen
    after (as :func:`nephireg.signals.import_polling` does for one run): the children then share those pages with
    this process instead of each collecting over them."""
    if "nephireg.pipeline" in sys.modules:
        return
    collecting = gc.isenabled()
    gc.disable()
    try:
        import nephireg.cli  # noqa: F401 - the child's entry point and its argument parser
        import nephireg.pipeline  # noqa: F401 - torch and the engine
        gc.freeze()
    finally:
        if collecting:
            gc.enable()


class EngineChild(Protocol):
    """One pair's registration process."""

    def wait(self) -> int:
        """Its exit code, once it has ended (negative: the signal that ended it)."""

    def terminate(self) -> None:
        """SIGTERM to it, unless it has been waited for (its pid may then be another process's)."""


class _FreshInterpreter:
    def __init__(self, register_argv: List[str]) -> None:
        self._process = subprocess.Popen([sys.executable, "-m", "nephireg", "register", *register_argv])

    def wait(self) -> int:
        return int(self._process.wait())

    def terminate(self) -> None:
        self._process.send_signal(signal.SIGTERM)  # Popen sends nothing once it has reaped the process


class _ForkedCopy:
    def __init__(self, register_argv: List[str]) -> None:
        for stream in (sys.stdout, sys.stderr):  # nothing buffered here may be written twice, once by the child
            _flush(stream)
        from nephireg import signals

        self._code: Optional[int] = None
        received = signals.received_count()
        self.pid = os.fork()
        if self.pid == 0:
            _child(register_argv, received)

    def wait(self) -> int:
        """The exit code; an interrupting signal may raise here (:class:`nephireg.errors.Cancelled`): call again."""
        if self._code is None:
            _, status = os.waitpid(self.pid, 0)
            self._code = os.waitstatus_to_exitcode(status)
        return self._code

    def terminate(self) -> None:
        if self._code is None:  # not reaped: the pid is still this child's
            os.kill(self.pid, signal.SIGTERM)


def start(register_argv: List[str], fork: bool) -> EngineChild:
    """``register`` with ``register_argv`` in a child process: a fork of this one when ``fork`` (after
    :func:`load_engine`; it loads the engine if that has not been done), else a fresh interpreter."""
    if not fork:
        return _FreshInterpreter(register_argv)
    load_engine()
    return _ForkedCopy(register_argv)


def _child(register_argv: List[str], received_before_fork: int) -> None:
    """The forked child's whole life: never returns into the batch's code."""
    code = int(ExitCode.INTERNAL_ERROR)
    try:
        from nephireg import signals

        signals.reset_after_fork(received_before_fork)  # a signal since the fork, or from now on, cancels the run
        from nephireg.cli import main

        code = main(["register", *register_argv])
    except BaseException as exc:  # noqa: BLE001 - a Cancelled (the batch's handling, copied), or a bug: one exit code
        from nephireg.errors import Cancelled

        if isinstance(exc, Cancelled):
            code = int(ExitCode.CANCELLED)
        else:
            traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            _flush(stream)
        os._exit(code)


def _flush(stream) -> None:
    try:
        stream.flush()
    except (AttributeError, OSError, ValueError):  # no stream, or a closed pipe: nothing to save
        pass
