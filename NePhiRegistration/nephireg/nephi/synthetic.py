"""Synthetic training pairs from real volumes: random smooth diffeomorphic warps and intensity changes.

A pair is ``fixed = I(volume)`` and ``moving = I'(volume o T)``, with ``T(y) = A y + d(y)`` in normalised
coordinates: a small random affine ``A`` and a displacement ``d`` integrated from a smooth random velocity field by
scaling and squaring (so ``T`` is a diffeomorphism). ``I``, ``I'`` are random gamma / gain / offset / noise. The
known ``T`` gives a validation error: a perfect registration has ``T(phi(x)) = x``.
All volumes are (1, 1, Z, Y, X) on the same normalised cube; displacements are normalised units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from nephireg.sampling import identity_normalised, sample_normalised


@dataclass(frozen=True)
class WarpSettings:
    control_points: int = 5  # per axis, of the random velocity field
    amplitude: float = 0.05  # std of the velocity at the control points, normalised units (~2.5 % of the FOV)
    field_size: int = 24  # per axis, grid on which the velocity is integrated
    squaring_steps: int = 6
    rotation_deg: float = 3.0
    scale: float = 0.03
    translation: float = 0.03


@dataclass
class SyntheticPair:
    fixed: torch.Tensor  # (1, 1, Z, Y, X)
    moving: torch.Tensor
    fixed_mask: Optional[torch.Tensor]
    moving_mask: Optional[torch.Tensor]
    displacement: torch.Tensor  # (1, 3, z, y, x) T(y) - y on the normalised cube, (i, j, k) components

    def warp_points(self, points: torch.Tensor) -> torch.Tensor:
        """T at (P, 3) normalised points -> (P, 3)."""
        values = sample_normalised(self.displacement, points.reshape(1, -1, 1, 1, 3))
        return points + values.reshape(3, -1).t()


def random_displacement(settings: WarpSettings, generator: torch.Generator) -> torch.Tensor:
    """(1, 3, n, n, n) displacement of a random smooth diffeomorphism plus a small affine, normalised units."""
    n, c = settings.field_size, settings.control_points
    velocity = torch.randn(1, 3, c, c, c, generator=generator) * settings.amplitude
    velocity = F.interpolate(velocity, size=(n, n, n), mode="trilinear", align_corners=True)
    identity = identity_normalised((n, n, n))  # (1, n, n, n, 3)
    disp = velocity / (2 ** settings.squaring_steps)
    for _ in range(settings.squaring_steps):  # phi_{2t} = phi_t o phi_t
        moved = identity + disp.permute(0, 2, 3, 4, 1)
        disp = disp + sample_normalised(disp, moved)
    affine = _random_affine(settings, generator)
    pts = identity.reshape(-1, 3)
    linear = pts @ affine[:, :3].t() + affine[:, 3] - pts
    return disp + linear.t().reshape(1, 3, n, n, n)


def _random_affine(settings: WarpSettings, generator: torch.Generator) -> torch.Tensor:
    """(3, 4) small random affine: rotation, anisotropic scale, translation."""
    angles = (torch.rand(3, generator=generator) * 2 - 1) * settings.rotation_deg * torch.pi / 180
    cx, cy, cz = torch.cos(angles)
    sx, sy, sz = torch.sin(angles)
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    scale = 1 + (torch.rand(3, generator=generator) * 2 - 1) * settings.scale
    shift = (torch.rand(3, generator=generator) * 2 - 1) * settings.translation
    return torch.cat([rz @ ry @ rx @ torch.diag(scale), shift[:, None]], dim=1)


def warp_volume(volume: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """``volume o T``: (1, C, Z, Y, X) sampled at T(x) for every voxel x."""
    shape = tuple(volume.shape[2:])
    identity = identity_normalised(shape, dtype=volume.dtype)
    disp = F.interpolate(displacement, size=shape, mode="trilinear", align_corners=True)
    return sample_normalised(volume, identity + disp.permute(0, 2, 3, 4, 1))


def intensity_change(volume: torch.Tensor, generator: torch.Generator, mask: Optional[torch.Tensor] = None
                     ) -> torch.Tensor:
    """Random gamma (0.8-1.25), gain (0.9-1.1), offset (+-0.05) and noise (std 0.01) on a [0, 1] volume."""
    u = torch.rand(4, generator=generator)
    gamma = torch.exp((u[0] * 2 - 1) * 0.223)
    out = volume.clamp(0, 1) ** gamma * (0.9 + 0.2 * u[1]) + (u[2] * 2 - 1) * 0.05
    out = out + 0.01 * torch.randn(volume.shape, generator=generator)
    return out if mask is None else out * mask


def make_pair(volume: torch.Tensor, mask: Optional[torch.Tensor], settings: WarpSettings,
              generator: torch.Generator) -> SyntheticPair:
    """A synthetic pair from one (1, 1, Z, Y, X) volume in [0, 1] and its optional mask."""
    displacement = random_displacement(settings, generator)
    moving = warp_volume(volume, displacement)
    moving_mask = None if mask is None else (warp_volume(mask, displacement) > 0.5).to(volume.dtype)
    return SyntheticPair(intensity_change(volume, generator, mask), intensity_change(moving, generator, moving_mask),
                         mask, moving_mask, displacement)
