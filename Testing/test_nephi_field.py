"""NePhi field: twice-differentiable trilinear sampling, identity at initialisation, GradICON, model files."""

from __future__ import annotations

import pytest
import torch

from nephireg.errors import InputError
from nephireg.geometry import Grid
from nephireg.nephi.encoder import Encoder, EncoderConfig
from nephireg.nephi.field import FieldConfig, NePhiNet, zero_codes
from nephireg.nephi.losses import PointSampler, gradicon, ncc
from nephireg.nephi.model_io import load_model, read_payload, save_model
from nephireg.nephi.objective import LossSettings, PairImages, pair_loss
from nephireg.nephi.output import NePhiField, lattice_field
from nephireg.nephi.trilinear import trilinear
from nephireg.sampling import grid_points_mm, sample_normalised

SMALL = FieldConfig(global_dim=4, local_dim=4, fourier_features=16, hidden=32)


def _points(n: int, low: float = -1.2, high: float = 1.2, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, generator=g, dtype=dtype) * (high - low) + low


def test_trilinear_matches_grid_sample_inside_and_beyond_the_border():
    volume = torch.randn(5, 6, 7, 8, generator=torch.Generator().manual_seed(1))
    pts = _points(500)  # 20 % of the range lies beyond the border: border padding must match
    reference = sample_normalised(volume[None], pts.reshape(1, -1, 1, 1, 3)).reshape(5, -1).t()
    assert torch.allclose(trilinear(volume, pts), reference, atol=1e-5)


