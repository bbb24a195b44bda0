"""A prepared image pair: what every registration method receives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from nephireg.geometry import Grid


@dataclass
class PreparedPair:
    """Fixed and pre-aligned moving images on one working grid (the fixed image's frame, isotropic spacing).

    ``fixed``, ``moving``: (1, 1, Z, Y, X) float32 intensities normalised by the preset (about [0, 1]).
    ``moving`` is already resampled through the pre-alignment, so a method looks for ``u`` with
    ``moving(x + u(x)) ~ fixed(x)``.
    ``fixed_mask``, ``moving_mask``: (1, 1, Z, Y, X) float32 in {0, 1} (dilated region of interest) or None.
    ``preset``: the run's preset name (:data:`nephireg.protocol.PRESETS`), None for a pair built outside a run.
    """

    grid: Grid
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_mask: Optional[torch.Tensor] = None
    moving_mask: Optional[torch.Tensor] = None
    seed: int = 0
    preset: Optional[str] = None

    @property
    def device(self) -> torch.device:
        return self.fixed.device
