"""A PNG overview of a registration (fixed / warped / checkerboard / Jacobian, three orthogonal slices),
written with the standard library (zlib), so it needs no plotting package."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import List

import numpy as np


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


def _orthogonal_slices(volume_zyx: np.ndarray, spacing_xyz) -> List[np.ndarray]:
    """Axial, coronal and sagittal centre slices, rows flipped so superior is up, resampled to ~square pixels."""
    nz, ny, nx = volume_zyx.shape
    sx, sy, sz = spacing_xyz
    views = [(volume_zyx[nz // 2], sy, sx), (volume_zyx[:, ny // 2][::-1], sz, sx),
             (volume_zyx[:, :, nx // 2][::-1], sz, sy)]
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
    rows = []
    for f, w, d in zip(*(_orthogonal_slices(v, spacing_xyz) for v in (fixed, warped, det))):
        tiles = 8
        yy, xx = np.indices(f.shape)
        checker = ((yy * tiles // f.shape[0] + xx * tiles // f.shape[1]) % 2).astype(bool)
        panels = [_gray(f, low, high), _gray(w, low, high), _gray(np.where(checker, f, w), low, high), _diverging(d)]
        rows.append(np.concatenate([np.pad(p, ((2, 2), (2, 2), (0, 0))) for p in panels], axis=1))
    width = max(r.shape[1] for r in rows)
    image = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
    write_png(image, path)
