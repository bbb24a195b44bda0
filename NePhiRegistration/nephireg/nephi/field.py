"""The NePhi neural deformation field: phi(x) = x + MLP(x, z(x)), a forward and a backward MLP sharing one code.

Coordinates ``x`` are normalised coordinates of the working grid ((P, 3), (i, j, k) order, about [-1, 1]; see
:mod:`nephireg.geometry`); displacements are returned in the same normalised units. The latent code is
``z(x) = concat(g, l(x))``: a global code ``g`` (G,) and a local code grid ``l`` (L, Z, Y, X) sampled trilinearly
(:func:`nephireg.nephi.trilinear.trilinear`, twice differentiable in ``x``).

Each MLP is a modulated sine network (Mehta et al. 2021): a synthesis network of sine layers fed with the Fourier
embedding ``[sin 2 pi x B, cos 2 pi x B]`` of the point, whose hidden activations are multiplied by gates from a
ReLU modulation network fed with ``[z(x), embedding]``. The last (linear) layer reads ``[hidden, z(x)]`` and starts
at zero, so a fresh field is the identity.
The Gaussian matrix ``B`` (3, F) is a buffer: it is saved with the weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Tuple

import torch
from torch import nn

from nephireg.nephi.trilinear import trilinear

Codes = Tuple[torch.Tensor, torch.Tensor]
"""(global code (G,), local code grid (L, Z, Y, X))."""


@dataclass(frozen=True)
class FieldConfig:
    """Architecture of the field; saved in model files, so every field here is part of the file format."""

    global_dim: int = 32
    local_dim: int = 32
    fourier_features: int = 128  # columns of B; the embedding has twice as many entries
    fourier_scale: float = 1.0  # standard deviation of B's entries
    hidden: int = 128
    hidden_layers: int = 2
    omega: float = 1.0  # sine frequency factor: sin(omega (W h + b)); scales the effective learning rate
    code_readout: bool = True  # the last layer also reads z(x) (faster instance optimisation)

    def __post_init__(self) -> None:
        for name in ("global_dim", "local_dim", "fourier_features", "hidden", "hidden_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"FieldConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.fourier_scale <= 0 or self.omega <= 0:
            raise ValueError("FieldConfig.fourier_scale and omega must be positive")

    @property
    def code_dim(self) -> int:
        return self.global_dim + self.local_dim

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FieldConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown field configuration keys: {sorted(unknown)}")
        return cls(**dict(values))


class ModulatedSiren(nn.Module):
    """Maps (embedding (P, E), code (P, C)) -> displacement (P, 3); zero at initialisation."""

    def __init__(self, embed_dim: int, code_dim: int, hidden: int, layers: int, omega: float,
                 code_readout: bool = True) -> None:
        super().__init__()
        self.omega = omega
        self.code_readout = code_readout
        self.synthesis = nn.ModuleList(
            [nn.Linear(embed_dim if i == 0 else hidden, hidden) for i in range(layers)])
        self.modulation = nn.ModuleList(
            [nn.Linear(code_dim + (embed_dim if i == 0 else hidden), hidden) for i in range(layers)])
        # The read-out also sees the code itself: a linear map of the trilinearly sampled local code is a smooth,
        # coarse displacement that Adam fits quickly; the sine layers add the detail on top.
        self.out = nn.Linear(hidden + (code_dim if code_readout else 0), 3)
        for layer in self.synthesis:  # SIREN initialisation, so activations stay well spread
            bound = math.sqrt(6.0 / layer.in_features) / omega
            nn.init.uniform_(layer.weight, -bound, bound)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, embedding: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        h, gate = embedding, embedding
        for synth, mod in zip(self.synthesis, self.modulation):
            gate = torch.relu(mod(torch.cat([code, gate], dim=1)))
            h = gate * torch.sin(self.omega * synth(h))
        return self.out(torch.cat([h, code], dim=1) if self.code_readout else h)


class NePhiNet(nn.Module):
    """The two MLPs and the Fourier matrix; the latent codes are inputs (from the encoder or optimised)."""

    def __init__(self, config: FieldConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        generator = torch.Generator().manual_seed(seed)
        matrix = torch.randn(3, config.fourier_features, generator=generator) * config.fourier_scale
        self.register_buffer("fourier_matrix", matrix)
        embed = 2 * config.fourier_features
        args = (embed, config.code_dim, config.hidden, config.hidden_layers, config.omega, config.code_readout)
        self.forward_map = ModulatedSiren(*args)
        self.backward_map = ModulatedSiren(*args)

    def embed(self, points: torch.Tensor) -> torch.Tensor:
        """(P, 3) -> (P, 2F) Fourier features."""
        proj = 2.0 * math.pi * points @ self.fourier_matrix.to(points.dtype)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=1)

    def code_at(self, codes: Codes, points: torch.Tensor) -> torch.Tensor:
        """(P, 3) -> (P, G + L) latent code z(x)."""
        global_code, local_grid = codes
        local = trilinear(local_grid.to(points.dtype), points)
        return torch.cat([global_code.to(points.dtype).expand(points.shape[0], -1), local], dim=1)

    def displacement(self, points: torch.Tensor, codes: Codes, inverse: bool = False) -> torch.Tensor:
        """(P, 3) normalised points -> (P, 3) normalised displacement of phi (or of phi^-1 if ``inverse``)."""
        mlp = self.backward_map if inverse else self.forward_map
        return mlp(self.embed(points), self.code_at(codes, points))

    def transform(self, points: torch.Tensor, codes: Codes, inverse: bool = False) -> torch.Tensor:
        """phi(x) = x + u(x) (or phi^-1), (P, 3) -> (P, 3)."""
        return points + self.displacement(points, codes, inverse)

    def transform_pair(self, forward_points: torch.Tensor, backward_points: torch.Tensor, codes: Codes
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(phi(a), phi^-1(b)) for points a (P, 3) and b (Q, 3): the same numbers as two :meth:`transform` calls,
        with one Fourier embedding and one latent-code gather for all P + Q points (shared when ``b is a``): each
        gather's backward fills and scatters a whole local-grid gradient, so fewer gathers made an instance-
        optimisation step ~8 % cheaper on the lung pair (docs/nephi.md, session 6)."""
        both = forward_points if backward_points is forward_points else torch.cat([forward_points, backward_points])
        embedding, code = self.embed(both), self.code_at(codes, both)
        count = forward_points.shape[0]
        rest = slice(0, count) if backward_points is forward_points else slice(count, None)
        moved = forward_points + self.forward_map(embedding[:count], code[:count])
        return moved, backward_points + self.backward_map(embedding[rest], code[rest])


def zero_codes(config: FieldConfig, local_shape_zyx: Tuple[int, int, int], dtype: torch.dtype = torch.float32,
               device: torch.device = None) -> Codes:
    """All-zero latent codes: the starting point of NePhi + IO without a trained model."""
    return (torch.zeros(config.global_dim, dtype=dtype, device=device),
            torch.zeros((config.local_dim,) + tuple(local_shape_zyx), dtype=dtype, device=device))
