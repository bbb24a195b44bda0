"""Models that state what they are for: training writes ``metadata["intended_use"]``, the stdlib model store reads
it (registry entries, model files), each preset has its default model, and a run on another preset warns."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from nephireg import modelstore
from nephireg.methods.nephi import MODEL_PRESET_MISMATCH, run_instance_optimisation, run_predict
from nephireg.nephi.encoder import Encoder, EncoderConfig
from nephireg.nephi.field import FieldConfig, NePhiNet
from nephireg.nephi.model_io import load_model, save_model
from nephireg.nephi.train import TrainConfig, train
from nephireg.pair import PreparedPair
from nephireg.progress import CallbackReporter
from nephireg.protocol import Event

SMALL_FIELD = {"global_dim": 32, "local_dim": 32, "fourier_features": 8, "hidden": 16}
BRAIN_USE = {"anatomy": "brain", "modality": "MRI", "preset": "brain-mri"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def volumes_csv(tmp_path_factory):
    """One small MR-like volume (smooth texture in a head-sized ellipsoid) and its CSV."""
    import SimpleITK as sitk

    folder = tmp_path_factory.mktemp("vols")
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in (34, 38, 30)), indexing="ij")
    head = (x ** 2 / 0.8 + y ** 2 / 0.9 + z ** 2 / 0.7 < 1).astype(np.float32)
    image = sitk.GetImageFromArray((head * (1 + np.cos(5 * x) * np.sin(4 * y + z))).astype(np.float32))
    image.SetSpacing((1.0, 1.2, 1.1))
    sitk.WriteImage(image, str(folder / "head.nrrd"))
    csv = folder / "volumes.csv"
    csv.write_text("image\nhead.nrrd\n")
    return csv


@pytest.fixture(scope="module")
def brain_model(tmp_path_factory, volumes_csv):
    """A tiny model trained 2 steps with ``--anatomy brain --modality MRI --preset brain-mri``."""
    folder = tmp_path_factory.mktemp("brain-model")
    config = TrainConfig(out=str(folder / "brain.pt"), workdir=str(folder / "work"), volumes_csv=str(volumes_csv),
                         steps=2, input_shape=(66, 66, 66), similarity_points=200, gradicon_points=8,
                         validate_every=2, checkpoint_every=2, validation_pairs=1, field=SMALL_FIELD,
                         **BRAIN_USE)
    train(config, log=lambda line: None)
    return folder / "brain.pt"


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(modelstore.CACHE_ENV, str(folder))
    return folder


def _pair(preset):
    """A (1, 1, 20, 20, 20) smooth pair shifted by one voxel, labelled with the run's preset."""
    from nephireg.geometry import Grid

    z, y, x = torch.meshgrid(*(torch.linspace(-1, 1, 20),) * 3, indexing="ij")
    fixed = (0.5 + 0.5 * torch.cos(3 * x) * torch.sin(2 * y + z))[None, None]
    grid = Grid((20, 20, 20), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return PreparedPair(grid, fixed, torch.roll(fixed, 1, 4), preset=preset)


def _warnings(run, *args):
    seen = []
    reporter = CallbackReporter(lambda event, fields: seen.append((event, fields)))
    run(*args, reporter)
    return [f for e, f in seen if e == Event.WARNING], reporter


def test_training_writes_the_intended_use_and_both_readers_find_it(brain_model):
    assert load_model(brain_model).metadata["intended_use"] == BRAIN_USE
    assert modelstore.read_file_intended_use(brain_model) == BRAIN_USE  # stdlib only: no torch
    assert modelstore.intended_use(str(brain_model)) == BRAIN_USE  # not a registry model: from the file


def test_training_without_a_stated_use_stores_none_and_bad_presets_are_refused(tmp_path, volumes_csv):
    with pytest.raises(ValueError, match="unknown preset 'brain'"):
        TrainConfig(out="m.pt", workdir=str(tmp_path), volumes_csv=str(volumes_csv), preset="brain")
    config = TrainConfig(out="m.pt", workdir=str(tmp_path), volumes_csv=str(volumes_csv), anatomy="brain")
    assert config.intended_use() is None  # all three or nothing
    net = NePhiNet(FieldConfig(**SMALL_FIELD))
    save_model(tmp_path / "plain.pt", net, None, {"steps": 0})
    assert modelstore.read_file_intended_use(tmp_path / "plain.pt") is None
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    assert modelstore.read_file_intended_use(tmp_path / "junk.pt") is None
    assert modelstore.intended_use(str(tmp_path / "absent.pt")) is None


def test_the_file_reader_runs_no_code_from_the_file(tmp_path):
    import pickle
    import zipfile

    class Exploit:
        def __reduce__(self):
            return (print, ("code ran",))

    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"metadata": {"intended_use": Exploit()}}))
    assert modelstore.read_file_intended_use(tmp_path / "evil.pt") is None  # builtins.print refused


