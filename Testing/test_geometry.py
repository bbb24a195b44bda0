import numpy as np
import pytest
import torch

from nephireg.geometry import LPS_TO_RAS, Grid, apply_affine, lps_to_ras_matrix4, overlap_fraction
from nephireg.sampling import grid_points_mm, physical_to_normalised, pool, pooled_grid, sample_points
from nephireg.synthetic import rotation_direction

OBLIQUE = Grid((7, 5, 4), (0.8, 1.3, 2.5), (10.0, -20.0, 35.0), rotation_direction((20.0, -15.0, 30.0)))


def test_index_physical_round_trip_oblique_anisotropic():
    idx = np.array([[0, 0, 0], [6, 4, 3], [2.5, 1.25, 3.0]])
    phys = apply_affine(OBLIQUE.index_to_physical(), idx)
    assert np.allclose(apply_affine(OBLIQUE.physical_to_index(), phys), idx)
    # step along i moves spacing[0] mm along the first direction column
    d = OBLIQUE.direction_matrix
    assert np.allclose(phys[0], OBLIQUE.origin)
    step = apply_affine(OBLIQUE.index_to_physical(), [1, 0, 0]) - phys[0]
    assert np.allclose(step, d[:, 0] * 0.8)


def test_matches_simpleitk():
    import SimpleITK as sitk

    image = sitk.Image(list(OBLIQUE.size), sitk.sitkFloat32)
    image.SetSpacing(OBLIQUE.spacing)
    image.SetOrigin(OBLIQUE.origin)
    image.SetDirection(OBLIQUE.direction)
    assert Grid.of(image) == OBLIQUE
    for index in [(0, 0, 0), (6, 4, 3), (3, 1, 2)]:
        expected = image.TransformContinuousIndexToPhysicalPoint([float(i) for i in index])
        assert np.allclose(apply_affine(OBLIQUE.index_to_physical(), index), expected)
    assert np.allclose(OBLIQUE.physical_points()[3, 1, 2], image.TransformIndexToPhysicalPoint((2, 1, 3)))


def test_normalised_corners_are_minus_one_and_one():
    corners = OBLIQUE.corners_physical()
    norm = apply_affine(OBLIQUE.physical_to_normalised(), corners)
    assert np.allclose(np.abs(norm), 1.0)
    assert np.allclose(apply_affine(OBLIQUE.normalised_to_physical(), norm), corners)


def test_sampling_a_linear_ramp_is_exact_between_voxels():
    """grid_sample through the geometry convention reads back a field linear in physical space exactly."""
    a = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64)
    pts = grid_points_mm(OBLIQUE, dtype=torch.float64)
    volume = (pts @ a + 5.0)[None, None]  # (1, 1, Z, Y, X)
    rng = np.random.default_rng(0)
    inner = torch.as_tensor(apply_affine(OBLIQUE.index_to_physical(), rng.uniform(0, 1, (50, 3)) * [6, 4, 3]))
    values = sample_points(volume, OBLIQUE, inner)[:, 0]
    assert torch.allclose(values, inner @ a + 5.0, atol=1e-9)
    assert torch.allclose(physical_to_normalised(pts, OBLIQUE)[0, 0, 0], -torch.ones(3, dtype=torch.float64))


def test_pooled_grid_centres_match_avg_pool():
    grid = Grid((8, 6, 4), (1.0, 2.0, 3.0), (1.0, 2.0, 3.0), rotation_direction((0, 10, 0)))
    pts = grid_points_mm(grid, dtype=torch.float64).permute(3, 0, 1, 2)[None]  # coordinates as channels
    pooled = pool(pts, 2)[0].permute(1, 2, 3, 0)
    coarse = pooled_grid(grid, 2)
    assert torch.allclose(pooled, grid_points_mm(coarse, dtype=torch.float64))


def test_lps_ras_flip_is_an_involution():
    assert np.allclose(LPS_TO_RAS @ LPS_TO_RAS, np.eye(3))
    m = lps_to_ras_matrix4()
    assert np.allclose(apply_affine(m, [1.0, 2.0, 3.0]), [-1.0, -2.0, 3.0])
    ijk_to_ras = OBLIQUE.ijk_to_ras()
    assert np.allclose(apply_affine(ijk_to_ras, [0, 0, 0]), [-10.0, 20.0, 35.0])


def test_resampled_grid_keeps_field_of_view_and_overlap():
    fine = OBLIQUE.resampled([0.5, 0.5, 0.5])
    assert np.allclose(fine.extent_mm(), OBLIQUE.extent_mm(), atol=0.5)
    assert overlap_fraction(OBLIQUE, fine) == pytest.approx(1.0)
    far = Grid(OBLIQUE.size, OBLIQUE.spacing, (1000.0, 0.0, 0.0), OBLIQUE.direction)
    assert overlap_fraction(OBLIQUE, far) == 0.0


def test_a_covering_grid_reaches_every_voxel_centre():
    """Grid.covering: the first centre kept, the last at or beyond the grid's own last one, never a lattice step
    beyond it. 10 voxels of 1 mm at 2 mm is the tie that rounding leaves short (4.5 steps -> 4)."""
    grid = Grid((10, 7, 5), (1.0, 1.5, 2.5), (3.0, -4.0, 5.0), OBLIQUE.direction)
    assert grid.resampled([2.0, 3.0, 3.0]).size[0] == 5  # last centre 8 mm: short of 9
    for spacing in ([2.0, 3.0, 3.0], [4.0, 4.0, 4.0], [1.0, 1.5, 2.5], [2.25, 3.0, 5.0]):
        cover = grid.covering(spacing)
        assert cover.origin == grid.origin and cover.direction == grid.direction and cover.spacing == tuple(spacing)
        reach = cover.extent_mm() - grid.extent_mm()
        assert np.all(reach >= -1e-9) and np.all(reach < np.asarray(spacing) - 1e-9), (spacing, reach)
    assert grid.covering(grid.spacing) == grid


def test_invalid_grid_rejected():
    with pytest.raises(ValueError):
        Grid((0, 4, 4), (1, 1, 1), (0, 0, 0), tuple(np.eye(3).ravel()))
