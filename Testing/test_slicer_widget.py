"""The Register panel (widget.py) on a real MRML scene (slicer-core), with a stand-in ``qt`` and a recording
stand-in UI (Qt widgets have no real object here).

Checks the panel's own logic: the transform-grid button is unchecked before the previous result is forgotten,
method availability is read once per model choice (and again after enter()/clearing the cache, which deletes only
model files), the model path shows empty (never "."), the CPU-retry notice and warning events reach the result
summary, a model meant for another preset is shown with the reason, and a transform around the run that blocks it
disables Register with the reason.
"""

import importlib
import sys
import types
from pathlib import Path

import pytest
from slicer_scene import new_app, require_slicer_core


class Signal:
    def __init__(self):
        self.slots = []

    def connect(self, slot):
        self.slots.append(slot)

    def emit(self, *args):
        for slot in self.slots:
            slot(*args)


class Widget:
    """Any widget: attributes are free; the signals and the properties that emit them are the real ones."""

    def __init__(self):
        for name in ("clicked", "toggled", "valueChanged", "currentPathChanged"):
            object.__setattr__(self, name, Signal())
        object.__setattr__(self, "items", {})
        object.__setattr__(self, "checked", False)
        object.__setattr__(self, "currentPath", "")
        object.__setattr__(self, "count", 3)

    def __setattr__(self, name, value):
        old = self.__dict__.get(name)
        object.__setattr__(self, name, value)
        if name == "checked" and value != old:
            self.toggled.emit(value)
        if name == "currentPath" and value != old:
            self.currentPathChanged.emit(value)

    def __getattr__(self, name):  # methods nobody checks (hide, clear, setFormat, ...)
        return lambda *args, **kwargs: None

    def setItemText(self, index, text):
        self.items[index] = text

    def itemText(self, index):
        return self.items.get(index, "")


class UI:
    def __init__(self):
        self.widgets = {}

    def __getattr__(self, name):
        return self.widgets.setdefault(name, Widget())


@pytest.fixture
def panel_env(monkeypatch):
    """The panel on a real scene (slicer-core); stand-ins only for Qt and the application's Python parts that
    the wheel lacks (``slicer.i18n``, ``slicer.parameterNodeWrapper``, dialogs)."""
    require_slicer_core()
    import slicer

    qt = types.ModuleType("qt")
    qt.QTimer = lambda: types.SimpleNamespace(setInterval=lambda ms: None, timeout=Signal(), start=lambda: None,
                                              stop=lambda: None)
    qt.Qt = types.SimpleNamespace(ToolTipRole=3)
    for name, value in (("confirmOkCancelDisplay", lambda *a, **k: True), ("infoDisplay", lambda *a, **k: None),
                        ("errorDisplay", lambda *a, **k: None)):
        monkeypatch.setattr(slicer.util, name, value, raising=False)
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = wrapper.WithinRange = lambda *args: None
    for name, module in (("qt", qt), ("slicer.parameterNodeWrapper", wrapper)):
        monkeypatch.setitem(sys.modules, name, module)
    app = new_app()
    names = [f"NePhiRegistrationLib.{m}" for m in ("parameters", "logic", "widget")]
    for name in names:
        monkeypatch.delitem(sys.modules, name, raising=False)
    modules = {name.split(".")[1]: importlib.import_module(name) for name in names}  # in dependency order
    widget = modules["widget"]
    calls = []
    monkeypatch.setattr(widget.availability, "methodAvailability",
                        lambda modelPath="": calls.append(modelPath) or {
                            m: widget.availability.Availability(True) for m in widget.protocol.METHODS})
    node = types.SimpleNamespace(modelPath="", method="adam", preset="generic", fixedVolume=None, movingVolume=None,
                                 outputTransform=None, keepEngineLoaded=True)
    ui = UI()
    panel = widget.RegistrationPanel(ui, lambda: node, app.logics)
    yield types.SimpleNamespace(widget=widget, sceneio=app.sceneio, panel=panel, ui=ui, node=node, calls=calls,
                                scene=app.scene)
    for name in names:
        sys.modules.pop(name, None)


def finished_job(env, name, notice=""):
    transform = env.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
    fixed = env.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fixed")
    result = types.SimpleNamespace(transform=transform, metrics={"folding_percent": 0.0})
    return types.SimpleNamespace(result=result, fixed=fixed, notice=notice, outcome=None, error="",
                                 progress=types.SimpleNamespace(warnings=[]))


def test_grid_button_is_unchecked_while_the_previous_result_is_still_known(panel_env, monkeypatch):
    shown = []
    monkeypatch.setattr(panel_env.sceneio, "showTransformGrid",
                        lambda transform, fixed, visible=True: shown.append((transform.GetName(), visible)))
    panel_env.panel.onFinished(finished_job(panel_env, "first"))
    panel_env.ui.showTransformGridButton.checked = True
    panel_env.panel.onFinished(finished_job(panel_env, "second"))
    assert shown == [("first", True), ("first", False)]  # the first result's grid was hidden
    assert panel_env.panel.lastResult[0].transform.GetName() == "second"


def test_cpu_retry_notice_is_in_the_result_summary(panel_env):
    notice = "The GPU ran out of memory; running again on the CPU (slower)."
    panel_env.panel.onFinished(finished_job(panel_env, "r", notice=notice))
    assert panel_env.ui.resultSummaryLabel.text.startswith("The GPU ran out of memory")


