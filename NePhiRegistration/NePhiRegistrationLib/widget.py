"""The Register panel's behaviour (buttons, run, progress, result). Slicer + Qt only.

The module's widget (``NePhiRegistration.py``) loads the .ui, binds it to the parameter node with
``connectGui`` and hands both to :class:`RegistrationPanel`. The panel moves values between the GUI and
:class:`logic.RegistrationJob`; a ``qt.QTimer`` calls the job's ``poll()`` so the GUI never waits on the engine.
"""

import os

import qt
import slicer

from nephireg import protocol
from NePhiRegistrationLib import availability, engineserver, logic, sceneio
from NePhiRegistrationLib.i18n import _
from NePhiRegistrationLib.parameters import settingsFromParameterNode
from NePhiRegistrationLib.result import summaryLines

POLL_INTERVAL_MS = 100


class RegistrationPanel:
    def __init__(self, ui, parameterNodeGetter, logics=None) -> None:
        self.ui = ui
        self._parameterNode = parameterNodeGetter  # callable: the current parameter node or None
        self.logics = logics or sceneio.slicerLogics()  # scene + module logics the runs read and write
        self.job = None
        self.lastResult = None
        self._availability = {}  # modelPath -> method availability (reads the model store: not on every change)
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.timeout.connect(self.onTimer)
        ui.registerButton.clicked.connect(self.onRegisterOrCancel)
        ui.showTransformGridButton.toggled.connect(self.onShowTransformGrid)
        ui.jacobianOpacitySlider.valueChanged.connect(self.onOpacityChanged)
        ui.openModelFolderButton.clicked.connect(self.onOpenModelFolder)
        ui.clearModelCacheButton.clicked.connect(self.onClearModelCache)
        # bound here, not by connectGui: a Path parameter cannot be empty (Path("") shows "."), a str can
        ui.modelPathLineEdit.currentPathChanged.connect(self.onModelPathEdited)
        ui.progressBar.hide()

    # -- labels and enabled state --------------------------------------------------------------------------
    def relabelChoices(self) -> None:
        """connectGui fills the combo boxes with raw values; show the readable labels instead (order kept)."""
        deviceLabels = {"auto": _("Automatic"), "cpu": _("CPU"), "cuda": _("GPU (CUDA)")}
        for combo, labels in ((self.ui.methodComboBox, protocol.METHOD_LABELS),
                              (self.ui.presetComboBox, protocol.PRESET_LABELS),
                              (self.ui.deviceComboBox, deviceLabels)):
            for index in range(combo.count):
                value = combo.itemText(index)
                combo.setItemText(index, labels.get(value, value))

    def invalidateAvailability(self) -> None:
        """Forget the cached method availability (module entered, model cache cleared)."""
        self._availability.clear()

    def methodStates(self, modelPath: str):
        if modelPath not in self._availability:
            self._availability[modelPath] = availability.methodAvailability(modelPath)
        return self._availability[modelPath]

    def onModelPathEdited(self, path) -> None:
        node = self._parameterNode()
        if node is not None and node.modelPath != str(path):
            node.modelPath = str(path)

    def updateState(self) -> None:
        """Method availability, Register button enabled state and its reason."""
        node = self._parameterNode()
        if node is None or self.job is not None:
            return
        if not node.keepEngineLoaded:  # unticked: its memory back now, not at the next Register
            engineserver.stopSharedIfIdle()
        modelPath = modelPathText(node)
        if self.ui.modelPathLineEdit.currentPath != modelPath:
            self.ui.modelPathLineEdit.currentPath = modelPath
        states = self.methodStates(modelPath)
        for index, method in enumerate(protocol.METHODS):
            label = protocol.METHOD_LABELS[method]
            state = states[method]
            text = label if state.available else _("{label} (unavailable)").format(label=label)
            self.ui.methodComboBox.setItemText(index, text)
            self.ui.methodComboBox.setItemData(index, state.reason or label, qt.Qt.ToolTipRole)
        chosen = states[node.method]
        status = chosen.reason if chosen.available else _("Cannot run: {reason}.").format(reason=chosen.reason)
        mismatch = availability.modelPresetMismatch(node.method, node.preset, modelPath) if chosen.available else ""
        if mismatch:  # runnable, but never silently: the method is shown with the reason
            status = _("Warning: {reason}.").format(reason=mismatch)
            index = protocol.METHODS.index(node.method)
            label = protocol.METHOD_LABELS[node.method]
            self.ui.methodComboBox.setItemText(index, _("{label} (model for another preset)").format(label=label))
            self.ui.methodComboBox.setItemData(index, status, qt.Qt.ToolTipRole)
        self.ui.methodStatusLabel.text = status
        self.ui.methodStatusLabel.toolTip = status
        reason = ""
        if not node.fixedVolume or not node.movingVolume:
            reason = _("Select a fixed and a moving volume.")
        elif node.fixedVolume == node.movingVolume:
            reason = _("The fixed and moving volumes are the same node.")
        elif not chosen.available:
            reason = chosen.reason
        else:
            reason = sceneio.inputTransformProblem(node.fixedVolume, node.movingVolume, node.outputTransform)
        self.ui.registerButton.enabled = not reason
        self.ui.registerButton.toolTip = reason or _("Register the moving volume to the fixed volume.")

    # -- run -----------------------------------------------------------------------------------------------
    def onRegisterOrCancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Registration could not start."), waitCursor=True):
            self.start()

    def start(self) -> None:
        node = self._parameterNode()
        output = node.outputTransform
        if output is not None and sceneio.holdsTransform(output):
            if not slicer.util.confirmOkCancelDisplay(
                    _("Replace the transform stored in '{name}' with the new result?").format(name=output.GetName())):
                return
        logic.ensureTorch(askConfirmation=True, onStatus=self.showStatus)
        options = sceneio.ImportOptions(node.createWarpedVolume, node.createJacobianVolume,
                                        node.applyTransformToMoving, node.showJacobianHeatmap, node.jacobianOpacity,
                                        importInverse=node.importInverse)
        job = logic.RegistrationJob(node.fixedVolume, node.movingVolume, settingsFromParameterNode(node),
                                    node.fixedMask, node.movingMask, output, options,
                                    onProgress=self.onProgress, onLog=self.appendLog, onFinished=self.onFinished,
                                    logics=self.logics)
        self.ui.logTextEdit.clear()
        job.start()  # raises (shown by tryWithErrorDisplay) before the panel switches to "running"
        self.job = job
        self.ui.resultSummaryLabel.text = _("Running...")
        self.setRunning(True)
        self.timer.start()

    def showStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text

    def setRunning(self, running: bool) -> None:
        self.ui.registerButton.text = _("Cancel") if running else _("Register")
        self.ui.registerButton.enabled = True
        self.ui.progressBar.visible = running
        self.ui.progressBar.value = 0
        for box in (self.ui.inputsCollapsibleButton, self.ui.expertCollapsibleButton, self.ui.outputsCollapsibleButton):
            box.enabled = not running

    def onTimer(self) -> None:
        if self.job is not None:
            self.job.poll()

    def onProgress(self, state) -> None:
        self.ui.progressBar.value = state.percent
        self.ui.progressBar.setFormat(state.barText())
        self.ui.statusLabel.text = state.message

    def appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def onFinished(self, job) -> None:
        self.timer.stop()
        self.job = None
        self.setRunning(False)
        if job.result is not None:
            # unchecked while lastResult is still the previous result, so its grid is the one hidden
            self.ui.showTransformGridButton.checked = False
            self.lastResult = (job.result, job.fixed)
            lines = summaryLines(job.result.metrics)  # the result manifest's warnings first, with their codes
            if not job.result.metrics.get("warnings"):  # a manifest without them: the run's warning events
                lines = warningLines(job.progress.warnings) + lines
            self.ui.resultSummaryLabel.text = "\n".join(([job.notice] if job.notice else []) + lines)
            done = _("Done: {name}").format(name=job.result.transform.GetName())
            if job.progress.warnings:
                done = _("{done} ({count} warning(s): see the summary)").format(done=done,
                                                                                  count=len(job.progress.warnings))
            self.ui.statusLabel.text = done
            self.ui.showTransformGridButton.enabled = True
        else:
            message = job.outcome.message if job.outcome else ""
            self.ui.resultSummaryLabel.text = "\n".join(t for t in (job.notice, message) if t)
            self.ui.statusLabel.text = job.outcome.message if job.outcome else ""
            if job.outcome is not None and job.outcome.status.value == "failed":
                self.ui.logCollapsibleButton.collapsed = False
                slicer.util.errorDisplay(_("Registration failed."), detailedText=job.error)
        self.updateState()

    # -- result display ------------------------------------------------------------------------------------
    def onShowTransformGrid(self, checked: bool) -> None:
        if self.lastResult is None:
            return
        result, fixed = self.lastResult
        if self.logics.scene.IsNodePresent(result.transform) and self.logics.scene.IsNodePresent(fixed):
            sceneio.showTransformGrid(result.transform, fixed, bool(checked))

    def onOpacityChanged(self, value: float) -> None:
        if self.lastResult is not None:
            sceneio.setJacobianOpacity(self.logics.scene, float(value))

    def onOpenModelFolder(self) -> None:
        folder = availability.modelCacheDir()
        if not folder:
            slicer.util.infoDisplay(_("This build has no model store, so there is no model folder."))
            return
        os.makedirs(folder, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(folder))

    def onClearModelCache(self) -> None:
        folder = availability.modelCacheDir()
        if not folder or not os.path.isdir(folder) or not any(map(availability.isModelCacheFile, os.listdir(folder))):
            slicer.util.infoDisplay(_("The model cache is empty."))
            return
        question = _("Delete every downloaded model (and partial download) in {folder}? They are downloaded again "
                     "when needed; other files in the folder are kept.")
        if slicer.util.confirmOkCancelDisplay(question.format(folder=folder)):
            availability.clearModelCache(folder)
            self.invalidateAvailability()
            self.updateState()

    def cleanup(self) -> None:
        self.timer.stop()
        if self.job is not None:
            self.job.cancel(wait=True)
        engineserver.stopShared()  # it would stop with Slicer anyway (--exit-with); this also removes its folder


def modelPathText(node) -> str:
    """The parameter node's model path; "" = the default model ("." from scenes saved when it was a Path)."""
    text = str(node.modelPath or "")
    return "" if text in ("", ".") else text


def warningLines(warnings) -> list:
    """The run's warning events as summary lines (shown above the metrics, never only in the log)."""
    return [_("Warning: {message}").format(message=text) for text in warnings]
