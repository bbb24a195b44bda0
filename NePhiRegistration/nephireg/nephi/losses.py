"""NePhi losses on sampled points: NCC similarity, GradICON, latent prior, and the point samplers.

All points are normalised coordinates of the working grid, (P, 3), (i, j, k) order.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from nephireg.geometry import Grid
from nephireg.nephi.field import Codes, NePhiNet
from nephireg.sampling import matrix_tensor, sample_flat


def ncc(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalised cross-correlation of two samples (P,) or (C, P), in [-1, 1] (1 = identical up to one common gain
    and each channel's offset): each channel is centred on its own mean, then the channels count as one sample."""
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    return (a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum() + eps)


def sample_image(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Values of ``volume`` (1, C, Z, Y, X) at normalised points (P, 3), border-padded trilinear: (P,) for one
    channel, (C, P) for several (e.g. MIND-SSC features)."""
    values = sample_flat(volume, points.to(volume.dtype))
    return values.reshape(-1) if values.shape[0] == 1 else values


def jacobian(fn: Callable[[torch.Tensor], torch.Tensor], points: torch.Tensor) -> torch.Tensor:
    """Exact Jacobian (P, 3, 3) of a pointwise map (P, 3) -> (P, 3) by autograd, kept in the graph (so a loss
    built on it can be differentiated once more). Rows are output components."""
    x = points.detach().requires_grad_(True)
    y = fn(x)
    # The three rows in one batched vector-Jacobian product (vmap over the unit vectors): the same numbers as three
    # separate grad calls, ~30 % faster here, where GradICON's double backward is half of an IO step.
    unit = torch.eye(3, dtype=y.dtype, device=y.device).reshape(3, 1, 3).expand(3, y.shape[0], 3)
    rows = torch.autograd.grad(y, x, grad_outputs=unit, create_graph=True, is_grads_batched=True)[0]  # (3, P, 3)
    return rows.transpose(0, 1)


GRADICON_JACOBIANS = ("exact", "fd")  # how GradICON differentiates the round trip (see :func:`gradicon`)
FD_STEP = 1e-3  # normalised units (~0.1 working voxel on a 200-voxel axis): GradICON's own finite-difference step


def jacobian_fd(fn: Callable[[torch.Tensor], torch.Tensor], points: torch.Tensor, step: float = FD_STEP
                ) -> torch.Tensor:
    """Forward-difference Jacobian (P, D, 3) of a pointwise map (P, 3) -> (P, D): ``fn`` evaluated once on the
    points and their three shifted copies (one (4P, 3) batch), column j = (fn(x + step e_j) - fn(x)) / step.
    Differentiable in ``fn``'s parameters by a single backward (no double backward), as GradICON's own code does;
    exact for an affine map up to float round-off (~1e-4 at this step in float32), O(step) otherwise."""
    x = points.detach()
    shifts = torch.eye(3, dtype=x.dtype, device=x.device) * step  # row j = step e_j
    batch = torch.cat([x, *(x + shifts[j] for j in range(3))])  # (4P, 3)
    y = fn(batch).reshape(4, x.shape[0], -1)
    return ((y[1:] - y[0]) / step).permute(1, 2, 0)  # (P, D outputs, 3 inputs)


def gradicon(net: NePhiNet, codes: Codes, points: torch.Tensor, method: str = "exact") -> torch.Tensor:
    """Symmetric GradICON: mean ||D(phi^-1 o phi)(x) - I||_F^2, averaged with the same for phi o phi^-1.

    The Jacobian of the round trip on a few points (P, 3): ``exact`` by autograd (a double backward in the loss's
    gradient), ``fd`` by forward differences (:func:`jacobian_fd`, GradICON's original, cheaper: both round trips
    in two batched map evaluations); 0 iff the two maps are inverse in first order.
    """
    if method not in GRADICON_JACOBIANS:
        raise ValueError(f"unknown GradICON Jacobian {method!r}; choose one of {GRADICON_JACOBIANS}")
    eye = torch.eye(3, dtype=points.dtype, device=points.device)
    if method == "fd":
        def round_trips(x: torch.Tensor) -> torch.Tensor:  # (N, 3) -> (N, 6): [phi^-1(phi(x)), phi(phi^-1(x))]
            there, back = net.transform_pair(x, x, codes)
            forward_of_back, backward_of_there = net.transform_pair(back, there, codes)
            return torch.cat([backward_of_there, forward_of_back], dim=1)

        jac = jacobian_fd(round_trips, points)  # (P, 6, 3): both round trips' Jacobians, stacked
        return ((jac - torch.cat([eye, eye])) ** 2).sum(dim=(1, 2)).mean() / 2.0
    total = points.new_zeros(())
    for first_inverse in (False, True):
        def round_trip(x: torch.Tensor, first_inverse: bool = first_inverse) -> torch.Tensor:
            y = net.transform(x, codes, inverse=first_inverse)
            return net.transform(y, codes, inverse=not first_inverse)

        jac = jacobian(round_trip, points)
        total = total + ((jac - eye) ** 2).sum(dim=(1, 2)).mean()
    return total / 2.0


def latent_prior(codes: Codes) -> torch.Tensor:
    """mean |g| + mean |l|: keeps the codes small (the paper weights it by 0.01)."""
    global_code, local_grid = codes
    return global_code.abs().mean() + local_grid.abs().mean()


class PointSampler:
    """Random points inside a mask (or the whole grid), jittered within their voxels.

    ``mask``: (1, 1, Z, Y, X) in {0, 1} or None. Points are normalised coordinates (P, 3). Only the flat indices
    of the mask's voxels are kept (none without a mask), so memory does not hold a coordinate per voxel; they are
    found at the first :meth:`sample` (NePhi predict builds its samplers and never samples).
    """

    def __init__(self, shape_zyx, mask: Optional[torch.Tensor], device: torch.device) -> None:
        self.shape_zyx = tuple(int(n) for n in shape_zyx)
        self.device = device
        self.count = self.shape_zyx[0] * self.shape_zyx[1] * self.shape_zyx[2]
        # voxel index -> normalised, from the one home of the convention (a unit grid of this shape)
        unit = Grid(self.shape_zyx[::-1], (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
        self.to_normalised = matrix_tensor(unit.index_to_normalised(), torch.zeros(1, device=device))
        self._mask = mask
        self._inside: Optional[torch.Tensor] = None

    @property
    def inside(self) -> Optional[torch.Tensor]:
        """Flat indices (N,) of the mask's voxels; None without a mask or for an empty one (the whole grid)."""
        if self._mask is not None:
            inside = torch.nonzero(self._mask.reshape(-1) > 0.5).reshape(-1)
            self._inside = inside.to(self.device) if inside.numel() > 0 else None
            self._mask = None
        return self._inside

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        device = self.device
        if self.inside is None:
            flat = torch.randint(0, self.count, (count,), generator=generator, device=device)
        else:
            rows = torch.randint(0, self.inside.numel(), (count,), generator=generator, device=device)
            flat = self.inside[rows]
        nz, ny, nx = self.shape_zyx
        index = torch.stack([flat % nx, (flat // nx) % ny, flat // (nx * ny)], dim=1).to(torch.float32)
        index = index + torch.rand(count, 3, generator=generator, device=device) - 0.5  # jitter in the voxel
        m = self.to_normalised
        return (index @ m[:3, :3].t() + m[:3, 3]).clamp(-1.0, 1.0)
