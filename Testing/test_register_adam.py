"""End-to-end continuous Adam through the pipeline and the written files, as users and Slicer read them."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import sample_mask
from nephireg import io
from nephireg.fields import DenseField, evaluate_on_grid
from nephireg.geometry import Grid
from nephireg.pipeline import Request, register
from nephireg.synthetic import rotation_direction, warp_error_mm

FAST = {"iterations": 60, "coarse_iterations": 40}


@pytest.fixture(scope="module")
def adam_result(small_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("adam") / "result"
    request = Request(small_pair["fixed"], small_pair["moving"], str(out), method="adam", preset="generic",
                      prealign="none", fixed_mask=small_pair["fixed_mask"], options=dict(FAST))
    manifest = register(request)
    return out, manifest


def test_known_deformation_recovered_without_folding(small_pair, adam_result):
    out, manifest = adam_result
    transform = io.read_transform(out / "transform.h5")
    points = sample_mask(small_pair["mask"], 600)
    before = warp_error_mm(sitk.Transform(3, sitk.sitkIdentity), small_pair["truth"], small_pair["grid"], points)
    after = warp_error_mm(transform, small_pair["truth"], small_pair["grid"], points)
    assert before.mean() > 2.0
    assert after.mean() < 0.55 * before.mean(), (before.mean(), after.mean())
    assert after.mean() < 1.5  # mm: under half the smallest voxel (3 mm; 3.3 and 4.2 mm on the other axes)
    assert manifest["metrics"]["folding_percent"] == 0.0
    assert manifest["metrics"]["ncc_after"] > manifest["metrics"]["ncc_before"]


def test_manifest_and_files(adam_result):
    out, manifest = adam_result
    on_disk = json.loads((out / "result.json").read_text())
    assert on_disk["protocol_version"] == 1
    assert set(on_disk["files"]) == {"transform", "inverse", "jacobian", "warped", "overview"}
    for name in on_disk["files"].values():
        assert (out / name).stat().st_size > 0
    assert not list(out.glob(".partial-*")), "staging folder removed"
    for key in ("folding_percent", "std_log_jacobian", "jacobian_min", "jacobian_max", "ncc_before", "ncc_after"):
        assert np.isfinite(on_disk["metrics"][key])
    assert {"read", "optimise", "write", "total"} <= set(on_disk["timings_s"])
    assert on_disk["versions"]["torch"] == torch.__version__ and on_disk["device"] == "cpu"
    assert (out / "overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_jacobian_file_matches_the_transform(adam_result, small_pair):
    out, manifest = adam_result
    jac = sitk.ReadImage(str(out / "jacobian.nrrd"))
    assert jac.GetPixelID() == sitk.sitkFloat32
    assert io.same_grid(Grid.of(jac), small_pair["grid"])
    values = sitk.GetArrayFromImage(jac)
    assert values.min() == pytest.approx(manifest["metrics"]["jacobian_min"])


def test_warped_image_is_reproduced_by_simpleitk_resampling(adam_result, small_pair):
    out, _ = adam_result
    fixed = sitk.ReadImage(small_pair["fixed"])
    moving = sitk.ReadImage(small_pair["moving"], sitk.sitkFloat32)
    transform = sitk.ReadTransform(str(out / "transform.h5"))
    background = float(sitk.GetArrayViewFromImage(moving).min())  # outside the moving image: its minimum
    theirs = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, background))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nrrd")))
    assert np.allclose(ours, theirs, atol=1e-3)


def test_written_transform_maps_points_as_the_field_says_oblique_anisotropic(tmp_path):
    """A dense field on an oblique working grid, evaluated on a differently oriented fixed grid and written: SimpleITK
    reads back x -> x + u(x) at voxel centres and between them (u linear, so interpolation is exact)."""
    working = Grid((30, 28, 26), (1.5, 1.5, 1.5), (-10.0, -12.0, -10.0), rotation_direction((10.0, 5.0, -12.0)))
    fixed = Grid((14, 11, 7), (1.2, 1.7, 3.1), (2.0, -2.0, 1.0), rotation_direction((8.0, 3.0, -10.0)))
    a = np.array([[0.05, -0.02, 0.01], [0.03, 0.04, -0.02], [-0.01, 0.02, 0.06]])
    b = np.array([2.0, -1.0, 3.0])

    def u(points):
        return points @ a.T + b

    values = torch.as_tensor(u(working.physical_points()), dtype=torch.float64).permute(3, 0, 1, 2)[None]
    displacement = evaluate_on_grid(DenseField(working, values), fixed, torch.device("cpu"), chunk_points=300)
    io.write_transform(displacement, fixed, tmp_path / "t.h5")
    transform = sitk.ReadTransform(str(tmp_path / "t.h5"))
    rng = np.random.default_rng(1)
    index = rng.uniform(0, 1, (40, 3)) * (np.asarray(fixed.size) - 1)
    points = index @ fixed.index_to_physical()[:3, :3].T + fixed.origin
    mapped = np.array([transform.TransformPoint(tuple(p)) for p in points])
    assert np.allclose(mapped, points + u(points), atol=1e-6)


def test_deterministic_on_cpu(small_pair, tmp_path):
    results = []
    for name in ("a", "b"):
        request = Request(small_pair["fixed"], small_pair["moving"], str(tmp_path / name), preset="generic",
                          prealign="none", options={"iterations": 8, "coarse_iterations": 4}, seed=5,
                          write_warped=False, write_overview=False)
        register(request)
        results.append(io.displacement_of(io.read_transform(tmp_path / name / "transform.h5"), small_pair["grid"]))
    assert np.array_equal(results[0], results[1])