def test_registry_names_paths_and_preset_defaults(cache, tmp_path, brain_model):
    shipped = modelstore.MODELS_DIR / "nephi-lung-synth-v2.pt"
    registry = {"default": "lung", "defaults": {"lung-ct": "lung", "brain-mri": "brain"}, "models": [
        {"name": "lung", "file": shipped.name, "anatomy": "lung", "modality": "CT", "preset": "lung-ct"},
        {"name": "brain", "url": "http://127.0.0.1:9/brain.pt", "sha256": "0" * 64, **BRAIN_USE},
        {"name": "vague", "url": "http://127.0.0.1:9/v.pt", "sha256": "1" * 64, "anatomy": "brain"}]}
    lung_use = {"anatomy": "lung", "modality": "CT", "preset": "lung-ct"}
    assert modelstore.intended_use("lung", registry) == lung_use
    assert modelstore.intended_use(None, registry) == lung_use  # the default
    assert modelstore.intended_use(str(shipped), registry) == lung_use  # a registry model's file -> its entry
    assert modelstore.intended_use("brain", registry) == BRAIN_USE  # not downloaded: still known
    assert modelstore.intended_use("vague", registry) is None  # incomplete entry: unknown
    assert modelstore.intended_use("nobody", registry) is None
    assert modelstore.default_model_name("brain-mri", registry) == "brain"
    assert modelstore.default_model_name("generic", registry) == "lung"  # no own default: the fallback
    assert modelstore.default_model_name(None, registry) == "lung"
    listed = {m["name"]: m for m in modelstore.list_models(registry)}
    assert listed["brain"]["preset"] == "brain-mri" and listed["brain"]["default_for"] == ["brain-mri"]
    assert listed["lung"]["default"] and listed["lung"]["default_for"] == ["lung-ct"]
    cache.mkdir()  # a user model dropped into the cache: its file states its use
    (cache / "mine.pt").write_bytes(brain_model.read_bytes())
    assert modelstore.intended_use("mine", registry) == BRAIN_USE
    assert {m["name"]: m for m in modelstore.list_models(registry)}["mine"]["preset"] == "brain-mri"
    # the model a run without --model uses: its preset's default, else the overall default
    registry["defaults"]["brain-mri"] = "mine"
    assert modelstore.resolve_model(None, registry=registry, preset="brain-mri") == str(cache / "mine.pt")
    assert modelstore.resolve_model(None, registry=registry, preset="generic") == str(shipped)


def test_the_shipped_registry_states_every_models_use_and_a_default_per_preset_it_has():
    from nephireg.protocol import PRESETS

    registry = modelstore.load_registry()
    for entry in registry["models"]:
        assert modelstore.intended_use(entry["name"]) is not None, entry["name"]
        if entry.get("file"):  # the shipped file says the same as its entry
            assert modelstore.read_file_intended_use(modelstore.MODELS_DIR / entry["file"]) == \
                modelstore.intended_use(entry["name"])
    for preset, name in registry.get("defaults", {}).items():
        assert preset in PRESETS and modelstore.intended_use(name)["preset"] == preset


def test_predict_warns_on_another_preset_and_not_on_its_own(brain_model):
    warned, _ = _warnings(run_predict, _pair("lung-ct"), {"model": str(brain_model), "output_lattice": 4})
    assert [w["code"] for w in warned] == [MODEL_PRESET_MISMATCH]
    text = warned[0]["message"]
    assert str(brain_model) in text and "brain MRI (preset brain-mri)" in text and "lung-ct preset" in text
    quiet, reporter = _warnings(run_predict, _pair("brain-mri"), {"model": str(brain_model), "output_lattice": 4})
    assert quiet == [] and reporter.warnings == []


def test_io_from_a_model_warns_too_and_from_identity_does_not(brain_model):
    options = {"iterations": 1, "similarity_points": 200, "gradicon_points": 8, "output_lattice": 4}
    warned, reporter = _warnings(run_instance_optimisation, _pair("generic"), {**options, "model": str(brain_model)})
    assert [w["code"] for w in warned] == [MODEL_PRESET_MISMATCH] and reporter.warnings == warned
    assert _warnings(run_instance_optimisation, _pair("generic"), options)[0] == []


def test_a_model_without_a_stated_use_is_logged_not_warned(tmp_path):
    net, encoder = NePhiNet(FieldConfig(**SMALL_FIELD)), Encoder(EncoderConfig(input_shape=(66, 66, 66)))
    save_model(tmp_path / "plain.pt", net, encoder, {"steps": 0})
    seen = []
    run_predict(_pair("brain-mri"), {"model": str(tmp_path / "plain.pt"), "output_lattice": 4},
                CallbackReporter(lambda event, fields: seen.append((event, fields))))
    assert not [f for e, f in seen if e == Event.WARNING]
    assert any("states no intended use" in f["message"] for e, f in seen if e == Event.LOG)


def test_the_command_line_shows_the_warning_and_the_manifest_keeps_it(tmp_path, small_pair):
    """The shipped lung model on the brain-mri preset (no brain default shipped here, or a named lung model)."""
    import subprocess

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "nephireg", "register", "--fixed", small_pair["fixed"],
                           "--moving", small_pair["moving"], "--out", str(out), "--method", "nephi",
                           "--preset", "brain-mri", "--prealign", "none", "--option", "model=nephi-lung-synth-v2",
                           "--progress", "none"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "warning: NePhi model nephi-lung-synth-v2 was trained for lung CT (preset lung-ct)" in proc.stderr
    manifest = json.loads((out / "result.json").read_text())
    assert [w["code"] for w in manifest["warnings"]] == [MODEL_PRESET_MISMATCH]


def test_models_listing_shows_each_models_use_and_the_presets_it_is_default_for(capsys, cache):
    from nephireg.cli import main

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    registry = modelstore.load_registry()
    for entry in registry["models"]:
        line = next(line for line in lines if f" {entry['name']} " in line)
        assert f" {entry['anatomy']} " in line and f" {entry['preset']} " in line
        presets = sorted(p for p, name in registry.get("defaults", {}).items() if name == entry["name"])
        assert line.endswith(f"(default for {', '.join(presets)})") if presets else "(default for" not in line
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {m["name"]: m["preset"] for m in listed} == {e["name"]: e["preset"] for e in registry["models"]}
