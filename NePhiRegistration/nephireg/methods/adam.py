"""Continuous Adam: MIND-SSC features, a dense displacement on a coarse grid, Adam with a scheduled learning rate.

METHODS.md, method 1. Per pyramid level (pooling factor f of the working grid):

* features: MIND-SSC of both images on the working grid (``similarity="mind"``), or MIND-SSC plus the normalised
  intensities (``"mind+intensity"``, the intensity channel weighted as much as the 12 MIND channels together),
  block-averaged by f onto the level grid G. With ``mind_pooling`` m > 1 the images are block-averaged by m first
  and the features computed on that coarser grid (m must divide every level's f; ``mind_radius`` and
  ``mind_dilation`` count voxels of the grid the features are computed on): m^3 times fewer voxels;
* unknown: ``p`` (1, 3, Zg, Yg, Xg) mm on G; the displacement used is ``u = S(p)``, S = ``smoothing_passes`` 3x3x3
  box filters (approximates a B-spline);
* loss: ``mean_w((MIND_F - MIND_M o (x + u))^2) + lambda * mean(|grad u|^2)`` with forward differences in mm/mm
  and ``w`` the fixed mask on G (all ones without mask; ``data_region="foreground"``: without a mask, the voxels of
  G whose block holds fixed intensity above 0, dilated by ``FOREGROUND_MARGIN_MM`` - the background of a
  skull-stripped brain is sampled no more);
* ``parameterisation="svf"``: ``S(p)`` is a stationary velocity ``v`` instead, ``u`` the displacement of exp(v)
  (:func:`nephireg.svf.exp_velocity`, scaling and squaring: diffeomorphic), and the diffusion term acts on ``v``;
* Adam with :class:`nephireg.schedule.ConstantCosineLinear`, stretched to the level's iteration count.

The coarse level's result (displacement or velocity) initialises the next one. Returns a
:class:`nephireg.fields.DenseField` on the finest level grid (trilinear interpolation upsamples it).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from nephireg.errors import InputError
from nephireg.features import MindScratch, mind_ssc
from nephireg.fields import DenseField
from nephireg.geometry import Grid
from nephireg.lncc import local_ncc
from nephireg.optim import Adam
from nephireg.options import GRID_SPACING_RULE, Rule, check_settings, settings_from
from nephireg.pair import PreparedPair
from nephireg.progress import Reporter
from nephireg.sampling import (
    PointBatches,
    channels_last,
    identity_normalised,
    matrix_tensor,
    pool,
    pooled_grid,
    resample_volume,
    sample_flat,
)
from nephireg.schedule import ConstantCosineLinear
from nephireg.svf import exp_velocity

PARAMETERISATIONS = ("displacement", "svf")
# "mind", "mind+intensity": squared differences of these features; "lncc": 1 - local squared correlation of the
# intensities (nephireg.lncc); "mind+lncc", "mind+intensity+lncc": those squared differences plus lncc_weight times
# the LNCC term
SIMILARITIES = ("mind", "mind+intensity", "lncc", "mind+lncc", "mind+intensity+lncc")
# "mask": the fixed mask, or every voxel without one; "foreground": the fixed mask, or without one the fixed image's
# foreground (normalised intensity > 0) dilated by FOREGROUND_MARGIN_MM
DATA_REGIONS = ("mask", "foreground")
FOREGROUND_MARGIN_MM = 6.0


@dataclass(frozen=True)
class Settings:
    iterations: int = 80  # at the finest level (270 measured no better on the lung pair: docs/benchmarks.md)
    coarse_iterations: int = 60  # at each coarser level
    levels: Tuple[int, ...] = (4, 2)  # pooling factors of the working grid, coarse to fine
    regularization: float = 1.0  # lambda of the diffusion term (dimensionless, displacement gradients in mm/mm)
    lr: float = 1.0  # mm per step in the constant phase
    smoothing_passes: int = 3
    mind_radius: int = 1  # patch radius, voxels of the grid MIND-SSC is computed on (0: single voxels)
    mind_dilation: int = 2  # neighbour offset, voxels of that grid
    mind_pooling: int = 1  # MIND-SSC on the working grid block-averaged by this factor (1: the working grid itself)
    constant_until: int = 70  # schedule breakpoints for 270 steps; stretched to each level's count
    cosine_until: int = 180
    cosine_floor: float = 0.433
    final_fraction: float = 0.0333
    grid_spacing_mm: Optional[float] = None  # if set, the finest level's spacing (overrides the last level)
    parameterisation: str = "displacement"  # or "svf": a stationary velocity field, exp by scaling and squaring
    svf_steps: int = 5  # squarings of the svf parameterisation (2^5 = 32 sub-steps; measured on brain MRI)
    similarity: str = "mind"  # SIMILARITIES
    lncc_radius: int = 4  # LNCC box radius in working-grid voxels (divided by each level's pooling, at least 1)
    lncc_weight: float = 1.0  # weight of the LNCC term (1 - mean local squared correlation) against the rest
    data_region: str = "mask"  # DATA_REGIONS: where the similarity is averaged when the user gives no fixed mask

    def __post_init__(self) -> None:
        check_settings(self, OPTION_RULES, INVARIANTS)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Settings:
        return settings_from(cls, options, OPTION_RULES, ignored=("model", "seed"), what="continuous Adam")

    def schedule(self, steps: int) -> ConstantCosineLinear:
        base = ConstantCosineLinear(self.lr, self.constant_until, self.cosine_until, 270,
                                    self.cosine_floor, self.final_fraction)
        return base.scaled_to(steps)


MAX_ITERATIONS = 100_000
# The one schema of these options (nephireg.options): type and allowed range of every Settings field.
OPTION_RULES = {
    "iterations": Rule("int", 1, MAX_ITERATIONS),
    "coarse_iterations": Rule("int", 0, MAX_ITERATIONS),
    "levels": Rule("int-list", 1, 32, items=(1, 6)),
    "regularization": Rule("float", 0, 1e6),
    "lr": Rule("float", 0, 1e3, low_open=True),
    "smoothing_passes": Rule("int", 0, 20),
    "mind_radius": Rule("int", 0, 5),
    "mind_dilation": Rule("int", 1, 10),
    "mind_pooling": Rule("int", 1, 8),
    "constant_until": Rule("int", 0, 270),
    "cosine_until": Rule("int", 0, 270),
    "cosine_floor": Rule("float", 0, 1),
    "final_fraction": Rule("float", 0, 1, low_open=True),
    "grid_spacing_mm": GRID_SPACING_RULE,
    "parameterisation": Rule("choice", choices=PARAMETERISATIONS),
    "svf_steps": Rule("int", 0, 12),
    "similarity": Rule("choice", choices=SIMILARITIES),
    "lncc_radius": Rule("int", 1, 20),
    "lncc_weight": Rule("float", 0, 1e6, low_open=True),
    "data_region": Rule("choice", choices=DATA_REGIONS),
}
INVARIANTS = ((lambda s: s.constant_until <= s.cosine_until,
               "--option constant_until must not exceed --option cosine_until (schedule breakpoints of 270 steps)"),
              (lambda s: s.final_fraction <= s.cosine_floor,
               "--option final_fraction must not exceed --option cosine_floor (schedule.ConstantCosineLinear)"))


def coarsest_pooling(settings: Settings, grid: Grid) -> int:
    """The largest pooling factor of the working grid this method uses (the geometry check needs it); refuses a
    ``mind_pooling`` that does not divide every level's factor here, with the request's check, before any work."""
    factors = level_factors(settings, grid)
    check_mind_pooling(settings, factors)
    return max(factors)


def run(pair: PreparedPair, options: Mapping[str, Any], reporter: Reporter) -> DenseField:
    """Register ``pair`` by continuous Adam; see the module docstring."""
    settings = Settings.from_options(options)
    factors = level_factors(settings, pair.grid)
    check_mind_pooling(settings, factors)
    reporter.stage("features", "MIND-SSC features")
    with torch.no_grad():
        scratch = MindScratch()  # the second image's working arrays are the first's
        fixed_features = features(pool(pair.fixed, settings.mind_pooling), settings, scratch)
        reporter.check_cancel()  # each takes a second on a big working grid
        moving_features = features(pool(pair.moving, settings.mind_pooling), settings, scratch)
        del scratch
    field: Optional[DenseField] = None
    for number, factor in enumerate(factors, start=1):
        steps = settings.iterations if number == len(factors) else settings.coarse_iterations
        if steps == 0:
            continue
        reporter.stage("optimise", f"Adam level {number}/{len(factors)}: grid 1/{factor}, {steps} iterations")
        field = _optimise_level(pair, fixed_features, moving_features, factor, steps, field, settings, reporter)
    assert field is not None
    if settings.parameterisation == "svf":  # the levels carry the velocity; the result is its exponential
        with torch.no_grad():
            field = DenseField(field.grid, exp_velocity(field.values_mm, field.grid, settings.svf_steps))
    return field


def features(image: torch.Tensor, settings: Settings, scratch: Optional[MindScratch] = None) -> torch.Tensor:
    """The features compared by squared differences, of a (1, 1, Z, Y, X) image: (1, C, Z, Y, X), C = 12 (MIND-SSC)
    or 13 (with intensities); C = 0 for ``lncc`` alone (the LNCC term uses the images themselves). ``scratch``:
    MIND-SSC's working arrays, shared by the calls for the two images (:class:`nephireg.features.MindScratch`)."""
    if settings.similarity == "lncc":
        return image[:, :0]
    mind = mind_ssc(image, settings.mind_radius, settings.mind_dilation, scratch)
    if settings.similarity in ("mind", "mind+lncc"):
        return mind
    # sqrt(C): the squared difference of the intensity channel weighs as much as those of all MIND channels
    return torch.cat([mind, image * float(mind.shape[1]) ** 0.5], dim=1)


