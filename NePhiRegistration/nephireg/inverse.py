"""The inverse of a registration (moving -> fixed) over the moving image, and its consistency with the forward map.

The forward map the engine writes is phi(x) = A(x + u(x)) (:func:`nephireg.compose.compose_prealignment`): the
method's field u on the fixed space, then the pre-alignment A, fixed -> moving. Its inverse is

    phi^-1(y) = w(A^-1 y),   w = (id + u)^-1,

on a lattice over the moving image (:func:`nephireg.geometry.inverse_lattice`; its voxel centres cover the moving
image's), stored as it is: ITK and Slicer interpolate the file trilinearly, which at the moving voxel centres gives
what interpolating the lattice onto them and storing that would, in a file a fifth to an eighth of the size (lung pair:
11 MB, not 60). w(z) is the fixed point of x = z - u(x) (the scheme of ITK's ``InvertDisplacementFieldImageFilter``),
iterated on all points at once with u sampled trilinearly from its dense values on the fixed grid (constant beyond
its border); it converges where |grad u| < 1, i.e. wherever the field does not come close to folding (after
:data:`UNDAMPED_ITERATIONS`, the points still moving take half steps).
The iteration starts from a method's own inverse when it has one (NePhi's backward map,
:class:`~nephireg.fields.FieldWithInverse`), otherwise from z - u(z); each point stops once it moves less than
:data:`TOLERANCE_MM`, all after :data:`MAX_ITERATIONS`.

The consistency error |phi^-1(phi(x)) - x| (mm) is measured over the fixed mask (or the whole fixed image), at the
points whose phi(x) lies inside the moving image (elsewhere the inverse is not defined by the registration), with
both maps as ITK applies the files: the forward field trilinear on the fixed grid, the inverse on its lattice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from nephireg import io
from nephireg.fields import DisplacementField
from nephireg.geometry import Grid, inverse_lattice
from nephireg.sampling import grid_points_mm, matrix_tensor, sample_flat

MAX_ITERATIONS = 30
UNDAMPED_ITERATIONS = 10
"""Full fixed-point steps; after these, the points still moving take half steps (a damped iteration)."""
TOLERANCE_MM = 0.01
"""A point stops iterating once its update is below this (mm); only the points still moving are sampled."""

CONSISTENCY_STRIDE = 2
"""The manifest's consistency metrics sample every second fixed voxel along each axis (an eighth of them)."""

@dataclass
class InverseMap:
    """phi^-1 as y -> y + v(y): ``displacement_mm`` v (Z, Y, X, 3) float64 LPS mm on ``grid``, the inversion lattice
    over ``domain`` (the moving image's grid, where the inverse is defined; ``grid`` is ``domain`` itself when the
    lattice is no coarser; :func:`nephireg.geometry.inverse_lattice`)."""

    displacement_mm: np.ndarray
    grid: Grid
    domain: Grid
    iterations: int  # fixed-point iterations run
    started_from: str  # "backward map" (the method's own inverse) or "negated field"


def invert(field: DisplacementField, displacement_mm: np.ndarray, fixed_grid: Grid, moving_grid: Grid,
           prealign: np.ndarray, device: torch.device, lattice_mm: float = 0.0,
           cancel: Optional[Callable[[], None]] = None) -> InverseMap:
    """The inverse map of phi(x) = A(x + u(x)) over ``moving_grid`` (on its lattice, below).

    ``field``: the method's field (its ``inverse`` starts the iteration when it is a
    :class:`~nephireg.fields.FieldWithInverse`);
    ``displacement_mm``: u (Z, Y, X, 3) LPS mm at ``fixed_grid``'s voxels, as the forward transform was built from;
    ``prealign``: A, 4x4 LPS mm, fixed -> moving. ``lattice_mm``: the iteration runs on a lattice over the moving
    image no finer than this (mm per axis; the pipeline gives the field's own resolution), whose voxel centres cover
    ``moving_grid``'s, and the map is returned on it; 0: on ``moving_grid`` itself. ``cancel``: called every
    iteration (raises to stop).
    """
    lattice = inverse_lattice(moving_grid, lattice_mm)
    v, iterations, started_from = _invert_on(field, displacement_mm, fixed_grid, lattice, prealign, device, cancel)
    values = v[0].permute(1, 2, 3, 0).double().cpu().numpy()  # float64, as ITK stores it
    return InverseMap(values, lattice, moving_grid, iterations, started_from)


