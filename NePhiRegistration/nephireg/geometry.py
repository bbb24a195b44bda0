"""The one home of image geometry: voxel, normalised and physical coordinates, and LPS/RAS.

numpy only (the Slicer module imports it too). Torch-side sampling lives in :mod:`nephireg.sampling` and takes
its matrices from here.

Conventions
-----------
* Physical space is ITK's LPS, millimetres. Slicer's RAS is LPS with x and y negated (:data:`LPS_TO_RAS`).
* A :class:`Grid` is an image's geometry: ``size`` (i, j, k) = (x, y, z) voxel counts, ``spacing`` mm,
  ``origin`` mm (centre of voxel 0) and ``direction`` (3x3, columns are the i, j, k axes in LPS).
  ``physical = origin + direction @ diag(spacing) @ index``, index in voxels, (i, j, k) order.
* Arrays (numpy from SimpleITK, torch volumes) are indexed [k, j, i]: a torch volume is (N, C, Z, Y, X).
* Normalised coordinates are torch ``grid_sample``'s, with ``align_corners=True`` (:data:`ALIGN_CORNERS`):
  -1 and +1 are the centres of the first and last voxel along each axis; the last dimension of a sampling grid
  is ordered (i, j, k). Every sampler in the engine uses this constant; nothing restates it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

ALIGN_CORNERS = True

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
"""Multiply an LPS point or vector (3,) by this to get RAS; it is its own inverse."""


def lps_to_ras_matrix4() -> np.ndarray:
    """4x4 homogeneous LPS <-> RAS flip."""
    m = np.eye(4)
    m[:3, :3] = LPS_TO_RAS
    return m


@dataclass(frozen=True)
class Grid:
    """Geometry of a 3D image. ``size`` (nx, ny, nz) voxels, ``spacing`` (mm), ``origin`` (mm, LPS), ``direction``
    (3x3, columns = voxel axes in LPS)."""

    size: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: Tuple[float, ...]  # 9 numbers, row-major, as SimpleITK's GetDirection()

    def __post_init__(self) -> None:
        if len(self.size) != 3 or len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise ValueError("Grid needs 3 sizes, 3 spacings, 3 origin coordinates and 9 direction entries")
        if min(self.size) < 1 or min(self.spacing) <= 0:
            raise ValueError(f"Grid size {self.size} and spacing {self.spacing} must be positive")

    # -- constructors -------------------------------------------------------------------------------------
    @classmethod
    def of(cls, image) -> Grid:
        """The grid of a SimpleITK image (anything with GetSize/GetSpacing/GetOrigin/GetDirection)."""
        return cls(
            size=tuple(int(s) for s in image.GetSize()),
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    @classmethod
    def from_matrix(cls, size: Sequence[int], index_to_physical: np.ndarray) -> Grid:
        """A grid from its 4x4 index -> physical (LPS) matrix."""
        m = np.asarray(index_to_physical, dtype=float)
        spacing = np.linalg.norm(m[:3, :3], axis=0)
        direction = m[:3, :3] / spacing
        return cls(tuple(int(s) for s in size), tuple(spacing), tuple(m[:3, 3]), tuple(direction.ravel()))

    # -- matrices -----------------------------------------------------------------------------------------
    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def shape_zyx(self) -> Tuple[int, int, int]:
        """Array shape (nz, ny, nx) of an image on this grid."""
        return (self.size[2], self.size[1], self.size[0])

    def index_to_physical(self) -> np.ndarray:
        """4x4: homogeneous (i, j, k, 1) voxel index -> (x, y, z, 1) LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def physical_to_index(self) -> np.ndarray:
        return np.linalg.inv(self.index_to_physical())

    def index_to_normalised(self) -> np.ndarray:
        """4x4: voxel index -> normalised (align_corners=True): n = 2 i / (size - 1) - 1 (0 for a size-1 axis)."""
        size = np.asarray(self.size, dtype=float)
        scale = np.where(size > 1, 2.0 / np.maximum(size - 1.0, 1.0), 1.0)
        offset = np.where(size > 1, -1.0, 0.0)
        m = np.eye(4)
        m[:3, :3] = np.diag(scale)
        m[:3, 3] = offset
        return m

    def physical_to_normalised(self) -> np.ndarray:
        """4x4: LPS mm -> normalised sampling coordinates of this grid, (i, j, k) order."""
        return self.index_to_normalised() @ self.physical_to_index()

    def normalised_to_physical(self) -> np.ndarray:
        return np.linalg.inv(self.physical_to_normalised())

    # -- points -------------------------------------------------------------------------------------------
    def physical_points(self) -> np.ndarray:
        """(nz, ny, nx, 3) LPS mm of every voxel centre (origin + i * column_i + j * column_j + k * column_k,
        summed by broadcasting: no index array)."""
        m = self.index_to_physical()
        nz, ny, nx = self.shape_zyx
        points = np.empty((nz, ny, nx, 3))
        points[...] = m[:3, 3]
        points += np.arange(nx, dtype=float)[None, None, :, None] * m[:3, 0]
        points += np.arange(ny, dtype=float)[None, :, None, None] * m[:3, 1]
        points += np.arange(nz, dtype=float)[:, None, None, None] * m[:3, 2]
        return points

    def corners_physical(self) -> np.ndarray:
        """(8, 3) LPS mm of the corner voxel centres."""
        ext = [(0, n - 1) for n in self.size]
        corners = np.array([[a, b, c] for a in ext[0] for b in ext[1] for c in ext[2]], dtype=float)
        return apply_affine(self.index_to_physical(), corners)

    def center_physical(self) -> np.ndarray:
        """(3,) LPS mm of the centre of the field of view."""
        return apply_affine(self.index_to_physical(), (np.asarray(self.size, dtype=float) - 1.0) / 2.0)

    def extent_mm(self) -> np.ndarray:
        """(3,) field-of-view lengths along the grid axes, mm (centre of first to centre of last voxel)."""
        return (np.asarray(self.size, dtype=float) - 1.0) * np.asarray(self.spacing)

    def resampled(self, spacing_mm: Sequence[float]) -> Grid:
        """A grid with the same direction and field of view (first voxel centre kept) at ``spacing_mm``."""
        return self._at_spacing(spacing_mm, np.round)

    def covering(self, spacing_mm: Sequence[float]) -> Grid:
        """Like :meth:`resampled`, but its voxel centres reach at least as far as this grid's along every axis (the
        last one at or beyond this grid's last centre): a displacement stored on it is defined, as ITK and Slicer
        interpolate it, at every voxel centre of this grid."""
        return self._at_spacing(spacing_mm, lambda steps: np.ceil(steps - 1e-9))

    def _at_spacing(self, spacing_mm: Sequence[float], steps_to_int: Callable[[np.ndarray], np.ndarray]) -> Grid:
        """This grid's direction and first voxel centre at ``spacing_mm``, with ``steps_to_int`` of the field of
        view in steps of the new spacing (per axis) + 1 voxels."""
        spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,))
        size = np.maximum(steps_to_int(self.extent_mm() / spacing).astype(int) + 1, 1)
        return Grid(tuple(int(s) for s in size), tuple(float(s) for s in spacing), self.origin, self.direction)

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 index -> RAS mm (what Slicer's volume nodes store as IJKToRAS)."""
        return lps_to_ras_matrix4() @ self.index_to_physical()


def apply_affine(matrix4: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 homogeneous matrix to points (..., 3)."""
    points = np.asarray(points, dtype=float)
    return points @ matrix4[:3, :3].T + matrix4[:3, 3]


def overlap_fraction(a: Grid, b: Grid, samples_per_axis: int = 9, a_to_b: Optional[np.ndarray] = None) -> float:
    """Fraction of a lattice over ``a``'s field of view that lies inside ``b``'s field of view (0..1), the points
    first mapped by the 4x4 ``a_to_b`` (LPS mm) when given."""
    axes = [np.linspace(0, n - 1, samples_per_axis) for n in a.size]
    i, j, k = np.meshgrid(*axes, indexing="ij")
    pts = apply_affine(a.index_to_physical(), np.stack([i, j, k], -1).reshape(-1, 3))
    if a_to_b is not None:
        pts = apply_affine(a_to_b, pts)
    idx_b = apply_affine(b.physical_to_index(), pts)
    inside = np.all((idx_b >= -0.5) & (idx_b <= np.asarray(b.size) - 0.5), axis=1)
    return float(inside.mean())


INVERSE_LATTICE_FACTOR = 2.0
"""The inverse map is computed and stored on a lattice of this x the working spacing over the moving image: the scale
the methods' fields vary on (continuous Adam's finest level and NePhi's output lattice are 2x the working grid). On
the lung pair (moving grid 1.37 x 1.37 x 2.5 mm) the 3 mm lattice cost a third of an inversion at every moving voxel,
for a consistency error of 0.090 mm mean instead of 0.042 (docs/methods.md)."""


def inverse_lattice_mm(working: Grid) -> float:
    """The inverse lattice's spacing (mm) for a method that ran on the working grid ``working``."""
    return INVERSE_LATTICE_FACTOR * min(working.spacing)


def inverse_lattice(moving: Grid, spacing_mm: float) -> Grid:
    """The grid the inverse map is computed and stored on: over ``moving``, no finer than ``spacing_mm`` along any
    axis, its voxel centres covering ``moving``'s (:meth:`Grid.covering`); ``moving`` itself when that is no coarser."""
    lattice = moving.covering([max(s, spacing_mm) for s in moving.spacing])
    return moving if lattice.size == moving.size else lattice