def test_trilinear_passes_gradcheck_and_gradgradcheck():
    volume = torch.randn(2, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    pts = _points(6, -0.9, 0.9, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(trilinear, (volume, pts))
    assert torch.autograd.gradgradcheck(trilinear, (volume, pts))


def test_fresh_field_is_the_identity_in_millimetres():
    net = NePhiNet(SMALL)
    grid = Grid((9, 8, 7), (1.5, 2.0, 2.5), (10.0, -20.0, 30.0), (0, 1, 0, -1, 0, 0, 0, 0, 1))
    field = NePhiField(net, zero_codes(SMALL, (3, 3, 3)), grid)
    pts = grid_points_mm(grid).reshape(-1, 3)
    assert torch.count_nonzero(field.displacement_mm(pts)) == 0


class _Translations(torch.nn.Module):
    """A stand-in with NePhiNet's interface: phi = x + a, phi^-1 = x + b."""

    def __init__(self, forward_shift, backward_shift):
        super().__init__()
        self.a, self.b = torch.tensor(forward_shift), torch.tensor(backward_shift)

    def transform(self, points, codes, inverse=False):
        return points + (self.b if inverse else self.a)

    def transform_pair(self, forward_points, backward_points, codes):
        return self.transform(forward_points, codes), self.transform(backward_points, codes, inverse=True)


class _Affine(_Translations):
    def __init__(self, matrix, inverse_matrix):
        super().__init__([0.0] * 3, [0.0] * 3)
        self.m, self.mi = matrix, inverse_matrix

    def transform(self, points, codes, inverse=False):
        return points @ (self.mi if inverse else self.m).t()


def test_gradicon_is_zero_for_inverse_maps_and_positive_otherwise():
    pts = _points(50)
    assert gradicon(_Translations([0.1, -0.2, 0.3], [-0.1, 0.2, -0.3]), None, pts) < 1e-10
    matrix = torch.tensor([[1.1, 0.2, 0.0], [0.0, 0.9, 0.1], [0.05, 0.0, 1.2]])
    assert gradicon(_Affine(matrix, torch.linalg.inv(matrix)), None, pts) < 1e-8
    # translations are never penalised (their Jacobians are I); a wrong linear inverse is
    assert gradicon(_Affine(matrix, torch.eye(3)), None, pts) > 0.05


def test_transform_pair_gives_the_numbers_of_two_transform_calls():
    net = NePhiNet(SMALL)
    for mlp in (net.forward_map, net.backward_map):
        torch.nn.init.normal_(mlp.out.weight, std=0.1)
    codes = (torch.full((4,), 0.1), torch.randn(4, 3, 4, 5, generator=torch.Generator().manual_seed(2)))
    a, b = _points(30, seed=1), _points(20, seed=2)
    there, back = net.transform_pair(a, b, codes)
    assert torch.allclose(there, net.transform(a, codes), atol=1e-6)
    assert torch.allclose(back, net.transform(b, codes, inverse=True), atol=1e-6)
    shared = net.transform_pair(a, a, codes)  # the same points for both maps: one embedding and gather
    assert torch.allclose(shared[1], net.transform(a, codes, inverse=True), atol=1e-6)
    assert not torch.allclose(shared[0], shared[1], atol=1e-3)  # the two maps differ: the checks can fail


def test_gradicon_of_a_real_field_has_a_second_derivative():
    net = NePhiNet(SMALL)
    torch.nn.init.normal_(net.forward_map.out.weight, std=0.1)
    codes = tuple(torch.nn.Parameter(c + 0.1) for c in zero_codes(SMALL, (3, 3, 3)))
    loss = gradicon(net, codes, _points(20, -0.9, 0.9))
    assert loss > 0
    loss.backward()
    assert net.forward_map.synthesis[0].weight.grad.abs().sum() > 0
    assert codes[1].grad.abs().sum() > 0  # through the trilinear gather's double backward


def test_point_jacobian_is_exact_and_differentiable():
    from nephireg.nephi.losses import jacobian

    torch.manual_seed(0)
    points = torch.rand(7, 3, dtype=torch.float64)
    weights = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)

    def fn(x):  # a nonlinear pointwise map with a closed-form Jacobian
        return torch.sin(x @ weights.t())

    ours = jacobian(fn, points)
    closed = torch.cos(points @ weights.t())[:, :, None] * weights[None]  # rows = output components
    assert torch.allclose(ours, closed)
    assert torch.autograd.gradcheck(lambda w: jacobian(lambda x: torch.sin(x @ w.t()), points), (weights,))


def test_finite_difference_jacobian_matches_the_exact_one():
    from nephireg.nephi.losses import jacobian, jacobian_fd

    torch.manual_seed(0)
    points = torch.rand(40, 3) * 1.6 - 0.8
    matrix = torch.tensor([[1.1, 0.2, 0.0], [0.0, 0.9, 0.1], [0.05, 0.0, 1.2]])
    affine = jacobian_fd(lambda x: x @ matrix.t() + torch.tensor([0.1, -0.2, 0.3]), points)
    assert torch.allclose(affine, matrix.expand(40, 3, 3), atol=5e-4)  # float32 round-off at the 1e-3 step
    # a strongly curved NePhi field: forward differences are first order (error ~ step x curvature), and a point
    # whose step crosses a ReLU kink or a face of the trilinear code's cells sees a blend of both sides
    net = NePhiNet(SMALL)
    torch.nn.init.normal_(net.forward_map.out.weight, std=0.3)
    codes = tuple(c + 0.2 for c in zero_codes(SMALL, (3, 3, 3)))
    exact = jacobian(lambda x: net.transform(x, codes), points).detach()
    approx = jacobian_fd(lambda x: net.transform(x, codes), points).detach()
    departure = (exact - torch.eye(3)).abs().amax(dim=(1, 2)).median()
    error = (approx - exact).abs().amax(dim=(1, 2)).median()
    assert departure > 0.5 and error < 0.02 * departure, (float(departure), float(error))  # measured 0.94 / 0.010


def test_gradicon_by_finite_differences_agrees_with_the_exact_one_and_trains():
    pts = _points(50, -0.9, 0.9)
    matrix = torch.tensor([[1.1, 0.2, 0.0], [0.0, 0.9, 0.1], [0.05, 0.0, 1.2]])
    assert gradicon(_Affine(matrix, torch.linalg.inv(matrix)), None, pts, "fd") < 1e-5  # exact inverses: ~0
    wrong = _Affine(matrix, torch.eye(3))
    assert torch.isclose(gradicon(wrong, None, pts, "fd"), gradicon(wrong, None, pts), rtol=1e-3)
    net = NePhiNet(SMALL)
    torch.nn.init.normal_(net.forward_map.out.weight, std=0.1)
    codes = tuple(torch.nn.Parameter(c + 0.1) for c in zero_codes(SMALL, (3, 3, 3)))
    exact, approx = gradicon(net, codes, pts), gradicon(net, codes, pts, "fd")
    assert exact > 1e-4 and torch.isclose(approx, exact, rtol=0.02), (float(exact), float(approx))
    approx.backward()  # one backward, no double backward: still reaches the weights and the local code grid
    assert net.forward_map.synthesis[0].weight.grad.abs().sum() > 0
    assert codes[1].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="GradICON Jacobian"):
        gradicon(net, codes, pts, "central")