def check_mind_pooling(settings: Settings, factors: Tuple[int, ...]) -> None:
    """The features on the grid of pooling ``mind_pooling`` are block-averaged onto each level: it must divide them."""
    if any(factor % settings.mind_pooling for factor in factors):
        raise InputError(f"--option mind_pooling={settings.mind_pooling} must divide every level's pooling factor "
                         f"(levels {', '.join(map(str, factors))})")


def level_factors(settings: Settings, grid: Grid) -> Tuple[int, ...]:
    """Pooling factors coarse to fine; ``grid_spacing_mm`` replaces the finest by the nearest integer factor."""
    factors = list(settings.levels)
    if settings.grid_spacing_mm is not None:
        finest = max(1, round(settings.grid_spacing_mm / min(grid.spacing)))
        factors = [f for f in factors[:-1] if f > finest] + [finest]
    return tuple(factors)


def _optimise_level(pair: PreparedPair, fixed_features: torch.Tensor, moving_features: torch.Tensor, factor: int,
                    steps: int, init: Optional[DenseField], settings: Settings, reporter: Reporter) -> DenseField:
    grid = pooled_grid(pair.grid, factor)
    data_term = _data_term(pair, fixed_features, moving_features, factor, grid, settings)
    start = torch.zeros((1, 3) + grid.shape_zyx, dtype=pair.fixed.dtype, device=pair.device)
    if init is not None:
        start = resample_volume(init.values_mm, init.grid, grid, padding="border")
    params = start.clone().requires_grad_(True)
    optimiser = Adam([([params], settings.lr)])
    schedule = settings.schedule(steps)
    for step in range(1, steps + 1):
        optimiser.groups[0]["lr"] = schedule(step)
        optimiser.zero_grad()
        state = smooth(params, settings.smoothing_passes)  # displacement, or velocity with svf
        u = exp_velocity(state, grid, settings.svf_steps) if settings.parameterisation == "svf" else state
        loss = data_term(u) + settings.regularization * diffusion(state, grid.spacing)
        loss.backward()
        optimiser.step()
        reporter.step(step, steps, float(loss.detach()))
    with torch.no_grad():
        return DenseField(grid, smooth(params, settings.smoothing_passes).detach())


