"""NePhi instance optimisation: Adam on the latent codes and both MLPs for one pair (METHODS.md method 3)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Tuple

import torch
from torch import nn

from nephireg.nephi.field import Codes, NePhiNet
from nephireg.nephi.objective import LossSettings, PairImages, pair_loss
from nephireg.optim import Adam
from nephireg.progress import Reporter
from nephireg.sampling import channels_last


def optimise(net: NePhiNet, codes: Codes, images: PairImages, settings: Any, reporter: Reporter
             ) -> Tuple[NePhiNet, Codes]:
    """Run ``settings.iterations`` Adam steps; returns the tuned net and codes (detached).

    ``settings`` carries iterations, learning_rate, code_learning_rate, regularization, prior_weight,
    similarity_points, gradicon_points, gradicon_jacobian and seed (see :class:`nephireg.methods.nephi.Settings`).
    The learning rate decays linearly to 10 % over the last half of the run, so the field settles.
    """
    loss_settings = LossSettings(similarity_points=settings.similarity_points,
                                 gradicon_points=settings.gradicon_points,
                                 gradicon_weight=settings.regularization, prior_weight=settings.prior_weight,
                                 gradicon_jacobian=getattr(settings, "gradicon_jacobian", "exact"))
    with _cpu_threads(getattr(settings, "threads", 0), images.fixed.device):
        return _run(net, codes, images, settings, reporter, loss_settings)


@contextmanager
def _cpu_threads(threads: int, device: torch.device) -> Iterator[None]:
    """Use ``threads`` torch CPU threads inside the loop, then restore the caller's setting. The per-step tensors
    are small (10k points), so on CPU extra threads cost more in synchronisation than they bring: on the lung CT
    pair one thread ran 0.46 s per step and two threads 1.4 s."""
    before = torch.get_num_threads()
    if threads > 0 and device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(net: NePhiNet, codes: Codes, images: PairImages, settings: Any, reporter: Reporter,
         loss_settings: LossSettings) -> Tuple[NePhiNet, Codes]:
    net = net.train()
    global_code, local_grid = (c.detach().clone() for c in codes)
    # The local grid channels-last (same (L, Z, Y, X) shape and values): the trilinear gather reads it as its
    # (Z*Y*X, L) table directly instead of copying the whole grid at every map evaluation, forward and backward.
    params = [nn.Parameter(global_code), nn.Parameter(channels_last(local_grid[None])[0])]
    rates = (settings.learning_rate, settings.code_learning_rate)
    optimiser = Adam([(list(net.parameters()), rates[0]), (params, rates[1])])
    total = settings.iterations
    generator = torch.Generator(device=images.fixed.device).manual_seed(settings.seed)
    for step in range(1, total + 1):
        for group, rate in zip(optimiser.groups, rates):
            group["lr"] = rate * _decay(step - 1, total)
        optimiser.zero_grad()
        terms = pair_loss(net, tuple(params), images, loss_settings, generator)
        terms["total"].backward()
        optimiser.step()
        reporter.step(step, total, float(terms["total"].detach()))
    return net.eval(), tuple(p.detach() for p in params)


def _decay(step: int, total: int) -> float:
    """1 for the first half, then linear down to 0.1 at the end."""
    half = total / 2.0
    if step <= half or total <= 1:
        return 1.0
    return max(0.1, 1.0 - 0.9 * (step - half) / half)