def _model(tmp_path):
    torch.manual_seed(0)
    net = NePhiNet(SMALL, seed=3)
    torch.nn.init.normal_(net.forward_map.out.weight, std=0.05)
    encoder = Encoder(EncoderConfig(input_shape=(66, 66, 66), global_dim=4, local_dim=4, local_convs=1,
                                    local_channels=8))
    path = tmp_path / "model.pt"
    save_model(path, net, encoder, {"note": "test"})
    return net, encoder, path


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    net, encoder, path = _model(tmp_path)
    model = load_model(path)
    assert torch.equal(model.net.fourier_matrix, net.fourier_matrix)
    pts = _points(100)
    codes = (torch.randn(4), torch.randn(4, 3, 3, 3))
    with torch.no_grad():
        assert torch.equal(model.net.transform(pts, codes), net.eval().transform(pts, codes))
        images = torch.rand(1, 1, 40, 44, 48), torch.rand(1, 1, 40, 44, 48)
        g, local = encoder.eval()(*images)
        g2, local2 = model.predict_codes(*images)
    assert torch.equal(g[0], g2) and torch.equal(local[0], local2)
    assert model.metadata == {"note": "test"}


def test_bad_model_files_give_stated_errors(tmp_path):
    _, _, path = _model(tmp_path)
    with pytest.raises(InputError, match="not found"):
        load_model(tmp_path / "absent.pt")
    corrupt = tmp_path / "corrupt.pt"
    data = bytearray(path.read_bytes())
    corrupt.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(InputError, match="corrupt or not a model file"):
        load_model(corrupt)
    payload = read_payload(path)
    payload["format_version"] = 99
    newer = tmp_path / "newer.pt"
    torch.save(payload, newer)
    with pytest.raises(InputError, match="format version 99"):
        load_model(newer)
    payload["format_version"] = 1
    payload["field_config"] = dict(payload["field_config"], hidden=64)
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(InputError, match="incompatible model file"):
        load_model(tmp_path / "other.pt")


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_file_that_would_run_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "nephireg-nephi-model", "x": _Exploit()}, path)
    with pytest.raises(InputError, match="refused"):
        load_model(path)
    assert "must never run" not in capsys.readouterr().out