def _data_term(pair: PreparedPair, fixed_features: torch.Tensor, moving_features: torch.Tensor, factor: int,
               grid: Grid, settings: Settings) -> Callable[[torch.Tensor], torch.Tensor]:
    """The similarity term of ``settings.similarity`` on the level grid of pooling ``factor``: u (mm) -> loss."""
    weights = _weights(pair, factor, grid, settings.data_region)
    terms = []
    if settings.similarity != "lncc":
        feature_factor = factor // settings.mind_pooling  # the features lie on the grid of pooling mind_pooling
        terms.append(MindDataTerm(pool(fixed_features, feature_factor), pool(moving_features, feature_factor), grid,
                                  weights))
    if settings.similarity.endswith("lncc"):
        radius = max(1, round(settings.lncc_radius / factor))
        lncc = LnccDataTerm(pool(pair.fixed, factor), pool(pair.moving, factor), grid, weights, radius)
        terms.append(lambda u: settings.lncc_weight * lncc(u))
    return lambda u: sum(term(u) for term in terms)


def _weights(pair: PreparedPair, factor: int, grid: Grid, data_region: str) -> Optional[torch.Tensor]:
    """(1, 1, Z, Y, X) bool on the level ``grid`` of pooling ``factor``: where the similarity is averaged; None
    for everywhere."""
    if pair.fixed_mask is not None:
        weights = pool(pair.fixed_mask, factor) > 0
    elif data_region == "foreground":
        weights = foreground(pair.fixed, factor, grid)
    else:
        return None
    return weights if weights.any() else None


