"""A PNG overview of a registration (fixed / warped / checkerboard / Jacobian, three orthogonal slices),
written with the standard library (zlib), so it needs no plotting package."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import List

import numpy as np

MIN_WIDTH_PIXELS = 800


def write_png(rgb: np.ndarray, path) -> None:
    """Write an (H, W, 3) uint8 image as PNG."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
                           + chunk(b"IEND", b""))


def _gray(slice2d: np.ndarray, low: float, high: float) -> np.ndarray:
    g = np.clip((slice2d - low) / max(high - low, 1e-12), 0, 1)
    return np.repeat((g * 255).astype(np.uint8)[..., None], 3, axis=-1)


def _diverging(det: np.ndarray) -> np.ndarray:
    """Blue (det 0) - white (1) - red (2); folds (det <= 0) black."""
    t = np.clip(det / 2.0, 0, 1)[..., None]
    blue, white, red = np.array([0, 60, 255.0]), np.array([255, 255, 255.0]), np.array([255, 30, 0.0])
    rgb = np.where(t < 0.5, blue + (white - blue) * (t / 0.5), white + (red - white) * ((t - 0.5) / 0.5))
    rgb[det <= 0] = 0
    return rgb.astype(np.uint8)


def _most_informative(fixed_zyx: np.ndarray, det_zyx: np.ndarray, axis: int) -> int:
    """Of the slices at 1/3, 1/2 and 2/3 along ``axis``, the one with the most structure where things moved
    (largest product of the fixed image's and det J's standard deviations)."""
    n = det_zyx.shape[axis]
    candidates = sorted({n // 3, n // 2, (2 * n) // 3})
    return max(candidates, key=lambda i: float(np.take(fixed_zyx, i, axis=axis).std())
               * float(np.take(det_zyx, i, axis=axis).std()))


def _orthogonal_slices(volume_zyx: np.ndarray, spacing_xyz, where) -> List[np.ndarray]:
    """Axial, coronal and sagittal slices at ``where`` (k, j, i), rows flipped so superior is up, resampled to
    square pixels of the finest spacing."""
    k, j, i = where
    sx, sy, sz = spacing_xyz
    views = [(volume_zyx[k], sy, sx), (volume_zyx[:, j][::-1], sz, sx), (volume_zyx[:, :, i][::-1], sz, sy)]
    out = []
    for image, row_mm, col_mm in views:
        rows = max(1, int(round(image.shape[0] * row_mm / min(row_mm, col_mm))))
        cols = max(1, int(round(image.shape[1] * col_mm / min(row_mm, col_mm))))
        ri = np.minimum((np.arange(rows) * image.shape[0] / rows).astype(int), image.shape[0] - 1)
        ci = np.minimum((np.arange(cols) * image.shape[1] / cols).astype(int), image.shape[1] - 1)
        out.append(image[np.ix_(ri, ci)])
    return out


def overview(fixed: np.ndarray, warped: np.ndarray, det: np.ndarray, spacing_xyz, path) -> None:
    """Rows: axial, coronal, sagittal; columns: fixed, warped moving, checkerboard, Jacobian determinant."""
    low, high = np.percentile(fixed, [1, 99])
    where = tuple(_most_informative(fixed, det, axis) for axis in (0, 1, 2))
    rows = []
    for f, w, d in zip(*(_orthogonal_slices(v, spacing_xyz, where) for v in (fixed, warped, det))):
        tiles = 8
        yy, xx = np.indices(f.shape)
        checker = ((yy * tiles // f.shape[0] + xx * tiles // f.shape[1]) % 2).astype(bool)
        panels = [_gray(f, low, high), _gray(w, low, high), _gray(np.where(checker, f, w), low, high), _diverging(d)]
        rows.append(np.concatenate([np.pad(p, ((2, 2), (2, 2), (0, 0))) for p in panels], axis=1))
    width = max(r.shape[1] for r in rows)
    image = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
    zoom = max(1, int(np.ceil(MIN_WIDTH_PIXELS / image.shape[1])))
    write_png(np.repeat(np.repeat(image, zoom, axis=0), zoom, axis=1), path)
