"""The module's resident engine: one ``nephireg serve`` per Slicer session (Linux), so that a Register after the
first runs in a fork of an engine that has torch loaded already (1-2 s less per run: torch's import). Setting
``keepEngineLoaded`` (on by default). Standard library only.

Lifetime: started after a run has finished (never beside a run, which would share the CPU with the engine's
loading), with Slicer's pid as ``--exit-with`` (it stops when Slicer ends, a crash included) and ``--idle-exit``
(it stops when unused for :data:`IDLE_EXIT_S`; the next run then loads the engine itself and starts a new one).
Its socket is in a private folder of its own (created 0700 by ``tempfile.mkdtemp``), removed by :meth:`stop`;
the folder of a server whose Slicer crashed is removed by the next session (:func:`removeStaleFolders`).

A run uses it only when it is ready and was started for the same interpreter and environment (the CPU device hides
the GPUs, for instance); the engine's own checks stay in force: a server it refuses (another engine version, files
changed by an update, another load-time environment) makes the run load the engine itself, as without a server.
A server is never stopped or replaced while a run of this module is in it (:meth:`EngineServer.acquire`), except
by :func:`stopShared` when the module's panel is cleaned up (its runs are cancelled then); one that fails
:data:`MAX_FAILURES` times (it stopped by itself with an error - a nonzero exit, e.g. killed for memory - or it
refused a run) is not started again in this session, and its log goes to Slicer's log.

Cancel of a run in the server: SIGTERM to its client (forwarded to the run, which cleans up and exits as a
cancelled command does), the process tree killed only when it has not ended after :data:`CANCEL_GRACE_S`; the
runner then kills whatever still holds the run's output pipes (the run itself, a child of the server:
:func:`NePhiRegistrationLib.runner.pipeHolders`) before the run counts as over, so nothing writes into the job's
folder after it is removed (a holder that survives the runner's timeout: the folder is kept, and the log says
so). The server, for its part, kills a run whose client went away :data:`CANCEL_GRACE_S` after the client's first
cancel.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Mapping, Optional, Set

from nephireg.engine_link import LOCK_NAME, MAX_SOCKET_PATH_BYTES, SERVER_ENV, SOCKET_NAME
from NePhiRegistrationLib import engine

IDLE_EXIT_S = 1800.0  # an unused server stops after this (it holds ~0.3 GiB with torch loaded)
CANCEL_GRACE_S = 10.0  # a cancelled run's time to clean up before it is killed (client side and server side)
STOP_TIMEOUT_S = CANCEL_GRACE_S + 5.0  # a stopping server waits CANCEL_GRACE_S for its runs, then kills them
MAX_FAILURES = 2  # servers that failed (a nonzero exit of their own, a refused run): then none this session
STALE_AFTER_S = 600.0  # a server folder whose lock nobody holds, older than this, is left by a crash
FOLDER_PREFIX = "nephireg-engine-"
LOG_NAME = "server.log"


def supported() -> bool:
    """The engine server forks runs and watches its owner through a pidfd: Linux only."""
    return sys.platform.startswith("linux") and hasattr(os, "pidfd_open")


class EngineServer:
    """One ``nephireg serve`` started by this process for ``python`` and the runs' environment ``env``."""

    def __init__(self, python: str, env: Mapping[str, str]) -> None:
        self.python = python
        self.env = _withoutServer(env)
        self.folder = tempfile.mkdtemp(prefix=FOLDER_PREFIX)  # 0700; short, for the socket path limit
        self.socketPath = os.path.join(self.folder, SOCKET_NAME)
        self.logPath = os.path.join(self.folder, LOG_NAME)
        self.jobs: Set[int] = set()  # ids of the module's jobs whose run is in this server (acquire / release)
        self.failed = False  # it refused a run of this engine (the module then replaces it)
        self._proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        command = engine.engineCommand(self.python, ["serve", "--socket", self.socketPath, "--idle-exit",
                                                     f"{IDLE_EXIT_S:g}", "--exit-with", str(os.getpid()),
                                                     "--cancel-grace", f"{CANCEL_GRACE_S:g}"])
        with open(self.logPath, "ab") as log:
            self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                          env=dict(self.env), cwd=self.folder, start_new_session=True)

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def ready(self) -> bool:
        """Running and listening (its socket exists once the engine is loaded)."""
        return self.running and os.path.exists(self.socketPath)

    @property
    def inUse(self) -> bool:
        return bool(self.jobs)

    @property
    def broken(self) -> bool:
        """It refused a run, or stopped by itself with an error (``nephireg serve`` exits 0 only after it served:
        an idle exit, its owner's end): a failure."""
        return self.failed or (not self.running and self._proc is not None and self._proc.returncode != 0)

    def serves(self, python: str, env: Mapping[str, str]) -> bool:
        """Started for this interpreter and environment (the run's ``NEPHIREG_SERVER`` aside)."""
        return python == self.python and _withoutServer(env) == self.env

    def acquire(self, job: object) -> None:
        """``job``'s run goes through this server: it is not stopped or replaced until :meth:`release`."""
        self.jobs.add(id(job))

    def release(self, job: object) -> None:
        self.jobs.discard(id(job))

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop it (SIGTERM: runs still going are cancelled; SIGKILL after ``timeout``) and remove its folder;
        the log of a broken server goes to Slicer's log first."""
        broken = self.broken  # before the stop: one stopped while it loads is not broken
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if broken:
            logging.warning("NePhiRegistration: the engine server did not work (exit code %s); its log:\n%s",
                            self._proc.returncode if self._proc is not None else None, "\n".join(self.logTail(40)))
        shutil.rmtree(self.folder, ignore_errors=True)

    def logTail(self, lines: int = 20) -> List[str]:
        try:
            with open(self.logPath, encoding="utf-8", errors="replace") as log:
                return log.read().splitlines()[-lines:]
        except OSError:
            return []


