"""Built-in sample data: a synthetic thorax-like CT phantom and smooth known deformations.

Used by ``nephireg demo``, the tests and training. Deterministic for a seed. Everything is SimpleITK images on real
(anisotropic, optionally oblique) grids, intensities in Hounsfield-like units.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from nephireg.geometry import Grid
from nephireg.io import displacement_transform, image_from_array, resample_to


def rotation_direction(angles_deg: Sequence[float]) -> Tuple[float, ...]:
    """A 3x3 direction matrix (row-major 9-tuple) rotating by ``angles_deg`` about x, y then z."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return tuple((rz @ ry @ rx).ravel())


def thorax_phantom(grid: Grid, seed: int = 0, airways: bool = False, table: bool = False
                   ) -> Tuple[sitk.Image, sitk.Image]:
    """A CT-like thorax on ``grid``: air, body, two lungs with branching vessels, heart, spine; and its lung mask.

    Shapes are defined in physical mm around the grid's centre, so the same anatomy appears on any grid.
    ``airways``: a trachea (radius :data:`TRACHEA_RADIUS_MM`) from the top of the field of view down to a carina,
    and two main bronchi joining it to both lungs (air, not in the returned lung mask). ``table``: a patient table
    under the back (posterior), touching the body: two thin shells around a hollow low-density core, as wide as
    the field of view (cut by it where the grid is small).
    Returns (ct in HU as float32, lung mask uint8).
    """
    rng = np.random.default_rng(seed)
    points = grid.physical_points() - grid.center_physical()  # (Z, Y, X, 3) mm, LPS axes
    extent = np.abs(grid.index_to_physical()[:3, :3] @ (np.asarray(grid.size) - 1.0)) / 2.0
    half = np.maximum(extent, 1.0)
    x, y, z = (points[..., a] / half[a] for a in range(3))  # about [-1, 1] along L, P, S
    ct = np.full(grid.shape_zyx, -1000.0, dtype=np.float32)
    body = (x / 0.9) ** 2 + (y / 0.75) ** 2 <= 1.0
    ct[body] = 40.0
    lungs = np.zeros(grid.shape_zyx, dtype=bool)
    for side in (-1, 1):
        lung = ((x - side * 0.42) / 0.33) ** 2 + ((y + 0.05) / 0.5) ** 2 + (z / 0.72) ** 2 <= 1.0
        lungs |= lung
    ct[lungs] = -850.0
    ct[((x / 0.22) ** 2 + ((y + 0.15) / 0.25) ** 2 + (z / 0.6) ** 2) <= 1.0] = 45.0  # heart between the lungs
    ct[((x / 0.1) ** 2 + ((y - 0.6) / 0.1) ** 2) <= 1.0] = 700.0  # spine
    ct[_vessels(points, half, lungs, rng)] = 30.0
    if airways:
        ct[_airways(points, half)] = -1000.0
    texture = _smooth_noise(grid, rng, sigma_mm=3.0) * 25.0
    ct = ct + np.where(lungs, texture, texture * 0.4)
    if table:
        ct = _add_table(ct, points, 0.75 * half[1])
    return image_from_array(ct.astype(np.float32), grid), image_from_array(lungs.astype(np.uint8), grid)


TRACHEA_RADIUS_MM = 7.0
BRONCHUS_RADIUS_MM = 5.0
TABLE_SHELL_MM = 3.0  # carbon-fibre skins
TABLE_CORE_MM = 14.0  # foam core, -950 HU


