"""Issue 14: per-step similarity, the warnings a user can act on, and provenance, through the real engine on small
volumes made here (each warning triggered by a constructed case and absent on a good one)."""

import hashlib
import json
import shutil
from dataclasses import asdict

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nephireg import io, modelstore, quality
from nephireg.geometry import Grid
from nephireg.jacobian import jacobian_determinant, jacobian_summary
from nephireg.methods import adam, nephi
from nephireg.pipeline import Request, register
from nephireg.preprocess import working_grid
from nephireg.presets import get_preset
from nephireg.progress import SilentReporter
from nephireg.synthetic import deform, random_displacement
from NePhiRegistrationLib.result import manifestMetrics, summaryLines

FAST = {"iterations": 40, "coarse_iterations": 30}
GRID = Grid((40, 36, 32), (2.5, 2.5, 2.5), (-50.0, -45.0, -40.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def blobs(grid: Grid, seed: int = 0) -> sitk.Image:
    """An asymmetric volume: a few bright ellipsoids at random places on smooth noise (no axis symmetry)."""
    rng = np.random.default_rng(seed)
    points = grid.physical_points() - grid.center_physical()
    half = np.asarray(grid.spacing) * (np.asarray(grid.size) - 1) / 2
    values = np.zeros(grid.shape_zyx, dtype=np.float32)
    for _ in range(9):
        centre = rng.uniform(-0.6, 0.6, 3) * half
        radii = rng.uniform(0.12, 0.3, 3) * half
        values[(((points - centre) / radii) ** 2).sum(-1) <= 1.0] += rng.uniform(0.4, 1.0)
    noise = sitk.SmoothingRecursiveGaussian(io.image_from_array(rng.normal(size=grid.shape_zyx).astype(np.float32),
                                                                grid), 5.0)
    return io.image_from_array(values + 0.3 * sitk.GetArrayFromImage(noise), grid)


def shifted(image: sitk.Image, offset_mm) -> sitk.Image:
    """The same voxels with the origin moved by ``offset_mm``: the same content ``offset_mm`` away."""
    out = sitk.Image(image)
    out.SetOrigin(tuple(np.asarray(image.GetOrigin()) + np.asarray(offset_mm, dtype=float)))
    return out


def write(folder, name: str, image: sitk.Image) -> str:
    path = str(folder / f"{name}.nrrd")
    io.write_image(image, path)
    return path


def run(folder, fixed: sitk.Image, moving: sitk.Image, method: str = "adam", **request) -> dict:
    request.setdefault("options", dict(FAST) if method == "adam" else {})
    request.setdefault("preset", "generic")
    return register(Request(write(folder, "fixed", fixed), write(folder, "moving", moving), str(folder / "out"),
                            method=method, write_overview=False, **request))


def codes(manifest: dict) -> list:
    return [w["code"] for w in manifest["warnings"]]


@pytest.fixture(scope="module")
def good(tmp_path_factory, one_torch_thread):
    """A deformed copy 12 mm away: pre-alignment (centres) and the deformable step each have something to do."""
    fixed = blobs(GRID)
    moving = shifted(deform(fixed, random_displacement(GRID, 4.0, 10.0, seed=2), GRID, default=0.0), (12, -8, 6))
    return run(tmp_path_factory.mktemp("good"), fixed, moving)


def test_per_step_similarity_is_monotone_and_good_case_has_no_warning(good):
    m = good["metrics"]
    assert m["ncc_before"] + 0.1 < m["ncc_prealigned"] < m["ncc_after"] - 0.02, m
    assert m["similarity_region"] == "whole fixed image"
    assert m["prealign_determinant"] == pytest.approx(1.0) and m["prealign_rotation_deg"] == pytest.approx(0.0)
    assert m["overlap_prealigned"] > 0.9 and m["orientation_ncc_gain"] < 0
    assert good["warnings"] == []


def test_mirrored_moving_image_warns_of_the_orientation(tmp_path, one_torch_thread):
    fixed = blobs(GRID)
    mirrored = io.image_from_array(np.ascontiguousarray(sitk.GetArrayFromImage(fixed)[:, :, ::-1]), GRID)
    manifest = run(tmp_path, fixed, mirrored, options={"iterations": 5, "coarse_iterations": 5})
    assert quality.ORIENTATION_MISMATCH in codes(manifest)
    message = next(w["message"] for w in manifest["warnings"] if w["code"] == quality.ORIENTATION_MISMATCH)
    assert "mirrored" in message and "-x" in message and "header" in message
    assert manifest["metrics"]["orientation_ncc_gain"] > 0.5  # the x flip matches (nearly) exactly


def test_a_pre_alignment_that_mirrors_back_is_a_reflection_not_an_orientation_mismatch(tmp_path):
    """A mirror as the pre-alignment (as an initial transform file can give) undoes the mirrored voxels: the
    reflection is reported, the orientation no longer (the headers and pre-alignment together match)."""
    from nephireg.compose import affine_transform
    from nephireg.inputs import read_inputs

    fixed = blobs(GRID)
    mirrored = io.image_from_array(np.ascontiguousarray(sitk.GetArrayFromImage(fixed)[:, :, ::-1]), GRID)
    request = Request(write(tmp_path, "fixed", fixed), write(tmp_path, "moving", mirrored), str(tmp_path / "out"))
    inputs = read_inputs(request, get_preset("generic"), SilentReporter())
    mirror = np.eye(4)
    mirror[0, 0], mirror[0, 3] = -1.0, 2 * GRID.center_physical()[0]  # x -> 2 c_x - x
    warped = sitk.GetArrayFromImage(io.resample_to(inputs.moving_norm, GRID, affine_transform(mirror)))
    reporter = SilentReporter()
    metrics = quality.assess(inputs, GRID, mirror, warped, 0.0, reporter)
    assert metrics["ncc_prealigned"] == pytest.approx(1.0, abs=1e-6) and metrics["ncc_before"] < 0.5
    assert metrics["prealign_determinant"] == pytest.approx(-1.0) and metrics["orientation_ncc_gain"] <= 0  # the x flip
    assert [w["code"] for w in reporter.warnings] == [quality.PREALIGN_REFLECTION]


def test_a_mirroring_initial_transform_warns_of_the_reflection_end_to_end(tmp_path, one_torch_thread):
    """``--initial-transform`` replaces the pre-alignment: a mirror there is reported as such."""
    from nephireg.compose import affine_transform

    fixed = blobs(GRID)
    mirrored = io.image_from_array(np.ascontiguousarray(sitk.GetArrayFromImage(fixed)[:, :, ::-1]), GRID)
    mirror = np.eye(4)
    mirror[0, 0], mirror[0, 3] = -1.0, 2 * GRID.center_physical()[0]
    initial = str(tmp_path / "mirror.tfm")
    sitk.WriteTransform(affine_transform(mirror), initial)
    manifest = run(tmp_path, fixed, mirrored, initial_transform=initial, options={"iterations": 5,
                                                                                  "coarse_iterations": 5})
    assert manifest["parameters"]["prealign"] == "initial-transform"
    assert manifest["metrics"]["ncc_prealigned"] > 0.99 > manifest["metrics"]["ncc_before"] + 0.5
    assert manifest["metrics"]["folding_percent"] > 99 and manifest["metrics"]["std_log_jacobian"] is None
    assert quality.PREALIGN_REFLECTION in codes(manifest)
    assert not {quality.ORIENTATION_MISMATCH, quality.FOLDING} & set(codes(manifest))  # the reflection says it all
    json.loads((tmp_path / "out" / "result.json").read_text())  # strict JSON: the mirror's rotation is null


def test_pair_the_deformable_step_cannot_help_warns(tmp_path, one_torch_thread):
    """An unrelated image: no deformation explains it, so the similarity barely moves (or drops)."""
    manifest = run(tmp_path, blobs(GRID, seed=0), blobs(GRID, seed=5))
    m = manifest["metrics"]
    assert m["ncc_after"] - m["ncc_prealigned"] < quality.MIN_NCC_GAIN_SHARE * (1 - m["ncc_prealigned"])
    assert set(codes(manifest)) & {quality.DEFORMABLE_WORSE, quality.DEFORMABLE_LITTLE_GAIN}
    assert quality.ORIENTATION_MISMATCH not in codes(manifest)  # no orientation of it matches well either


def test_deformable_gain_thresholds():
    reporter = SilentReporter()
    quality.check_deformable_gain(0.1, 0.90, 0.95, reporter)  # 50 % of the room: fine
    quality.check_deformable_gain(0.1, 0.995, 0.995, reporter)  # nothing left to gain
    assert reporter.warnings == []
    quality.check_deformable_gain(0.1, 0.928, 0.922, reporter)  # issue 14's brain with the lung model
    quality.check_deformable_gain(0.1, 0.60, 0.61, reporter)  # 2.5 % of the room
    assert [w["code"] for w in reporter.warnings] == [quality.DEFORMABLE_WORSE, quality.DEFORMABLE_LITTLE_GAIN]


def test_inverted_contrast_is_judged_by_the_magnitude_of_the_similarity():
    reporter = SilentReporter()
    quality.check_deformable_gain(-0.2, -0.464, -1.0, reporter)  # inverted contrast, perfectly aligned: a gain
    assert reporter.warnings == []
    quality.check_deformable_gain(-0.2, -0.90, -0.80, reporter)  # the alignment got worse
    assert [w["code"] for w in reporter.warnings] == [quality.DEFORMABLE_WORSE]


def assess_codes(tmp_path, prealign: np.ndarray, folding_percent: float) -> list:
    """The warning codes :func:`quality.assess` raises for a pair of identical volumes under ``prealign``."""
    from nephireg.compose import affine_transform
    from nephireg.inputs import read_inputs

    image = blobs(GRID)
    request = Request(write(tmp_path, "fixed", image), write(tmp_path, "moving", image), str(tmp_path / "out"))
    inputs = read_inputs(request, get_preset("generic"), SilentReporter())
    warped = sitk.GetArrayFromImage(io.resample_to(inputs.moving_norm, GRID, affine_transform(prealign)))
    reporter = SilentReporter()
    quality.assess(inputs, GRID, prealign, warped, folding_percent, reporter)
    return [w["code"] for w in reporter.warnings]


def test_the_checks_measured_before_registration_are_those_assess_makes(tmp_path):
    """The command line measures :func:`quality.before_registration` while torch loads; :func:`quality.assess`
    given it returns the same metrics, in the same order, and emits the same warnings in the same order."""
    from nephireg.compose import affine_transform
    from nephireg.inputs import read_inputs

    image = blobs(GRID)
    squashed = np.diag([1.6, 1.0, 0.55, 1.0])  # implausible: a prealignment warning from the part measured before
    request = Request(write(tmp_path, "fixed", image), write(tmp_path, "moving", image), str(tmp_path / "out"))
    inputs = read_inputs(request, get_preset("generic"), SilentReporter())
    warped = quality.normalised_warped(inputs, GRID, affine_transform(squashed))
    alone, given = SilentReporter(), SilentReporter()
    expected = quality.assess(inputs, GRID, squashed, warped, 2 * quality.MAX_FOLDING_PERCENT, alone)
    before = quality.before_registration(inputs, GRID, squashed)
    assert set(before.metrics) == set(expected) - {"ncc_after"}
    assert [code for code, _ in before.warnings] == [quality.PREALIGN_IMPLAUSIBLE]
    got = quality.assess(inputs, GRID, squashed, warped, 2 * quality.MAX_FOLDING_PERCENT, given, before)
    assert list(got.items()) == list(expected.items())
    assert given.warnings == alone.warnings and [w["code"] for w in given.warnings][-1] == quality.FOLDING


def test_the_similarity_is_measured_on_the_warped_output_as_normalised(tmp_path):
    """``normalised_warped``: the moving image warped as the output is (its minimum outside) and mapped by
    moving_norm's window; where no interpolation straddles the window's ends this is moving_norm
    resampled, and outside the moving image it is the window's bottom (0) for a CT."""
    from nephireg.compose import affine_transform
    from nephireg.inputs import read_inputs

    ct = sitk.GetImageFromArray(np.random.default_rng(1).uniform(-1024, 400, GRID.shape_zyx).astype(np.int16))
    ct.SetSpacing(GRID.spacing)
    ct.SetOrigin(GRID.origin)
    request = Request(write(tmp_path, "fixed", ct), write(tmp_path, "moving", ct), str(tmp_path / "out"),
                      preset="lung-ct")
    inputs = read_inputs(request, get_preset("lung-ct"), SilentReporter())  # window [-1000, 0] HU
    shift = np.eye(4)
    shift[:3, 3] = (5.0, 0.0, 0.0)  # two voxels: integer steps, so no interpolation at all
    transform = affine_transform(shift)
    ours = quality.normalised_warped(inputs, GRID, transform)
    output = io.warp_image(inputs.moving, GRID, transform)
    resampled = sitk.GetArrayFromImage(io.resample_to(inputs.moving_norm, GRID, transform))
    assert ours.dtype == np.float32
    assert np.allclose(ours, resampled, atol=1e-6)  # incl. the two planes outside the moving image: 0
    assert np.array_equal(ours, quality.normalised_warped(inputs, GRID, transform, output))
    assert np.all(ours[:, :, -2:] == 0.0)


def test_assess_warns_of_folding_and_of_an_implausible_prealignment(tmp_path):
    assert quality.FOLDING not in assess_codes(tmp_path, np.eye(4), 0.0)
    assert quality.FOLDING in assess_codes(tmp_path, np.eye(4), 2 * quality.MAX_FOLDING_PERCENT)
    squashed = np.diag([1.0, 1.0, 0.6, 1.0])  # a 0.6 scaling along z: outside SCALE_RANGE and MAX_ANISOTROPY
    squashed[2, 3] = 0.4 * GRID.center_physical()[2]  # about the centre, so the images still overlap
    assert quality.PREALIGN_IMPLAUSIBLE in assess_codes(tmp_path, squashed, 0.0)
    assert quality.PREALIGN_IMPLAUSIBLE not in assess_codes(tmp_path, np.eye(4), 0.0)


def test_low_overlap_after_prealignment_warns(tmp_path, good, one_torch_thread):
    fixed = blobs(GRID)
    far = shifted(fixed, (0.55 * 39 * 2.5, 0, 0))  # 55 % of the x extent away; no pre-alignment brings it back
    manifest = run(tmp_path, fixed, far, prealign="none", options={"iterations": 5, "coarse_iterations": 5})
    assert manifest["metrics"]["overlap_prealigned"] == pytest.approx(0.45, abs=0.03)
    assert quality.LOW_OVERLAP in codes(manifest)
    assert quality.LOW_OVERLAP not in codes(good)


def test_prealignment_reflection_rotation_and_scaling():
    def warnings_for(linear):
        matrix = np.eye(4)
        matrix[:3, :3] = linear
        reporter = SilentReporter()
        summary = quality.linear_part(matrix)
        quality.check_prealignment(summary, reporter)
        return summary, [w["code"] for w in reporter.warnings]

    angle = np.deg2rad(40.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    summary, found = warnings_for(rotation)
    assert summary["prealign_rotation_deg"] == pytest.approx(40.0) and found == [quality.PREALIGN_IMPLAUSIBLE]
    summary, found = warnings_for(np.diag([-1.0, 1.0, 1.0]))
    assert summary["prealign_determinant"] == pytest.approx(-1.0) and found == [quality.PREALIGN_REFLECTION]
    assert summary["prealign_rotation_deg"] is None  # no rotation explains a mirror; strict JSON (no NaN)
    json.dumps(summary, allow_nan=False)
    summary, found = warnings_for(np.diag([0.8, 1.0, 1.31]))  # issue 14's brain under a wrong header: 0.80-1.31
    assert (summary["prealign_scale_min"], summary["prealign_scale_max"]) == pytest.approx((0.8, 1.31))
    assert found == [quality.PREALIGN_IMPLAUSIBLE]
    small = np.array([[np.cos(0.1), -np.sin(0.1), 0], [np.sin(0.1), np.cos(0.1), 0], [0, 0, 1]]) @ np.diag([1.1] * 3)
    summary, found = warnings_for(small)  # 5.7 degrees, 10 % larger: one anatomy between two scans
    assert summary["prealign_rotation_deg"] == pytest.approx(np.rad2deg(0.1)) and found == []


def test_folding_above_the_threshold_warns():
    grid = Grid((24, 24, 24), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    x = grid.physical_points()[..., 0]
    displacement = np.zeros(grid.shape_zyx + (3,))
    for amplitude, expect in ((1.0, []), (4.0, [quality.FOLDING])):  # du/dx = amplitude * 2 pi / 12 * cos(...)
        displacement[..., 0] = amplitude * np.sin(2 * np.pi * x / 12.0)
        folding = jacobian_summary(jacobian_determinant(displacement, grid))["folding_percent"]
        reporter = SilentReporter()
        quality.check_folding(folding, reporter)
        assert [w["code"] for w in reporter.warnings] == expect, folding
    assert folding > 10 * quality.MAX_FOLDING_PERCENT


def _model_with_constant_shift(path, shift_normalised: float) -> str:
    """The shipped model with its forward read-out replaced by a constant: u = (shift, 0, 0) normalised units."""
    from nephireg.nephi.model_io import load_model, save_model

    model = load_model(modelstore.default_model_path())
    out = model.net.forward_map.out
    with torch.no_grad():
        out.weight.zero_()
        out.bias.copy_(torch.tensor([shift_normalised, 0.0, 0.0]))
    save_model(path, model.net, model.encoder, {**model.metadata, "test": "constant shift"})
    return str(path)


@pytest.mark.parametrize("shift", [0.0, 0.1])
def test_nephi_identity_test_reports_a_model_that_moves_an_image_registered_to_itself(tmp_path, shift,
                                                                                       one_torch_thread):
    if modelstore.default_model_path() is None:
        pytest.skip("needs the shipped NePhi model")
    fixed = blobs(GRID)
    model = _model_with_constant_shift(tmp_path / "shifted.pt", shift)
    manifest = run(tmp_path, fixed, shifted(fixed, (5, 0, 0)), method="nephi", options={"model": model})
    working = working_grid(GRID, get_preset("generic").working_spacing_mm)  # normalised [-1, 1] spans its x extent
    expected_mm = shift * (working.size[0] - 1) * working.spacing[0] / 2
    assert expected_mm == 0 or expected_mm > 2 * quality.MAX_IDENTITY_MEAN_MM
    found = [w for w in manifest["warnings"] if w["code"] == quality.MODEL_IDENTITY_BIAS]
    if expected_mm > quality.MAX_IDENTITY_MEAN_MM:
        assert len(found) == 1 and f"by {expected_mm:.1f} mm" in found[0]["message"]
    else:
        assert found == []


def test_provenance_names_the_model_file_and_the_values_used(tmp_path, one_torch_thread):
    if modelstore.default_model_path() is None:
        pytest.skip("needs the shipped NePhi model")
    fixed = blobs(GRID)
    inside = write(tmp_path, "mask", io.image_from_array(np.ones(GRID.shape_zyx, np.uint8), GRID))  # no lung search
    manifest = run(tmp_path, fixed, fixed, method="nephi", preset="lung-ct", fixed_mask=inside,
                   options={"output_lattice": 3})
    record = manifest["model"]
    shipped = modelstore.default_model_path()
    with open(shipped, "rb") as f:
        assert record["sha256"] == hashlib.sha256(f.read()).hexdigest()
    entry = modelstore.load_registry()["models"][0]
    assert record["name"] == entry["name"] == "nephi-lung-synth-v2" and record["file"] == shipped
    assert (record["anatomy"], record["modality"]) == ("lung", "CT")
    assert record["preset"] == entry["preset"] == "lung-ct" and record["card"] == entry["card"] == "docs/model-card.md"
    parameters = manifest["parameters"]
    assert parameters["preset_values"]["name"] == "lung-ct" and parameters["preset_values"]["working_spacing_mm"] == 1.5
    assert parameters["preset_values"]["method_options"]["nephi"] == {"output_lattice": 6}
    assert parameters["settings"] == asdict(nephi.Settings.from_options({"output_lattice": 3}))
    assert parameters["settings"]["output_lattice"] == 3.0  # the user's override, resolved

    copy = shutil.copy(shipped, tmp_path / "my-model.pt")  # a file outside the registry: named by its stem
    (tmp_path / "b").mkdir()
    again = run(tmp_path / "b", fixed, fixed, method="nephi", options={"model": str(copy)})
    assert again["model"]["name"] == "my-model" and again["model"]["sha256"] == record["sha256"]
    assert again["model"]["card"] is None and again["model"]["preset"] == "lung-ct"  # the file's own intended use


def test_no_model_and_resolved_settings_without_one(good):
    assert good["model"] is None
    resolved = adam.Settings.from_options(get_preset("generic").options_for("adam", FAST))  # preset, then user's
    assert good["parameters"]["settings"] == asdict(resolved) and good["parameters"]["settings"]["iterations"] == 40
    assert good["parameters"]["preset_values"]["prealign"] == "center"


def test_panel_summary_shows_warnings_per_step_similarity_and_model():
    manifest = {"metrics": {"folding_percent": 0.0, "ncc_before": 0.1, "ncc_prealigned": 0.928, "ncc_after": 0.922},
                "warnings": [{"code": quality.DEFORMABLE_WORSE, "message": "the deformable step made it worse"}],
                "model": {"name": "nephi-lung-synth-v2", "anatomy": "lung", "modality": "CT", "preset": "lung-ct"}}
    lines = summaryLines(manifestMetrics(manifest))
    assert lines[0] == f"Warning: the deformable step made it worse [{quality.DEFORMABLE_WORSE}]"
    assert "ncc: 0.1 before -> 0.928 pre-aligned -> 0.922 after" in lines
    assert "Model: nephi-lung-synth-v2 (lung, CT, preset lung-ct)" in lines
    assert not any(line.startswith(("warnings", "model ")) for line in lines)  # not repeated as raw values


def test_panel_and_terminal_summaries_show_an_engine_warning(tmp_path, capsys, one_torch_thread):
    from nephireg.cli import _print_summary

    fixed = blobs(GRID)
    manifest = run(tmp_path, fixed, shifted(fixed, (0.55 * 39 * 2.5, 0, 0)), prealign="none",
                   options={"iterations": 3, "coarse_iterations": 3})
    warning = next(w for w in manifest["warnings"] if w["code"] == quality.LOW_OVERLAP)
    assert f"Warning: {warning['message']} [{quality.LOW_OVERLAP}]" in summaryLines(manifestMetrics(manifest))
    _print_summary(manifest)
    printed = capsys.readouterr().out
    assert f"warning [{quality.LOW_OVERLAP}]: {warning['message']}" in printed
    m = manifest["metrics"]
    assert f"NCC {m['ncc_before']:.3f} before -> {m['ncc_prealigned']:.3f} pre-aligned -> {m['ncc_after']:.3f}" \
        in printed


def test_model_preset_mismatch_reaches_both_summaries(tmp_path, capsys, one_torch_thread):
    """The model-preset-mismatch warning (the lung model on another preset) shows like every other warning."""
    from nephireg.cli import _print_summary

    fixed = blobs(GRID)
    manifest = run(tmp_path, fixed, fixed, method="nephi", preset="generic")
    warning = next(w for w in manifest["warnings"] if w["code"] == "model-preset-mismatch")
    assert f"Warning: {warning['message']} [model-preset-mismatch]" in summaryLines(manifestMetrics(manifest))
    _print_summary(manifest)
    assert f"warning [model-preset-mismatch]: {warning['message']}" in capsys.readouterr().out


def test_warnings_of_the_measuring_thread_reach_the_reporter_on_the_callers_thread(small_pair, tmp_path,
                                                                                  monkeypatch):
    """The quality checks run on the write stage's second thread; their warnings are emitted on the caller's
    thread (a GUI callback never runs on another thread), in order, and land in the manifest."""
    import threading

    from nephireg.progress import SilentReporter

    real_assess = quality.assess

    def assess_with_a_warning(inputs, grid, prealign, warped_norm, folding_percent, reporter, before=None):
        reporter.warn("test-warning", "raised on the measuring thread")
        return real_assess(inputs, grid, prealign, warped_norm, folding_percent, reporter, before)

    monkeypatch.setattr(quality, "assess", assess_with_a_warning)

    class ThreadLog(SilentReporter):
        def __init__(self):
            super().__init__()
            self.threads = []

        def warn(self, code, message):
            self.threads.append((code, threading.current_thread().name))
            super().warn(code, message)

    log = ThreadLog()
    manifest = register(Request(small_pair["fixed"], small_pair["moving"], str(tmp_path / "out"), method="adam",
                                preset="generic", prealign="none", write_overview=False,
                                options={"iterations": 2, "coarse_iterations": 1}), log)
    assert ("test-warning", threading.current_thread().name) in log.threads
    assert all(name == threading.current_thread().name for _, name in log.threads)
    assert "test-warning" in [w["code"] for w in manifest["warnings"]]
