"""The learning-rate schedule of continuous Adam: constant, then cosine decay, then linear decay.

Vujovic et al. ("Continuous optimization for medical image registration of large displacement datasets"):
constant for steps <= ``constant_until``, cosine from ``lr`` to ``lr * cosine_floor`` until ``cosine_until``, then
linear from there to ``lr * final_fraction`` at ``linear_until`` (= the last step). Steps are 1-based.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ConstantCosineLinear:
    lr: float = 1.0  # learning rate of the constant phase (parameter units per step, e.g. mm)
    constant_until: int = 70
    cosine_until: int = 180
    linear_until: int = 270
    cosine_floor: float = 0.433  # lr at the end of the cosine phase, as a fraction of lr (15 -> 6.5 in the paper)
    final_fraction: float = 0.0333  # lr at the last step, as a fraction of lr (15 -> 0.5)

    def __post_init__(self) -> None:
        if not (0 <= self.constant_until <= self.cosine_until <= self.linear_until):
            raise ValueError("schedule breakpoints must satisfy 0 <= constant <= cosine <= linear")
        if self.lr <= 0 or not (0 < self.final_fraction <= self.cosine_floor <= 1):
            raise ValueError("schedule needs lr > 0 and 0 < final_fraction <= cosine_floor <= 1")

    @property
    def total_steps(self) -> int:
        return self.linear_until

    def __call__(self, step: int) -> float:
        """Learning rate at 1-based ``step``."""
        if step <= self.constant_until:
            return self.lr
        if step <= self.cosine_until:
            t = (step - self.constant_until) / max(self.cosine_until - self.constant_until, 1)
            floor = self.lr * self.cosine_floor
            return floor + (self.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
        t = min((step - self.cosine_until) / max(self.linear_until - self.cosine_until, 1), 1.0)
        start, end = self.lr * self.cosine_floor, self.lr * self.final_fraction
        return start + (end - start) * t

    def scaled_to(self, total_steps: int) -> ConstantCosineLinear:
        """The same shape stretched or squeezed to ``total_steps`` steps (breakpoints scaled proportionally)."""
        f = total_steps / self.linear_until
        constant = round(self.constant_until * f)
        cosine = max(constant, round(self.cosine_until * f))
        return ConstantCosineLinear(self.lr, constant, cosine, max(cosine, total_steps),
                                    self.cosine_floor, self.final_fraction)
