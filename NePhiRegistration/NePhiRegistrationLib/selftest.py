"""Helpers of the in-Slicer self-test (``NePhiRegistrationTest``): a synthetic engine result made without torch.

numpy + SimpleITK (both ship with Slicer), written with the engine's own writers (``nephireg.io``).
:func:`writeSyntheticResult` writes what the engine would: an ITK
displacement-field transform, its Jacobian determinant map (analytic) and ``result.json``.
"""

from __future__ import annotations

import os
from typing import Dict, Tuple

import numpy as np

from nephireg import protocol
from nephireg.geometry import Grid

# A small oblique, anisotropic fixed grid, so a wrong axis order or LPS/RAS flip shows.
TEST_GRID = Grid(size=(20, 16, 12), spacing=(1.5, 2.0, 3.0), origin=(12.0, -30.0, 40.0),
                 direction=tuple(np.round(np.array([[0.9800666, -0.1986693, 0.0],
                                                    [0.1986693, 0.9800666, 0.0],
                                                    [0.0, 0.0, 1.0]]), 7).ravel()))


def syntheticDisplacement(grid: Grid = TEST_GRID, amplitude_mm: float = 3.0) -> np.ndarray:
    """(Z, Y, X, 3) LPS mm: u(x) = amplitude * (sin(x/20), cos(y/25), sin(z/30)) - smooth, det J > 0."""
    points = grid.physical_points()
    return amplitude_mm * np.stack([np.sin(points[..., 0] / 20.0), np.cos(points[..., 1] / 25.0),
                                    np.sin(points[..., 2] / 30.0)], axis=-1)


def analyticJacobian(grid: Grid = TEST_GRID, amplitude_mm: float = 3.0) -> np.ndarray:
    """det(I + Du) of :func:`syntheticDisplacement` (Du is diagonal): (Z, Y, X) float32."""
    p = grid.physical_points()
    det = ((1 + amplitude_mm / 20.0 * np.cos(p[..., 0] / 20.0)) * (1 - amplitude_mm / 25.0 * np.sin(p[..., 1] / 25.0))
           * (1 + amplitude_mm / 30.0 * np.cos(p[..., 2] / 30.0)))
    return det.astype(np.float32)


def writeSyntheticResult(outDir: str, grid: Grid = TEST_GRID) -> Tuple[Dict, np.ndarray]:
    """Write transform.h5, jacobian.nrrd and result.json into ``outDir``; returns (manifest, displacement)."""
    from nephireg.io import image_from_array, write_image, write_transform

    os.makedirs(outDir, exist_ok=True)
    displacement = syntheticDisplacement(grid)
    write_transform(displacement, grid, os.path.join(outDir, protocol.OUTPUT_FILES["transform"]))
    write_image(image_from_array(analyticJacobian(grid), grid), os.path.join(outDir, protocol.OUTPUT_FILES["jacobian"]))
    det = analyticJacobian(grid)
    metrics = {"folding_percent": 0.0, "jacobian_min": float(det.min()), "jacobian_max": float(det.max())}
    files = {key: protocol.OUTPUT_FILES[key] for key in ("transform", "jacobian")}
    protocol.write_manifest(outDir, {"files": files, "metrics": metrics})
    return protocol.read_manifest(outDir), displacement


def volumeArraysOnGrid(grid: Grid = TEST_GRID) -> Tuple[np.ndarray, np.ndarray]:
    """(fixed, moving) float32 arrays [k, j, i] with some structure (for addVolumeFromArray)."""
    p = grid.physical_points()
    fixed = np.exp(-((p - grid.center_physical()) ** 2).sum(-1) / 400.0).astype(np.float32)
    moving = np.exp(-((p - grid.center_physical() - 2.0) ** 2).sum(-1) / 400.0).astype(np.float32)
    return fixed, moving
