"""Regenerates the extension's icons and the demo pair's thumbnail (matplotlib). From the repository root:

    python Resources/Screenshots/make_illustrations.py

The screenshot (README, ExtensionsIndex) is rendered by Slicer's own slice views: ``render_slice_views.py``.
"""

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


def demo_thumbnail():
    fixed, moving = array(SAMPLES / "NePhiDemoFixed.nrrd"), array(SAMPLES / "NePhiDemoMoving.nrrd")
    thumbnail(fixed, moving, fixed.shape[0] // 2, REPO / "NePhiRegistration" / "Resources" / "Icons" /
              "NePhiDemoPair.png")


if __name__ == "__main__":
    icon(REPO / "NePhiRegistration" / "Resources" / "Icons" / "NePhiRegistration.png")
    icon(REPO / "Resources" / "NePhiRegistration.png")
    demo_thumbnail()