def foreground(image: torch.Tensor, factor: int, grid: Grid) -> torch.Tensor:
    """Level-grid voxels whose block of ``image`` (1, 1, Z, Y, X, working grid) holds intensity above 0, dilated by
    a box of ``FOREGROUND_MARGIN_MM`` (at least one voxel) on ``grid``: (1, 1, Z/f, Y/f, X/f) bool."""
    inside = F.max_pool3d((image > 0).to(image.dtype), kernel_size=factor, stride=factor) if factor > 1 else \
        (image > 0).to(image.dtype)
    radius = [max(1, math.ceil(FOREGROUND_MARGIN_MM / spacing)) for spacing in reversed(grid.spacing)]  # z, y, x
    return F.max_pool3d(inside, kernel_size=[2 * r + 1 for r in radius], stride=1, padding=radius) > 0


class MindDataTerm:
    """Mean squared MIND difference between the fixed features and the moving features warped by ``u``, over the
    voxels of a level grid inside the mask (all voxels without one).

    Only the masked voxels are sampled, so the cost scales with the region of interest, not the field of view.
    The fixed features are kept in the sampler's layout (:class:`nephireg.sampling.PointBatches`) and the loss is
    one fused function (:class:`_MeanSquaredDifference`), so a step copies nothing out of that layout.
    ``target``, ``source``: (1, C, Z, Y, X) on ``grid``; ``mask``: (1, 1, Z, Y, X) bool or None.
    """

    def __init__(self, target: torch.Tensor, source: torch.Tensor, grid: Grid, mask: Optional[torch.Tensor]):
        channels = target.shape[1]
        identity = identity_normalised(grid.shape_zyx, dtype=target.dtype, device=target.device).reshape(-1, 3)
        self.index = None if mask is None else torch.nonzero(mask.reshape(-1)).squeeze(1)  # (P,)
        self.identity = identity if self.index is None else identity[self.index]  # (P, 3) normalised
        flat_target = target.reshape(channels, -1)
        flat_target = flat_target if self.index is None else flat_target[:, self.index]  # (C, P)
        self.batches = PointBatches.for_points(flat_target.shape[1], target.device)
        self.target = self.batches.arrange(flat_target)  # (parts, C, per_part)
        self.source = channels_last(source)  # sampled at every masked voxel each step
        self.to_normalised = matrix_tensor(grid.physical_to_normalised(), target)[:3, :3]  # mm vector -> normalised

    def __call__(self, u_mm: torch.Tensor) -> torch.Tensor:
        """``u_mm``: (1, 3, Z, Y, X) LPS mm on the level grid -> scalar loss."""
        flat = u_mm.reshape(3, -1)
        if self.index is not None:
            flat = flat[:, self.index]
        points = self.identity + flat.T @ self.to_normalised.T  # (P, 3)
        warped = self.batches.sample(self.source, points, padding="border")  # (parts, C, per_part)
        return _MeanSquaredDifference.apply(warped, self.target, self.batches)


