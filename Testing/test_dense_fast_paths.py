"""The fast paths of the engine's dense outputs give the numbers of the plain ones: separable resampling of a dense
field (nephireg.sampling.resample_axis_aligned, used by nephireg.fields.evaluate_on_grid) against point sampling,
and the slab-wise det J (nephireg.jacobian) against np.gradient over the whole grid."""

import numpy as np
import pytest
import torch

from nephireg.fields import DenseField, evaluate_on_grid
from nephireg.geometry import Grid
from nephireg.jacobian import SLAB_PLANES, jacobian_determinant
from nephireg.sampling import axis_aligned_index_map
from nephireg.synthetic import rotation_direction

DIRECTION = rotation_direction((15.0, -20.0, 25.0))
FINE = Grid((23, 17, 2 * SLAB_PLANES + 3), (1.1, 1.4, 2.5), (3.0, -4.0, 5.0), DIRECTION)


class PointsOnly:
    """The same field, seen only through displacement_mm: evaluate_on_grid samples it point by point."""

    def __init__(self, field: DenseField) -> None:
        self.field = field

    def displacement_mm(self, points_mm: torch.Tensor) -> torch.Tensor:
        return self.field.displacement_mm(points_mm)


def _random_field(grid: Grid) -> DenseField:
    generator = torch.Generator().manual_seed(3)
    return DenseField(grid, 5.0 * torch.randn(1, 3, *grid.shape_zyx, generator=generator))


@pytest.mark.parametrize("spacing", [(3.0, 3.0, 3.0), (2.2, 2.8, 5.0), (0.7, 1.0, 2.0)])
def test_separable_resampling_equals_point_sampling_on_an_oblique_grid(spacing):
    field = _random_field(FINE.resampled(spacing))
    assert axis_aligned_index_map(field.grid, FINE) is not None  # the fast path is taken
    fast = evaluate_on_grid(field, FINE, torch.device("cpu"))
    plain = evaluate_on_grid(PointsOnly(field), FINE, torch.device("cpu"))
    assert fast.shape == plain.shape == (*FINE.shape_zyx, 3) and fast.dtype == np.float64
    assert np.abs(fast - plain).max() < 1e-4  # float32 rounding of grid_sample's coordinates; values ~5 mm


def test_separable_resampling_clamps_at_the_border_like_point_sampling():
    field = _random_field(FINE.resampled((3.0, 3.0, 3.0)))
    corner = FINE.index_to_physical() @ np.array([-4.5, -3.25, -6.0, 1.0])  # a grid reaching beyond the field's
    wider = Grid((30, 24, 30), FINE.spacing, tuple(corner[:3]), DIRECTION)
    fast = evaluate_on_grid(field, wider, torch.device("cpu"))
    plain = evaluate_on_grid(PointsOnly(field), wider, torch.device("cpu"))
    assert np.abs(fast - plain).max() < 1e-4


def test_grids_with_other_axes_are_not_taken_for_axis_aligned():
    turned = Grid(FINE.size, FINE.spacing, FINE.origin, rotation_direction((16.0, -20.0, 25.0)))
    assert axis_aligned_index_map(FINE, turned) is None


def _det_by_np_gradient(u: np.ndarray, grid: Grid) -> np.ndarray:
    """det(I + Du) the plain way: np.gradient along the voxel axes over the whole grid, then the chain rule."""
    d_dk, d_dj, d_di = np.gradient(u, axis=(0, 1, 2))  # (Z, Y, X, 3) each: d u_a / d index_m
    by_index = np.stack([d_di, d_dj, d_dk], axis=-1)  # (..., a, m)
    du = by_index @ grid.physical_to_index()[:3, :3]  # (..., a, n): d u_a / d x_n
    return np.linalg.det(np.eye(3) + du)


def test_slabwise_det_j_equals_the_whole_grid_computation():
    points = FINE.physical_points()
    u = np.stack([3.0 * np.sin(points[..., 1] / 6.0) + 40.0,  # a large shift too: removed before float32
                  2.0 * np.cos(points[..., 2] / 5.0) * np.sin(points[..., 0] / 7.0),
                  1.5 * np.sin(points[..., 0] / 4.0 + points[..., 2] / 9.0)], axis=-1)
    det = jacobian_determinant(u, FINE)
    assert det.shape == FINE.shape_zyx and det.dtype == np.float32
    reference = _det_by_np_gradient(u, FINE)
    assert reference.min() < 0.8 and reference.max() > 1.2  # a field with real variation
    assert np.abs(det - reference).max() < 1e-4


@pytest.mark.parametrize("planes", [2, 3, SLAB_PLANES + 1])
def test_det_j_on_thin_grids(planes):
    grid = Grid((9, 7, planes), (1.0, 1.2, 2.0), (0.0, 0.0, 0.0), DIRECTION)
    points = grid.physical_points()
    u = np.stack([np.sin(points[..., 2] / 3.0), 0.5 * points[..., 0] / 10.0, np.cos(points[..., 1] / 4.0)], axis=-1)
    assert np.abs(jacobian_determinant(u, grid) - _det_by_np_gradient(u, grid)).max() < 1e-4


def test_det_j_refuses_a_flat_grid():
    with pytest.raises(ValueError, match="at least 2 voxels"):
        jacobian_determinant(np.zeros((1, 4, 4, 3)), FINE)


def test_slabwise_composition_with_an_affine_equals_the_whole_grid_formula():
    from nephireg.compose import compose_prealignment

    generator = np.random.default_rng(5)
    u = generator.normal(0.0, 3.0, (*FINE.shape_zyx, 3))
    prealign = np.eye(4)
    prealign[:3, :3] = [[1.05, 0.02, -0.01], [0.0, 0.97, 0.04], [0.03, 0.0, 1.02]]
    prealign[:3, 3] = [4.0, -7.0, 2.5]
    points = FINE.physical_points()
    expected = (points + u) @ prealign[:3, :3].T + prealign[:3, 3] - points  # A(x + u) - x
    composed = compose_prealignment(FINE, u, prealign)
    assert composed.dtype == np.float64 and np.abs(composed - expected).max() < 1e-9
    assert np.abs(compose_prealignment(FINE, u, np.eye(4)) - u).max() == 0.0  # a translation-free identity: u
    shift = np.eye(4)
    shift[:3, 3] = [4.0, -7.0, 2.5]
    for matrix in (prealign, shift):  # in place (the pipeline's use: u replaced by phi's displacement): the same
        new = compose_prealignment(FINE, u, matrix)
        in_place = u.copy()
        assert compose_prealignment(FINE, in_place, matrix, out=in_place) is in_place
        assert np.array_equal(in_place, new)
    with pytest.raises(ValueError, match="C-contiguous float64"):
        compose_prealignment(FINE, u, prealign, out=np.empty(u.shape, np.float32))


def test_separable_resampling_in_slabs_equals_point_sampling_and_checks_cancel_per_slab():
    field = _random_field(FINE.resampled((2.2, 2.8, 5.0)))
    calls = []
    per_slab = FINE.size[0] * FINE.size[1] * 2  # two z planes a slab
    fast = evaluate_on_grid(field, FINE, torch.device("cpu"), chunk_points=per_slab, cancel=lambda: calls.append(1))
    plain = evaluate_on_grid(PointsOnly(field), FINE, torch.device("cpu"))
    assert np.abs(fast - plain).max() < 1e-4
    assert len(calls) == -(-FINE.size[2] // 2)  # one check per slab: memory and cancellation flat in the grid size
