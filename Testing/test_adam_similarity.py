"""Continuous Adam's similarity option: MIND-SSC, or MIND-SSC and intensities, as squared feature differences, and
the local normalised cross-correlation (LNCC) alone or added to them."""

import pytest
import SimpleITK as sitk
import torch

from conftest import StageLog, sample_mask
from nephireg import io
from nephireg.errors import InputError
from nephireg.methods.adam import Settings, features
from nephireg.pipeline import Request, register
from nephireg.synthetic import warp_error_mm


def assert_recovers_the_known_warp(small_pair, out, options) -> None:
    """``adam`` (generic preset, these options on top) on the small pair: the error of the known warp inside the
    mask falls below 0.6 of its start, with 0 % folding."""
    manifest = register(Request(small_pair["fixed"], small_pair["moving"], str(out), method="adam", preset="generic",
                                prealign="none", fixed_mask=small_pair["fixed_mask"], write_overview=False,
                                options={"iterations": 60, "coarse_iterations": 40, **options}))
    points = sample_mask(small_pair["mask"], 600)
    before = warp_error_mm(sitk.Transform(3, sitk.sitkIdentity), small_pair["truth"], small_pair["grid"], points)
    after = warp_error_mm(io.read_transform(out / "transform.h5"), small_pair["truth"], small_pair["grid"], points)
    assert after.mean() < 0.6 * before.mean(), (before.mean(), after.mean())
    assert manifest["metrics"]["folding_percent"] == 0.0

def test_features_have_the_channels_each_similarity_names():
    image = torch.rand(1, 1, 12, 11, 10)
    mind = features(image, Settings(similarity="mind"))
    both = features(image, Settings(similarity="mind+intensity"))
    assert mind.shape == (1, 12, 12, 11, 10) and both.shape == (1, 13, 12, 11, 10)
    assert torch.equal(both[:, :12], mind)
    assert torch.allclose(both[:, 12:], image * 12 ** 0.5)  # as much weight as the 12 MIND channels together
    assert features(image, Settings(similarity="lncc")).shape[1] == 0  # LNCC compares the images themselves
    assert torch.equal(features(image, Settings(similarity="mind+lncc")), mind)
    assert torch.equal(features(image, Settings(similarity="mind+intensity+lncc")), both)


def test_adam_recovers_a_known_deformation_with_mind_and_intensity(small_pair, tmp_path, one_torch_thread):
    similarity = "mind+intensity"
    out = tmp_path / similarity
    assert_recovers_the_known_warp(small_pair, out, {"similarity": similarity})


def test_unknown_similarity_is_refused():
    with pytest.raises(InputError, match="similarity"):
        Settings.from_options({"similarity": "intensity"})


def test_local_ncc_is_one_for_an_affine_intensity_change_and_lower_for_noise():
    from nephireg.lncc import local_ncc

    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, 20, 20, 20, generator=generator)  # local variances ~0.08 >> lncc.EPSILON
    assert torch.allclose(local_ncc(image, 2.0 - 3.0 * image, 2)[..., 3:-3, 3:-3, 3:-3], torch.ones(1), atol=1e-2)
    noise = torch.rand(1, 1, 20, 20, 20, generator=generator)
    assert local_ncc(image, noise, 2).mean() < 0.2


@pytest.mark.parametrize("similarity", ["lncc", "mind+lncc", "mind+intensity+lncc"])
def test_adam_recovers_a_known_deformation_with_lncc(similarity, small_pair, tmp_path, one_torch_thread):
    out = tmp_path / similarity
    manifest = register(Request(small_pair["fixed"], small_pair["moving"], str(out), method="adam", preset="generic",
                                prealign="none", fixed_mask=small_pair["fixed_mask"], write_overview=False,
                                options={"iterations": 60, "coarse_iterations": 40, "similarity": similarity,
                                         "lncc_radius": 2, "regularization": 1.0}))
    points = sample_mask(small_pair["mask"], 600)
    before = warp_error_mm(sitk.Transform(3, sitk.sitkIdentity), small_pair["truth"], small_pair["grid"], points)
    after = warp_error_mm(io.read_transform(out / "transform.h5"), small_pair["truth"], small_pair["grid"], points)
    assert after.mean() < 0.6 * before.mean(), (before.mean(), after.mean())
    assert manifest["metrics"]["folding_percent"] == 0.0


