"""One registration run inside Slicer: temp folder -> engine process -> scene. Slicer only.

:class:`RegistrationJob` owns the run's temp folder and :class:`runner.EngineProcess`; something calls
:meth:`RegistrationJob.poll` - a ``qt.QTimer`` in the panel, or :meth:`RegistrationJob.wait` in scripts. Output
nodes are created only after the engine succeeded, so a failed or cancelled run leaves the scene as it was.
A GPU out-of-memory failure (of a run whose START event reported a CUDA device) is retried once on the CPU, with a
message in the status line and the result summary (``job.notice``). The process factory is injectable
(tests and other front ends pass their own). With ``keepEngineLoaded`` (Linux, on by default), the module's engine
server (:mod:`NePhiRegistrationLib.engineserver`) is started once a run has finished, and later runs go through it;
a run cut short because that server stopped is a failure ("the engine server stopped"), not a cancel.
"""

import logging
import os
import shutil
import time
import uuid
from typing import Callable, Optional

import slicer

from nephireg import engine_link
from NePhiRegistrationLib import availability, engine, engineserver, sceneio
from NePhiRegistrationLib.i18n import _
from NePhiRegistrationLib.progress import ProgressState
from NePhiRegistrationLib.result import manifestMetrics
from NePhiRegistrationLib.runner import EngineProcess, RunOutcome, RunStatus
from NePhiRegistrationLib.settings import RegistrationSettings

TORCH_REQUIREMENT = ">=2.1"
CPU_RETRY_NOTICE = _("The GPU ran out of memory; running again on the CPU (slower).")
SERVER_STOPPED = _("The engine server stopped during the run, which was cancelled; Register again (the next run "
                   "loads the engine itself).")


INSTALLING_TORCH = _("Installing PyTorch (several minutes)...")
NO_TORCH = _("PyTorch is not installed; the registration cannot run without it.")


def ensureTorch(askConfirmation: bool = True, onStatus: Optional[Callable[[str], None]] = None) -> None:
    """Make sure PythonSlicer can import torch, installing it through the PyTorch extension (after the user
    confirms). This module only looks for the package (``find_spec``); note that the PyTorch extension's
    installer itself imports torch once in Slicer's process when it installs it. ``onStatus(text)`` is told
    before the install starts: it blocks the GUI thread for minutes, so the text is shown first."""
    if availability.torchFound():
        return
    try:
        import PyTorchUtils
    except ImportError:
        raise RuntimeError(_("NePhi Registration needs PyTorch. Install the 'PyTorch' extension from the "
                             "Extensions Manager, restart Slicer and try again.")) from None
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("NePhi Registration needs PyTorch. Download and install it now through the PyTorch extension? "
              "This takes several minutes, during which Slicer does not respond.")):
        raise RuntimeError(NO_TORCH)
    if onStatus is not None:
        onStatus(INSTALLING_TORCH)
    slicer.app.processEvents()  # paint the message before the blocking install
    installed = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                              torchVersionRequirement=TORCH_REQUIREMENT)
    if installed is None or not availability.torchFound():
        raise RuntimeError(NO_TORCH)


def pythonSlicer() -> str:
    found = engine.findPythonSlicer()
    if not found:
        raise RuntimeError(_("PythonSlicer was not found next to the Slicer executable."))
    return found


def newTempFolder() -> str:
    """A fresh folder under Slicer's temp path (unique even for two runs in the same millisecond)."""
    return slicer.util.tempDirectory(key=f"NePhiRegistration-{uuid.uuid4().hex[:8]}-")


