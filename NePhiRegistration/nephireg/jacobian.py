"""Jacobian determinant of a map phi(x) = x + u(x) on a voxel grid, in physical units, and folding measures."""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from nephireg.geometry import Grid


def jacobian_determinant(displacement_mm: np.ndarray, grid: Grid) -> np.ndarray:
    """det(I + Du) at every voxel; ``displacement_mm`` (Z, Y, X, 3) LPS mm on ``grid`` -> (Z, Y, X) float32.

    Du is taken by central differences along the voxel axes (one-sided at the borders) and mapped to physical
    derivatives with the inverse of direction @ diag(spacing), so anisotropic and oblique grids are exact for
    affine maps. Computed with torch in float32 (multi-threaded; 5-7x faster than float64 numpy here) after removing
    the mean displacement: deformations of tens of mm round to ~1e-6 mm, so det J is exact to ~1e-5.
    """
    if displacement_mm.ndim != 4 or displacement_mm.shape[-1] != 3:
        raise ValueError(f"displacement must be (Z, Y, X, 3); got {displacement_mm.shape}")
    mm_to_index = grid.physical_to_index()[:3, :3]  # d index_m / d x_n
    # A constant shift (e.g. a composed pre-alignment translation) has no derivative: removing the mean first keeps
    # float32's rounding relative to the deformation, not to the shift.
    displacement_mm = np.asarray(displacement_mm)
    mean = displacement_mm.reshape(-1, 3).mean(axis=0, dtype=np.float64)
    centred = np.subtract(displacement_mm, mean, out=np.empty(displacement_mm.shape, np.float32), casting="same_kind")
    u = torch.from_numpy(centred)
    with torch.no_grad():
        d_dk, d_dj, d_di = torch.gradient(u, dim=(0, 1, 2), edge_order=1)  # (Z, Y, X, 3): d u_a / d index_m
        # column n of Du: d u / d x_n = sum_m d u / d index_m * d index_m / d x_n, m = i, j, k
        columns = [d_di * float(mm_to_index[0, n]) + d_dj * float(mm_to_index[1, n]) + d_dk * float(mm_to_index[2, n])
                   for n in range(3)]
        del d_dk, d_dj, d_di
        (j00, j10, j20), (j01, j11, j21), (j02, j12, j22) = (c.unbind(-1) for c in columns)
        j00, j11, j22 = j00 + 1.0, j11 + 1.0, j22 + 1.0
        # The 3x3 determinant written out: the same numbers as a batched det, without (Z, Y, X, 3, 3) in memory.
        det = (j00 * (j11 * j22 - j12 * j21) - j01 * (j10 * j22 - j12 * j20) + j02 * (j10 * j21 - j11 * j20))
    return det.to(torch.float32).numpy()


def jacobian_summary(det: np.ndarray) -> Dict[str, float]:
    """Folding % (det <= 0, whole field), std of log det over det > 0 (SDlogJ; None without any), min, max, mean."""
    positive = det[det > 0]
    return {
        "folding_percent": float(100.0 * np.count_nonzero(det <= 0) / det.size),
        # None, not NaN, where no det > 0 (a mirroring transform): manifests and events are strict JSON
        "std_log_jacobian": float(np.std(np.log(positive))) if positive.size else None,
        "jacobian_min": float(det.min()),
        "jacobian_max": float(det.max()),
        "jacobian_mean": float(det.mean()),
    }