_shared: Optional[EngineServer] = None
_failures = 0


def serverFor(python: str, env: Mapping[str, str]) -> Optional[EngineServer]:
    """The shared server when it is ready for a run of ``python`` with ``env``; None otherwise (the run then
    loads the engine itself)."""
    if _shared is not None and not _shared.failed and _shared.ready and _shared.serves(python, env):
        return _shared
    return None


def prepare(python: str, env: Mapping[str, str]) -> Optional[EngineServer]:
    """Make sure a server for ``python`` and ``env`` is running or loading (after a run: see the module
    docstring); one of another environment, one that has stopped or one that refused a run is replaced, unless a
    run is in it. None where unsupported, while the server in use is another's, after :data:`MAX_FAILURES`
    failed servers, or when no socket path fits in this temp folder."""
    global _shared
    if not supported():
        return None
    if _shared is not None:
        if _shared.inUse:  # another job's run is in it: never cancelled by a replacement
            return _shared if _shared.serves(python, env) and not _shared.failed else None
        if _shared.running and _shared.serves(python, env) and not _shared.failed:
            return _shared
        stopShared()
    if _failures >= MAX_FAILURES:
        return None
    removeStaleFolders()
    server = EngineServer(python, env)
    if len(os.fsencode(server.socketPath)) > MAX_SOCKET_PATH_BYTES:
        logging.info("NePhiRegistration: the temp folder's path is too long for the engine server's socket: %s",
                     server.socketPath)
        shutil.rmtree(server.folder, ignore_errors=True)
        return None
    try:
        server.start()
    except OSError:  # no interpreter, no process slot: runs go on loading the engine themselves
        _count(server)
        shutil.rmtree(server.folder, ignore_errors=True)
        return None
    _shared = server
    return server


def stopShared() -> None:
    """Stop the shared server now (a run in it is cancelled: the module is closing)."""
    global _shared
    if _shared is not None:
        server, _shared = _shared, None
        if server.broken:
            _count(server)
        server.stop()


def stopSharedIfIdle() -> None:
    """Stop the shared server unless a run is in it (the setting was turned off)."""
    if _shared is not None and not _shared.inUse:
        stopShared()


def _count(server: EngineServer) -> None:
    global _failures
    _failures += 1
    if _failures >= MAX_FAILURES:
        logging.warning("NePhiRegistration: the engine server failed %d times; runs load the engine themselves "
                        "for the rest of this session", _failures)


def removeStaleFolders(now: Optional[float] = None) -> List[str]:
    """Remove this user's server folders that no server holds (its lock free) and that are older than
    :data:`STALE_AFTER_S` (a server claims its lock as it starts): those of a Slicer that crashed. Returns them."""
    import fcntl

    now = time.time() if now is None else now
    removed = []
    try:
        entries = [e for e in os.scandir(tempfile.gettempdir()) if e.name.startswith(FOLDER_PREFIX)]
    except OSError:
        return removed
    for entry in entries:
        folder = entry.path
        try:
            info = entry.stat(follow_symlinks=False)
            if not entry.is_dir(follow_symlinks=False) or info.st_uid != os.getuid():
                continue
            if now - info.st_mtime < STALE_AFTER_S or (_shared is not None and folder == _shared.folder):
                continue
            lockPath = os.path.join(folder, LOCK_NAME)
            if os.path.lexists(lockPath):
                lock = os.open(lockPath, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a server holds it
                finally:
                    os.close(lock)  # closing releases the lock taken here
        except OSError:  # in use, or not ours to inspect
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _withoutServer(env: Mapping[str, str]) -> Dict[str, str]:
    return {str(k): str(v) for k, v in env.items() if k != SERVER_ENV}
