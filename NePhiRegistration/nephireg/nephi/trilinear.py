"""Trilinear interpolation of a latent grid at arbitrary points, twice differentiable in the points.

``torch.nn.functional.grid_sample`` has no double backward with respect to its sampling grid, but GradICON
differentiates the field's Jacobian (itself a derivative with respect to the points) once more during training.
This gather-based version is built only from indexing, products and sums, so autograd can differentiate it any
number of times. Coordinates follow :data:`nephireg.geometry.ALIGN_CORNERS` (the one home of that choice);
points beyond the grid take the border value (clamped), as ``grid_sample(padding_mode="border")``.
"""

from __future__ import annotations

import torch

from nephireg.geometry import ALIGN_CORNERS


def _to_index(points_norm: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """(P, 3) normalised (i, j, k) -> (P, 3) continuous voxel indices, clamped into the grid."""
    if ALIGN_CORNERS:
        index = (points_norm + 1.0) * 0.5 * (size - 1.0)
    else:
        index = ((points_norm + 1.0) * size - 1.0) * 0.5
    return torch.minimum(torch.clamp(index, min=0.0), size - 1.0)


def trilinear(volume: torch.Tensor, points_norm: torch.Tensor) -> torch.Tensor:
    """Sample ``volume`` (C, Z, Y, X) at ``points_norm`` (P, 3) in normalised (i, j, k) order -> (P, C).

    Matches ``grid_sample(mode="bilinear", padding_mode="border")`` with the engine's align_corners choice.
    """
    if volume.dim() != 4 or points_norm.dim() != 2 or points_norm.shape[1] != 3:
        raise ValueError(f"expected volume (C, Z, Y, X) and points (P, 3), got {tuple(volume.shape)} and "
                         f"{tuple(points_norm.shape)}")
    channels, nz, ny, nx = volume.shape
    size = torch.tensor([nx, ny, nz], dtype=points_norm.dtype, device=points_norm.device)
    index = _to_index(points_norm, size)
    # The lower corner is a constant (no gradient); the fractional part carries all the derivatives.
    upper = (size - 2.0).clamp(min=0.0)
    base = torch.minimum(torch.floor(index.detach()), upper)
    frac = index - base
    base = base.long()
    step = (size > 1).long()  # a size-1 axis has no upper neighbour
    # (Z*Y*X, C) made contiguous: gathering whole rows is ~10x faster than gathering strided ones, far more than
    # the copy costs (a latent grid is small). A channels-last volume is already such a table: no copy.
    flat = volume.reshape(channels, -1).t().contiguous()
    # One gather for all eight corners: its backward fills and scatters into one (Z*Y*X, C) gradient instead of
    # eight, which made up a third of an instance-optimisation step on a fine latent grid.
    rows, weights = [], []
    for dz in (0, 1):
        wz = frac[:, 2] if dz else 1.0 - frac[:, 2]
        kz = base[:, 2] + dz * step[2]
        for dy in (0, 1):
            wy = frac[:, 1] if dy else 1.0 - frac[:, 1]
            ky = base[:, 1] + dy * step[1]
            for dx in (0, 1):
                wx = frac[:, 0] if dx else 1.0 - frac[:, 0]
                kx = base[:, 0] + dx * step[0]
                rows.append((kz * ny + ky) * nx + kx)
                weights.append(wz * wy * wx)
    corners = flat.index_select(0, torch.cat(rows)).reshape(8, points_norm.shape[0], channels)  # (8, P, C)
    return (torch.stack(weights).unsqueeze(2) * corners).sum(dim=0)
