"""NePhi + IO from identity on a small synthetic pair with a known smooth deformation; option validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nephireg.errors import InputError
from nephireg.fields import evaluate_on_grid
from nephireg.geometry import Grid
from nephireg.methods.nephi import Settings, run_instance_optimisation
from nephireg.pair import PreparedPair
from nephireg.progress import CallbackReporter, SilentReporter
from nephireg.protocol import Event
from nephireg.sampling import grid_points_mm, sample_points

N = 24


def _texture(n: int) -> torch.Tensor:
    """(1, 1, n, n, n) smoothed noise in [0, 1]: structure everywhere, so every displacement is identifiable."""
    noise = torch.rand(1, 1, n, n, n, generator=torch.Generator().manual_seed(0))
    kernel = torch.exp(-torch.arange(-4, 5.0) ** 2 / (2 * 1.5 ** 2))
    kernel = kernel / kernel.sum()
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 9
        noise = torch.nn.functional.conv3d(noise, kernel.reshape(shape), padding="same")
    return (noise - noise.min()) / (noise.max() - noise.min())


def _warp(points: torch.Tensor) -> torch.Tensor:
    """The known map T (mm): a smooth sine field plus a shift; moving(y) = fixed(T(y))."""
    p = points
    smooth = torch.stack([2.0 * torch.sin(p[:, 1] / 10), 1.5 * torch.cos(p[:, 2] / 12), 1.5 * torch.sin(p[:, 0] / 9)],
                         dim=1)
    return p + smooth + torch.tensor([1.5, -1.0, 0.5])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def known_pair():
    # oblique, anisotropic-free working grid (the pipeline's working grids are isotropic)
    c, s = np.cos(0.3), np.sin(0.3)
    grid = Grid((N, N, N), (2.0, 2.0, 2.0), (5.0, -40.0, 12.0), (c, -s, 0, s, c, 0, 0, 0, 1))
    fixed = _texture(N)
    pts = grid_points_mm(grid).reshape(-1, 3)
    moving = sample_points(fixed, grid, _warp(pts)).reshape(1, 1, N, N, N)
    return grid, PreparedPair(grid, fixed, moving), pts


def test_io_from_identity_recovers_a_known_deformation(known_pair):
    grid, pair, pts = known_pair
    events = []
    reporter = CallbackReporter(lambda event, fields: events.append((event, fields)))
    field = run_instance_optimisation(pair, {"iterations": 80, "similarity_points": 2000, "gradicon_points": 50,
                                             "regularization": 1.0, "grid_spacing_mm": 3.0}, reporter)
    u = torch.from_numpy(evaluate_on_grid(field, grid, torch.device("cpu"))).float().reshape(-1, 3)
    idx = torch.arange(N)
    inner = ((idx[:, None, None] >= 4) & (idx[:, None, None] < N - 4) & (idx[None, :, None] >= 4)
             & (idx[None, :, None] < N - 4) & (idx[None, None, :] >= 4) & (idx[None, None, :] < N - 4)).reshape(-1)
    before = (_warp(pts) - pts).norm(dim=1)[inner].mean()
    after = (_warp(pts + u) - pts).norm(dim=1)[inner].mean()
    assert before > 2.5
    assert after < 0.45 * before, (float(before), float(after))  # measured: 2.66 -> 0.86 mm
    det = _jacobian_det(u.reshape(N, N, N, 3).numpy(), grid)
    assert (det <= 0).mean() == 0.0
    steps = [f for e, f in events if e == Event.PROGRESS and f["stage"] == "nephi-io"]
    assert len(steps) == 80 and steps[-1]["step"] == 80 and steps[-1]["loss"] < steps[0]["loss"]


def _jacobian_det(u: np.ndarray, grid: Grid) -> np.ndarray:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(u.astype(np.float64), isVector=True)
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction)
    return sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(image))


def test_cancellation_stops_the_loop(known_pair):
    _, pair, _ = known_pair
    from nephireg.errors import Cancelled

    reporter = CallbackReporter(lambda event, fields: None)

    def cancel_on_third(event, fields):
        if event == Event.PROGRESS and fields["step"] == 3:
            reporter.request_cancel()

    reporter.callback = cancel_on_third
    with pytest.raises(Cancelled):
        run_instance_optimisation(pair, {"iterations": 50, "similarity_points": 500, "gradicon_points": 10}, reporter)


def test_settings_validate_options():
    settings = Settings.from_options({"iterations": "30", "regularization": 2, "model": None, "seed": 3,
                                      "grid_spacing_mm": 4.0, "mask_images": "false"})
    assert (settings.iterations, settings.regularization, settings.seed, settings.mask_images) == (30, 2.0, 3, False)
    with pytest.raises(InputError, match="unknown NePhi option"):
        Settings.from_options({"iteratoins": 3})
    with pytest.raises(InputError, match="coarse"):
        Settings.from_options({"coarse": "bspline"})
    with pytest.raises(InputError, match=r"--iterations='many' is not allowed; allowed: an integer"):
        Settings.from_options({"iterations": "many"})
    with pytest.raises(InputError, match="coarse_regularization"):
        Settings.from_options({"coarse_regularization": -1})
    with pytest.raises(InputError, match="coarse_iterations"):
        Settings.from_options({"coarse": "adam", "coarse_iterations": 0})
    assert Settings.from_options({"similarity": "mind"}).similarity == "mind"
    assert Settings.from_options({"gradicon_jacobian": "fd"}).gradicon_jacobian == "fd"
    with pytest.raises(InputError, match="gradicon_jacobian='central' is not allowed; allowed: one of exact, fd"):
        Settings.from_options({"gradicon_jacobian": "central"})
    with pytest.raises(InputError, match="similarity='mutual-information' is not allowed; allowed: one of ncc, mind"):
        Settings.from_options({"similarity": "mutual-information"})


def test_the_runs_seed_reaches_the_point_sampling_unless_an_option_sets_it(known_pair):
    grid, pair, _ = known_pair
    options = {"iterations": 3, "similarity_points": 300, "gradicon_points": 8, "output_lattice": 0}

    def result(run_seed: int, **extra) -> np.ndarray:
        seeded = PreparedPair(grid, pair.fixed, pair.moving, seed=run_seed)
        return evaluate_on_grid(run_instance_optimisation(seeded, {**options, **extra}, SilentReporter()), grid,
                                torch.device("cpu"))

    first = result(0)
    assert np.array_equal(first, result(0))
    assert not np.allclose(first, result(1))
    assert np.array_equal(result(1, seed=0), first)



def _io_error_before_after(known_pair, options, bound: float) -> torch.Tensor:
    """NePhi + IO (80 iterations, these options on top) on the known pair: the mean warp error falls below ``bound``
    times its start; returns u at the pair's points (P, 3)."""
    grid, pair, pts = known_pair
    field = run_instance_optimisation(pair, {"iterations": 80, "similarity_points": 2000, "gradicon_points": 50,
                                             "regularization": 1.0, **options}, SilentReporter())
    u = torch.from_numpy(evaluate_on_grid(field, grid, torch.device("cpu"))).float().reshape(-1, 3)
    before = (_warp(pts) - pts).norm(dim=1).mean()
    after = (_warp(pts + u) - pts).norm(dim=1).mean()
    assert after < bound * before, (float(before), float(after))
    return u

