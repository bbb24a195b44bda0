"""Writes the sample pair shipped in ``Resources/SampleData``: the engine's synthetic demo pair.

Not patient data: :func:`nephireg.synthetic.demo_pair` (seed 0) - a thorax-like CT phantom on an oblique,
anisotropic grid and the same phantom deformed by a known smooth displacement (affine + random smooth field).
Stored as int16 Hounsfield-like units, gzip NRRD. Regenerate (developer tool, needs numpy + SimpleITK, no
torch) from the module folder: ``python -m NePhiRegistrationLib.demodata Resources/SampleData``; then update the
checksums in ``sampledata.py`` (a pytest compares them with the files).
"""

from __future__ import annotations

import os
import sys
from typing import Tuple

FILE_NAMES = ("NePhiDemoFixed.nrrd", "NePhiDemoMoving.nrrd")


def writeDemoPair(folder: str, seed: int = 0) -> Tuple[str, str]:
    import SimpleITK as sitk

    from nephireg.synthetic import demo_pair

    fixed, moving = demo_pair(seed)[:2]
    os.makedirs(folder, exist_ok=True)
    paths = tuple(os.path.join(folder, name) for name in FILE_NAMES)
    for image, path in zip((fixed, moving), paths):
        rounded = sitk.Cast(sitk.Round(image), sitk.sitkInt16)
        sitk.WriteImage(rounded, path, True)
    return paths


if __name__ == "__main__":  # pragma: no cover - developer tool
    print("\n".join(writeDemoPair(sys.argv[1] if len(sys.argv) > 1 else ".")))
