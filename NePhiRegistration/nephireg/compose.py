"""Composing the pre-alignment with a method's field: phi(x) = T(x + u(x)), on the fixed grid."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from nephireg.geometry import apply_affine

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


def compose_prealignment(points_mm: np.ndarray, displacement_mm: np.ndarray, prealign: np.ndarray) -> np.ndarray:
    """Displacement of phi(x) = A(x + u(x)) - x, for points (..., 3), u (..., 3) and A a 4x4; all LPS mm.

    Written A u + (A - I) x + t, with the one (..., 3) temporary a matrix product needs.
    """
    out = displacement_mm @ prealign[:3, :3].T
    out += points_mm @ (prealign[:3, :3] - np.eye(3)).T
    out += prealign[:3, 3]
    return out
