"""Stationary velocity fields: the displacement of exp(v) by scaling and squaring (a diffeomorphic map).

``phi = exp(v)`` is the flow of the velocity ``v`` for unit time. Scaling and squaring: ``u_0 = v / 2^n``, then
``n`` times ``u <- u + u o (x + u)`` (phi <- phi o phi), each composition sampled trilinearly on the velocity's grid.
For a smooth ``v`` whose per-step displacement ``v / 2^n`` stays under about half a voxel the result has a positive
Jacobian everywhere, whatever the size of ``v``: large deformations without folding.
"""

from __future__ import annotations

import torch

from nephireg.geometry import Grid
from nephireg.sampling import identity_normalised, matrix_tensor, sample_flat


def exp_velocity(velocity_mm: torch.Tensor, grid: Grid, steps: int = 7) -> torch.Tensor:
    """Displacement (1, 3, Z, Y, X) LPS mm of exp(v) for the velocity ``velocity_mm`` (1, 3, Z, Y, X) LPS mm on
    ``grid``; ``steps`` squarings (2^steps sub-steps). Differentiable; borders replicate the field.

    Each composition samples the field at its own grid points by :func:`nephireg.sampling.sample_flat`, which
    spreads the points over the CPU threads (the 3D grid sampler alone uses one core for one volume)."""
    if steps < 0:
        raise ValueError(f"scaling and squaring needs steps >= 0, got {steps}")
    to_normalised = matrix_tensor(grid.physical_to_normalised(), velocity_mm)[:3, :3]  # mm vector -> normalised
    identity = identity_normalised(grid.shape_zyx, dtype=velocity_mm.dtype, device=velocity_mm.device).reshape(-1, 3)
    u = velocity_mm / (2.0 ** steps)
    for _ in range(steps):
        points = identity + u.reshape(3, -1).T @ to_normalised.T  # (P, 3) normalised
        u = u + sample_flat(u, points, padding="border").reshape(u.shape)
    return u
