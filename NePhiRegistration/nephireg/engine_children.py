"""How ``nephireg batch`` runs one registration per pair: each in its own process, so that a crash or an
out-of-memory kill ends that pair only.

Where it can (:func:`nephireg.forked.can_fork` when the batch begins: Linux, torch not yet imported, one thread,
children reaped by this process), the batch loads the engine (torch: 1-2 s on a 2-core CPU) once and forks a copy
of itself per pair, which runs ``register`` from its first line with torch already in memory. Elsewhere, with
``--fresh-processes``, when the engine cannot be loaded here or when the system refuses the fork, each pair starts
a fresh interpreter (``python -m nephireg register ...``) and pays the import itself.

A forked child is the command line without its interpreter start: it records signals as a fresh process does
(:func:`nephireg.signals.reset_after_fork`), runs :func:`nephireg.cli.main`, flushes its streams and leaves by
``os._exit`` with main's exit code (the batch's own exit handlers are not its to run). The batch itself never runs
a torch operation, so no torch thread pool or CUDA context exists in it to be copied (numpy's idle OpenBLAS
thread does, as for :class:`nephireg.forked.ForkedWork`: OpenBLAS handles the fork).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import traceback
from typing import Callable, List, NoReturn, Optional, Protocol

from nephireg.progress import flush_standard_streams
from nephireg.protocol import ExitCode

ENGINE_MODULES = ("nephireg.cli", "nephireg.pipeline")  # the child's entry point; torch and the engine


class EngineChild(Protocol):
    """One pair's registration process."""

    def wait(self) -> int:
        """Its exit code, once it has ended (negative: the signal that ended it)."""

    def terminate(self) -> None:
        """SIGTERM to it, unless it has been waited for (its pid may then be another process's)."""


class Launcher:
    """Starts the batch's children (see the module's docstring). ``fork``: forks wanted (not
    ``--fresh-processes``); whether they are possible is decided here, once, before anything is loaded."""

    def __init__(self, fork: bool, say: Callable[[str], None]) -> None:
        from nephireg.forked import can_fork

        self.fork = fork and can_fork()
        self._say = say
        self._loaded = False

    def load(self) -> None:
        """Load the engine for the forks, once (a signal during it cancels the batch as any step does). An engine
        that fails to load here leaves every pair to a fresh interpreter, which then reports the failure as that
        pair's error."""
        if not self.fork or self._loaded:
            return
        from nephireg.signals import import_frozen

        try:
            for name in ENGINE_MODULES:
                import_frozen(name)
        except Exception as exc:  # noqa: BLE001 - e.g. a broken torch install: reported by each pair's own run
            self.fork = False
            self._say(f"the engine could not be loaded into the batch ({type(exc).__name__}: {exc}); every pair "
                      "starts a fresh interpreter")
            return
        self._loaded = True
        self._say("engine loaded once; each pair runs in a fork of this process (--fresh-processes: a fresh "
                  "interpreter each)")

    def start(self, register_argv: List[str]) -> EngineChild:
        """``register`` with ``register_argv`` in a child process, after :meth:`load`."""
        if self.fork and self._loaded:
            try:
                return _ForkedCopy(register_argv)
            except OSError:  # no memory or process slot for a copy of this process: a fresh one needs less
                pass
        return _FreshInterpreter(register_argv)


class _FreshInterpreter:
    def __init__(self, register_argv: List[str]) -> None:
        self._process = subprocess.Popen([sys.executable, "-m", "nephireg", "register", *register_argv])

    def wait(self) -> int:
        return int(self._process.wait())

    def terminate(self) -> None:
        self._process.send_signal(signal.SIGTERM)  # Popen sends nothing once it has reaped the process


class _ForkedCopy:
    def __init__(self, register_argv: List[str]) -> None:
        from nephireg import signals

        flush_standard_streams()  # nothing buffered here may be written twice, once by the child
        self._code: Optional[int] = None
        received = signals.received_count()
        parent = os.getpid()
        with signals.blocked():  # a signal sent to the child at once is not lost (see signals.blocked)
            self.pid = os.fork()
            if self.pid == 0:
                run_command_in_fork(["register", *register_argv], received, parent)

    def wait(self) -> int:
        """The exit code. A signal may raise :class:`nephireg.errors.Cancelled` while the child runs (call again):
        the child is waited for without being reaped, then reaped and its code kept in one uninterrupted step, so
        :meth:`terminate` never signals a pid that is no longer this child's."""
        from nephireg import signals

        if self._code is None:
            try:
                os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
                with signals.deferred():
                    _, status = os.waitpid(self.pid, 0)
                    self._code = os.waitstatus_to_exitcode(status)
            except ChildProcessError:  # reaped by someone else (a SIGCHLD handler set in C): its code is lost
                self._code = int(ExitCode.INTERNAL_ERROR)
        return self._code

    def terminate(self) -> None:
        if self._code is None:
            os.kill(self.pid, signal.SIGTERM)


def run_command_in_fork(argv: List[str], received_before_fork: int, parent: int,
                        prepare: Optional[Callable[[], None]] = None) -> NoReturn:
    """The whole life of a child forked from a process with the engine loaded (the batch, the engine server):
    ``prepare()`` (the server's: the client's streams, folder and environment), then the command line ``argv``,
    then ``os._exit`` with its exit code; never returns into the parent's code. A parent that is killed (SIGKILL:
    it cannot forward anything) cancels it by SIGTERM, so no run goes on writing after its parent has gone."""
    code = int(ExitCode.INTERNAL_ERROR)
    try:
        from nephireg import signals
        from nephireg.forked import die_with

        signals.reset_after_fork(received_before_fork)  # a signal since the fork, or from now on, cancels the run
        die_with(parent, signal.SIGTERM)
        if prepare is not None:
            prepare()
        from nephireg.cli import main

        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors (2) and --help (0): the exit a fresh interpreter makes
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except BaseException as exc:  # noqa: BLE001 - a Cancelled (the parent's handling, copied), or a bug: one exit code
        from nephireg.errors import Cancelled

        if isinstance(exc, Cancelled):
            code = int(ExitCode.CANCELLED)
        else:
            traceback.print_exc()
    finally:
        flush_standard_streams()
        os._exit(code)
