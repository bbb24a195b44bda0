"""MIND-SSC features (Heinrich et al. 2013): modality-independent self-similarity descriptors, 12 channels.

For each of the 12 pairs (a, b) of the six face neighbours of a voxel that lie at squared distance 2 of each other,
the patch distance D_ab(x) = box_r * (I(x + d a) - I(x + d b))^2 (patch radius ``r``, dilation ``d`` voxels). The
descriptor is exp(-(D_ab - min_ab D) / V(x)), with V the mean of the 12 distances (clamped relative to its global
mean for stability). Invariant to monotone-ish intensity changes that keep local contrast ordering.

Shapes: image (N, 1, Z, Y, X) -> features (N, 12, Z, Y, X).
"""

from __future__ import annotations

import itertools
from typing import List, Tuple

import torch
import torch.nn.functional as F

_FACE_NEIGHBOURS = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]  # (dz, dy, dx)


def ssc_pairs() -> List[Tuple[Tuple[int, int, int], Tuple[int, int, int]]]:
    """The 12 neighbour pairs (a, b) with |a - b|^2 == 2 (edges of the six-neighbourhood octahedron)."""
    pairs = []
    for a, b in itertools.combinations(_FACE_NEIGHBOURS, 2):
        if sum((p - q) ** 2 for p, q in zip(a, b)) == 2:
            pairs.append((a, b))
    assert len(pairs) == 12
    return pairs


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC of ``image`` (N, 1, Z, Y, X) -> (N, 12, Z, Y, X), values in (0, 1]."""
    if image.ndim != 5 or image.shape[1] != 1:
        raise ValueError(f"mind_ssc expects (N, 1, Z, Y, X); got {tuple(image.shape)}")
    d = dilation
    z, y, x = image.shape[2:]
    padded = F.pad(image, (d,) * 6, mode="replicate")

    def shifted(offset: Tuple[int, int, int]) -> torch.Tensor:  # image(x + d * offset), a view
        oz, oy, ox = (d + d * o for o in offset)
        return padded[:, :, oz:oz + z, oy:oy + y, ox:ox + x]

    diffs = torch.cat([(shifted(a) - shifted(b)) ** 2 for a, b in ssc_pairs()], dim=1)
    ssd = _box_filter(diffs, radius)
    del diffs
    # In place from here: the (N, 12, Z, Y, X) tensors are the largest of a run and nothing else holds them.
    ssd.sub_(ssd.min(dim=1, keepdim=True).values)
    variance = ssd.mean(dim=1, keepdim=True)
    global_mean = variance.mean()
    variance.clamp_(min=global_mean * 1e-3 + 1e-12, max=global_mean * 1e3 + 1e-12)
    return ssd.div_(variance).neg_().exp_()


def _box_filter(volume: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over a (2r+1)^3 box with replicate borders; shape kept.

    Separable sums of shifted views, one axis at a time: 2x faster on a CPU than one ``avg_pool3d`` with the
    (2r+1)^3 kernel (0.3 against 0.6-0.7 s for the 12 channels of the lung pair's working grid).
    """
    if radius == 0:
        return volume.clone()
    width = 2 * radius + 1
    out = F.pad(volume, (radius,) * 6, mode="replicate")
    for dim in (2, 3, 4):
        size = out.shape[dim] - 2 * radius
        summed = out.narrow(dim, 0, size) + out.narrow(dim, 1, size)
        for shift in range(2, width):
            summed += out.narrow(dim, shift, size)
        out = summed
    return out.div_(width ** 3)
