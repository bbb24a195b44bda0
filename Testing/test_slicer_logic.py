"""RegistrationJob (the module's run logic) with a stand-in ``slicer`` module and real child processes.

The scene side (``sceneio``) is replaced by recorders, so these tests check the flow that Slicer cannot show us
here: output nodes are created only after success, a GPU out-of-memory exit is retried once on the CPU, the temp
folder (spaces, non-ASCII) is removed unless "keep temporary files", cancel finishes the job at once.
"""

import importlib
import os
import sys
import textwrap
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "NePhiRegistration"
sys.path.insert(0, str(MODULE_DIR))


@pytest.fixture
def fake_slicer(tmp_path, monkeypatch):
    temp_root = tmp_path / "Slicer temp ünï"
    temp_root.mkdir()
    counter = iter(range(1000))

    def temp_directory(key="__SlicerTemp__", tempDir=None, includeDateTime=True):
        path = temp_root / f"{key}{next(counter)}"
        path.mkdir()
        return str(path)

    slicer = types.ModuleType("slicer")
    slicer.util = types.SimpleNamespace(tempDirectory=temp_directory, startupEnvironment=lambda: dict(os.environ))
    monkeypatch.setitem(sys.modules, "slicer", slicer)
    for name in ("NePhiRegistrationLib.logic", "NePhiRegistrationLib.sceneio"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    # import_module, not "from package import": the package attribute may still hold a module bound to another stand-in
    sceneio = importlib.import_module("NePhiRegistrationLib.sceneio")  # first: logic then binds this one
    logic = importlib.import_module("NePhiRegistrationLib.logic")

    imported = []

    def write_inputs(folder, fixed, moving, fixedMask=None, movingMask=None):
        for name in ("fixed.nrrd", "moving.nrrd"):
            Path(folder, name).write_bytes(b"")
        return {"fixed": os.path.join(folder, "fixed.nrrd"), "moving": os.path.join(folder, "moving.nrrd"),
                "fixedMask": None, "movingMask": None}

    def import_result(manifest, fixed, moving, outputTransform=None, options=None, metrics=None):
        assert os.path.isfile(manifest["files"]["transform"]), "import must happen before the temp folder goes"
        imported.append((manifest, metrics))
        return sceneio.ResultNodes(transform="transform-node", metrics=dict(metrics or {}))

    monkeypatch.setattr(sceneio, "writeInputs", write_inputs)
    monkeypatch.setattr(sceneio, "importResult", import_result)
    yield types.SimpleNamespace(logic=logic, sceneio=sceneio, imported=imported, temp_root=temp_root)
    for name in ("NePhiRegistrationLib.logic", "NePhiRegistrationLib.sceneio"):  # bound to the stand-in slicer
        sys.modules.pop(name, None)


CHILD = """
import os, sys, time
sys.path.insert(0, {module_dir!r})
from nephireg import protocol
args = sys.argv[1:]
out = args[args.index("--out") + 1]
device = args[args.index("--device") + 1]
behaviour = {behaviour!r}
# the engine's START event reports the device it resolved ("auto" -> cuda on the GPU machine, cpu here)
resolved = "cuda" if behaviour == "oom-then-ok" and device != "cpu" else ("cpu" if device == "auto" else device)
print(protocol.encode_event("start", method="adam", preset="generic", device=resolved, out=out), flush=True)
if behaviour == "slow":
    time.sleep(60)
if behaviour == "fail" or (behaviour == "oom-then-ok" and device != "cpu") or behaviour == "oom":
    code = 2 if behaviour == "fail" else 4
    message = "moving image is empty" if behaviour == "fail" else "out of memory"
    print(protocol.encode_event("error", code=code, kind="x", message=message), flush=True)
    sys.exit(code)
os.makedirs(out, exist_ok=True)
open(os.path.join(out, "transform.h5"), "w").close()
metrics = {{"folding_percent": 0.0, "device": device}}
path = protocol.write_manifest(out, {{"files": {{"transform": "transform.h5"}}, "metrics": metrics}})
print(protocol.encode_event("result", manifest=path, metrics=metrics), flush=True)
"""


def make_factory(tmp_path, behaviour):
    from NePhiRegistrationLib.runner import EngineProcess

    script = tmp_path / f"fake engine {behaviour}.py"
    script.write_text(textwrap.dedent(CHILD.format(module_dir=str(MODULE_DIR), behaviour=behaviour)), encoding="utf-8")
    commands = []

    def factory(command, outDir, **kwargs):
        commands.append(command)
        return EngineProcess([sys.executable, str(script), *command[3:]], outDir, **kwargs)

    return factory, commands


def run_job(env, factory, keep=False, device="auto", progress=None):
    from NePhiRegistrationLib.settings import RegistrationSettings

    logs, finished = [], []
    settings = RegistrationSettings(device=device, keepTemporaryFiles=keep)
    onProgress = (lambda state: progress.append(state.message)) if progress is not None else None
    job = env.logic.RegistrationJob("fixed-node", "moving-node", settings, python=sys.executable,
                                    processFactory=factory, onLog=logs.append, onFinished=finished.append,
                                    onProgress=onProgress)
    job.start()
    return job, logs, finished


def test_out_of_memory_is_retried_on_cpu_then_imported_and_temp_removed(fake_slicer, tmp_path):
    factory, commands = make_factory(tmp_path, "oom-then-ok")
    progress = []
    job, logs, finished = run_job(fake_slicer, factory, progress=progress)
    outcome = job.wait()
    assert outcome.status.value == "succeeded" and finished == [job]
    devices = [c[c.index("--device") + 1] for c in commands]
    assert devices == ["auto", "cpu"]
    assert any("out of memory" in line for line in logs)
    # visible outside the log: the status line (progress message) and the job's notice (result summary)
    assert fake_slicer.logic.CPU_RETRY_NOTICE in progress
    assert job.notice == fake_slicer.logic.CPU_RETRY_NOTICE
    (manifest, metrics), = fake_slicer.imported
    assert metrics["device"] == "cpu" and "runtime_s" in metrics
    assert job.result.transform == "transform-node"
    assert not Path(job.folder).exists() and "ü" in job.folder and " " in job.folder


def test_failure_creates_no_nodes_and_reports_the_engine_message(fake_slicer, tmp_path):
    factory, _ = make_factory(tmp_path, "fail")
    job, _, finished = run_job(fake_slicer, factory)
    outcome = job.wait()
    assert outcome.status.value == "failed" and finished == [job]
    assert fake_slicer.imported == [] and job.result is None
    assert "moving image is empty" in job.error
    assert not Path(job.folder).exists()


def test_no_cpu_retry_when_the_cpu_itself_ran_out_of_memory(fake_slicer, tmp_path):
    factory, commands = make_factory(tmp_path, "fail")
    job, _, _ = run_job(fake_slicer, factory, device="cpu")
    job.wait()
    assert len(commands) == 1


def test_no_cpu_retry_when_an_auto_run_already_ran_on_the_cpu(fake_slicer, tmp_path):
    factory, commands = make_factory(tmp_path, "oom")
    job, _, _ = run_job(fake_slicer, factory, device="auto")
    outcome = job.wait()
    assert len(commands) == 1 and outcome.outOfMemory and job.notice == ""
    assert job.progress.device == "cpu"


def test_keep_temporary_files(fake_slicer, tmp_path):
    factory, _ = make_factory(tmp_path, "ok")
    job, logs, _ = run_job(fake_slicer, factory, keep=True)
    assert job.wait().status.value == "succeeded"
    assert Path(job.folder, "fixed.nrrd").exists() and any(job.folder in line for line in logs)


def test_cancel_with_wait_finishes_at_once_without_import(fake_slicer, tmp_path):
    factory, _ = make_factory(tmp_path, "slow")
    job, _, finished = run_job(fake_slicer, factory)
    job.poll()
    job.cancel(wait=True)
    assert job.done and job.outcome.status.value == "cancelled" and finished == [job]
    assert fake_slicer.imported == [] and not Path(job.folder).exists()


def fake_pytorch_install(fake_slicer, monkeypatch, confirm=True):
    """Stand-ins for the PyTorch extension and Slicer's dialogs; returns the ordered list of what happened."""
    events = []
    slicer = sys.modules["slicer"]
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text: events.append("confirm") or confirm,
                        raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(processEvents=lambda: events.append("processEvents")),
                        raising=False)
    found = iter([False, True])
    monkeypatch.setattr(fake_slicer.logic.availability, "torchFound", lambda: next(found))

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=False, torchVersionRequirement=None):
            events.append(("install", askConfirmation, torchVersionRequirement))
            return object()

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    return events


def test_ensure_torch_shows_the_status_and_paints_it_before_the_blocking_install(fake_slicer, monkeypatch):
    events = fake_pytorch_install(fake_slicer, monkeypatch)
    fake_slicer.logic.ensureTorch(askConfirmation=True, onStatus=events.append)
    logic = fake_slicer.logic
    assert events == ["confirm", logic.INSTALLING_TORCH, "processEvents", ("install", False, logic.TORCH_REQUIREMENT)]
    assert logic.INSTALLING_TORCH == "Installing PyTorch (several minutes)..."


def test_ensure_torch_declined_installs_nothing(fake_slicer, monkeypatch):
    events = fake_pytorch_install(fake_slicer, monkeypatch, confirm=False)
    with pytest.raises(RuntimeError, match="PyTorch is not installed"):
        fake_slicer.logic.ensureTorch(askConfirmation=True, onStatus=events.append)
    assert events == ["confirm"]