class _MeanSquaredDifference(torch.autograd.Function):
    """The mean of (warped - target)^2 over the points' values of two arrays in the layout of ``batches``
    (:class:`nephireg.sampling.PointBatches`: (parts, C, per_part), the filler not data). Forward: one difference
    (kept) and one dot product; backward: one scaling of the difference. Autograd's graph of the same expression made
    ~8 passes over these arrays and two copies out of the sampler's layout: about half of a fine lung step (53 of
    100-130 ms, torch's profiler)."""

    @staticmethod
    def forward(ctx, warped: torch.Tensor, target: torch.Tensor, batches: PointBatches) -> torch.Tensor:
        difference = batches.zero_filler(warped - target)
        ctx.save_for_backward(difference)
        ctx.count = batches.count * difference.shape[1]  # C * P values
        flat = difference.reshape(-1)
        return torch.dot(flat, flat) / ctx.count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> Tuple[torch.Tensor, None, None]:
        (difference,) = ctx.saved_tensors
        return difference * (grad * (2.0 / ctx.count)), None, None


class LnccDataTerm:
    """1 - the mean local squared correlation (:func:`nephireg.lncc.local_ncc`) of the fixed image and the moving
    image warped by ``u`` over the voxels of a level grid inside the mask (all voxels without one).

    The boxes need the warped image around every masked voxel, so the box of the mask's voxels widened by
    ``radius`` (clamped to the grid) is sampled each step: the same numbers as over the whole grid, since no box
    of a masked voxel reaches past it. ``fixed``, ``moving``: (1, 1, Z, Y, X) on ``grid``; ``mask``:
    (1, 1, Z, Y, X) bool or None; ``radius`` in voxels of ``grid``.
    """

    def __init__(self, fixed: torch.Tensor, moving: torch.Tensor, grid: Grid, mask: Optional[torch.Tensor],
                 radius: int):
        self.window = _mask_window(mask, radius, fixed.shape[2:])  # (z, y, x) slices of the level grid
        self.fixed = fixed[(Ellipsis,) + self.window]
        self.source, self.radius = moving, radius
        self.shape = self.fixed.shape
        identity = identity_normalised(grid.shape_zyx, dtype=fixed.dtype, device=fixed.device)  # (1, Z, Y, X, 3)
        self.identity = identity[(slice(None),) + self.window].reshape(-1, 3)
        self.mask = None if mask is None else mask[(Ellipsis,) + self.window]
        self.to_normalised = matrix_tensor(grid.physical_to_normalised(), fixed)[:3, :3]  # mm vector -> normalised

    def __call__(self, u_mm: torch.Tensor) -> torch.Tensor:
        """``u_mm``: (1, 3, Z, Y, X) LPS mm on the level grid -> scalar loss."""
        u_window = u_mm[(Ellipsis,) + self.window]
        points = self.identity + u_window.reshape(3, -1).T @ self.to_normalised.T  # (N, 3)
        warped = sample_flat(self.source, points, padding="border").reshape(self.shape)
        cc = local_ncc(self.fixed, warped, self.radius)
        return 1.0 - (cc.mean() if self.mask is None else cc[self.mask].mean())


