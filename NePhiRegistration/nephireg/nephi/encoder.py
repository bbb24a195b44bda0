"""The NePhi encoder: concat(fixed, moving) -> (global code (G,), local code grid (L, z, y, x)).

Six blocks of Conv3d(kernel 3, stride 2) + BatchNorm + LeakyReLU(0.2), channels 8-16-32-64-128-256 (the paper's).
The local head reads the block whose grid is about 1/8 of the input (a 1x1x1 convolution to ``local_dim``
channels); the global head averages the last block over space (so any input size works) and maps it to
``global_dim`` by a linear layer. Inputs are first resampled to ``input_shape`` in the working grid's normalised
coordinates, so the codes live on the same normalised cube as the field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Mapping, Tuple

import torch
from torch import nn

from nephireg.sampling import identity_normalised, sample_normalised


@dataclass(frozen=True)
class EncoderConfig:
    input_shape: Tuple[int, int, int] = (96, 96, 96)  # (Z, Y, X) the pair is resampled to
    channels: Tuple[int, ...] = field(default=(8, 16, 32, 64, 128, 256))
    local_block: int = 3  # 1-based block feeding the local code (stride 2^3 = 8)
    global_dim: int = 32
    local_dim: int = 32
    # stride-1 conv blocks on the local branch, at the local code's resolution (cheap: ~10^3 voxels); each widens
    # the local code's receptive field by 2 x 2^local_block input voxels and adds depth for matching the two images
    # (the paper's local code is 3 convolutions from the input). 0 = the paper's encoder.
    local_convs: int = 0
    local_channels: int = 64

    def __post_init__(self) -> None:
        # BatchNorm in training needs more than one value per channel after the last stride-2 block
        if len(self.input_shape) != 3 or min(self.input_shape) <= 2 ** len(self.channels):
            raise ValueError(f"input_shape {self.input_shape} too small for {len(self.channels)} stride-2 blocks: "
                             f"each side must exceed {2 ** len(self.channels)}")
        if not 1 <= self.local_block <= len(self.channels):
            raise ValueError(f"local_block must be in 1..{len(self.channels)}")
        if self.local_convs < 0 or self.local_channels < 1:
            raise ValueError("local_convs must be >= 0 and local_channels >= 1")

    def to_dict(self) -> Dict[str, Any]:
        values = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EncoderConfig:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown encoder configuration keys: {sorted(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**values)


def _block(cin: int, cout: int, stride: int = 2) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm3d(cout),
                         nn.LeakyReLU(0.2))


class Encoder(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        chans = (2,) + tuple(config.channels)
        self.blocks = nn.ModuleList([_block(chans[i], chans[i + 1]) for i in range(len(config.channels))])
        local = (config.channels[config.local_block - 1],) + (config.local_channels,) * config.local_convs
        self.local_convs = nn.Sequential(*[_block(local[i], local[i + 1], stride=1) for i in range(config.local_convs)])
        self.local_head = nn.Conv3d(local[-1], config.local_dim, 1)
        self.global_head = nn.Linear(config.channels[-1], config.global_dim)
        # Small heads: codes start near zero, where the field's modulation was trained from.
        for head in (self.local_head, self.global_head):
            nn.init.normal_(head.weight, std=1e-3)
            nn.init.zeros_(head.bias)

    def resample(self, volume: torch.Tensor) -> torch.Tensor:
        """(N, 1, Z, Y, X) on the working grid -> (N, 1, *input_shape), same normalised cube."""
        if tuple(volume.shape[2:]) == tuple(self.config.input_shape):
            return volume
        grid = identity_normalised(self.config.input_shape, dtype=volume.dtype, device=volume.device)
        return sample_normalised(volume, grid.expand(volume.shape[0], -1, -1, -1, -1))

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(N, 1, Z, Y, X) each -> global (N, G), local (N, L, z, y, x)."""
        h = torch.cat([self.resample(fixed), self.resample(moving)], dim=1)
        local = None
        for i, block in enumerate(self.blocks, start=1):
            h = block(h)
            if i == self.config.local_block:
                local = self.local_head(self.local_convs(h))
        return self.global_head(h.mean(dim=(2, 3, 4))), local
