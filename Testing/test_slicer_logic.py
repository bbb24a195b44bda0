"""RegistrationJob (the module's run logic) on a real MRML scene (slicer-core) with real child processes.

The child is a small fake engine that speaks the protocol and writes a real result folder (an ITK displacement
field, a Jacobian map, result.json: ``selftest.writeSyntheticResult``), so the real ``sceneio`` writes the inputs
and imports the result through Slicer's own logics. Only what belongs to Slicer's application (its temp folder,
its startup environment, dialogs, the PyTorch extension) is replaced. Checked: output nodes are created only after
success, a GPU out-of-memory exit is retried once on the CPU, the temp folder (spaces, non-ASCII) is removed unless
"keep temporary files", cancel finishes the job at once, a linear parent of the moving volume reaches the engine as
``--initial-transform``.
"""

import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
from slicer_scene import MODULE_DIR, node_ids

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
if behaviour == "leaves-a-writer":  # a process outside this one's tree that keeps the output pipes
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            open(os.path.join(os.path.dirname(out), "writer.pid"), "w").write(str(os.getpid()))
            time.sleep(60)
        os._exit(0)
    time.sleep(60)
if behaviour == "fail" or (behaviour == "oom-then-ok" and device != "cpu") or behaviour == "oom":
    code = 2 if behaviour == "fail" else 4
    message = "moving image is empty" if behaviour == "fail" else "out of memory"
    print(protocol.encode_event("error", code=code, kind="x", message=message), flush=True)
    sys.exit(code)
from NePhiRegistrationLib import selftest
selftest.writeSyntheticResult(out)
metrics = {{"folding_percent": 0.0, "device": device}}
files = {{key: protocol.OUTPUT_FILES[key] for key in ("transform", "jacobian")}}
path = protocol.write_manifest(out, {{"files": files, "metrics": metrics}})
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
    job = env.logic.RegistrationJob(env.fixed, env.moving, settings, python=sys.executable,
                                    processFactory=factory, onLog=logs.append, onFinished=finished.append,
                                    onProgress=onProgress, logics=env.logics)
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
    metrics = job.result.metrics
    assert metrics["device"] == "cpu" and "runtime_s" in metrics
    assert job.result.transform.GetName() == "moving to fixed (NePhi)"
    assert fake_slicer.moving.GetParentTransformNode() is job.result.transform
    assert not Path(job.folder).exists() and "ü" in job.folder and " " in job.folder


def test_failure_creates_no_nodes_and_reports_the_engine_message(fake_slicer, tmp_path):
    factory, _ = make_factory(tmp_path, "fail")
    before = node_ids(fake_slicer.scene)
    job, _, finished = run_job(fake_slicer, factory)
    outcome = job.wait()
    assert outcome.status.value == "failed" and finished == [job]
    assert node_ids(fake_slicer.scene) == before and job.result is None
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
    before = node_ids(fake_slicer.scene)
    job, _, finished = run_job(fake_slicer, factory)
    job.poll()
    job.cancel(wait=True)
    assert job.done and job.outcome.status.value == "cancelled" and finished == [job]
    assert node_ids(fake_slicer.scene) == before and not Path(job.folder).exists()


def test_a_linear_parent_of_the_moving_volume_reaches_the_engine_and_is_replaced_by_the_result(fake_slicer,
                                                                                                 tmp_path):
    import SimpleITK as sitk
    from slicer_scene import matrix4

    manual = fake_slicer.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "manual alignment")
    shift = np.eye(4)
    shift[:3, 3] = (5.0, -3.0, 2.0)  # RAS mm, moving -> world
    manual.SetMatrixTransformToParent(matrix4(shift))
    fake_slicer.moving.SetAndObserveTransformNodeID(manual.GetID())
    factory, commands = make_factory(tmp_path, "ok")
    job, _, _ = run_job(fake_slicer, factory, keep=True)
    assert job.wait().status.value == "succeeded"
    command, = commands
    initial = command[command.index("--initial-transform") + 1]
    lps = np.array(sitk.ReadTransform(initial).TransformPoint((0.0, 0.0, 0.0)))
    np.testing.assert_allclose(lps, [5.0, -3.0, -2.0], atol=1e-9)  # fixed -> moving = -shift, in LPS
    assert fake_slicer.moving.GetParentTransformNode() is job.result.transform  # replaces the parent