class RegistrationJob:
    """Inputs -> engine -> result nodes. ``onProgress(ProgressState)``, ``onLog(str)`` and
    ``onFinished(job)`` are called from :meth:`poll` (the caller's thread)."""

    def __init__(self, fixed, moving, settings: RegistrationSettings, fixedMask=None, movingMask=None,
                 outputTransform=None, importOptions: Optional[sceneio.ImportOptions] = None,
                 python: Optional[str] = None, processFactory: Callable = EngineProcess,
                 onProgress: Optional[Callable] = None, onLog: Optional[Callable] = None,
                 onFinished: Optional[Callable] = None, logics: Optional[sceneio.SceneLogics] = None) -> None:
        if fixed is None or moving is None:
            raise ValueError(_("Select a fixed and a moving volume."))
        self.logics = logics or sceneio.slicerLogics()  # the scene and module logics the run reads and writes
        self.fixed, self.moving = fixed, moving
        self.fixedMask, self.movingMask = fixedMask, movingMask
        self.outputTransform = outputTransform
        self.settings = settings
        self.importOptions = importOptions or sceneio.ImportOptions(createWarpedVolume=settings.writeWarped)
        self.python = python
        self.processFactory = processFactory
        self.onProgress, self.onLog, self.onFinished = onProgress, onLog, onFinished
        self.progress = ProgressState()
        self.process: Optional[EngineProcess] = None
        self.outcome: Optional[RunOutcome] = None
        self.result: Optional[sceneio.ResultNodes] = None
        self.error: str = ""
        self.folder: Optional[str] = None
        self._inputs = {}
        self._engine = None  # (python, environment) of the first launch (the user's device): the server to prepare
        self._server = None  # the engine server of the last launch, or None (acquired while the run is in it)
        self._serverStopped = False  # that server went away during the run (the client exits "cancelled")
        self._retriedOnCpu = False
        self.notice: str = ""  # shown with the result (e.g. the CPU retry), not only in the log
        self.started = 0.0

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def start(self) -> None:
        self.started = time.monotonic()
        self.folder = newTempFolder()
        try:
            self._inputs = sceneio.writeInputs(self.logics, self.folder, self.fixed, self.moving, self.fixedMask,
                                               self.movingMask, self.outputTransform)
            self._launch(self.settings.device)
        except Exception:
            self._cleanup()
            raise

    def _launch(self, device: str) -> None:
        out = os.path.join(self.folder, f"result-{device}")
        args = self.settings.engineArguments(self._inputs["fixed"], self._inputs["moving"], out,
                                             self._inputs["fixedMask"], self._inputs["movingMask"], device=device,
                                             initialTransform=self._inputs.get("initialTransform"))
        python = self.python or pythonSlicer()
        command = engine.engineCommand(python, args)
        startup = slicer.util.startupEnvironment()
        env = engine.childEnvironment(startup, device=device)
        if self._engine is None:  # not a CPU retry's: the next Register is on the user's device again
            self._engine = (python, env)
        self._releaseServer()
        server = engineserver.serverFor(python, env) if self.settings.keepEngineLoaded else None
        if server is not None:  # torch already loaded there: the run skips its import
            env = engine.childEnvironment(startup, device=device, server=server.socketPath)
            self._log(f"Engine server: {server.socketPath}")
        served = {"cancelGraceS": engineserver.CANCEL_GRACE_S, "spare": (server.pid,)} if server is not None else {}
        self._log("Running: " + " ".join(f'"{c}"' if " " in c else c for c in command))
        self.process = self.processFactory(command, out, env=env, cwd=self.folder, onEvent=self._onEvent,
                                           onText=self._onText, **served)
        self.process.start()
        if server is not None:
            self._server = server
            server.acquire(self)  # not stopped or replaced under this run

    def cancel(self, wait: bool = False, timeout: float = 10.0) -> None:
        """Stop the engine (a run in the engine server gets its grace to clean up: ``runner.EngineProcess``); with
        ``wait`` kill it at once and finish the job now (temp folder removed, onFinished called)."""
        if self.process is None or self.done:
            return
        self.process.cancel(force=wait)
        deadline = time.monotonic() + timeout
        while wait and not self.done and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.05)

    def poll(self) -> None:
        if self.done or self.process is None:
            return
        self.process.poll()
        outcome = self.process.outcome
        if outcome is None:
            return
        if outcome.status == RunStatus.CANCELLED and self._serverStopped and not self.process.cancelRequested:
            outcome = RunOutcome(RunStatus.FAILED, outcome.exitCode, SERVER_STOPPED, "engine-server", outcome.logTail,
                                 seconds=outcome.seconds)
        if outcome.outOfMemory and not self._retriedOnCpu and self.progress.device.startswith("cuda"):
            # only a run the engine reported as running on the GPU (START event); a CPU run is not rerun
            self._retriedOnCpu = True
            self.notice = CPU_RETRY_NOTICE
            self._log(CPU_RETRY_NOTICE)
            self.progress.message = CPU_RETRY_NOTICE
            if self.onProgress:
                self.onProgress(self.progress)
            try:
                self._launch("cpu")
            except Exception as exc:  # e.g. the temp folder vanished: end the job, never raise into a timer
                self._complete(RunOutcome(RunStatus.FAILED, outcome.exitCode,
                                          _("The GPU ran out of memory and the CPU retry could not start: "
                                            "{error}").format(error=exc),
                                          "retry", outcome.logTail))
            return
        self._complete(outcome)

    def wait(self, interval: float = 0.1) -> RunOutcome:
        """Block until the run ends (scripting)."""
        while not self.done:
            self.poll()
            time.sleep(interval)
        return self.outcome

    def _complete(self, outcome: RunOutcome) -> None:
        try:
            if outcome.status == RunStatus.SUCCEEDED:
                metrics = manifestMetrics(outcome.manifest)
                metrics.setdefault("runtime_s", round(time.monotonic() - self.started, 1))
                self.result = sceneio.importResult(self.logics, outcome.manifest, self.fixed, self.moving,
                                                   self.outputTransform, self.importOptions, metrics)
            else:
                self.error = outcome.describe()
        except Exception as exc:  # import failed: report like an engine failure, scene already restored
            logging.exception("NePhiRegistration: result import failed")
            self.error = _("The result could not be imported: {error}").format(error=exc)
            outcome = RunOutcome(RunStatus.FAILED, outcome.exitCode, self.error, "import", outcome.logTail)
        finally:
            self.outcome = outcome
            self._cleanup()
            self._releaseServer()
            self._prepareEngineServer()
            if self.onFinished:
                self.onFinished(self)

    def _releaseServer(self) -> None:
        if self._server is not None:
            self._server.release(self)
            self._server = None

    def _prepareEngineServer(self) -> None:
        """After a run (never beside one): the engine server for the next, if wanted and not running yet (not after
        a cancel: the module may be closing). A job without the setting leaves a server alone (the panel's setting
        stops it: ``widget.py``)."""
        wanted = self.settings.keepEngineLoaded and self.outcome.status != RunStatus.CANCELLED
        try:
            if wanted and self._engine is not None:
                engineserver.prepare(*self._engine)  # replaces one that refused this run (engineserver.prepare)
        except Exception:  # noqa: BLE001 - the next run then loads the engine itself, as without a server
            logging.exception("NePhiRegistration: the engine server could not be started")

    def _cleanup(self) -> None:
        stillRunning = self.process.outcome.stillRunning if self.process and self.process.outcome else []
        if stillRunning:  # they may still write there: removing it now could leave a half-written folder behind
            self._log(f"Temporary files kept in {self.folder}: engine processes {stillRunning} could not be stopped")
        elif self.folder and not self.settings.keepTemporaryFiles:
            shutil.rmtree(self.folder, ignore_errors=True)
        elif self.folder:
            self._log(f"Temporary files kept in {self.folder}")

    def _onEvent(self, event) -> None:
        self.progress.update(event)
        for line in self.progress.takeLogLines():
            self._log(line)
        if self.onProgress:
            self.onProgress(self.progress)

    def _onText(self, text: str) -> None:
        if self._server is not None and engine_link.is_refusal_line(text, self._server.socketPath):
            self._server.failed = True  # it would refuse every run of this engine: replaced after this one
        if self._server is not None and engine_link.is_stopped_line(text, self._server.socketPath):
            self._serverStopped = True
        self._log(text)

    def _log(self, text: str) -> None:
        logging.info(f"NePhiRegistration: {text}")
        if self.onLog:
            self.onLog(text)
