"""Benchmark: peak memory of one NePhi-IO step versus one dense voxel-field optimisation step, 64^3 .. 256^3.

Each measurement runs in a fresh subprocess: allocate the images, read the peak RSS (``ru_maxrss``), run one
optimisation step (loss + backward + Adam update), read the peak again; the difference is the step's own peak
memory. NePhi: 10k similarity points per direction and 2 x 250 GradICON points, as NePhi + IO uses. Dense: a
full-resolution displacement grid (1, 3, S, S, S), the moving image warped over every voxel, MSE + diffusion
(forward differences), the baseline every voxel method pays. Also the NePhi dense output evaluation in chunks.

    python Testing/benchmarks/bench_nephi_memory.py [--sizes 64 96 128 192 256] [--plot docs/nephi-memory.png]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def measure(kind: str, size: int) -> dict:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    from nephireg.geometry import Grid

    grid = Grid((size,) * 3, (2.0,) * 3, (0.0,) * 3, (1, 0, 0, 0, 1, 0, 0, 0, 1))
    fixed = torch.rand(1, 1, size, size, size)
    moving = torch.rand(1, 1, size, size, size)
    before = _peak_mb()
    started = time.perf_counter()
    if kind == "nephi":
        _nephi_step(fixed, moving, size)
    elif kind == "dense":
        _dense_step(fixed, moving)
    else:
        _nephi_output(grid)
    return {"kind": kind, "size": size, "peak_extra_mb": round(_peak_mb() - before, 1),
            "seconds": round(time.perf_counter() - started, 2)}


def _nephi_step(fixed, moving, size: int) -> None:
    import torch

    from nephireg.nephi.field import FieldConfig, NePhiNet, zero_codes
    from nephireg.nephi.objective import LossSettings, PairImages, pair_loss

    net = NePhiNet(FieldConfig())
    codes = [torch.nn.Parameter(c) for c in zero_codes(FieldConfig(), (max(2, size // 8),) * 3)]
    optimiser = torch.optim.Adam(list(net.parameters()) + codes, lr=1e-3)
    images = PairImages.build(fixed, moving)
    terms = pair_loss(net, tuple(codes), images, LossSettings(), torch.Generator().manual_seed(0))
    terms["total"].backward()
    optimiser.step()


def _dense_step(fixed, moving) -> None:
    import torch

    from nephireg.sampling import identity_normalised, sample_normalised

    shape = tuple(fixed.shape[2:])
    disp = torch.nn.Parameter(torch.zeros(1, *shape, 3))
    optimiser = torch.optim.Adam([disp], lr=1e-3)
    warped = sample_normalised(moving, identity_normalised(shape) + disp)
    diffusion = sum(((disp.diff(dim=d)) ** 2).mean() for d in (1, 2, 3))
    loss = ((warped - fixed) ** 2).mean() + diffusion
    loss.backward()
    optimiser.step()


def _nephi_output(grid) -> None:
    import torch

    from nephireg.fields import evaluate_on_grid
    from nephireg.nephi.field import FieldConfig, NePhiNet, zero_codes
    from nephireg.nephi.output import NePhiField

    net = NePhiNet(FieldConfig())
    field = NePhiField(net, zero_codes(FieldConfig(), (max(2, grid.size[0] // 8),) * 3), grid)
    evaluate_on_grid(field, grid, torch.device("cpu"))  # output array (Z, Y, X, 3) float64 included


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = {"nephi": "NePhi-IO step (10k + 2x250 points)", "dense": "dense voxel-field step",
              "nephi-output": "NePhi dense output, chunked (incl. output array)"}
    for kind, label in labels.items():
        pts = sorted((r["size"], r["peak_extra_mb"]) for r in rows if r["kind"] == kind)
        if pts:
            ax.plot([f"{s}^3" for s, _ in pts], [m for _, m in pts], marker="o", label=label)
    ax.set_xlabel("image size (voxels)")
    ax.set_ylabel("peak extra memory of the step (MB)")
    ax.set_yscale("log")
    ax.set_title("Memory per optimisation step, CPU (one process, 1 thread)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128, 192, 256])
    parser.add_argument("--plot", default="")
    parser.add_argument("--kinds", nargs="+", default=["nephi", "dense", "nephi-output"])
    parser.add_argument("--extra", help="JSON lines file of earlier rows to include in the plot")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]))))
        return 0
    rows = []
    if args.extra:
        rows = [json.loads(line) for line in open(args.extra) if line.strip()]
    for size in args.sizes:
        for kind in args.kinds:
            out = subprocess.run([sys.executable, __file__, "--one", kind, str(size)], check=True,
                                 capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
