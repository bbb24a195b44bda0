import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nephireg import io
from nephireg.features import mind_ssc, ssc_pairs
from nephireg.geometry import Grid
from nephireg.jacobian import jacobian_determinant, jacobian_summary
from nephireg.schedule import ConstantCosineLinear
from nephireg.synthetic import rotation_direction

OBLIQUE = Grid((12, 10, 8), (1.0, 1.5, 2.5), (3.0, -4.0, 5.0), rotation_direction((15.0, -20.0, 25.0)))


def _affine_displacement(grid: Grid, matrix: np.ndarray) -> np.ndarray:
    """u(x) = (A - I)(x - c), the displacement of a linear map about the grid centre."""
    centred = grid.physical_points() - grid.center_physical()
    return centred @ (matrix - np.eye(3)).T


@pytest.mark.parametrize("scale", [0.8, 1.0, 1.3])
def test_uniform_scaling_has_det_scale_cubed_on_oblique_grid(scale):
    det = jacobian_determinant(_affine_displacement(OBLIQUE, np.eye(3) * scale), OBLIQUE)
    assert np.allclose(det, scale ** 3, atol=1e-5)


def test_shear_and_general_affine_match_closed_form():
    shear = np.eye(3)
    shear[0, 1] = 0.7  # x += 0.7 y: volume preserving
    assert np.allclose(jacobian_determinant(_affine_displacement(OBLIQUE, shear), OBLIQUE), 1.0, atol=1e-5)
    a = np.array([[1.1, 0.2, -0.1], [0.05, 0.9, 0.3], [0.0, -0.2, 1.2]])
    assert np.allclose(jacobian_determinant(_affine_displacement(OBLIQUE, a), OBLIQUE), np.linalg.det(a), atol=1e-5)


def test_folding_detected():
    flip = np.diag([-0.5, 1.0, 1.0])  # mirrors x: det < 0 everywhere
    det = jacobian_determinant(_affine_displacement(OBLIQUE, flip), OBLIQUE)
    summary = jacobian_summary(det)
    assert summary["folding_percent"] == pytest.approx(100.0)
    smooth = jacobian_summary(jacobian_determinant(_affine_displacement(OBLIQUE, np.eye(3) * 1.1), OBLIQUE))
    assert smooth["folding_percent"] == 0.0 and smooth["std_log_jacobian"] < 1e-4


def test_matches_simpleitk_on_a_smooth_field():
    grid = Grid((20, 18, 16), (1.0, 1.5, 2.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    pts = grid.physical_points()
    u = np.stack([2.0 * np.sin(pts[..., 1] / 9.0), 1.5 * np.cos(pts[..., 2] / 7.0), np.sin(pts[..., 0] / 5.0)], -1)
    ours = jacobian_determinant(u, grid)
    field = io.image_from_array(u, grid)
    theirs = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    inner = (slice(1, -1),) * 3  # ITK and numpy differ only in border handling
    assert np.allclose(ours[inner], theirs[inner], atol=1e-4)


def test_mind_is_invariant_to_monotone_intensity_remaps():
    torch.manual_seed(0)
    # float64: the exact-invariance check must not depend on float32 rounding of 3 * image + 7
    image = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 24, 24, 24, dtype=torch.float64), 3, 1, 1) + 0.5
    reference = mind_ssc(image)
    assert reference.shape == (1, 12, 24, 24, 24)
    linear = mind_ssc(3.0 * image + 7.0)  # exactly invariant
    assert torch.allclose(linear, reference, atol=1e-5)
    gamma = mind_ssc(image ** 1.3)  # monotone and smooth: nearly invariant
    assert (gamma - reference).abs().mean() < 0.03
    unrelated = mind_ssc(torch.rand(1, 1, 24, 24, 24, dtype=torch.float64))
    assert (unrelated - reference).abs().mean() > 5 * (gamma - reference).abs().mean()


