"""Training data for NePhi: real pairs from a CSV and single volumes for synthetic pairs, as tensors on the
encoder's input shape (each image resampled over its own normalised cube, as the encoder does at inference).

CSV formats (header row required, paths relative to the CSV's folder or absolute):

* pairs:   ``fixed,moving[,fixed_mask,moving_mask][,window_lo,window_hi]``
* volumes: ``image[,mask][,window_lo,window_hi]``

Intensities: clamped to ``[window_lo, window_hi]`` and scaled to [0, 1] when a window is given (CT in HU),
otherwise robust 0.5-99.5 percentile scaling. Masks multiply their images, as NePhi does at inference.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from nephireg.errors import InputError
from nephireg.sampling import identity_normalised, sample_normalised


@dataclass
class Volume:
    image: torch.Tensor  # (1, 1, Z, Y, X) in [0, 1], masked
    mask: Optional[torch.Tensor]
    name: str


@dataclass
class Pair:
    fixed: Volume
    moving: Volume


def read_csv(path: Path, required: Sequence[str]) -> List[dict]:
    if not path.is_file():
        raise InputError("CSV file not found", path)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in required if rows and c not in rows[0]]
    if not rows or missing:
        raise InputError(f"CSV needs a header with {', '.join(required)} and at least one row", path)
    return rows


def load_volumes(csv_path: Path, shape: Tuple[int, int, int]) -> List[Volume]:
    rows = read_csv(csv_path, ["image"])
    return [_load(csv_path.parent, row["image"], row.get("mask"), _window(row), shape) for row in rows]


def load_pairs(csv_path: Path, shape: Tuple[int, int, int]) -> List[Pair]:
    import SimpleITK as sitk

    from nephireg import io as nio
    from nephireg.geometry import Grid

    out = []
    for row in read_csv(csv_path, ["fixed", "moving"]):
        fixed = nio.read_image(_path(csv_path.parent, row["fixed"]), "fixed")
        grid = Grid.of(fixed)
        moving = nio.resample_to(nio.read_image(_path(csv_path.parent, row["moving"]), "moving"), grid)
        fm = _mask(csv_path.parent, row.get("fixed_mask"), fixed, grid)
        mm = _mask(csv_path.parent, row.get("moving_mask"), None, grid)
        window = _window(row)
        out.append(Pair(_volume(sitk.GetArrayFromImage(fixed), fm, window, shape, row["fixed"]),
                        _volume(sitk.GetArrayFromImage(moving), mm, window, shape, row["moving"])))
    return out


def _path(base: Path, value: str) -> Path:
    p = Path(value.strip())
    return p if p.is_absolute() else base / p


def _window(row: dict) -> Optional[Tuple[float, float]]:
    lo, hi = (row.get("window_lo") or "").strip(), (row.get("window_hi") or "").strip()
    return (float(lo), float(hi)) if lo and hi else None


def _mask(base: Path, value: Optional[str], image, grid) -> Optional[np.ndarray]:
    import SimpleITK as sitk

    from nephireg import io as nio

    if not value or not value.strip():
        return None
    mask = sitk.ReadImage(str(_path(base, value)))
    return sitk.GetArrayFromImage(nio.resample_to(mask, grid, linear=False)) > 0


def _load(base: Path, image: str, mask: Optional[str], window, shape) -> Volume:
    import SimpleITK as sitk

    from nephireg import io as nio
    from nephireg.geometry import Grid

    img = nio.read_image(_path(base, image), "image")
    m = _mask(base, mask, img, Grid.of(img))
    return _volume(sitk.GetArrayFromImage(img), m, window, shape, image)


def _volume(array: np.ndarray, mask: Optional[np.ndarray], window, shape, name: str) -> Volume:
    array = array.astype(np.float32)
    if window is not None:
        lo, hi = window
    else:
        lo, hi = np.percentile(array, [0.5, 99.5])
    scaled = np.clip((array - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)
    image = _resample(torch.from_numpy(scaled)[None, None], shape)
    mask_t = None
    if mask is not None:
        mask_t = (_resample(torch.from_numpy(mask.astype(np.float32))[None, None], shape) > 0.5).float()
        image = image * mask_t
    return Volume(image, mask_t, name)


def _resample(volume: torch.Tensor, shape: Tuple[int, int, int]) -> torch.Tensor:
    grid = identity_normalised(shape, dtype=volume.dtype)
    return sample_normalised(volume, grid)
