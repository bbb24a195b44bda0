"""The module's Slicer-free option handling: settings -> engine command line, availability, progress text."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "NePhiRegistration"))

from nephireg import protocol  # noqa: E402
from NePhiRegistrationLib import availability  # noqa: E402
from NePhiRegistrationLib.progress import ProgressState, formatSeconds  # noqa: E402
from NePhiRegistrationLib.settings import RegistrationSettings  # noqa: E402


def option(args, flag):
    return args[args.index(flag) + 1] if flag in args else None


def test_defaults_leave_expert_options_to_the_preset():
    args = RegistrationSettings().engineArguments("/f dir/fixed.nrrd", "/m.nrrd", "/out dir")
    assert args[0] == "register" and option(args, "--fixed") == "/f dir/fixed.nrrd"
    assert option(args, "--out") == "/out dir" and option(args, "--progress") == "jsonl"
    for flag in ("--iterations", "--regularization", "--grid-spacing-mm", "--model", "--fixed-mask"):
        assert flag not in args
    assert option(args, "--prealign") == "preset" and "--overwrite" in args


def test_expert_options_masks_device_override_and_method_options():
    settings = RegistrationSettings(method="nephi", preset="lung-ct", iterations=300, regularization=2.5,
                                    gridSpacingMm=3.0, affinePrealignment=False, device="cuda",
                                    modelPath="/models/m.pt", writeWarped=False,
                                    methodOptions={"levels": [4, 2], "lr": 0.5})
    args = settings.engineArguments("f", "m", "o", fixedMask="fm", movingMask="mm", device="cpu")
    assert option(args, "--method") == "nephi" and option(args, "--preset") == "lung-ct"
    assert option(args, "--iterations") == "300" and option(args, "--regularization") == "2.5"
    assert option(args, "--grid-spacing-mm") == "3.0" and option(args, "--prealign") == "none"
    assert option(args, "--device") == "cpu"  # the CPU retry overrides the user's device
    assert option(args, "--model") == "/models/m.pt" and "--no-warped" in args
    assert option(args, "--fixed-mask") == "fm" and option(args, "--moving-mask") == "mm"
    options = [args[i + 1] for i, a in enumerate(args) if a == "--option"]
    assert options == ["levels=[4, 2]", "lr=0.5"]


def test_adam_never_gets_a_model_argument():
    args = RegistrationSettings(method="adam", modelPath="/models/m.pt").engineArguments("f", "m", "o")
    assert "--model" not in args


def test_bad_values_and_unknown_keywords_fail_before_any_process():
    with pytest.raises(ValueError, match="method"):
        RegistrationSettings(method="demons")
    with pytest.raises(ValueError, match=">= 0"):
        RegistrationSettings(iterations=-1)
    with pytest.raises(TypeError, match="itertions"):
        RegistrationSettings.fromOptions("adam", "generic", itertions=10)
    assert RegistrationSettings.fromOptions("adam", "brain-mri", iterations=10).iterations == 10


def test_availability_names_the_reason(tmp_path, monkeypatch):
    states = availability.methodAvailability(str(tmp_path / "missing model.pt"))
    assert states["adam"].available and states["nephi-io"].available
    assert not states["nephi"].available and "does not exist" in states["nephi"].reason
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    assert availability.methodAvailability(str(model))["nephi"].available
    monkeypatch.setattr(availability, "defaultModelPath", lambda: None)
    state = availability.methodAvailability("")["nephi"]
    assert not state.available and state.reason
    assert set(availability.methodAvailability("")) == set(protocol.METHODS)


def test_progress_state_and_eta_text():
    state = ProgressState()
    state.update({"event": "start", "method": "adam", "preset": "generic", "device": "cuda"})
    state.update({"event": "stage", "stage": "optimise", "message": "Adam level 1/2"})
    state.update({"event": "progress", "stage": "optimise", "step": 30, "total": 120, "eta_s": 75.4})
    assert state.percent == 25 and state.barText() == "optimise 25% - ETA 1 min 15 s"
    state.update({"event": "log", "level": "warning", "message": "mask is small"})
    assert "Warning: mask is small" in state.takeLogLines() and state.logLines == []
    assert formatSeconds(None) == "" and formatSeconds(42) == "42 s" and formatSeconds(3725) == "1 h 02 min"


def test_downloadable_default_model_keeps_nephi_predict_available(monkeypatch):
    monkeypatch.setattr(availability, "defaultModelPath", lambda: None)
    monkeypatch.setattr(availability, "listModels", lambda: [
        {"name": "nephi-lung", "default": True, "installed": False, "url": "https://example.org/m.pt"}])
    state = availability.methodAvailability("")["nephi"]
    assert state.available and "downloaded on first use" in state.reason
    monkeypatch.setattr(availability, "listModels", lambda: [{"name": "x", "default": True, "installed": False}])
    assert not availability.methodAvailability("")["nephi"].available


def test_initial_transform_reaches_the_command_line():
    args = RegistrationSettings().engineArguments("f.nrrd", "m.nrrd", "out", initialTransform="/t/initial.tfm")
    assert option(args, "--initial-transform") == "/t/initial.tfm" and option(args, "--prealign") == "preset"
    assert "--initial-transform" not in RegistrationSettings().engineArguments("f.nrrd", "m.nrrd", "out")


LUNG = {"anatomy": "lung", "modality": "CT", "preset": "lung-ct"}


def test_model_preset_mismatch_is_named_only_when_a_model_is_used_for_another_preset():
    mismatch = availability.modelPresetMismatch
    reason = mismatch("nephi", "brain-mri", use=LUNG)
    assert "meant for lung CT (preset Lung CT)" in reason and "Brain MRI" in reason
    assert mismatch("nephi", "lung-ct", use=LUNG) == ""
    assert mismatch("adam", "brain-mri", use=LUNG) == ""  # no model
    assert mismatch("nephi-io", "brain-mri", use=LUNG) == ""  # nephi-io without a chosen model starts from identity
    assert mismatch("nephi-io", "brain-mri", "/m/lung.pt", use=LUNG) != ""
    assert mismatch("nephi", "brain-mri", use={"anatomy": "lung"}) == ""  # intended preset unknown: nothing to say


def test_intended_use_of_the_default_model_follows_the_preset_as_the_engine_picks_it():
    from nephireg import modelstore

    default = modelstore.intended_use(modelstore.default_model_name("lung-ct"))
    assert availability.intendedUse("", "lung-ct") == default and default["preset"] == "lung-ct"
    path = modelstore.default_model_path(preset="lung-ct")
    assert availability.intendedUse(path, "brain-mri") == default  # a file: what it is, whatever the preset
    assert availability.modelPresetMismatch("nephi", "lung-ct", path) == ""
    assert "meant for lung CT" in availability.modelPresetMismatch("nephi-io", "brain-mri", path)


def test_clear_model_cache_deletes_only_model_files_and_partial_downloads(tmp_path):
    for name in ("a.pt", ".a.k3j.part", "README.txt", "a.pt.sha256", "settings.json"):
        (tmp_path / name).write_text("x")
    (tmp_path / "folder.pt").mkdir()  # a folder is never removed, whatever its name
    deleted = availability.clearModelCache(str(tmp_path))
    assert sorted(Path(p).name for p in deleted) == [".a.k3j.part", "a.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.txt", "a.pt.sha256", "folder.pt", "settings.json"]
    assert availability.clearModelCache(str(tmp_path / "missing")) == []


def test_a_warning_event_shows_in_the_status_line_and_the_log():
    state = ProgressState()
    state.update({"event": "warning", "code": "mask-fallback", "message": "no lung found in the moving image"})
    assert state.warnings == ["no lung found in the moving image"]
    assert state.message == "Warning: no lung found in the moving image"
    assert state.takeLogLines() == ["Warning: no lung found in the moving image"]