def test_mind_with_shared_working_arrays_gives_the_same_features_as_without():
    """``MindScratch`` reuses the working arrays across calls (the two images of a pair); the features must be the
    same numbers as a call with fresh arrays, whatever the order and sizes of the calls, and must not change when
    the arrays are reused afterwards."""
    from nephireg.features import MindScratch

    torch.manual_seed(1)
    images = [torch.nn.functional.avg_pool3d(torch.rand(1, 1, *shape), 3, 1, 1)
              for shape in ((12, 14, 16), (20, 18, 22), (12, 14, 16))]  # grows, then smaller again
    for radius, dilation in ((1, 2), (0, 1), (2, 1)):
        scratch = MindScratch()
        shared = [mind_ssc(image, radius, dilation, scratch) for image in images]
        kept = [features.clone() for features in shared]
        mind_ssc(torch.rand(1, 1, 20, 18, 22), radius, dilation, scratch)  # overwrites the working arrays
        for image, features, copy in zip(images, shared, kept):
            assert torch.equal(features, mind_ssc(image, radius, dilation))
            assert torch.equal(features, copy)


def test_ssc_pairs_are_the_twelve_octahedron_edges():
    pairs = ssc_pairs()
    assert len({tuple(sorted(p)) for p in pairs}) == 12
    assert all(sum((x - y) ** 2 for x, y in zip(a, b)) == 2 for a, b in pairs)


def test_schedule_breakpoints():
    s = ConstantCosineLinear(lr=15.0, constant_until=70, cosine_until=180, linear_until=270,
                             cosine_floor=6.5 / 15.0, final_fraction=0.5 / 15.0)
    assert s(1) == 15.0 and s(70) == 15.0
    assert s(125) == pytest.approx(6.5 + (15.0 - 6.5) * 0.5, rel=1e-6)  # cosine midpoint
    assert s(180) == pytest.approx(6.5)
    assert s(225) == pytest.approx((6.5 + 0.5) / 2)  # linear midpoint
    assert s(270) == pytest.approx(0.5)
    values = [s(k) for k in range(1, 271)]
    assert all(a >= b for a, b in zip(values, values[1:])), "the schedule never increases"
    half = s.scaled_to(135)
    assert half.constant_until == 35 and half.linear_until == 135 and half(135) == pytest.approx(0.5)


def test_schedule_rejects_bad_breakpoints():
    with pytest.raises(ValueError):
        ConstantCosineLinear(constant_until=100, cosine_until=50)
    assert math.isclose(ConstantCosineLinear().total_steps, 270)


def test_adam_smoothing_equals_repeated_box_filters_inside_and_keeps_constants():
    import torch.nn.functional as F

    from nephireg.methods.adam import smooth

    u = torch.rand(1, 3, 14, 15, 16, dtype=torch.float64)
    reference = u
    for _ in range(3):
        reference = F.avg_pool3d(F.pad(reference, (1,) * 6, mode="replicate"), 3, stride=1)
    inner = (Ellipsis, slice(3, -3), slice(3, -3), slice(3, -3))
    assert torch.allclose(smooth(u, 3)[inner], reference[inner])
    constant = torch.full((1, 3, 8, 8, 8), 2.5, dtype=torch.float64)
    assert torch.allclose(smooth(constant, 3), constant)
    assert smooth(u, 0) is u


def test_adam_smoothing_gradient_is_the_exact_adjoint():
    from nephireg.methods.adam import smooth

    for shape in ((1, 3, 5, 6, 7), (1, 3, 2, 1, 4)):  # axes shorter than the filter's reach too
        u = torch.rand(*shape, dtype=torch.float64, requires_grad=True)
        for passes in (1, 3):
            assert torch.autograd.gradcheck(lambda v, p=passes: smooth(v, p), (u,))


