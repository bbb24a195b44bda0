"""The stationary-velocity-field parameterisation: scaling and squaring, and continuous Adam with it."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.linalg import expm

from conftest import sample_mask
from nephireg import io
from nephireg.errors import InputError
from nephireg.geometry import Grid
from nephireg.jacobian import jacobian_determinant
from nephireg.pipeline import Request, register
from nephireg.sampling import grid_points_mm
from nephireg.svf import exp_velocity
from nephireg.synthetic import rotation_direction, warp_error_mm

OBLIQUE = Grid((24, 22, 20), (2.0, 2.5, 3.0), (-20.0, -25.0, -30.0), rotation_direction((8.0, -6.0, 12.0)))


def test_exp_of_a_linear_velocity_is_the_matrix_exponential_on_an_oblique_grid():
    """v(x) = A (x - c): the flow is exp(A) (x - c) + c - x, whatever the grid's direction and spacing."""
    a = np.array([[0.05, -0.12, 0.03], [0.10, -0.04, 0.06], [-0.02, 0.08, 0.07]])
    points = grid_points_mm(OBLIQUE, dtype=torch.float64)  # (Z, Y, X, 3)
    centre = torch.as_tensor(OBLIQUE.center_physical())
    velocity = ((points - centre) @ torch.as_tensor(a).T).permute(3, 0, 1, 2)[None]
    u = exp_velocity(velocity, OBLIQUE, steps=8)[0].permute(1, 2, 3, 0)
    expected = (points - centre) @ torch.as_tensor(expm(a) - np.eye(3)).T
    inner = (slice(4, -4),) * 3  # away from the replicated border
    assert torch.allclose(u[inner], expected[inner], atol=0.02)  # mm, against displacements up to ~4 mm
    assert float(expected[inner].norm(dim=-1).max()) > 3.0
    gap_to_v = (velocity[0].permute(1, 2, 3, 0)[inner] - expected[inner]).abs().max()
    assert float(gap_to_v) > 0.1  # five times the tolerance above: the flow is not the velocity itself


def test_exp_of_a_large_smooth_velocity_does_not_fold_where_the_displacement_would():
    """Two crossed shears v = (4 sin(2 pi y / 20), 4 sin(2 pi x / 20), 0) mm: as a displacement they fold (det < 0
    where both slopes pass 1); their flow does not, and since v is divergence-free the flow keeps volume (det ~ 1)."""
    grid = Grid((40, 40, 40), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    points = grid_points_mm(grid, dtype=torch.float64)
    shears = torch.zeros_like(points)
    shears[..., 0] = 4.0 * torch.sin(2 * np.pi * points[..., 1] / 20.0)
    shears[..., 1] = 4.0 * torch.sin(2 * np.pi * points[..., 0] / 20.0)
    plain = jacobian_determinant(shears.numpy(), grid)
    flowed = exp_velocity(shears.permute(3, 0, 1, 2)[None], grid, steps=8)[0].permute(1, 2, 3, 0).numpy()
    det = jacobian_determinant(flowed, grid)
    assert (plain <= 0).mean() > 0.1
    assert det.min() > 0
    inner = (slice(5, -5),) * 3  # away from the replicated border
    assert np.abs(det[inner] - 1.0).max() < 0.05


def test_exp_needs_non_negative_steps():
    with pytest.raises(ValueError, match="steps"):
        exp_velocity(torch.zeros(1, 3, 4, 4, 4), Grid((4, 4, 4), (1.0,) * 3, (0.0,) * 3, tuple(np.eye(3).ravel())),
                     steps=-1)


def test_adam_svf_recovers_a_known_smooth_deformation_without_folding(small_pair, tmp_path, one_torch_thread):
    request = Request(small_pair["fixed"], small_pair["moving"], str(tmp_path / "svf"), method="adam",
                      preset="generic", prealign="none", fixed_mask=small_pair["fixed_mask"],
                      options={"iterations": 60, "coarse_iterations": 40, "parameterisation": "svf"},
                      write_overview=False)
    manifest = register(request)
    points = sample_mask(small_pair["mask"], 600)
    transform = io.read_transform(tmp_path / "svf" / "transform.h5")
    before = warp_error_mm(sitk.Transform(3, sitk.sitkIdentity), small_pair["truth"], small_pair["grid"], points)
    after = warp_error_mm(transform, small_pair["truth"], small_pair["grid"], points)
    assert before.mean() > 2.0
    assert after.mean() < 0.55 * before.mean(), (before.mean(), after.mean())
    assert after.mean() < 1.5  # mm: under half the smallest voxel
    assert manifest["metrics"]["folding_percent"] == 0.0
    assert manifest["parameters"]["options"]["parameterisation"] == "svf"


def test_unknown_parameterisation_is_refused():
    from nephireg.methods.adam import Settings

    with pytest.raises(InputError, match="parameterisation"):
        Settings.from_options({"parameterisation": "bspline"})


def test_nephi_coarse_step_takes_adams_parameterisation_and_similarity():
    from nephireg.methods.nephi import Settings as NephiSettings

    settings = NephiSettings.from_options({"coarse": "adam", "coarse_parameterisation": "svf",
                                           "coarse_similarity": "mind+intensity"})
    assert (settings.coarse_parameterisation, settings.coarse_similarity) == ("svf", "mind+intensity")
    with pytest.raises(InputError, match="coarse_parameterisation"):
        NephiSettings.from_options({"coarse_parameterisation": "bspline"})
