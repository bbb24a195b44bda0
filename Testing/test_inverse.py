"""The inverse transform (moving -> fixed, over the moving image): the fixed-point inversion, the file every run
writes (adam and nephi-io) on the inversion lattice, its consistency metrics, and ``nephireg warp --inverse``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from test_cli import run_cli

from conftest import CancelOnCall, sample_mask
from nephireg import io
from nephireg.fields import DenseField, FieldWithInverse
from nephireg.geometry import Grid, apply_affine, inverse_lattice, inverse_lattice_mm
from nephireg.inverse import consistency_mm, invert, write_inverse
from nephireg.preprocess import working_grid
from nephireg.presets import get_preset
from nephireg.synthetic import deform, random_displacement, rotation_direction, thorax_phantom

FIXED_GRID = Grid((56, 48, 36), (3.0, 3.3, 4.2), (-80.0, -70.0, -300.0), rotation_direction((7.0, -5.0, 10.0)))
# The moving image on a grid of its own: another obliquity, spacing, size and origin.
MOVING_GRID = Grid((50, 52, 30), (3.4, 3.0, 4.8), (-78.0, -82.0, -292.0), rotation_direction((-4.0, 6.0, -8.0)))


def rigid(angles_deg, translation_mm, center) -> np.ndarray:
    """4x4 LPS mm: a rotation about ``center`` then a translation."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(rotation_direction(angles_deg)).reshape(3, 3)
    matrix[:3, 3] = center - matrix[:3, :3] @ center + np.asarray(translation_mm)
    return matrix


def round_trip_mm(forward: sitk.Transform, inverse: sitk.Transform, points: np.ndarray) -> np.ndarray:
    """|inverse(forward(x)) - x| (mm) for the points (n, 3) that the forward map takes into the moving image (where
    the inverse is defined), with the transforms as SimpleITK applies them."""
    mapped = np.array([forward.TransformPoint(tuple(p)) for p in points])
    index = apply_affine(MOVING_GRID.physical_to_index(), mapped)
    inside = np.all((index >= 0) & (index <= np.asarray(MOVING_GRID.size) - 1), axis=1)
    assert inside.mean() > 0.9
    back = np.array([inverse.TransformPoint(tuple(q)) for q in mapped[inside]])
    return np.linalg.norm(back - points[inside], axis=1)


def test_fixed_point_inversion_with_a_prealignment():
    """phi(x) = A(x + u(x)) with a smooth u of 6 mm and a rotation A: phi(phi^-1(y)) = y at the moving voxels whose
    inverse lies inside the fixed grid, and the consistency error is tiny."""
    u = random_displacement(FIXED_GRID, amplitude_mm=6.0, sigma_mm=14.0, seed=2)
    prealign = rigid((3.0, -2.0, 4.0), (2.0, -3.0, 5.0), FIXED_GRID.center_physical())
    field = DenseField(FIXED_GRID, torch.from_numpy(u).float().permute(3, 0, 1, 2)[None])
    inverse = invert(field, u, FIXED_GRID, MOVING_GRID, prealign, torch.device("cpu"))
    assert inverse.grid == MOVING_GRID and inverse.displacement_mm.shape == MOVING_GRID.shape_zyx + (3,)
    assert inverse.started_from == "negated field" and inverse.iterations < 30
    y = MOVING_GRID.physical_points().reshape(-1, 3)
    x = y + inverse.displacement_mm.reshape(-1, 3)
    index = apply_affine(FIXED_GRID.physical_to_index(), x)
    inside = np.all((index >= 0) & (index <= np.asarray(FIXED_GRID.size) - 1), axis=1)
    assert inside.mean() > 0.5
    plus_u = io.displacement_transform(u, FIXED_GRID)  # x -> x + u(x), trilinear as ITK applies it
    sampled = np.array([plus_u.TransformPoint(tuple(p)) for p in x[inside][::50]])
    error = np.linalg.norm(apply_affine(prealign, sampled) - y[inside][::50], axis=1)
    assert error.max() < 0.05  # mm; the iteration stops when no point moves 0.01 mm
    forward = (apply_affine(prealign, FIXED_GRID.physical_points() + u) - FIXED_GRID.physical_points())
    errors = consistency_mm(forward, FIXED_GRID, inverse)
    # Measured 0.043 mean, 0.089 p95: the trilinear interpolation of both fields between voxels 3-4.8 mm apart.
    assert errors.size > 0.5 * np.prod(FIXED_GRID.size) and errors.mean() < 0.08 and np.percentile(errors, 95) < 0.15


