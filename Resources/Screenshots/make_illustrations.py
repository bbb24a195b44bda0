"""Regenerates the extension's icons and the README illustration.

The illustration is a matplotlib render of a real engine result on the shipped synthetic demo pair - not a
screenshot of 3D Slicer (Slicer could not run where this was made). From the repository root:

    python -m nephireg register --fixed NePhiRegistration/Resources/SampleData/NePhiDemoFixed.nrrd \\
        --moving NePhiRegistration/Resources/SampleData/NePhiDemoMoving.nrrd --out /tmp/demo --preset generic
    python Resources/Screenshots/make_illustrations.py /tmp/demo
"""

import json
import sys
from pathlib import Path

import matplotlib
import numpy as np
import SimpleITK as sitk

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "NePhiRegistration" / "Resources" / "SampleData"
CT_WINDOW = {"cmap": "gray", "vmin": -1000, "vmax": 200}
NAVY, GRID_COLOUR = "#1d3557", "#a8dadc"


def warp(x, y):
    """A smooth 2D deformation for the icon's grid lines."""
    return (x + 0.06 * np.sin(2.5 * np.pi * y) * np.sin(np.pi * x),
            y + 0.06 * np.sin(2 * np.pi * x) * np.sin(np.pi * y))


def icon(path, size=128):
    """A deformed grid with a diverging (Jacobian-like) blob and the letters N-phi, ``size`` px square."""
    fig = plt.figure(figsize=(1, 1), dpi=size)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    ax.add_patch(plt.Rectangle((0.02, 0.02), 0.96, 0.96, color=NAVY, ec="none", zorder=0))
    s = np.linspace(0.12, 0.88, 60)
    for v in np.linspace(0.12, 0.88, 7):
        ax.plot(*warp(np.full_like(s, v), s), color=GRID_COLOUR, lw=1.6)
        ax.plot(*warp(s, np.full_like(s, v)), color=GRID_COLOUR, lw=1.6)
    yy, xx = np.mgrid[0:1:128j, 0:1:128j]
    blob = (np.exp(-((xx - 0.62) ** 2 + (yy - 0.58) ** 2) / 0.02)
            - np.exp(-((xx - 0.36) ** 2 + (yy - 0.38) ** 2) / 0.015))
    ax.imshow(np.ma.masked_where(np.abs(blob) < 0.15, blob), cmap="coolwarm", vmin=-1, vmax=1, alpha=0.75,
              extent=(0, 1, 0, 1), origin="lower", zorder=3)
    ax.text(0.5, 0.5, "N\u03c6", color="white", fontsize=34, fontweight="bold", ha="center", va="center", zorder=4)
    fig.savefig(path, dpi=size, facecolor=NAVY)
    plt.close(fig)


def array(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def thumbnail(fixed, moving, k, path):
    """SampleData thumbnail (about 260 x 280 px): fixed | moving."""
    fig, axes = plt.subplots(1, 2, figsize=(2.6, 2.8), dpi=100)
    for ax, image, title in zip(axes, (fixed, moving), ("fixed", "moving")):
        ax.imshow(image[k], **CT_WINDOW)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle("NePhi demo pair\n(synthetic)", fontsize=8)
    fig.savefig(path)
    plt.close(fig)


def illustration(out_dir, path):
    fixed, moving = array(SAMPLES / "NePhiDemoFixed.nrrd"), array(SAMPLES / "NePhiDemoMoving.nrrd")
    warped, jacobian = array(Path(out_dir) / "warped.nrrd"), array(Path(out_dir) / "jacobian.nrrd")
    manifest = json.loads((Path(out_dir) / "result.json").read_text())
    metrics, seconds = manifest["metrics"], manifest["timings_s"]["total"]
    k = fixed.shape[0] // 2
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.9), dpi=100)
    panels = ((fixed, "Fixed (synthetic thorax CT)"), (moving, "Moving (known smooth deformation)"),
              (warped, "Moving warped by the result"))
    for ax, (image, title) in zip(axes, panels):
        ax.imshow(image[k], **CT_WINDOW)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    ax = axes[3]
    ax.imshow(fixed[k], **CT_WINDOW)
    heat = ax.imshow(jacobian[k], cmap="coolwarm", vmin=0, vmax=2, alpha=0.5)
    ax.set_title("det J over the fixed image", fontsize=9)
    ax.axis("off")
    fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.02)
    fig.suptitle(f"Continuous Adam, {manifest['preset']} preset, {manifest['device'].upper()}: "
                 f"NCC {metrics['ncc_before']:.2f} -> {metrics['ncc_after']:.2f}, "
                 f"folding {metrics['folding_percent']:.4f} %, "
                 f"det J [{metrics['jacobian_min']:.2f}, {metrics['jacobian_max']:.2f}], "
                 f"{seconds:.0f} s (shared 2-core machine)", fontsize=10)
    fig.text(0.5, 0.01, "Illustration rendered with matplotlib from a real NePhiRegistration engine result on the "
             "synthetic demo pair (axial slice). Not a screenshot of 3D Slicer.", ha="center", fontsize=8,
             style="italic")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    thumbnail(fixed, moving, k, REPO / "NePhiRegistration" / "Resources" / "Icons" / "NePhiDemoPair.png")


if __name__ == "__main__":
    icon(REPO / "NePhiRegistration" / "Resources" / "Icons" / "NePhiRegistration.png")
    icon(REPO / "Resources" / "NePhiRegistration.png")
    if len(sys.argv) > 1:
        illustration(sys.argv[1], REPO / "Resources" / "Screenshots" / "NePhiRegistration-demo-result.png")