def test_io_with_mind_similarity_recovers_a_known_deformation(known_pair):
    _io_error_before_after(known_pair, {"similarity": "mind"}, bound=0.5)


def test_io_with_the_finite_difference_gradicon_recovers_a_known_deformation(known_pair):
    grid, _, _ = known_pair
    u = _io_error_before_after(known_pair, {"gradicon_jacobian": "fd"}, bound=0.45)  # the exact Jacobian's bound
    assert (_jacobian_det(u.reshape(N, N, N, 3).numpy(), grid) <= 0).mean() == 0.0


@pytest.mark.parametrize("preset", ["lung-ct", "brain-mri", "generic"])
def test_every_preset_default_parses_for_every_method(preset):
    """A misspelt key in a preset's method options must fail here, not in a user's run."""
    from nephireg.methods import adam
    from nephireg.presets import get_preset

    adam.Settings.from_options(get_preset(preset).options_for("adam", {}))
    for method in ("nephi", "nephi-io"):
        Settings.from_options(get_preset(preset).options_for(method, {}))


def test_coarse_regularization_reaches_the_coarse_adam_step(known_pair):
    grid, pair, pts = known_pair
    spread = {}
    for weight in (0.2, 1000.0):  # NePhi itself stays the identity (0 iterations): the field is the coarse one
        field = run_instance_optimisation(pair, {"coarse": "adam", "coarse_iterations": 30, "iterations": 0,
                                                 "coarse_regularization": weight}, SilentReporter())
        spread[weight] = float(field.displacement_mm(pts).std(dim=0).sum())
    assert spread[1000.0] < 0.5 * spread[0.2]  # a stiff coarse field varies far less over the points