def fake_pytorch_install(fake_slicer, monkeypatch, confirm=True):
    """Stand-ins for the PyTorch extension and Slicer's dialogs; returns the ordered list of what happened."""
    import slicer

    events = []
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


def test_the_module_asks_the_engine_for_no_overview_unless_told(fake_slicer, tmp_path):
    # the panel never shows overview.png, so the engine is asked not to draw it (docs/benchmarks.md, "Session 6")
    from NePhiRegistrationLib.settings import RegistrationSettings

    factory, commands = make_factory(tmp_path, "ok")
    for settings in (RegistrationSettings(), RegistrationSettings(writeOverview=True)):
        job = fake_slicer.logic.RegistrationJob(fake_slicer.fixed, fake_slicer.moving, settings,
                                                python=sys.executable, processFactory=factory,
                                                logics=fake_slicer.logics)
        job.start()
        assert job.wait().status.value == "succeeded"
    assert ["--no-overview" in command for command in commands] == [True, False]


def test_a_real_engine_run_writes_no_overview_and_is_imported(fake_slicer):
    # the real engine through the module's own process factory: the outputs the scene needs, no overview.png
    from NePhiRegistrationLib.settings import RegistrationSettings

    settings = RegistrationSettings(method="adam", preset="generic", affinePrealignment=False, device="cpu",
                                    keepTemporaryFiles=True, writeWarped=False,
                                    methodOptions={"iterations": 5, "levels": [4], "coarse_iterations": 0})
    job = fake_slicer.logic.RegistrationJob(fake_slicer.fixed, fake_slicer.moving, settings, python=sys.executable,
                                            logics=fake_slicer.logics)
    job.start()
    outcome = job.wait(interval=0.02)
    assert outcome.status.value == "succeeded", outcome.describe()
    written = {path.name for path in Path(outcome.manifest["files"]["transform"]).parent.iterdir()}
    assert {"transform.h5", "jacobian.nrrd", "result.json"} <= written and "overview.png" not in written
    assert "overview" not in outcome.manifest["files"]
    assert fake_slicer.moving.GetParentTransformNode() is job.result.transform
    assert job.result.jacobianVolume is not None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pipe holders are found through /proc (Linux)")
def test_a_folder_that_an_engine_process_may_still_write_into_is_kept_and_said(fake_slicer, tmp_path, monkeypatch):
    # a holder of the run's pipes the runner may not kill (here: spared, as the engine server is) and that outlives
    # the holders' timeout: removing the folder under it could leave a half-written one behind; kept, and logged
    import os
    import time

    from NePhiRegistrationLib import runner

    monkeypatch.setattr(runner, "HOLDER_TIMEOUT_S", 0.5)
    factory, _ = make_factory(tmp_path, "leaves-a-writer")
    writers = []

    class Spared:  # the writer's pid, once it has said it (the runner asks each scan)
        def __iter__(self):
            return iter(writers)

        def __contains__(self, pid):
            return pid in writers

    def spared_factory(command, outDir, **kwargs):
        proc = factory(command, outDir, **kwargs)
        proc.spare = Spared()
        return proc

    job, logs, finished = run_job(fake_slicer, spared_factory)
    pidfile = Path(job.folder) / "writer.pid"
    deadline = time.monotonic() + 30
    while not (pidfile.exists() and pidfile.read_text()):
        job.poll()
        assert time.monotonic() < deadline, "the fake engine never started its writer"
        time.sleep(0.02)
    writers.append(int(pidfile.read_text()))
    try:
        job.cancel()
        outcome = job.wait(interval=0.02)
        assert outcome.status.value == "cancelled" and outcome.stillRunning == writers
        assert Path(job.folder).is_dir()  # kept ...
        assert f"Temporary files kept in {job.folder}: engine processes {writers} could not be stopped" in logs
    finally:
        os.kill(writers[0], 9)