def test_lattice_output_matches_the_exact_field_for_a_smooth_field():
    """The lattice is exact at its nodes and close in between when the field is smooth on the lattice scale."""
    torch.manual_seed(0)
    net = NePhiNet(FieldConfig(global_dim=4, local_dim=4, fourier_features=16, hidden=32, fourier_scale=0.2))
    torch.nn.init.normal_(net.forward_map.out.weight, std=0.05)
    grid = Grid((30, 26, 22), (1.5, 1.5, 1.5), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    exact = NePhiField(net, (torch.zeros(4), torch.randn(4, 3, 3, 3) * 0.3), grid)
    pts = grid_points_mm(grid).reshape(-1, 3)[::7]
    reference = exact.displacement_mm(pts)
    approx = lattice_field(exact, grid, 2.0, torch.device("cpu")).displacement_mm(pts)
    assert reference.norm(dim=1).mean() > 0.05  # a real displacement (mm) ...
    assert (approx - reference).norm(dim=1).mean() < 0.05 * reference.norm(dim=1).mean()  # ... kept within 5 %
    nodes = lattice_field(exact, grid, 1.0, torch.device("cpu")).displacement_mm(pts)
    assert torch.allclose(nodes, reference, atol=1e-5)


def test_exact_field_output_does_not_depend_on_the_chunk_size():
    """NePhiField evaluates in chunks over a channels-last copy of the codes: the same numbers as the network."""
    from nephireg.sampling import normalised_to_physical, physical_to_normalised

    torch.manual_seed(0)
    net = NePhiNet(SMALL)
    torch.nn.init.normal_(net.forward_map.out.weight, std=0.05)
    grid = Grid((12, 10, 8), (1.5, 1.2, 2.0), (3.0, -4.0, 5.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    codes = (torch.randn(4), torch.randn(4, 3, 4, 5))
    pts = grid_points_mm(grid).reshape(-1, 3)
    x = physical_to_normalised(pts, grid)
    with torch.no_grad():
        direct = normalised_to_physical(net.transform(x, codes), grid) - normalised_to_physical(x, grid)
    for chunk in (None, 7, 100_000):
        difference = NePhiField(net, codes, grid, chunk_points=chunk).displacement_mm(pts) - direct
        assert difference.abs().max() < 1e-5  # mm, float32 rounding of differently blocked matrix products


def test_point_sampler_draws_inside_the_mask_voxels():
    from nephireg.nephi.losses import PointSampler

    mask = torch.zeros(1, 1, 5, 6, 7)
    mask[0, 0, 1, 2, 3] = 1  # voxel (i, j, k) = (3, 2, 1)
    pts = PointSampler((5, 6, 7), mask, torch.device("cpu")).sample(500, torch.Generator().manual_seed(0))
    centre = torch.tensor([2 * 3 / 6 - 1, 2 * 2 / 5 - 1, 2 * 1 / 4 - 1])
    half_voxel = torch.tensor([1 / 6, 1 / 5, 1 / 4])
    assert ((pts - centre).abs() <= half_voxel + 1e-6).all()
    assert ((pts - centre).abs().max(0).values > 0.8 * half_voxel).all()  # jittered over the whole voxel


def test_ncc_of_feature_channels_ignores_a_common_gain_and_each_channels_offset():
    a = torch.rand(12, 500, generator=torch.Generator().manual_seed(0))
    offsets = torch.linspace(-1, 1, 12)[:, None]
    assert float(ncc(2.5 * a + offsets, a)) == pytest.approx(1.0, abs=1e-5)
    assert float(ncc(a[:, torch.randperm(500)], a)) < 0.2
    assert float(ncc(a + offsets, a + offsets.flip(0))) == pytest.approx(1.0, abs=1e-5)  # offsets: centred away
    assert float(ncc(a[0], a[0] * 3 + 1)) == pytest.approx(1.0, abs=1e-5)  # one channel: (P,) as before


def test_the_similarity_compares_feature_volumes_when_the_pair_has_them():
    # two unrelated images whose (given) feature volumes are identical: at the identity the feature similarity is
    # perfect (loss 0), the intensity similarity is not
    gen = torch.Generator().manual_seed(0)
    fixed, moving = torch.rand(1, 1, 12, 12, 12, generator=gen), torch.rand(1, 1, 12, 12, 12, generator=gen)
    features = torch.rand(1, 3, 12, 12, 12, generator=gen)
    net = NePhiNet(SMALL)
    codes = zero_codes(SMALL, (3, 3, 3))
    settings = LossSettings(similarity_points=500, gradicon_weight=0.0, prior_weight=0.0)
    with_features = PairImages.build(fixed, moving, features=(features, features.clone()))
    plain = PairImages.build(fixed, moving)
    with torch.no_grad():
        feature_loss = float(pair_loss(net, codes, with_features, settings, gen)["similarity"])
        intensity_loss = float(pair_loss(net, codes, plain, settings, gen)["similarity"])
    assert feature_loss == pytest.approx(0.0, abs=1e-5) and intensity_loss > 0.5
    assert isinstance(plain.fixed_points, PointSampler)


def test_local_convs_widen_the_local_branch_without_changing_the_code_grid():
    plain = Encoder(EncoderConfig(input_shape=(66, 66, 66), global_dim=4, local_dim=5))
    deeper = Encoder(EncoderConfig(input_shape=(66, 66, 66), global_dim=4, local_dim=5, local_convs=2,
                                   local_channels=8))
    images = torch.rand(1, 1, 30, 34, 38), torch.rand(1, 1, 30, 34, 38)
    with torch.no_grad():
        (g1, l1), (g2, l2) = plain.eval()(*images), deeper.eval()(*images)
    assert l1.shape == l2.shape == (1, 5, 9, 9, 9) and g1.shape == g2.shape == (1, 4)
    assert len(deeper.local_convs) == 2 and len(plain.local_convs) == 0


def test_a_model_file_written_before_local_convs_existed_still_loads(tmp_path):
    # the session-1 file layout: an encoder configuration without the local_convs / local_channels keys
    _, _, path = _model(tmp_path)
    payload = read_payload(path)
    payload["encoder_config"] = {k: v for k, v in payload["encoder_config"].items()
                                 if k not in ("local_convs", "local_channels")}
    plain = Encoder(EncoderConfig(input_shape=(66, 66, 66), global_dim=4, local_dim=4))
    payload["encoder"] = plain.state_dict()
    torch.save(payload, tmp_path / "old.pt")
    model = load_model(tmp_path / "old.pt")
    assert model.encoder.config.local_convs == 0 and len(model.encoder.local_convs) == 0
    images = torch.rand(1, 1, 40, 44, 48), torch.rand(1, 1, 40, 44, 48)
    with torch.no_grad():
        assert torch.equal(model.predict_codes(*images)[1], plain.eval()(*images)[1][0])
    with pytest.raises(ValueError, match="local_convs"):
        EncoderConfig(local_convs=-1)
