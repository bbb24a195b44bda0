"""The module's own in-Slicer self-test (``NePhiRegistrationTest`` in ``NePhiRegistration.py``) run here on Slicer's
real MRML and Logic libraries (slicer-core): ``slicer.mrmlScene`` and ``slicer.modules.*.logic()`` are a real scene
and real logics; ``slicer.util`` is Slicer's own (the wheel ships it). Stand-ins only for what belongs to the
application and is not in the wheel: ``slicer.app``, ``slicer.i18n``, ``slicer.ScriptedLoadableModule`` (base
classes; ``delayDisplay`` is a no-op), ``slicer.parameterNodeWrapper``, the temp folder. So the self-test's facts
(linear interpolation to 1e-4 mm, the colour node exists, names, a linear parent, the failure clean-up) are checked
on every test run, not only inside Slicer. The real-engine test needs Slicer's IO manager and is left to Slicer.
"""

import importlib.util
import os
import sys
import types
import unittest

import pytest
from slicer_scene import MODULE_DIR, new_app


@pytest.fixture
def selftest_case(request, monkeypatch, tmp_path):
    # only the import test shows the heatmap, whose colour node must exist (the self-test checks it); the others run
    # without Slicer's colour files, so a fresh clone without ../shared still runs them
    app = new_app(color_files=request.node.callspec.params["test"] == "test_importSyntheticField")
    import slicer

    modules = types.SimpleNamespace(**{name: types.SimpleNamespace(logic=lambda logic=logic: logic) for name, logic in (
        ("transforms", app.logics.transforms), ("volumes", app.logics.volumes),
        ("segmentations", app.logics.segmentations))})
    monkeypatch.setattr(slicer, "mrmlScene", app.scene, raising=False)
    monkeypatch.setattr(slicer, "modules", modules, raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(testingEnabled=lambda: True, processEvents=lambda: None,
                                                             connect=lambda *a: None), raising=False)
    counter = iter(range(1000))
    def temp_directory(key="", **kwargs):
        return str(_mkdir(tmp_path / f"{key}{next(counter)}"))

    monkeypatch.setattr(slicer.util, "tempDirectory", temp_directory, raising=False)
    monkeypatch.setattr(slicer.util, "startupEnvironment", lambda: dict(os.environ), raising=False)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    i18n.getContext = lambda source_file: os.path.basename(source_file)
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")

    class Base:
        def __init__(self, *args, **kwargs):
            pass

    class Test(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            pass

    scripted.ScriptedLoadableModule = scripted.ScriptedLoadableModuleLogic = Base
    scripted.ScriptedLoadableModuleWidget = Base
    scripted.ScriptedLoadableModuleTest = Test
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = wrapper.WithinRange = lambda *args: None
    for name, module in (("slicer.i18n", i18n), ("slicer.ScriptedLoadableModule", scripted),
                         ("slicer.parameterNodeWrapper", wrapper)):
        monkeypatch.setitem(sys.modules, name, module)
    for name in ("NePhiRegistrationLib.logic", "NePhiRegistrationLib.parameters"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    spec = importlib.util.spec_from_file_location("NePhiRegistrationSelfTest", MODULE_DIR / "NePhiRegistration.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    case = module.NePhiRegistrationTest("runTest")
    yield case, app
    from NePhiRegistrationLib import engineserver

    engineserver.stopShared()  # the real run's Register leaves the module's server behind (on by default)
    for name in ("NePhiRegistrationLib.logic", "NePhiRegistrationLib.parameters"):
        sys.modules.pop(name, None)


def _mkdir(path):
    path.mkdir(parents=True)
    return path


@pytest.mark.parametrize("test", ["test_importSyntheticField", "test_linearParentIsTheInitialTransformAndIsReplaced",
                                  "test_failedRunLeavesSceneUnchanged", "test_failedMaskedRunLeavesSceneUnchanged"])
def test_the_in_slicer_self_test_passes_on_slicers_libraries(selftest_case, test):
    case, app = selftest_case
    before = app.scene.GetNumberOfNodes()
    getattr(case, test)()
    assert app.scene.GetNumberOfNodes() > before  # it really worked on this scene