def _mask_window(mask: Optional[torch.Tensor], margin: int, shape: Tuple[int, ...]) -> Tuple[slice, ...]:
    """(z, y, x) slices of the box around the voxels of ``mask`` (1, 1, Z, Y, X) widened by ``margin`` voxels and
    clamped to ``shape``; the whole grid without a mask."""
    if mask is None:
        return tuple(slice(0, n) for n in shape)
    index = torch.nonzero(mask[0, 0])  # (P, 3) z, y, x
    low, high = index.min(dim=0).values, index.max(dim=0).values
    return tuple(slice(max(0, int(lo) - margin), min(n, int(hi) + margin + 1)) for lo, hi, n in zip(low, high, shape))


def smooth(u: torch.Tensor, passes: int) -> torch.Tensor:
    """``passes`` 3x3x3 box filters, (1, 3, Z, Y, X) -> same, borders replicated.

    Applied as one separable filter per axis whose taps are the box [1, 1, 1] / 3 convolved ``passes`` times
    ([1, 3, 6, 7, 6, 3, 1] / 27 for three passes), each tap reading the voxel at its offset clamped to the grid: the
    same numbers as repeated box filters away from the border (within ``passes`` voxels of it the replicated border
    is applied once instead of per pass). Its gradient is the exact adjoint written out (:class:`_Smooth`).
    """
    return u if passes == 0 else _Smooth.apply(u, passes)