@pytest.mark.parametrize("shape", [(1, 3, 9, 8, 10), (1, 3, 2, 1, 4)])
def test_adam_smoothing_is_the_separable_filter_of_the_replicate_padded_field(shape):
    import torch.nn.functional as F

    from nephireg.methods.adam import _box_taps, smooth

    u = torch.rand(*shape, dtype=torch.float64)
    taps = _box_taps(3, torch.float64, torch.device("cpu"))  # 7 taps
    padded = _replicate(u, 3)
    kernel = taps[:, None, None] * taps[None, :, None] * taps[None, None, :]
    reference = F.conv3d(padded.reshape(3, 1, *padded.shape[2:]), kernel[None, None]).reshape(u.shape)
    assert torch.allclose(smooth(u, 3), reference, rtol=1e-12, atol=1e-14)


def _replicate(u, margin):
    """Replicate padding by ``margin`` on the last three axes, for axes shorter than the margin too."""
    for dim in (2, 3, 4):
        size = u.shape[dim]
        index = torch.arange(-margin, size + margin).clamp(0, size - 1)
        u = u.index_select(dim, index)
    return u


def test_adam_diffusion_term_matches_its_definition_with_its_written_out_gradient():
    from nephireg.methods.adam import diffusion

    torch.manual_seed(0)
    spacing = (1.3, 0.7, 2.5)  # x, y, z (mm)
    u = torch.rand(1, 3, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    dz = (u[:, :, 1:] - u[:, :, :-1]) / 2.5
    dy = (u[:, :, :, 1:] - u[:, :, :, :-1]) / 0.7
    dx = (u[:, :, :, :, 1:] - u[:, :, :, :, :-1]) / 1.3
    definition = (dz ** 2).mean() + (dy ** 2).mean() + (dx ** 2).mean()
    assert torch.allclose(diffusion(u, spacing), definition, rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(lambda v: diffusion(v, spacing), (u,))
    linear = (torch.arange(5, dtype=torch.float64) * 2.5 * 0.3).reshape(1, 1, 5, 1, 1).expand(1, 3, 5, 6, 7)
    assert math.isclose(float(diffusion(linear, spacing)), 0.3 ** 2, rel_tol=1e-12)  # 0.3 mm/mm along z, each component
    flat = torch.rand(1, 3, 1, 6, 7, dtype=torch.float64, requires_grad=True)  # one plane: the z term adds 0
    in_plane = ((flat[..., 1:, :] - flat[..., :-1, :]) / 0.7) ** 2
    across = ((flat[..., 1:] - flat[..., :-1]) / 1.3) ** 2
    assert torch.allclose(diffusion(flat, spacing), in_plane.mean() + across.mean(), rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(lambda v: diffusion(v, spacing), (flat,))


@pytest.mark.parametrize("masked", [True, False])
def test_adam_mind_data_term_equals_the_mean_squared_difference_of_the_sampled_features(masked):
    from nephireg.methods.adam import MindDataTerm
    from nephireg.sampling import identity_normalised, sample_normalised

    torch.manual_seed(1)
    shape = (19, 21, 25)  # z, y, x: 9975 voxels, an odd count over the 2 batch entries of 2 threads
    grid = Grid(shape[::-1], (1.0, 1.5, 2.5), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    target = torch.rand(1, 5, *shape, dtype=torch.float64)
    source = torch.rand(1, 5, *shape, dtype=torch.float64)
    mask = (torch.arange(9975) < 9001).reshape(1, 1, *shape) if masked else None  # 9001 points: odd too
    u = (torch.rand(1, 3, *shape, dtype=torch.float64) * 4 - 2).requires_grad_(True)  # mm, some points outside
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the CPU path splits the points into batch entries, the last one padded
    try:
        term = MindDataTerm(target, source, grid, mask)
        loss = term(u)
    finally:
        torch.set_num_threads(threads)
    assert (term.batches.parts, term.batches.filler) == (2, 1)
    to_normalised = torch.as_tensor(grid.physical_to_normalised()[:3, :3])
    points = identity_normalised(grid.shape_zyx, dtype=torch.float64) + \
        (u.reshape(3, -1).T @ to_normalised.T).reshape(1, *shape, 3)
    difference = (sample_normalised(source, points, padding="border") - target) ** 2  # (1, 5, Z, Y, X)
    reference = difference.mean() if mask is None else difference[mask.expand_as(difference)].mean()
    grad, = torch.autograd.grad(loss, u)
    reference_grad, = torch.autograd.grad(reference, u)
    assert torch.allclose(loss, reference, rtol=1e-12, atol=0)
    assert torch.allclose(grad, reference_grad, rtol=1e-9, atol=1e-15)


def test_point_batches_give_the_samplers_layout_with_the_filler_last():
    from nephireg.sampling import PointBatches

    with pytest.raises(ValueError):
        PointBatches(count=5, parts=4)  # 2 per entry: 3 filler points would spill out of the last entry
    assert PointBatches.for_points(0, torch.device("cpu")).parts == 1  # no points: one empty entry

    batches = PointBatches(count=10, parts=3)  # 4 points per part, the last 2 of the last part filler
    assert (batches.per_part, batches.filler) == (4, 2)
    values = torch.arange(20.0).reshape(2, 10)  # (C, P)
    arranged = batches.arrange(values)
    assert arranged.shape == (3, 2, 4)
    assert torch.equal(arranged[1, 1], values[1, 4:8]) and torch.equal(arranged[2, 0], torch.tensor([8.0, 9, 0, 0]))
    volume = torch.rand(1, 2, 4, 5, 6, dtype=torch.float64)
    points = torch.rand(10, 3, dtype=torch.float64) * 2 - 1
    sampled = batches.sample(volume, points)
    from nephireg.sampling import sample_normalised

    whole = sample_normalised(volume, points.reshape(1, -1, 1, 1, 3)).reshape(2, 10)
    assert torch.allclose(sampled.transpose(0, 1).reshape(2, -1)[:, :10], whole)


def test_split_sampling_matches_one_batch_values_and_gradients():
    from nephireg.sampling import sample_flat, sample_normalised

    torch.manual_seed(0)
    volume = torch.rand(1, 4, 9, 10, 11, dtype=torch.float64)
    points = (torch.rand(10_001, 3, dtype=torch.float64) * 2.2 - 1.1).requires_grad_(True)  # some outside
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the CPU path splits the points into one batch entry per thread
    try:
        split = sample_flat(volume, points)
    finally:
        torch.set_num_threads(threads)
    (split ** 2).sum().backward()
    split_grad = points.grad.clone()
    points.grad = None
    whole = sample_normalised(volume, points.reshape(1, -1, 1, 1, 3)).reshape(4, -1)
    (whole ** 2).sum().backward()
    assert split.shape == (4, 10_001)
    assert torch.allclose(split, whole) and torch.allclose(split_grad, points.grad)


def test_channels_last_volumes_sample_to_the_same_values_and_gradients():
    from nephireg.sampling import channels_last, sample_flat

    torch.manual_seed(0)
    volume = torch.rand(1, 12, 9, 10, 11, dtype=torch.float64)
    fast = channels_last(volume)
    assert fast.is_contiguous(memory_format=torch.channels_last_3d) and torch.equal(fast, volume)
    grads = []
    for v in (volume, fast):
        points = (torch.rand(3000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1)
        points.requires_grad_(True)
        values = sample_flat(v, points)
        (values ** 2).sum().backward()
        grads.append((values.detach(), points.grad))
    assert torch.allclose(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1])


def test_engine_adam_follows_torch_adam_step_for_step():
    from nephireg.optim import Adam

    torch.manual_seed(0)
    target = torch.randn(4, 5, dtype=torch.float64)
    ours = [torch.zeros(4, 5, dtype=torch.float64, requires_grad=True),
            torch.ones(3, dtype=torch.float64, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_(True) for p in ours]
    mine = Adam([([ours[0]], 0.1), ([ours[1]], 0.02)])
    reference = torch.optim.Adam([{"params": [theirs[0]], "lr": 0.1}, {"params": [theirs[1]], "lr": 0.02}])
    for step in range(25):
        scale = 1.0 if step < 10 else 0.5  # a schedule changes the rates between steps
        for group, rate in zip(mine.groups, (0.1, 0.02)):
            group["lr"] = rate * scale
        for group, rate in zip(reference.param_groups, (0.1, 0.02)):
            group["lr"] = rate * scale
        for params, optimiser in ((ours, mine), (theirs, reference)):
            optimiser.zero_grad()
            (((params[0] - target) ** 2).sum() + (params[1] ** 3).sum()).backward()
            optimiser.step()
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(ours, theirs))
    assert not torch.allclose(ours[0], torch.zeros(4, 5, dtype=torch.float64))


def test_mind_box_filter_equals_a_replicate_padded_average_pool():
    import torch.nn.functional as F

    from nephireg.features import _box_filter

    volume = torch.rand(1, 3, 9, 10, 11, dtype=torch.float64)
    for radius in (1, 2):
        reference = F.avg_pool3d(F.pad(volume, (radius,) * 6, mode="replicate"), 2 * radius + 1, stride=1)
        assert torch.allclose(_box_filter(volume, radius), reference)
    assert torch.equal(_box_filter(volume, 0), volume)


def test_jacobian_stays_exact_far_from_the_origin_with_a_large_shift():
    """float32 inside: a composed 500 mm shift and coordinates ~1200 mm away must not cost accuracy."""
    grid = Grid((40, 50, 30), (0.5, 0.7, 1.0), (-200.0, 300.0, -1200.0), OBLIQUE.direction)
    points = grid.physical_points()
    a = np.array([[1.1, 0.05, 0.0], [0.02, 0.95, 0.03], [0.0, 0.04, 1.05]])
    displacement = points @ a.T - points + np.array([300.0, -250.0, 400.0])
    assert np.abs(jacobian_determinant(displacement, grid) - np.linalg.det(a)).max() < 1e-5


def _pairwise_mind_distances(image: torch.Tensor, radius: int, dilation: int) -> torch.Tensor:
    """The SSC patch distances by their definition, pair by pair: box_r (I(x + d a) - I(x + d b))^2, (1, 12, ...)."""
    import torch.nn.functional as F

    from nephireg.features import _box_filter

    d = dilation
    z, y, x = image.shape[2:]
    padded = F.pad(image, (d,) * 6, mode="replicate")

    def shifted(offset):
        oz, oy, ox = (d + d * o for o in offset)
        return padded[:, :, oz:oz + z, oy:oy + y, ox:ox + x]

    return _box_filter(torch.cat([(shifted(a) - shifted(b)) ** 2 for a, b in ssc_pairs()], dim=1), radius)


@pytest.mark.parametrize("radius, dilation", [(1, 2), (0, 1), (2, 1)])
def test_mind_from_six_directions_equals_the_pairwise_definition_inside(radius, dilation):
    """The 12 channels come from 6 box-filtered directions (features.mind_ssc): away from the border, where both
    paddings agree, they equal MIND-SSC built pair by pair; at the border they stay close."""
    torch.manual_seed(3)
    image = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 26, 22, 20, dtype=torch.float64), 3, 1, 1) + 0.2
    ssd = _pairwise_mind_distances(image, radius, dilation)
    ssd = ssd - ssd.min(dim=1, keepdim=True).values
    variance = ssd.mean(dim=1, keepdim=True)  # a textured image: the clamp of mind_ssc does not act here
    reference = torch.exp(-ssd / variance)
    ours = mind_ssc(image, radius, dilation)
    margin = 2 * dilation + radius
    inside = (slice(None), slice(None)) + (slice(margin, -margin),) * 3
    assert torch.allclose(ours[inside], reference[inside], atol=1e-10)
    assert (ours - reference).abs().mean() < 0.1  # most of these small volumes lie within the margin
    assert not torch.allclose(ours, mind_ssc(image.flip(2), radius, dilation))  # the channels are not symmetric
