"""Local normalised cross-correlation (LNCC) of two images, the neighbourhood CC of ANTs SyN's default metric.

For a (2r+1)^3 box around each voxel: ``cc = cov(F, M)^2 / (var(F) var(M) + eps)`` in [0, 1], box means by the
separable box filter of the MIND-SSC code (:func:`nephireg.features._box_filter`, replicate borders). Squared, as in
ANTs, so anti-correlated neighbourhoods count as matched too and the value needs no square root.
"""

from __future__ import annotations

import torch

from nephireg.features import _box_filter

EPSILON = 1e-8  # added to var(F) var(M) (images normalised to about [0, 1]); 1e-5 hid low-contrast detail


def local_ncc(fixed: torch.Tensor, moving: torch.Tensor, radius: int) -> torch.Tensor:
    """Squared local correlation of (1, 1, Z, Y, X) images over (2 ``radius`` + 1)^3 voxel boxes -> same shape."""
    mean_f, mean_m = _box_filter(fixed, radius), _box_filter(moving, radius)
    cov = _box_filter(fixed * moving, radius) - mean_f * mean_m
    var_f = (_box_filter(fixed * fixed, radius) - mean_f * mean_f).clamp(min=0)
    var_m = (_box_filter(moving * moving, radius) - mean_m * mean_m).clamp(min=0)
    return cov * cov / (var_f * var_m + EPSILON)
