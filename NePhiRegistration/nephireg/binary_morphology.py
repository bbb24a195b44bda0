"""Binary dilation, erosion, opening and closing by ITK's ball structuring element, on numpy (Z, Y, X) bool arrays.

The same results as SimpleITK's ``BinaryDilate`` / ``BinaryErode`` / ``BinaryMorphologicalOpening`` /
``BinaryMorphologicalClosing`` with ``sitkBall`` (tested voxel for voxel), 5-10x faster for the small radii the lung
masks use (1-3 voxels on a grid of about 2.5 mm): one OR of shifted views per kernel offset, where ITK's filters pay
for their generality. Radii are per ITK axis (x, y, z = the array's last, middle, first axis), in voxels.

ITK's ball of radius r is the set of offsets d with sum_i (d_i / (r_i + 0.5))^2 <= 1 (``FlatStructuringElement::Ball``:
an ellipsoid of axes 2 r_i + 1 over the voxel centres). Erosion counts the outside of the image as foreground
(ITK's ``BoundaryToForeground``) and dilation as background; closing first pads the image with background by the
radius and crops it back (ITK's ``SafeBorder``), so a mask touching the border is not glued to it. Any nonzero voxel
is foreground. Large kernels on large grids (the 6 mm similarity regions on a CT's own grid) stay with ITK, whose
boundary-following dilation does not pay per kernel offset (``preprocess.dilate``).
"""

from __future__ import annotations

import itertools
from typing import List, Sequence, Tuple

import numpy as np

Offset = Tuple[int, int, int]  # (dz, dy, dx), array axes


def ball_radius_voxels(radius_mm: float, spacing_mm: Sequence[float]) -> List[int]:
    """The per-axis voxel radius (x, y, z; at least 1) of a ball of ``radius_mm`` on voxels of ``spacing_mm``."""
    return [max(1, int(round(radius_mm / s))) for s in spacing_mm]


def ball_offsets(radius_xyz: Sequence[int]) -> List[Offset]:
    """The offsets (dz, dy, dx) of ITK's ball structuring element of ``radius_xyz`` voxels (centre included)."""
    rx, ry, rz = _radius(radius_xyz)
    return [(dz, dy, dx) for dz, dy, dx in itertools.product(range(-rz, rz + 1), range(-ry, ry + 1), range(-rx, rx + 1))
            if (dx / (rx + 0.5)) ** 2 + (dy / (ry + 0.5)) ** 2 + (dz / (rz + 0.5)) ** 2 <= 1.0]


def dilate(mask: np.ndarray, radius_xyz: Sequence[int]) -> np.ndarray:
    """``mask`` (Z, Y, X) dilated by the ball; outside the array is background. bool, same shape."""
    return _any_of_shifts(_binary(mask), radius_xyz, outside=False)


def erode(mask: np.ndarray, radius_xyz: Sequence[int]) -> np.ndarray:
    """``mask`` (Z, Y, X) eroded by the ball (symmetric, so the complement's dilation); outside the array is
    foreground. bool, same shape."""
    return ~_any_of_shifts(~_binary(mask), radius_xyz, outside=False)


def opening(mask: np.ndarray, radius_xyz: Sequence[int]) -> np.ndarray:
    """Erosion, then dilation (SimpleITK ``BinaryMorphologicalOpening``)."""
    return dilate(erode(mask, radius_xyz), radius_xyz)


def closing(mask: np.ndarray, radius_xyz: Sequence[int]) -> np.ndarray:
    """Dilation, then erosion, on ``mask`` padded with background by the radius and cropped back (SimpleITK
    ``BinaryMorphologicalClosing`` with its default safe border)."""
    rx, ry, rz = _radius(radius_xyz)
    mask = _binary(mask)
    padded = np.pad(mask, ((rz, rz), (ry, ry), (rx, rx)))
    closed = erode(dilate(padded, radius_xyz), radius_xyz)
    z, y, x = mask.shape
    return closed[rz:rz + z, ry:ry + y, rx:rx + x]


def _any_of_shifts(mask: np.ndarray, radius_xyz: Sequence[int], outside: bool) -> np.ndarray:
    """For every voxel, whether ``mask`` holds at any ball offset from it (``outside``: the value beyond the array)."""
    rx, ry, rz = _radius(radius_xyz)
    z, y, x = mask.shape
    padded = np.pad(mask, ((rz, rz), (ry, ry), (rx, rx)), constant_values=outside)
    out = np.zeros(mask.shape, dtype=bool)
    for dz, dy, dx in ball_offsets(radius_xyz):
        out |= padded[rz + dz:rz + dz + z, ry + dy:ry + dy + y, rx + dx:rx + dx + x]
    return out


def _binary(mask: np.ndarray) -> np.ndarray:
    """(Z, Y, X) bool: nonzero = foreground."""
    array = np.asarray(mask)
    if array.ndim != 3:
        raise ValueError(f"a 3D (Z, Y, X) mask is needed, not shape {array.shape}")
    return array if array.dtype == bool else array != 0


def _radius(radius_xyz: Sequence[int]) -> Tuple[int, int, int]:
    rx, ry, rz = (int(r) for r in radius_xyz)
    if min(rx, ry, rz) < 0:
        raise ValueError(f"a ball radius is at least 0 voxels per axis, not {list(radius_xyz)}")
    return rx, ry, rz
