"""The NePhi loss of one image pair on sampled points (shared by instance optimisation and training):

``0.5 [ (1 - NCC(M o phi, F)) + (1 - NCC(F o phi^-1, M)) ] + lambda GradICON + prior_weight (|g| + |l|)``.

NCC compares the images' intensities, or, when the pair carries them, feature volumes of the two images (MIND-SSC,
12 channels: NCC over all channels, each centred on its own mean). The images themselves always feed the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from nephireg.nephi.field import Codes, NePhiNet
from nephireg.nephi.losses import GRADICON_JACOBIANS, PointSampler, gradicon, latent_prior, ncc, sample_image


@dataclass(frozen=True)
class LossSettings:
    similarity_points: int = 10_000  # per direction and step
    gradicon_points: int = 250  # per direction and step
    gradicon_weight: float = 10.0
    prior_weight: float = 0.01
    gradicon_jacobian: str = "exact"  # nephireg.nephi.losses.GRADICON_JACOBIANS

    def __post_init__(self) -> None:
        if self.gradicon_jacobian not in GRADICON_JACOBIANS:
            raise ValueError(f"gradicon_jacobian must be one of {GRADICON_JACOBIANS}")
        if self.similarity_points < 16 or self.gradicon_points < 1:
            raise ValueError("similarity_points must be >= 16 and gradicon_points >= 1")
        if self.gradicon_weight < 0 or self.prior_weight < 0:
            raise ValueError("loss weights must be >= 0")


@dataclass
class PairImages:
    """One pair on a common working grid: images (1, 1, Z, Y, X), samplers of their (masked) points, and the
    volumes the similarity compares (the images, or their features (1, C, Z, Y, X))."""

    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_points: PointSampler
    moving_points: PointSampler
    all_points: PointSampler
    fixed_similarity: Optional[torch.Tensor] = None  # None: the image itself
    moving_similarity: Optional[torch.Tensor] = None

    @classmethod
    def build(cls, fixed: torch.Tensor, moving: torch.Tensor, fixed_mask=None, moving_mask=None,
              features: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> PairImages:
        """``features``: optional (fixed, moving) feature volumes on the same grid for the similarity term."""
        shape = tuple(fixed.shape[2:])
        fixed_similarity, moving_similarity = features if features is not None else (None, None)
        return cls(fixed, moving, PointSampler(shape, fixed_mask, fixed.device),
                   PointSampler(shape, moving_mask, fixed.device), PointSampler(shape, None, fixed.device),
                   fixed_similarity, moving_similarity)

    def similarity_volumes(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(fixed, moving) volumes the similarity term samples."""
        if self.fixed_similarity is None or self.moving_similarity is None:
            return self.fixed, self.moving
        return self.fixed_similarity, self.moving_similarity


def pair_loss(net: NePhiNet, codes: Codes, images: PairImages, settings: LossSettings,
              generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """Loss terms of one pair; ``total`` is the one to minimise."""
    xf = images.fixed_points.sample(settings.similarity_points, generator)
    xm = images.moving_points.sample(settings.similarity_points, generator)
    fixed, moving = images.similarity_volumes()
    forward_of_fixed, backward_of_moving = net.transform_pair(xf, xm, codes)
    warped_moving = sample_image(moving, forward_of_fixed)
    warped_fixed = sample_image(fixed, backward_of_moving)
    similarity = 1.0 - 0.5 * (ncc(warped_moving, sample_image(fixed, xf))
                              + ncc(warped_fixed, sample_image(moving, xm)))
    terms = {"similarity": similarity}
    total = similarity
    if settings.gradicon_weight > 0:
        xr = images.all_points.sample(settings.gradicon_points, generator)
        terms["gradicon"] = gradicon(net, codes, xr, settings.gradicon_jacobian)
        total = total + settings.gradicon_weight * terms["gradicon"]
    if settings.prior_weight > 0:
        terms["prior"] = latent_prior(codes)
        total = total + settings.prior_weight * terms["prior"]
    terms["total"] = total
    return terms
