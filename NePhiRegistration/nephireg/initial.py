"""The initial linear transform a run starts from (``--initial-transform FILE``).

The file is an ITK linear transform (any of translation, Euler, similarity, affine, a composite of those; ``.tfm``,
``.txt``, ``.mat`` or ``.h5``) in the resampling direction, fixed -> moving, LPS mm - what Slicer writes for a
moving volume's parent transform and what ``nephireg`` itself writes. It replaces the automatic pre-alignment and is
composed before the deformable step: phi(x) = T(x + u(x)) (:func:`nephireg.compose.compose_prealignment`).
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np

from nephireg import io
from nephireg.compose import affine_matrix
from nephireg.errors import InputError

INITIAL_MODE = "initial-transform"  # the manifest's parameters.prealign when a run started from a file


def read_initial_transform(path: Union[str, os.PathLike]) -> np.ndarray:
    """The file's 4x4 matrix (fixed -> moving, LPS mm). InputError naming the file when it is missing, unreadable,
    not linear or singular."""
    transform = io.read_transform(path, "initial transform")
    if not transform.IsLinear():
        raise InputError(f"initial transform is not linear ({transform.GetName()}); give a rigid or affine "
                         "transform", path)
    matrix = affine_matrix(transform)
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-6:
        raise InputError("initial transform is singular (its matrix has no inverse)", path)
    return matrix
