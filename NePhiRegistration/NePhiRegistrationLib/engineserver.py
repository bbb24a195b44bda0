"""Off by default (``keepEngineLoaded``): a review found that a forced cancel, or one whose grace runs out, kills
only the client, while the run (a fork of the server in its own session) lives on until the server's own grace and
may write after the temp folder is removed; and that replacing the server cancels another job's run. Until those
are mended, a user opts in.

The module's resident engine: one ``nephireg serve`` per Slicer session (Linux), so that a Register after the
first runs in a fork of an engine that has torch loaded already (1-2 s less per run: torch's import). Standard
library only.

Lifetime: started after a run has finished (never beside a run, which would share the CPU with the engine's
loading), with Slicer's pid as ``--exit-with`` (it stops when Slicer ends, a crash included) and ``--idle-exit``
(it stops when unused for :data:`IDLE_EXIT_S`; the next run then loads the engine itself and starts a new one).
Its socket is in a private folder of its own (created 0700 by ``tempfile.mkdtemp``), removed by :meth:`stop`.

A run uses it only when it is ready and was started for the same interpreter and environment (the CPU device hides
the GPUs, for instance); the engine's own checks stay in force: a server it refuses (another engine version, files
changed by an update, another load-time environment) makes the run load the engine itself, as without a server.
Cancel of a run in the server: SIGTERM to its client (forwarded to the run, which cleans up and exits as a
cancelled command does), the process tree killed only when it has not ended after :data:`CANCEL_GRACE_S`
(:class:`NePhiRegistrationLib.runner.EngineProcess`); a run whose client was killed is cancelled by the server, and
killed by it :data:`CANCEL_GRACE_S` later.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Mapping, Optional

from nephireg.engine_link import SERVER_ENV
from NePhiRegistrationLib import engine

IDLE_EXIT_S = 1800.0  # an unused server stops after this (it holds ~0.3 GiB with torch loaded)
CANCEL_GRACE_S = 10.0  # a cancelled run's time to clean up before it is killed (client side and server side)
SOCKET_NAME = "engine.sock"
LOG_NAME = "server.log"


def supported() -> bool:
    """The engine server forks runs and watches its owner through a pidfd: Linux only."""
    return sys.platform.startswith("linux") and hasattr(os, "pidfd_open")


class EngineServer:
    """One ``nephireg serve`` started by this process for ``python`` and the runs' environment ``env``."""

    def __init__(self, python: str, env: Mapping[str, str]) -> None:
        self.python = python
        self.env = _withoutServer(env)
        self.folder = tempfile.mkdtemp(prefix="nephireg-engine-")  # 0700; short, for the socket path limit
        self.socketPath = os.path.join(self.folder, SOCKET_NAME)
        self.logPath = os.path.join(self.folder, LOG_NAME)
        self._proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        command = engine.engineCommand(self.python, ["serve", "--socket", self.socketPath, "--idle-exit",
                                                     f"{IDLE_EXIT_S:g}", "--exit-with", str(os.getpid()),
                                                     "--cancel-grace", f"{CANCEL_GRACE_S:g}"])
        with open(self.logPath, "ab") as log:
            self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                          env=dict(self.env), cwd=self.folder, start_new_session=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def ready(self) -> bool:
        """Running and listening (its socket exists once the engine is loaded)."""
        return self.running and os.path.exists(self.socketPath)

    def serves(self, python: str, env: Mapping[str, str]) -> bool:
        """Started for this interpreter and environment (the run's ``NEPHIREG_SERVER`` aside)."""
        return python == self.python and _withoutServer(env) == self.env

    def stop(self, timeout: float = 5.0) -> None:
        """Stop it (SIGTERM: runs still going are cancelled; SIGKILL after ``timeout``) and remove its folder."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def logTail(self, lines: int = 20) -> List[str]:
        try:
            with open(self.logPath, encoding="utf-8", errors="replace") as log:
                return log.read().splitlines()[-lines:]
        except OSError:
            return []


_shared: Optional[EngineServer] = None


def serverFor(python: str, env: Mapping[str, str]) -> Optional[EngineServer]:
    """The shared server when it is ready for a run of ``python`` with ``env``; None otherwise (the run then
    loads the engine itself)."""
    if _shared is not None and _shared.ready and _shared.serves(python, env):
        return _shared
    return None


def prepare(python: str, env: Mapping[str, str]) -> Optional[EngineServer]:
    """Make sure a server for ``python`` and ``env`` is running or loading (after a run: see the module
    docstring); one of another environment, or one that has stopped, is replaced. None where unsupported."""
    global _shared
    if not supported():
        return None
    if _shared is not None and _shared.running and _shared.serves(python, env):
        return _shared
    stopShared()
    server = EngineServer(python, env)
    try:
        server.start()
    except OSError:  # no interpreter, no process slot: runs go on loading the engine themselves
        server.stop()
        return None
    _shared = server
    return server


def stopShared() -> None:
    global _shared
    if _shared is not None:
        server, _shared = _shared, None
        server.stop()


def _withoutServer(env: Mapping[str, str]) -> Dict[str, str]:
    return {str(k): str(v) for k, v in env.items() if k != SERVER_ENV}