def test_coarse_lncc_weight_reaches_the_coarse_adam_step(known_pair):
    grid, pair, pts = known_pair
    spread = {}
    for weight in (1.0, 1e-4):  # against the same regularisation, a tiny similarity weight leaves a stiff field
        field = run_instance_optimisation(pair, {"coarse": "adam", "coarse_iterations": 30, "iterations": 0,
                                                 "coarse_similarity": "lncc", "coarse_lncc_weight": weight},
                                          SilentReporter())
        spread[weight] = float(field.displacement_mm(pts).std(dim=0).sum())
    assert spread[1e-4] < 0.5 * spread[1.0]


def test_multi_resolution_coarse_adam_then_nephi(known_pair):
    grid, pair, pts = known_pair
    reporter = CallbackReporter(lambda event, fields: None)
    field = run_instance_optimisation(pair, {"coarse": "adam", "coarse_iterations": 40, "iterations": 10,
                                             "similarity_points": 1000, "gradicon_points": 20}, reporter)
    u = field.displacement_mm(pts)
    assert (_warp(pts + u) - pts).norm(dim=1).mean() < 0.7 * (_warp(pts) - pts).norm(dim=1).mean()
    assert {"optimise", "nephi-io"} <= set(reporter.finish())  # the coarse Adam stage ran, then NePhi


def test_coarse_level_sets_the_coarse_adam_pyramid(known_pair):
    from nephireg.methods.nephi import coarse_levels

    assert [coarse_levels(f) for f in (8, 4, 2, 1)] == [(8,), (4,), (4, 2), (4, 2, 1)]
    with pytest.raises(InputError, match="coarse_level=3 is not allowed; allowed: one of 1, 2, 4, 8"):
        Settings.from_options({"coarse_level": 3})
    grid, pair, pts = known_pair
    messages = []
    reporter = CallbackReporter(lambda event, fields: messages.append(fields.get("message", "")))
    field = run_instance_optimisation(pair, {"coarse": "adam", "coarse_level": 2, "coarse_iterations": 20,
                                             "iterations": 0}, reporter)
    assert [m for m in messages if m.startswith("Adam level")] == [
        "Adam level 1/2: grid 1/4, 20 iterations", "Adam level 2/2: grid 1/2, 20 iterations"]
    u = field.displacement_mm(pts)  # NePhi stays the identity (0 iterations): this is the two-level Adam field
    assert (_warp(pts + u) - pts).norm(dim=1).mean() < 0.7 * (_warp(pts) - pts).norm(dim=1).mean()


def test_predict_with_the_shipped_model_gives_a_finite_regular_field(known_pair):
    from nephireg.methods.nephi import availability, run_predict

    if not availability()["available"]:
        pytest.skip("no NePhi model in the package")
    grid, pair, pts = known_pair
    field = run_predict(pair, {}, CallbackReporter(lambda event, fields: None))
    u = torch.from_numpy(evaluate_on_grid(field, grid, torch.device("cpu"))).float()
    assert torch.isfinite(u).all() and u.abs().max() < 20.0  # mm, on a 46 mm field of view
    assert (_jacobian_det(u.numpy(), grid) <= 0).mean() == 0.0


def test_predict_with_a_missing_model_names_it(known_pair, tmp_path):
    from nephireg.methods.nephi import run_predict

    with pytest.raises(InputError, match="model file not found"):
        run_predict(known_pair[1], {"model": str(tmp_path / "absent.pt")}, CallbackReporter(lambda e, f: None))
