"""Jacobian determinant of a map phi(x) = x + u(x) on a voxel grid, in physical units, and folding measures."""

from __future__ import annotations

from typing import Dict

import numpy as np

from nephireg.geometry import Grid


def jacobian_determinant(displacement_mm: np.ndarray, grid: Grid) -> np.ndarray:
    """det(I + Du) at every voxel; ``displacement_mm`` (Z, Y, X, 3) LPS mm on ``grid`` -> (Z, Y, X) float32.

    Du is taken by central differences along the voxel axes (one-sided at the borders) and mapped to physical
    derivatives with the inverse of direction @ diag(spacing), so anisotropic and oblique grids are exact for
    affine maps.
    """
    if displacement_mm.ndim != 4 or displacement_mm.shape[-1] != 3:
        raise ValueError(f"displacement must be (Z, Y, X, 3); got {displacement_mm.shape}")
    index_to_mm = grid.direction_matrix @ np.diag(grid.spacing)
    mm_to_index = np.linalg.inv(index_to_mm)  # d index / d x
    # d u_a / d index_m for m = i, j, k (array axes 2, 1, 0)
    per_index = np.stack([np.gradient(displacement_mm, axis=axis, edge_order=1) for axis in (2, 1, 0)], axis=-1)
    j = per_index @ mm_to_index  # d u / d x: (Z, Y, X, 3 components, 3 physical axes)
    j[..., 0, 0] += 1.0
    j[..., 1, 1] += 1.0
    j[..., 2, 2] += 1.0
    # The 3x3 determinant written out: the same numbers as np.linalg.det, twice as fast on millions of voxels.
    det = (j[..., 0, 0] * (j[..., 1, 1] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 1])
           - j[..., 0, 1] * (j[..., 1, 0] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 0])
           + j[..., 0, 2] * (j[..., 1, 0] * j[..., 2, 1] - j[..., 1, 1] * j[..., 2, 0]))
    return det.astype(np.float32)


def jacobian_summary(det: np.ndarray) -> Dict[str, float]:
    """Folding % (det <= 0, whole field), std of log det over det > 0 (SDlogJ), min, max, mean."""
    positive = det[det > 0]
    return {
        "folding_percent": float(100.0 * np.count_nonzero(det <= 0) / det.size),
        "std_log_jacobian": float(np.std(np.log(positive))) if positive.size else float("nan"),
        "jacobian_min": float(det.min()),
        "jacobian_max": float(det.max()),
        "jacobian_mean": float(det.mean()),
    }
