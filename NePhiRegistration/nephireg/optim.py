"""Adam for the engine's optimisation loops, with the numbers of ``torch.optim.Adam`` (defaults, no weight decay).

Why not ``torch.optim.Adam``: its constructor imports ``torch._dynamo``, which took 1.3 s on the 2-core CPU here -
a tenth of a whole lung CT registration - for a dozen lines of arithmetic. (Training keeps ``torch.optim``: its
checkpoints store the optimiser's ``state_dict`` and a second does not matter there.)
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Sequence, Tuple

import torch


class Adam:
    """Adam (Kingma and Ba 2015) over parameter groups, each with its own learning rate.

    ``groups``: (parameters, learning rate) pairs; set ``groups[n]["lr"]`` between steps to follow a schedule.
    One step count serves the bias corrections of all parameters: the same numbers as torch when every parameter
    has a gradient at every step, as in the engine's loops.
    """

    def __init__(self, groups: Iterable[Tuple[Sequence[torch.Tensor], float]],
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.groups: List[Dict] = [{"params": list(params), "lr": float(lr)} for params, lr in groups]
        self.betas = betas
        self.eps = eps
        self.steps = 0
        self._moments: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def zero_grad(self) -> None:
        for group in self.groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient (bias-corrected first and second moments)."""
        self.steps += 1
        beta1, beta2 = self.betas
        first_correction = 1.0 - beta1 ** self.steps
        second_correction_sqrt = math.sqrt(1.0 - beta2 ** self.steps)
        for group in self.groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if id(p) not in self._moments:
                    self._moments[id(p)] = (torch.zeros_like(p), torch.zeros_like(p))
                mean, square = self._moments[id(p)]
                mean.lerp_(p.grad, 1.0 - beta1)
                square.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                denominator = (square.sqrt() / second_correction_sqrt).add_(self.eps)
                p.addcdiv_(mean, denominator, value=-group["lr"] / first_correction)