class _Smooth(torch.autograd.Function):
    """Per axis, out[i] = sum_k w_k u[clamp(i + k)] (:func:`_filter_clamped`); backward applies the adjoint of each
    axis's filter in the reverse order (:func:`_filter_clamped_adjoint`). Both work on shifted views in place:
    no padded copies (3-4x faster on a CPU than a depthwise ``conv3d`` with the same taps)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, passes: int) -> torch.Tensor:
        ctx.passes = passes
        weights = _tap_weights(passes)
        for dim in (2, 3, 4):
            u = _filter_clamped(u, weights, dim)
        return u

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        weights = _tap_weights(ctx.passes)
        for dim in (4, 3, 2):
            grad = _filter_clamped_adjoint(grad, weights, dim)
        return grad, None


@functools.cache
def _tap_weights(passes: int) -> Tuple[float, ...]:
    """The symmetric taps of :func:`_box_taps` from the centre out: (w_0, w_1, ..., w_passes)."""
    taps = _box_taps(passes, torch.float64, torch.device("cpu"))
    return tuple(float(w) for w in taps[passes:])


def _filter_clamped(u: torch.Tensor, weights: Tuple[float, ...], dim: int) -> torch.Tensor:
    """out[i] = sum over |k| <= m of w_|k| u[clamp(i + k, 0, n - 1)] along ``dim`` (a new tensor, u's shape)."""
    size = u.shape[dim]
    out = u * weights[0]
    for distance, weight in enumerate(weights[1:], start=1):
        inside = min(distance, size)  # voxels whose tap at +-distance falls outside on that side
        if size > distance:
            out.narrow(dim, 0, size - distance).add_(u.narrow(dim, distance, size - distance), alpha=weight)
            out.narrow(dim, distance, size - distance).add_(u.narrow(dim, 0, size - distance), alpha=weight)
        out.narrow(dim, size - inside, inside).add_(u.narrow(dim, size - 1, 1), alpha=weight)  # clamped high
        out.narrow(dim, 0, inside).add_(u.narrow(dim, 0, 1), alpha=weight)  # clamped low
    return out


def _filter_clamped_adjoint(grad: torch.Tensor, weights: Tuple[float, ...], dim: int) -> torch.Tensor:
    """The adjoint of :func:`_filter_clamped` along ``dim``: each output's share goes back to the voxel its tap
    read, the clamped taps' shares summed onto the edge voxels."""
    size = grad.shape[dim]
    out = grad * weights[0]
    for distance, weight in enumerate(weights[1:], start=1):
        inside = min(distance, size)
        if size > distance:
            out.narrow(dim, distance, size - distance).add_(grad.narrow(dim, 0, size - distance), alpha=weight)
            out.narrow(dim, 0, size - distance).add_(grad.narrow(dim, distance, size - distance), alpha=weight)
        out.narrow(dim, size - 1, 1).add_(grad.narrow(dim, size - inside, inside).sum(dim, keepdim=True), alpha=weight)
        out.narrow(dim, 0, 1).add_(grad.narrow(dim, 0, inside).sum(dim, keepdim=True), alpha=weight)
    return out


def _box_taps(passes: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1D taps of ``passes`` 3-tap box filters in a row (length 2 * passes + 1, sum 1)."""
    taps = torch.ones(1, dtype=torch.float64)
    for _ in range(passes):
        taps = torch.nn.functional.conv1d(taps.reshape(1, 1, -1), torch.ones(1, 1, 3, dtype=torch.float64) / 3.0,
                                          padding=2).reshape(-1)
    return taps.to(dtype=dtype, device=device)


def diffusion(u_mm: torch.Tensor, spacing_mm: Sequence[float]) -> torch.Tensor:
    """mean |grad u|^2 by forward differences, gradients in mm/mm; ``spacing_mm`` the grid's 3 spacings in
    (x, y, z) order (numbers, not a tensor: nothing is read back from a GPU each step): the sum over the axes of
    mean((forward difference / spacing)^2), where an axis of one voxel has no difference and adds 0.
    Differentiable once (:class:`_Diffusion`)."""
    return _Diffusion.apply(u_mm, tuple(float(s) for s in spacing_mm))


_AXES_ZYX = ((2, 2), (3, 1), (4, 0))  # (dimension of (1, C, Z, Y, X), index of its spacing in (x, y, z) order)


class _Diffusion(torch.autograd.Function):
    """:func:`diffusion` with its gradient written out: per axis one difference (kept) and one dot product forward;
    backward adds each scaled difference to the voxel behind it and subtracts it from the voxel in front (the
    adjoint of the forward difference). Autograd's graph of the same expression allocated a zero-filled volume per
    axis for the slices' gradients and four passes more per axis."""

    @staticmethod
    def forward(ctx, u_mm: torch.Tensor, spacing_xyz: Tuple[float, float, float]) -> torch.Tensor:
        differences, weights = [], []
        total = u_mm.new_zeros(())
        for dim, axis in _AXES_ZYX:
            size = u_mm.shape[dim]
            difference = u_mm.narrow(dim, 1, size - 1) - u_mm.narrow(dim, 0, size - 1)
            weight = 1.0 / (max(difference.numel(), 1) * spacing_xyz[axis] ** 2)  # mean of (d / spacing)^2
            flat = difference.reshape(-1)
            total = total + torch.dot(flat, flat) * weight
            differences.append(difference)
            weights.append(weight)
        ctx.save_for_backward(*differences)
        ctx.weights = weights
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        differences = ctx.saved_tensors
        grad_u = None
        for (dim, _), difference, weight in zip(_AXES_ZYX, differences, ctx.weights):
            scaled = difference * (grad * (2.0 * weight))  # d loss / d difference
            if grad_u is None:
                shape = list(difference.shape)
                shape[dim] += 1
                grad_u = difference.new_zeros(shape)
            size = grad_u.shape[dim]
            grad_u.narrow(dim, 1, size - 1).add_(scaled)
            grad_u.narrow(dim, 0, size - 1).sub_(scaled)
        return grad_u, None