def test_a_known_inverse_starts_the_iteration():
    """A field that knows its inverse (NePhi's backward map): the iteration starts there and needs fewer steps."""
    u = random_displacement(FIXED_GRID, amplitude_mm=6.0, sigma_mm=14.0, seed=2)
    field = DenseField(FIXED_GRID, torch.from_numpy(u).float().permute(3, 0, 1, 2)[None])
    plain = invert(field, u, FIXED_GRID, FIXED_GRID, np.eye(4), torch.device("cpu"))
    exact = DenseField(FIXED_GRID, torch.from_numpy(plain.displacement_mm).float().permute(3, 0, 1, 2)[None])
    warm = invert(FieldWithInverse(field, exact), u, FIXED_GRID, FIXED_GRID, np.eye(4), torch.device("cpu"))
    assert warm.started_from == "backward map" and warm.iterations < plain.iterations
    assert np.abs(warm.displacement_mm - plain.displacement_mm).max() < 0.05


def test_the_written_inverse_reaches_every_moving_voxel(tmp_path):
    """On the inversion lattice, as ITK reads the file, the inverse of a translation by c is -c at every corner voxel
    of the moving grid too; with a lattice that stopped short of the last voxel centres (4.5 lattice steps rounded to
    4 along x here), ITK would leave that layer unmoved (it applies no displacement beyond the buffer)."""
    moving = Grid((10, 9, 8), (1.0, 1.0, 1.0), (-3.0, 2.0, 1.0), tuple(np.eye(3).ravel()))  # exact indices
    fixed = Grid((12, 11, 10), (1.0, 1.0, 1.0), (-4.0, 1.0, 0.0), moving.direction)
    c = np.array([0.7, -0.4, 0.3])
    u = np.broadcast_to(c, fixed.shape_zyx + (3,)).copy()
    field = DenseField(fixed, torch.from_numpy(u).float().permute(3, 0, 1, 2)[None])
    inverse = invert(field, u, fixed, moving, np.eye(4), torch.device("cpu"), lattice_mm=2.0)
    assert inverse.domain == moving and inverse.grid.size == (6, 5, 5) and inverse.grid.spacing == (2.0, 2.0, 2.0)
    write_inverse(inverse, tmp_path / "inverse.h5")
    read = sitk.ReadTransform(str(tmp_path / "inverse.h5"))
    for corner in moving.corners_physical():
        assert np.allclose(np.array(read.TransformPoint(tuple(corner))) - corner, -c, atol=1e-5), corner
    errors = consistency_mm(u, fixed, inverse)
    assert errors.size > 0 and errors.max() < 1e-5


@pytest.fixture(scope="module")
def oblique_pair(tmp_path_factory):
    """Fixed and moving thorax phantoms on different oblique anisotropic grids, with a known smooth deformation."""
    folder = tmp_path_factory.mktemp("inverse-pair")
    fixed, mask = thorax_phantom(FIXED_GRID, seed=3)
    truth = random_displacement(FIXED_GRID, amplitude_mm=6.0, sigma_mm=12.0, seed=4)
    moving = io.resample_to(deform(fixed, truth, FIXED_GRID), MOVING_GRID, default=-1000.0)
    paths = {"fixed": folder / "fixed.nrrd", "moving": folder / "moving.nrrd", "fixed_mask": folder / "mask.nrrd"}
    io.write_image(fixed, paths["fixed"])
    io.write_image(moving, paths["moving"])
    io.write_image(mask, paths["fixed_mask"])
    return {**{k: str(v) for k, v in paths.items()}, "mask": sitk.GetArrayFromImage(mask) > 0, "folder": folder}


