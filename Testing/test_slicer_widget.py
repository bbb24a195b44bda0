"""The Register panel (widget.py) with stand-in ``qt``/``slicer`` modules and a recording stand-in UI.

Checks the panel's own logic: the transform-grid button is unchecked before the previous result is forgotten,
method availability is read once per model choice (and again after enter()/clearing the cache), the model path
shows empty (never "."), the CPU-retry notice reaches the result summary, and an input under a transform disables
Register with the reason.
"""

import importlib
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "NePhiRegistration"))


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
    qt = types.ModuleType("qt")
    qt.QTimer = lambda: types.SimpleNamespace(setInterval=lambda ms: None, timeout=Signal(), start=lambda: None,
                                              stop=lambda: None)
    qt.Qt = types.SimpleNamespace(ToolTipRole=3)
    slicer = types.ModuleType("slicer")
    slicer.util = types.SimpleNamespace(confirmOkCancelDisplay=lambda *a, **k: True, infoDisplay=lambda *a, **k: None,
                                        errorDisplay=lambda *a, **k: None)
    slicer.mrmlScene = types.SimpleNamespace(IsNodePresent=lambda node: True)
    for cls in ("vtkMRMLLabelMapVolumeNode", "vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode",
                "vtkMRMLTransformNode"):
        setattr(slicer, cls, type(cls, (), {}))
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = wrapper.WithinRange = lambda *args: None
    for name, module in (("qt", qt), ("slicer", slicer), ("slicer.i18n", i18n),
                         ("slicer.parameterNodeWrapper", wrapper)):
        monkeypatch.setitem(sys.modules, name, module)
    names = [f"NePhiRegistrationLib.{m}" for m in ("sceneio", "parameters", "logic", "widget")]
    for name in names:
        monkeypatch.delitem(sys.modules, name, raising=False)
    modules = {name.split(".")[1]: importlib.import_module(name) for name in names}  # in dependency order
    widget = modules["widget"]
    calls = []
    monkeypatch.setattr(widget.availability, "methodAvailability",
                        lambda modelPath="": calls.append(modelPath) or {
                            m: widget.availability.Availability(True) for m in widget.protocol.METHODS})
    node = types.SimpleNamespace(modelPath="", method="adam", fixedVolume=None, movingVolume=None)
    ui = UI()
    panel = widget.RegistrationPanel(ui, lambda: node)
    yield types.SimpleNamespace(widget=widget, sceneio=modules["sceneio"], panel=panel, ui=ui, node=node,
                                calls=calls)
    for name in names:
        sys.modules.pop(name, None)


def finished_job(name, notice=""):
    transform = types.SimpleNamespace(GetName=lambda: name)
    result = types.SimpleNamespace(transform=transform, metrics={"folding_percent": 0.0})
    return types.SimpleNamespace(result=result, fixed="fixed", notice=notice, outcome=None, error="")


def test_grid_button_is_unchecked_while_the_previous_result_is_still_known(panel_env, monkeypatch):
    shown = []
    monkeypatch.setattr(panel_env.sceneio, "showTransformGrid",
                        lambda transform, fixed, visible=True: shown.append((transform.GetName(), visible)))
    panel_env.panel.onFinished(finished_job("first"))
    panel_env.ui.showTransformGridButton.checked = True
    panel_env.panel.onFinished(finished_job("second"))
    assert shown == [("first", True), ("first", False)]  # the first result's grid was hidden
    assert panel_env.panel.lastResult[0].transform.GetName() == "second"


def test_cpu_retry_notice_is_in_the_result_summary(panel_env):
    notice = "The GPU ran out of memory; running again on the CPU (slower)."
    panel_env.panel.onFinished(finished_job("r", notice=notice))
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
    (cache / "m.pt").write_bytes(b"")
    monkeypatch.setattr(panel_env.widget.availability, "modelCacheDir", lambda: str(cache))
    panel.onClearModelCache()
    assert not cache.exists() and len(panel_env.calls) == 4  # read again after clearing


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


def test_register_is_disabled_with_the_reason_when_an_input_is_under_a_transform(panel_env):
    def volume(name, parent=None):
        return types.SimpleNamespace(GetName=lambda: name, GetID=lambda: name, GetParentTransformNode=lambda: parent)

    users = types.SimpleNamespace(GetName=lambda: "manual", GetAttribute=lambda key: None,
                                  GetParentTransformNode=lambda: None)
    panel_env.node.fixedVolume, panel_env.node.movingVolume = volume("fixed"), volume("moving", users)
    panel_env.panel.updateState()
    assert panel_env.ui.registerButton.enabled is False
    assert "'manual'" in panel_env.ui.registerButton.toolTip and "Harden" in panel_env.ui.registerButton.toolTip
    panel_env.node.movingVolume = volume("moving")
    panel_env.panel.updateState()
    assert panel_env.ui.registerButton.enabled is True