def _airways(points: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Trachea from the top of the field of view to the carina, and a main bronchus into each lung (bool)."""
    carina = np.array([0.0, 0.15, 0.45]) * half
    top = np.array([0.0, 0.15, 1.5]) * half
    tubes = _segment_distance(points, top, carina) <= TRACHEA_RADIUS_MM
    for side in (-1, 1):
        end = np.array([side * 0.3, 0.0, 0.25]) * half  # inside the lung
        tubes |= _segment_distance(points, carina, end) <= BRONCHUS_RADIUS_MM
    return tubes


def _segment_distance(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance (mm) of every point (..., 3) to the segment start-end."""
    d = end - start
    t = np.clip(((points - start) @ d) / (d @ d), 0, 1)
    return np.linalg.norm(points - (start + t[..., None] * d), axis=-1)


def _add_table(ct: np.ndarray, points: np.ndarray, top_mm: float) -> np.ndarray:
    """A flat table whose top skin starts at LPS y = ``top_mm`` (the body's back): skin, core, skin."""
    depth = points[..., 1] - top_mm  # mm below the table's top surface (posterior is +y)
    out = ct.copy()
    out[(depth >= 0) & (depth < TABLE_SHELL_MM)] = 200.0
    out[(depth >= TABLE_SHELL_MM) & (depth < TABLE_SHELL_MM + TABLE_CORE_MM)] = -950.0
    out[(depth >= TABLE_SHELL_MM + TABLE_CORE_MM) & (depth < 2 * TABLE_SHELL_MM + TABLE_CORE_MM)] = 200.0
    return out


def tilted(image: sitk.Image, angles_deg: Sequence[float], padding: float) -> sitk.Image:
    """``image`` rotated by ``angles_deg`` (about x, y, z) about its centre on its own grid, the voxels that come
    from outside its field of view set to ``padding`` (e.g. -1024 or -2048 HU, as scanners and tools pad)."""
    transform = sitk.Euler3DTransform()
    transform.SetCenter(tuple(Grid.of(image).center_physical()))
    transform.SetRotation(*np.deg2rad(angles_deg))
    return sitk.Resample(image, image, transform, sitk.sitkLinear, padding, image.GetPixelID())


def reconstruction_circle(image: sitk.Image, radius_mm: float, value: float = -2048.0) -> sitk.Image:
    """``image`` with every voxel farther than ``radius_mm`` from the field of view's centre axis (LPS z, the
    scanner axis) set to ``value``: the corners outside a CT scanner's reconstruction circle."""
    grid = Grid.of(image)
    offset = grid.physical_points() - grid.center_physical()
    outside = np.hypot(offset[..., 0], offset[..., 1]) > radius_mm
    array = sitk.GetArrayFromImage(image)
    array[outside] = value
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def _vessels(points: np.ndarray, half: np.ndarray, lungs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Tubes (radius 1.5-3 mm) along random line segments in the lungs: structure for the registration to track."""
    vessels = np.zeros(lungs.shape, dtype=bool)
    for side in (-1, 1):
        for _ in range(14):
            start = np.array([side * 0.2, 0.0, 0.0]) * half
            end = np.array([side * rng.uniform(0.25, 0.7), rng.uniform(-0.45, 0.35), rng.uniform(-0.8, 0.8)]) * half
            d = end - start
            t = np.clip(((points - start) @ d) / (d @ d), 0, 1)
            vessels |= _segment_distance(points, start, end) <= rng.uniform(1.5, 3.0) * (1.2 - t)
    return vessels & lungs


def _smooth_noise(grid: Grid, rng: np.random.Generator, sigma_mm: float) -> np.ndarray:
    noise = image_from_array(rng.standard_normal(grid.shape_zyx).astype(np.float32), grid)
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, sigma_mm))
    return smooth / max(float(smooth.std()), 1e-6)


def random_displacement(grid: Grid, amplitude_mm: float, sigma_mm: float, seed: int = 0,
                        affine: Optional[np.ndarray] = None, waves: int = 6) -> np.ndarray:
    """A smooth random displacement (Z, Y, X, 3) LPS mm on ``grid``: per component a sum of ``waves`` plane sine
    waves with wavelengths of 4-8 ``sigma_mm`` in random directions (smooth everywhere, no border effects), scaled
    so its largest magnitude on the grid is ``amplitude_mm``; plus the displacement of an optional 4x4 ``affine``
    about the grid centre."""
    rng = np.random.default_rng(seed)
    points = grid.physical_points() - grid.center_physical()
    field = np.zeros(points.shape, dtype=np.float64)
    for component in range(3):
        for _ in range(waves):
            direction = rng.standard_normal(3)
            direction /= np.linalg.norm(direction)
            wavelength = rng.uniform(4.0, 8.0) * sigma_mm
            phase = rng.uniform(0, 2 * np.pi)
            field[..., component] += rng.uniform(0.5, 1.0) * np.sin(2 * np.pi * (points @ direction) / wavelength
                                                                     + phase)
    field *= amplitude_mm / max(float(np.linalg.norm(field, axis=-1).max()), 1e-6)
    if affine is not None:
        field = field + points @ (affine[:3, :3] - np.eye(3)).T + affine[:3, 3]
    return field


def deform(image: sitk.Image, displacement_mm: np.ndarray, grid: Grid, linear: bool = True,
           default: float = -1000.0) -> sitk.Image:
    """``image`` resampled onto ``grid`` through y -> y + v(y): the result at y is image(y + v(y))."""
    return resample_to(image, grid, displacement_transform(displacement_mm, grid), linear=linear, default=default)


def demo_pair(seed: int = 0, oblique: bool = True):
    """The built-in sample pair: (fixed CT, moving CT, fixed lung mask, moving lung mask, true displacement, grid).

    ``moving(y) = fixed(y + v(y))`` with ``v`` the true displacement on the moving grid (which equals the fixed
    grid here); a perfect registration phi (fixed -> moving) satisfies ``phi(x) + v(phi(x)) = x``.
    """
    direction = rotation_direction((6.0, -4.0, 8.0)) if oblique else tuple(np.eye(3).ravel())
    grid = Grid((96, 80, 56), (2.0, 2.2, 3.0), (-90.0, -80.0, -1200.0), direction)
    fixed, fixed_mask = thorax_phantom(grid, seed)
    affine = np.eye(4)
    affine[:3, :3] = np.diag([1.03, 0.98, 1.05])
    affine[:3, 3] = [3.0, -4.0, 8.0]
    truth = random_displacement(grid, amplitude_mm=6.0, sigma_mm=14.0, seed=seed + 1, affine=affine)
    moving = deform(fixed, truth, grid)
    moving_mask = sitk.Cast(deform(sitk.Cast(fixed_mask, sitk.sitkFloat32), truth, grid, default=0.0) >= 0.5,
                            sitk.sitkUInt8)
    return fixed, moving, fixed_mask, moving_mask, truth, grid


def warp_error_mm(transform: sitk.Transform, truth_mm: np.ndarray, grid: Grid, mask: np.ndarray) -> np.ndarray:
    """Errors ||phi(x) + v(phi(x)) - x|| (mm) at the voxels of ``mask`` (Z, Y, X bool), for the registration
    ``transform`` phi (fixed -> moving) and the true displacement ``truth_mm`` v on ``grid``."""
    truth = displacement_transform(truth_mm, grid)
    points = grid.physical_points()[mask]
    errors = np.empty(len(points))
    for n, p in enumerate(points):
        q = np.asarray(transform.TransformPoint(tuple(p)))
        errors[n] = np.linalg.norm(np.asarray(truth.TransformPoint(tuple(q))) - p)
    return errors
