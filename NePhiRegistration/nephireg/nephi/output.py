"""NePhi fields as the engine's :class:`nephireg.fields.DisplacementField` (LPS mm in, LPS mm out).

The network works in normalised coordinates of the working grid; every conversion goes through
:mod:`nephireg.sampling`. The exact field evaluates the MLP at each point (in chunks, so memory stays flat). For
fast dense outputs, :func:`lattice_field` evaluates it once on a lattice (default: twice the working spacing)
and interpolates trilinearly; the field is smooth on that scale (its local code lives on a grid about 8 working
voxels apart), and the interpolation error is reported by the tests.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from nephireg.fields import DenseField, DisplacementField, evaluate_on_grid
from nephireg.geometry import Grid
from nephireg.nephi.field import Codes, NePhiNet
from nephireg.sampling import channels_last, normalised_to_physical, physical_to_normalised

# On a CPU, small enough that the MLP's activations (4096 x 256 floats, 4 MB) stay in cache: 2x faster than 65536
# points. A GPU wants large launches instead.
EXACT_CHUNK_POINTS_CPU = 4_096
EXACT_CHUNK_POINTS_GPU = 65_536


class NePhiField:
    """Exact NePhi displacement ``u(x)`` in mm on ``grid``'s physical space (forward map, or inverse)."""

    def __init__(self, net: NePhiNet, codes: Codes, grid: Grid, inverse: bool = False,
                 chunk_points: Optional[int] = None) -> None:
        self.net = net.eval()
        global_code, local_grid = (c.detach() for c in codes)
        # The local grid's values stored channels-last (same (L, Z, Y, X) shape): the trilinear gather then reads
        # it as a (Z*Y*X, L) table without copying it for every chunk.
        self.codes = (global_code, channels_last(local_grid[None])[0])
        self.grid = grid
        self.inverse = inverse
        on_cpu = global_code.device.type == "cpu"
        self.chunk_points = chunk_points or (EXACT_CHUNK_POINTS_CPU if on_cpu else EXACT_CHUNK_POINTS_GPU)

    def displacement_mm(self, points_mm: torch.Tensor) -> torch.Tensor:
        """(P, 3) LPS mm -> (P, 3) LPS mm, evaluated in chunks of ``chunk_points``."""
        device = self.codes[0].device
        out = []
        with torch.no_grad():
            for chunk in torch.split(points_mm, self.chunk_points):
                chunk = chunk.to(device=device, dtype=torch.float32)
                x = physical_to_normalised(chunk, self.grid)
                moved = self.net.transform(x, self.codes, self.inverse)
                # difference of two conversions (not moved - chunk): exactly 0 where u is 0, no round-off
                out.append(normalised_to_physical(moved, self.grid) - normalised_to_physical(x, self.grid))
        return torch.cat(out).to(points_mm.device) if out else points_mm.new_zeros((0, 3))


class ComposedField:
    """u(x) = u1(x) + u2(x + u1(x)): the map x -> phi2(phi1(x)) with phi_i(x) = x + u_i(x).

    When NePhi (``first``) registers the fixed image to a moving image already warped by a coarse field
    (``second``), moving(phi2(phi1(x))) ~ fixed(x): this is the total resampling map."""

    def __init__(self, first: DisplacementField, second: DisplacementField) -> None:
        self.first = first
        self.second = second

    def displacement_mm(self, points_mm: torch.Tensor) -> torch.Tensor:
        u1 = self.first.displacement_mm(points_mm)
        return u1 + self.second.displacement_mm(points_mm + u1).to(u1.dtype)


def lattice_field(field: DisplacementField, grid: Grid, factor: float, device: torch.device,
                  cancel: Optional[Callable[[], None]] = None) -> DenseField:
    """``field`` sampled on a lattice covering ``grid`` at ``factor`` times its spacing, as a DenseField
    (``cancel``: called between chunks, raises to stop)."""
    lattice = grid.resampled([s * factor for s in grid.spacing])
    values = evaluate_on_grid(field, lattice, device, cancel=cancel)  # (Z, Y, X, 3) float64
    tensor = torch.from_numpy(values).to(torch.float32).permute(3, 0, 1, 2).unsqueeze(0).contiguous()
    return DenseField(lattice, tensor.to(device))