def test_method_availability_is_cached_per_model_and_invalidated(panel_env, tmp_path, monkeypatch):
    panel, node = panel_env.panel, panel_env.node
    for _ in range(3):
        panel.updateState()
    assert panel_env.calls == [""]
    node.modelPath = str(tmp_path / "model.pt")
    panel.updateState()
    panel.updateState()
    assert panel_env.calls == ["", node.modelPath]
    panel.invalidateAvailability()  # what enter() does
    panel.updateState()
    assert panel_env.calls == ["", node.modelPath, node.modelPath]
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in ("m.pt", ".m.x1y2.part", "notes.txt", "registry.json"):
        (cache / name).write_bytes(b"")
    (cache / "sub").mkdir()
    monkeypatch.setattr(panel_env.widget.availability, "modelCacheDir", lambda: str(cache))
    panel.onClearModelCache()
    # only the model and the partial download go, wherever NEPHIREG_CACHE_DIR points
    assert sorted(p.name for p in cache.iterdir()) == ["notes.txt", "registry.json", "sub"]
    assert len(panel_env.calls) == 4  # read again after clearing


def test_model_path_is_empty_not_a_dot_and_edits_reach_the_parameter_node(panel_env):
    panel, node, ui = panel_env.panel, panel_env.node, panel_env.ui
    node.modelPath = "."  # as saved by scenes from when the field was a Path
    panel.updateState()
    assert ui.modelPathLineEdit.currentPath == ""
    ui.modelPathLineEdit.currentPath = "/models/my model.pt"
    assert node.modelPath == "/models/my model.pt"
    node.modelPath = ""
    panel.updateState()
    assert ui.modelPathLineEdit.currentPath == ""


def test_register_is_disabled_with_the_reason_when_a_transform_around_the_run_blocks_it(panel_env):
    from slicer_scene import add_volume

    from NePhiRegistrationLib import selftest

    scene, node, ui = panel_env.scene, panel_env.node, panel_env.ui
    arrays = selftest.volumeArraysOnGrid()
    node.fixedVolume = add_volume(scene, arrays[0], selftest.TEST_GRID.ijk_to_ras(), "fixed")
    node.movingVolume = add_volume(scene, arrays[1], selftest.TEST_GRID.ijk_to_ras(), "moving")
    warp = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "manual warp")
    node.movingVolume.SetAndObserveTransformNodeID(warp.GetID())
    panel_env.panel.updateState()
    assert ui.registerButton.enabled is False
    assert "'manual warp'" in ui.registerButton.toolTip and "Harden" in ui.registerButton.toolTip
    linear = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "manual alignment")
    node.movingVolume.SetAndObserveTransformNodeID(linear.GetID())  # a pre-alignment: the run starts from it
    panel_env.panel.updateState()
    assert ui.registerButton.enabled is True
    node.outputTransform = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "out")
    node.outputTransform.SetAndObserveTransformNodeID(linear.GetID())
    panel_env.panel.updateState()
    assert ui.registerButton.enabled is False and "'out' is under the transform" in ui.registerButton.toolTip


def test_a_model_meant_for_another_preset_is_shown_with_the_reason(panel_env, monkeypatch):
    panel, node, ui = panel_env.panel, panel_env.node, panel_env.ui
    lung = {"anatomy": "lung", "modality": "CT", "preset": "lung-ct"}
    monkeypatch.setattr(panel_env.widget.availability, "intendedUse", lambda modelPath="", preset=None: lung)
    node.method, node.preset = "nephi", "brain-mri"
    panel.updateState()
    index = panel_env.widget.protocol.METHODS.index("nephi")
    assert "model for another preset" in ui.methodComboBox.items[index]
    assert "meant for lung CT" in ui.methodStatusLabel.text and "Brain MRI" in ui.methodStatusLabel.text
    node.preset = "lung-ct"
    panel.updateState()
    assert "another preset" not in ui.methodComboBox.items[index] and "Warning" not in ui.methodStatusLabel.text


def test_warning_events_are_in_the_summary_and_the_status_line(panel_env):
    job = finished_job(panel_env, "r")
    job.progress = types.SimpleNamespace(warnings=["no lung found in the moving image; running without its mask"])
    panel_env.panel.onFinished(job)
    assert panel_env.ui.resultSummaryLabel.text.startswith("Warning: no lung found in the moving image")
    assert "1 warning(s)" in panel_env.ui.statusLabel.text


def test_a_warning_in_the_manifest_and_in_the_events_is_shown_once(panel_env):
    """summaryLines shows the manifest's warnings (with their codes); the same run's events do not repeat them."""
    job = finished_job(panel_env, "r")
    message = "the deformable step made the similarity worse"
    job.result.metrics = {"folding_percent": 0.0, "warnings": [{"code": "deformable-worse", "message": message}]}
    job.progress = types.SimpleNamespace(warnings=[message])
    panel_env.panel.onFinished(job)
    text = panel_env.ui.resultSummaryLabel.text
    assert text.startswith(f"Warning: {message} [deformable-worse]") and text.count(message) == 1
    assert "1 warning(s)" in panel_env.ui.statusLabel.text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the engine server is Linux-only")
def test_unticking_keep_the_engine_loaded_stops_an_idle_server_at_once(panel_env, monkeypatch, tmp_path):
    from test_slicer_engine_server_lifetime import LISTENING, fake_python, wait_for

    engineserver = panel_env.widget.engineserver
    monkeypatch.setattr(engineserver, "_shared", None)
    monkeypatch.setattr(engineserver, "_failures", 0)
    monkeypatch.setattr(engineserver.tempfile, "tempdir", str(tmp_path))
    server = engineserver.prepare(fake_python(tmp_path, LISTENING), {"A": "1"})
    wait_for(lambda: server.ready)
    panel_env.panel.updateState()
    assert server.running  # ticked: kept
    panel_env.node.keepEngineLoaded = False
    panel_env.panel.updateState()  # what a change of the parameter node calls
    assert not server.running and engineserver._shared is None and not Path(server.folder).exists()
