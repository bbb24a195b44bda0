"""MIND-SSC features (Heinrich et al. 2013): modality-independent self-similarity descriptors, 12 channels.

For each of the 12 pairs (a, b) of the six face neighbours of a voxel that lie at squared distance 2 of each other,
the patch distance D_ab(x) = box_r * (I(x + d a) - I(x + d b))^2 (patch radius ``r``, dilation ``d`` voxels). The
descriptor is exp(-(D_ab - min_ab D) / V(x)), with V the mean of the 12 distances (clamped relative to its global
mean for stability). Invariant to monotone-ish intensity changes that keep local contrast ordering.

Shapes: image (N, 1, Z, Y, X) -> features (N, 12, Z, Y, X).
"""

from __future__ import annotations

import itertools
import math
from typing import List, Optional, Sequence, Tuple

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


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2,
             scratch: Optional[MindScratch] = None) -> torch.Tensor:
    """MIND-SSC of ``image`` (N, 1, Z, Y, X) -> (N, 12, Z, Y, X), values in (0, 1].

    The 12 pairs share 6 difference directions c = a - b (up to sign): D_ab(x) = box_r (I(y + d c) - I(y))^2 at
    y = x + d b (or x + d a when a - b = -c). So 6 squared differences are box-filtered once, on the image
    replicate-padded by 2d + r, and each pair's channel is a shifted view of its direction's result: half the work
    of filtering 12 channels. Inside (more than 2d + r voxels from the border) the numbers equal the pairwise
    definition; nearer the border the padded image stands in for the replicated distances.

    ``scratch``: the working arrays of an earlier call (:class:`MindScratch`), reused: pass one to the calls for
    both images of a pair. The working arrays are written in place (``out=``), never allocated per step, so the
    features are not differentiable with respect to ``image``: call it under ``torch.no_grad()`` (every caller
    does; the similarity terms differentiate through the sampling of precomputed features).
    """
    if image.ndim != 5 or image.shape[1] != 1:
        raise ValueError(f"mind_ssc expects (N, 1, Z, Y, X); got {tuple(image.shape)}")
    scratch = scratch if scratch is not None else MindScratch()
    d, r = dilation, radius
    margin = 2 * d + r
    size = image.shape[2:]
    padded = F.pad(image, (margin,) * 6, mode="replicate")
    directions = ssc_directions()
    # squared differences on the region y in [-(d + r), n + d + r) per axis, padded index y + margin
    region = [n + 2 * (d + r) for n in size]
    squares = scratch.array(0, (image.shape[0], len(directions), *region), image)
    for k, c in enumerate(directions):
        torch.sub(_window(padded, [d + d * ci for ci in c], region), _window(padded, [d] * 3, region),
                  out=squares[:, k:k + 1])
    del padded
    boxed = _box_sum_valid(squares.square_(), r, scratch)  # (N, 6, n + 2d per axis), index j <-> y = j - d
    ssd = torch.cat([_window(boxed[:, k:k + 1], [d + d * bi for bi in base], list(size))
                     for k, base in ssc_pair_bases(directions)], dim=1)
    # In place from here: the (N, 12, Z, Y, X) tensors are the largest of a run and nothing else holds them.
    ssd.sub_(torch.amin(ssd, dim=1, keepdim=True))
    variance = ssd.mean(dim=1, keepdim=True)
    global_mean = variance.mean()
    variance.clamp_(min=global_mean * 1e-3 + 1e-12, max=global_mean * 1e3 + 1e-12)
    return ssd.div_(variance).neg_().exp_()


class MindScratch:
    """Two flat working arrays that :func:`mind_ssc` writes its intermediate results into, grown as needed and
    reused by the next call.

    Why: each intermediate is tens to hundreds of MB (the lung pair's working grid: 80 MB per 6-channel array).
    Allocated afresh, each is new memory that the kernel maps page by page on first touch (each call allocated
    ~700 MB; on this VM 2-7 us a page, i.e. 0.4-1.2 s of the features stage in a slow phase); reused, the second
    image's intermediates cost no new pages and the first's half as many.
    """

    def __init__(self) -> None:
        self._flat: List[Optional[torch.Tensor]] = [None, None]

    def array(self, slot: int, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """A contiguous ``shape`` view of working array ``slot`` (0 or 1), its old contents undefined."""
        count = math.prod(shape)
        flat = self._flat[slot]
        if flat is None or flat.numel() < count or flat.dtype != like.dtype or flat.device != like.device:
            flat = self._flat[slot] = None  # the old one freed before the larger one is made
            flat = self._flat[slot] = torch.empty(count, dtype=like.dtype, device=like.device)
        return flat[:count].view(*shape)


def ssc_directions() -> List[Tuple[int, int, int]]:
    """The 6 directions c = a - b of the SSC pairs, each once up to sign (first non-zero component positive)."""
    directions = []
    for a, b in ssc_pairs():
        c = tuple(p - q for p, q in zip(a, b))
        if next(v for v in c if v != 0) < 0:
            c = tuple(-v for v in c)
        if c not in directions:
            directions.append(c)
    assert len(directions) == 6
    return directions


def ssc_pair_bases(directions: List[Tuple[int, int, int]]) -> List[Tuple[int, Tuple[int, int, int]]]:
    """For each SSC pair (a, b) in :func:`ssc_pairs` order: (index of its direction c, base point e) with
    I(x + d a) - I(x + d b) = +-(I(x + d e + d c) - I(x + d e))."""
    bases = []
    for a, b in ssc_pairs():
        c = tuple(p - q for p, q in zip(a, b))
        if c in directions:
            bases.append((directions.index(c), b))
        else:
            bases.append((directions.index(tuple(-v for v in c)), a))
    return bases


def _window(volume: torch.Tensor, start: List[int], length: List[int]) -> torch.Tensor:
    """The view volume[..., start_z : start_z + length_z, ...] over the last three axes."""
    for axis, (first, count) in enumerate(zip(start, length)):
        volume = volume.narrow(2 + axis, first, count)
    return volume


def _box_sum_valid(volume: torch.Tensor, radius: int, scratch: MindScratch) -> torch.Tensor:
    """Mean over (2r+1)^3 boxes without padding: each of the last 3 axes shrinks by 2r. The passes alternate
    between ``scratch``'s two arrays (its array 0 may be ``volume`` itself: each pass reads one array and writes the
    other), so the result is a view of array 1."""
    width = 2 * radius + 1
    if radius == 0:
        return volume.clone()
    out = volume
    for number, dim in enumerate((2, 3, 4)):
        size = out.shape[dim] - 2 * radius
        shape = list(out.shape)
        shape[dim] = size
        summed = scratch.array(1 - number % 2, shape, out)  # z -> array 1, y -> array 0, x -> array 1
        torch.add(out.narrow(dim, 0, size), out.narrow(dim, 1, size), out=summed)
        for shift in range(2, width):
            summed += out.narrow(dim, shift, size)
        out = summed
    return out.div_(width ** 3)


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