@pytest.mark.parametrize("option, value", [("lncc_radius", 0), ("lncc_radius", 2.5), ("lncc_weight", 0.0),
                                           ("lncc_weight", -1.0)])
def test_bad_lncc_options_are_refused(option, value):
    with pytest.raises(InputError, match=option):
        Settings.from_options({"similarity": "lncc", option: value})


def test_mind_on_a_pooled_grid_recovers_a_known_deformation(small_pair, tmp_path, one_torch_thread):
    """mind_pooling 2: MIND-SSC of the images block-averaged by 2 (dilation 1 there = 2 working voxels), pooled on
    to the level grids from there."""
    out = tmp_path / "pooled"
    assert_recovers_the_known_warp(small_pair, out, {"mind_pooling": 2, "mind_dilation": 1, "mind_radius": 0})


def test_block_averages_compose_so_pooled_features_land_on_each_level():
    from nephireg.geometry import Grid
    from nephireg.sampling import pool, pooled_grid

    volume = torch.rand(1, 2, 13, 18, 9, dtype=torch.float64)
    assert torch.allclose(pool(pool(volume, 2), 2), pool(volume, 4))
    grid = Grid((9, 18, 13), (1.5, 1.0, 2.0), (4.0, -3.0, 7.0), (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    twice, once = pooled_grid(pooled_grid(grid, 2), 2), pooled_grid(grid, 4)
    assert twice.size == once.size and twice.spacing == once.spacing
    assert all(abs(a - b) < 1e-9 for a, b in zip(twice.origin, once.origin))


def test_mind_pooling_that_does_not_divide_the_levels_is_refused(small_pair, tmp_path):
    """Refused with the request's geometry check, before the pre-alignment or any method work."""
    log = StageLog()
    with pytest.raises(InputError, match="mind_pooling=3 must divide"):
        register(Request(small_pair["fixed"], small_pair["moving"], str(tmp_path / "out"), method="adam",
                         preset="generic", prealign="affine", write_overview=False,
                         options={"mind_pooling": 3, "levels": [4, 2]}), log)
    assert not (tmp_path / "out").exists()
    assert "prealign" not in log.names and "features" not in log.names, log.names


def test_foreground_region_is_the_dilated_nonzero_blocks_on_the_level_grid():
    """data_region=foreground: level voxels whose block holds intensity > 0, dilated by 6 mm per axis (z, y, x)."""
    from nephireg.geometry import Grid
    from nephireg.methods.adam import FOREGROUND_MARGIN_MM, foreground
    from nephireg.sampling import pooled_grid

    image = torch.zeros(1, 1, 20, 24, 28)
    image[0, 0, 9, 10:12, 13] = 0.5  # z 9 -> level block 4; y 10-11 -> 5; x 13 -> 6
    working = Grid((28, 24, 20), (1.5, 1.0, 3.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    level = pooled_grid(working, 2)  # spacing x 3 mm, y 2 mm, z 6 mm: margins 2, 3 and 1 voxels
    assert FOREGROUND_MARGIN_MM == 6.0
    region = foreground(image, 2, level)
    expected = torch.zeros(1, 1, 10, 12, 14, dtype=torch.bool)
    expected[0, 0, 3:6, 2:9, 4:9] = True
    assert torch.equal(region, expected)


def test_a_fixed_mask_takes_precedence_over_the_foreground():
    from nephireg.geometry import Grid
    from nephireg.methods.adam import _weights
    from nephireg.pair import PreparedPair
    from nephireg.sampling import pooled_grid

    grid = Grid((8, 8, 8), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    image = torch.zeros(1, 1, 8, 8, 8)
    image[..., 1, 1, 1] = 1.0
    mask = torch.zeros(1, 1, 8, 8, 8)
    mask[..., 6:, 6:, 6:] = 1.0
    level = pooled_grid(grid, 2)
    with_mask = PreparedPair(grid, image, image, mask, None)
    without = PreparedPair(grid, image, image, None, None)
    masked = _weights(with_mask, 2, level, "foreground")
    assert torch.equal(masked, _weights(with_mask, 2, level, "mask"))
    assert masked[0, 0, 3, 3, 3] and not masked[0, 0, 0, 0, 0]  # the mask's block, not the image's
    assert _weights(without, 2, level, "mask") is None
    region = _weights(without, 2, level, "foreground")
    assert region.sum() == 27 and region[0, 0, :3, :3, :3].all()  # block 0 dilated by 6 mm = 2 voxels of 4 mm


def test_lncc_over_the_mask_window_equals_the_whole_grid_value_and_gradient():
    """LnccDataTerm samples only the mask's box widened by the radius: the loss and its gradient are those of the
    whole-grid computation restricted to the mask."""
    from nephireg.geometry import Grid
    from nephireg.lncc import local_ncc
    from nephireg.methods.adam import LnccDataTerm
    from nephireg.sampling import identity_normalised, matrix_tensor, sample_flat
    from nephireg.synthetic import rotation_direction

    generator = torch.Generator().manual_seed(5)
    grid = Grid((18, 16, 14), (2.0, 2.5, 3.0), (1.0, -2.0, 3.0), rotation_direction((10.0, -5.0, 20.0)))
    smooth3 = lambda v: torch.nn.functional.avg_pool3d(v, 3, 1, 1)  # noqa: E731
    fixed = smooth3(torch.rand(1, 1, 14, 16, 18, generator=generator, dtype=torch.float64))
    moving = smooth3(torch.rand(1, 1, 14, 16, 18, generator=generator, dtype=torch.float64))
    mask = torch.zeros(1, 1, 14, 16, 18, dtype=torch.bool)
    mask[0, 0, 4:9, 0:6, 7:12] = True  # touches the y border
    mask[0, 0, 6, 10, 8] = True
    u = (torch.randn(1, 3, 14, 16, 18, generator=generator, dtype=torch.float64) * 2.0).requires_grad_(True)
    ours = LnccDataTerm(fixed, moving, grid, mask, radius=2)(u)
    (ours_grad,) = torch.autograd.grad(ours, u)
    identity = identity_normalised(grid.shape_zyx, dtype=fixed.dtype).reshape(-1, 3)
    points = identity + u.reshape(3, -1).T @ matrix_tensor(grid.physical_to_normalised(), fixed)[:3, :3].T
    warped = sample_flat(moving, points).reshape(fixed.shape)
    reference = 1.0 - local_ncc(fixed, warped, 2)[mask].mean()
    (reference_grad,) = torch.autograd.grad(reference, u)
    assert torch.allclose(ours, reference, atol=1e-12) and 0.05 < reference.item() < 1.0
    assert torch.allclose(ours_grad, reference_grad, atol=1e-12) and reference_grad.abs().max() > 0
    assert reference_grad[:, :, :, 13:].abs().max() == 0  # no box of a masked voxel reaches y >= 13


def test_local_ncc_equals_the_squared_correlation_of_each_box():
    from nephireg.lncc import EPSILON, local_ncc

    generator = torch.Generator().manual_seed(2)
    fixed = torch.rand(1, 1, 9, 10, 11, generator=generator, dtype=torch.float64)
    moving = 0.5 * fixed + torch.rand(1, 1, 9, 10, 11, generator=generator, dtype=torch.float64)
    cc = local_ncc(fixed, moving, 2)
    for z, y, x in ((4, 5, 5), (2, 2, 8), (6, 7, 2)):
        f = fixed[0, 0, z - 2:z + 3, y - 2:y + 3, x - 2:x + 3].reshape(-1)
        m = moving[0, 0, z - 2:z + 3, y - 2:y + 3, x - 2:x + 3].reshape(-1)
        cov = ((f - f.mean()) * (m - m.mean())).mean()
        direct = cov ** 2 / (f.var(unbiased=False) * m.var(unbiased=False) + EPSILON)
        assert torch.isclose(cc[0, 0, z, y, x], direct, atol=1e-10), (z, y, x)