@pytest.mark.parametrize("method, options", [
    ("adam", {"iterations": 40, "coarse_iterations": 20, "regularization": 1.0}),  # lambda of the measurements below
    ("nephi-io", {"iterations": 25, "similarity_points": 2000, "gradicon_points": 100}),
])
def test_every_run_writes_an_inverse_that_maps_back(oblique_pair, method, options):
    """The round trip through both files is exact up to their trilinear interpolation between voxels 3-4.8 mm apart
    (measured for adam: 0.20 mm mean, 0.44 p95, 0.70 max; at every moving voxel instead of the 2x working-spacing
    lattice 0.14 / 0.32 / 0.67); the maps themselves move points by 5-10 mm (a wrong inverse errs by as much)."""
    from nephireg.inputs import Request
    from nephireg.pipeline import register

    out = oblique_pair["folder"] / method
    request = Request(oblique_pair["fixed"], oblique_pair["moving"], str(out), method=method, preset="generic",
                      prealign="moments", fixed_mask=oblique_pair["fixed_mask"], options=options,
                      write_overview=False)
    manifest = register(request)
    assert manifest["files"]["inverse"] == "inverse.h5"
    inverse = sitk.ReadTransform(str(out / "inverse.h5"))
    lattice = Grid.of(sitk.DisplacementFieldTransform(inverse).GetDisplacementField())
    step = inverse_lattice_mm(working_grid(FIXED_GRID, get_preset("generic").working_spacing_mm))  # 4 mm
    assert io.same_grid(lattice, inverse_lattice(MOVING_GRID, step)) and lattice.spacing[0] == pytest.approx(4.0)
    forward = sitk.ReadTransform(str(out / "transform.h5"))
    points = FIXED_GRID.physical_points()[sample_mask(oblique_pair["mask"], 400)]
    errors = round_trip_mm(forward, inverse, points)
    moved = np.linalg.norm(np.array([forward.TransformPoint(tuple(p)) for p in points]) - points, axis=1)
    assert moved.mean() > 2.0  # the map is far from the identity: the check means something
    assert errors.mean() < 0.35 and errors.max() < 1.0, (errors.mean(), errors.max())
    metrics = json.loads((out / "result.json").read_text())["metrics"]
    assert 0.0 <= metrics["inverse_consistency_mean_mm"] <= metrics["inverse_consistency_p95_mm"] < 1.0
    assert abs(metrics["inverse_consistency_mean_mm"] - errors.mean()) < 0.05  # the manifest measures the same


def test_warp_inverse_maps_points_and_images_into_fixed_space(oblique_pair, tmp_path):
    out = oblique_pair["folder"] / "adam"
    if not (out / "result.json").exists():
        pytest.skip("needs the adam run of test_every_run_writes_an_inverse_that_maps_back")
    forward = sitk.ReadTransform(str(out / "transform.h5"))
    interior = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.ReadImage(oblique_pair["fixed_mask"]), [2, 2, 2])) > 0
    fixed_points = FIXED_GRID.physical_points()[sample_mask(interior, 20)]  # mapped well inside the moving image
    moving_points = np.array([forward.TransformPoint(tuple(p)) for p in fixed_points])
    io.write_points(moving_points, tmp_path / "moving.txt")
    run_cli("warp", "--inverse", "--transform", out / "transform.h5", "--points", tmp_path / "moving.txt",
            "--out", tmp_path / "fixed.txt", check_code=0)
    assert np.linalg.norm(io.read_points(tmp_path / "fixed.txt") - fixed_points, axis=1).max() < 1.0
    run_cli("warp", "--inverse", "--transform", out, "--image", oblique_pair["fixed_mask"], "--nearest",
            "--reference", oblique_pair["moving"], "--out", tmp_path / "mask_on_moving.nrrd", check_code=0)
    on_moving = sitk.ReadImage(str(tmp_path / "mask_on_moving.nrrd"))
    assert io.same_grid(Grid.of(on_moving), MOVING_GRID)
    # The fixed mask carried into moving space and back through the forward map is the fixed mask again.
    back = sitk.GetArrayFromImage(io.resample_to(on_moving, FIXED_GRID, forward, linear=False)) > 0
    mask = oblique_pair["mask"]
    assert 2.0 * np.count_nonzero(back & mask) / (np.count_nonzero(back) + np.count_nonzero(mask)) > 0.95
    no_result = run_cli("warp", "--inverse", "--transform", tmp_path / "fixed.txt", "--points", tmp_path / "moving.txt",
                        "--out", tmp_path / "x.txt")
    assert no_result.returncode == 2 and "needs a registration result" in no_result.stderr


def test_warp_inverse_finds_the_inverse_of_a_result_given_by_a_relative_path(oblique_pair, monkeypatch):
    from nephireg.tools import inverse_transform_path

    out = oblique_pair["folder"] / "adam"
    if not (out / "result.json").exists():
        pytest.skip("needs the adam run of test_every_run_writes_an_inverse_that_maps_back")
    monkeypatch.chdir(out.parent)
    for given in ("adam", "adam/transform.h5"):
        found = inverse_transform_path(given)
        assert found.is_file() and found.resolve() == (out / "inverse.h5").resolve(), given


def test_the_inversion_stops_when_cancelled():
    from nephireg.errors import Cancelled

    u = random_displacement(FIXED_GRID, amplitude_mm=6.0, sigma_mm=14.0, seed=2)
    field = DenseField(FIXED_GRID, torch.from_numpy(u).float().permute(3, 0, 1, 2)[None])
    cancel = CancelOnCall(2)
    with pytest.raises(Cancelled):
        invert(field, u, FIXED_GRID, MOVING_GRID, np.eye(4), torch.device("cpu"), cancel=cancel)
    assert cancel.calls == 2