def _invert_on(field: DisplacementField, displacement_mm: np.ndarray, fixed_grid: Grid, moving_grid: Grid,
               prealign: np.ndarray, device: torch.device, cancel: Optional[Callable[[], None]]
               ) -> Tuple[torch.Tensor, int, str]:
    """:func:`invert` at ``moving_grid``'s voxels: (v as (1, 3, Z, Y, X) float32 mm, iterations, started from)."""
    values = torch.from_numpy(np.ascontiguousarray(displacement_mm, dtype=np.float32)).to(device)
    to_norm = matrix_tensor(fixed_grid.physical_to_normalised(), values)
    from_norm = matrix_tensor(fixed_grid.normalised_to_physical(), values)
    # u in normalised units of the fixed grid, (1, 3, Z, Y, X): the iteration then needs no conversion per step.
    u_norm = (values @ to_norm[:3, :3].T).permute(3, 0, 1, 2).unsqueeze(0)
    y = grid_points_mm(moving_grid, device=device).reshape(-1, 3)
    a_inv = matrix_tensor(np.linalg.inv(prealign), y)
    z = y @ a_inv[:3, :3].T + a_inv[:3, 3]  # A^-1 y, fixed space (mm)
    z_norm = z @ to_norm[:3, :3].T + to_norm[:3, 3]
    inverse = getattr(field, "inverse", None)
    with torch.no_grad():
        if inverse is not None:
            start = z + inverse.displacement_mm(z).to(z)
            x_norm = start @ to_norm[:3, :3].T + to_norm[:3, 3]
        else:
            x_norm = z_norm - sample_flat(u_norm, z_norm).T
        active = torch.arange(len(x_norm), device=device)  # points still moving more than TOLERANCE_MM a step
        iterations = 0
        for iterations in range(1, MAX_ITERATIONS + 1):
            if cancel is not None:
                cancel()
            x_active = x_norm[active]
            step = z_norm[active] - sample_flat(u_norm, x_active).T - x_active
            if iterations > UNDAMPED_ITERATIONS:  # points that oscillate (|grad u| near 1) settle with half steps
                step = 0.5 * step
            x_norm[active] = x_active + step
            active = active[(step @ from_norm[:3, :3].T).norm(dim=1) >= TOLERANCE_MM]
            if len(active) == 0:
                break
        x = x_norm @ from_norm[:3, :3].T + from_norm[:3, 3]
    v = (x - y).reshape(*moving_grid.shape_zyx, 3).permute(3, 0, 1, 2).unsqueeze(0)
    return v, iterations, "backward map" if inverse is not None else "negated field"


def consistency_mm(forward_mm: np.ndarray, fixed_grid: Grid, inverse: InverseMap,
                   mask: Optional[np.ndarray] = None, stride: int = 1) -> np.ndarray:
    """|phi^-1(phi(x)) - x| (mm) at the voxels x of ``fixed_grid`` (inside ``mask``, (Z, Y, X) bool, when given)
    whose phi(x) = x + ``forward_mm``(x) lies inside the moving image (``inverse.domain``); every ``stride``-th voxel
    along each axis; 1D float64."""
    every = (slice(None, None, stride),) * 3
    forward_mm = forward_mm[every]
    points = _strided(fixed_grid, stride).physical_points()
    if mask is not None:
        mask = mask[every]
        points, forward_mm = points[mask], forward_mm[mask]
    points, forward_mm = points.reshape(-1, 3), forward_mm.reshape(-1, 3)
    mapped = points + forward_mm
    domain = inverse.domain
    index = mapped @ domain.physical_to_index()[:3, :3].T + domain.physical_to_index()[:3, 3]
    inside = np.all((index >= 0) & (index <= np.asarray(domain.size) - 1.0), axis=1)
    grid = inverse.grid
    # (1, 3, Z, Y, X) over the (Z, Y, X, 3) array as it is: channels-last strides, no copy of the field (the sampler
    # reads any strides; the same numbers, a third of the time on the lung pair)
    values = torch.from_numpy(inverse.displacement_mm).permute(3, 0, 1, 2).unsqueeze(0)
    mapped_t = torch.from_numpy(mapped[inside])
    to_norm = matrix_tensor(grid.physical_to_normalised(), mapped_t)
    back = sample_flat(values, mapped_t @ to_norm[:3, :3].T + to_norm[:3, 3]).T.numpy()
    return np.linalg.norm(mapped[inside] + back - points[inside], axis=1)


def _strided(grid: Grid, stride: int) -> Grid:
    """The grid of every ``stride``-th voxel of ``grid`` along each axis (voxel 0 kept)."""
    size = tuple(-(-n // stride) for n in grid.size)
    return Grid(size, tuple(s * stride for s in grid.spacing), grid.origin, grid.direction)


def write_inverse(inverse: InverseMap, path: Path) -> None:
    """Write ``inverse`` as an ITK displacement-field transform (its lattice over the moving image, moving -> fixed)
    to ``path``."""
    io.write_transform(inverse.displacement_mm, inverse.grid, path)


def inverse_consistency(inverse: InverseMap, forward_mm: np.ndarray, fixed_grid: Grid, mask: Optional[np.ndarray]
                        ) -> Dict[str, Optional[float]]:
    """The manifest metrics ``inverse_consistency_mean_mm`` and ``inverse_consistency_p95_mm``
    (:func:`consistency_mm` on every :data:`CONSISTENCY_STRIDE`-th voxel; None where phi maps no voxel into the
    moving image: nothing to measure)."""
    errors = consistency_mm(forward_mm, fixed_grid, inverse, mask, CONSISTENCY_STRIDE)
    if errors.size == 0:
        return {"inverse_consistency_mean_mm": None, "inverse_consistency_p95_mm": None}
    return {"inverse_consistency_mean_mm": float(errors.mean()),
            "inverse_consistency_p95_mm": float(np.percentile(errors, 95))}
