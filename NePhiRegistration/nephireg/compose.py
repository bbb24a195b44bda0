"""Composing the pre-alignment with a method's field: phi(x) = T(x + u(x)), on the fixed grid."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from nephireg.geometry import Grid, apply_affine

_PROBES = np.array([[0, 0, 0], [100, 0, 0], [0, 100, 0], [0, 0, 100], [37, -53, 71]], dtype=float)


def affine_matrix(transform: sitk.Transform) -> np.ndarray:
    """The 4x4 (LPS mm) of an affine SimpleITK transform (translation, Euler, affine, composite of those).

    Read off by mapping four points; a fifth checks the transform really is affine.
    """
    mapped = np.array([transform.TransformPoint(tuple(p)) for p in _PROBES])
    linear = (mapped[1:4] - mapped[0]).T / 100.0
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = mapped[0]
    if not np.allclose(apply_affine(matrix, _PROBES[4]), mapped[4], atol=1e-6):
        raise ValueError(f"{transform.GetName()} is not affine")
    return matrix


def affine_transform(matrix4: np.ndarray) -> sitk.AffineTransform:
    """A 4x4 (LPS mm) as a SimpleITK transform: the inverse of :func:`affine_matrix`."""
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(float(v) for v in np.asarray(matrix4)[:3, :3].ravel()))
    transform.SetTranslation(tuple(float(v) for v in np.asarray(matrix4)[:3, 3]))
    return transform


def compose_prealignment(grid: Grid, displacement_mm: np.ndarray, prealign: np.ndarray) -> np.ndarray:
    """Displacement of phi(x) = A(x + u(x)) - x at ``grid``'s voxels, for u (Z, Y, X, 3) and A a 4x4; LPS mm.

    Written A u + (A - I) x + t, with the one (..., 3) temporary a matrix product needs. A translation (the
    ``center`` pre-alignment, or none) is u + t: no point array and no products (0.5 s on a 2.3 M-voxel CT).
    """
    linear = prealign[:3, :3]
    if np.allclose(linear, np.eye(3), rtol=0.0, atol=1e-12):
        return displacement_mm + prealign[:3, 3]
    out = displacement_mm @ linear.T
    out += grid.physical_points() @ (linear - np.eye(3)).T
    out += prealign[:3, 3]
    return out
