"""Render a real registration result offscreen through Slicer's own slice views (not the whole application window).

Slicer's MRML, Logic and displayable managers come from Kitware's ``slicer-core`` wheel; ``trame-slicer`` builds the
scene and the slice views (``DirectViewFactory(do_render_offscreen=True)``). The result is brought in by the module's
own code (``NePhiRegistrationLib.sceneio.importResult``: the Jacobian heatmap as foreground with the module's colour
node, window/level and opacity over the fixed volume, the moving volume under the transform) and the transform is
shown as a grid (``sceneio.showTransformGrid``). Slicer's file colour tables (``DivergingBlueRed``) are read from
``--color-files`` (default ``../shared/slicer-colorfiles``; Slicer's ``share/ColorFiles`` layout).

From the repository root (the ExtensionsIndex screenshot and README's picture)::

    python -m nephireg register --fixed NePhiRegistration/Resources/SampleData/NePhiDemoFixed.nrrd \\
        --moving NePhiRegistration/Resources/SampleData/NePhiDemoMoving.nrrd --out /tmp/demo --preset generic
    python Resources/Screenshots/render_slice_views.py \\
        --fixed NePhiRegistration/Resources/SampleData/NePhiDemoFixed.nrrd \\
        --moving NePhiRegistration/Resources/SampleData/NePhiDemoMoving.nrrd --result /tmp/demo \\
        --out Resources/Screenshots/NePhiRegistration-demo-result.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_COLOR_FILES = REPO.parent / "shared" / "slicer-colorfiles"
ORIENTATIONS = ("Axial", "Coronal", "Sagittal")
if str(REPO / "NePhiRegistration") not in sys.path:
    sys.path.insert(0, str(REPO / "NePhiRegistration"))


class SliceScene:
    """A Slicer scene with the module logics, Slicer's file colour tables and offscreen slice views."""

    def __init__(self, colorFiles: Path = DEFAULT_COLOR_FILES) -> None:
        import slicer
        from trame_slicer.core import SlicerApp
        from trame_slicer.views import DirectViewFactory

        from NePhiRegistrationLib import sceneio

        if not (Path(colorFiles) / "share" / "ColorFiles").is_dir():
            raise FileNotFoundError(f"Slicer's colour tables are not at {colorFiles} (needs share/ColorFiles/)")
        self.app = SlicerApp()
        self.scene = self.app.scene
        self.app.app_logic.SetHomeDirectory(str(Path(colorFiles).resolve()))
        self.app.app_logic.SetShareDirectory("share")
        self.colors = slicer.vtkSlicerColorLogic()  # kept: a destroyed colour logic removes its colour nodes
        self.colors.SetMRMLApplicationLogic(self.app.app_logic)
        self.colors.SetMRMLScene(self.scene)
        self.colors.AddDefaultColorNodes()
        self.app.app_logic.SetModuleLogic("Colors", self.colors)
        transforms = self.app.register_module_logic(slicer.vtkSlicerTransformLogic(), logic_name="Transforms")
        self.logics = sceneio.SceneLogics(self.scene, transforms, self.app.volumes_logic,
                                          self.app.segmentations_logic)
        self.app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
        self.views = {}

    def view(self, orientation: str):
        """The slice view of ``orientation`` (created on first use, like Slicer's Red/Green/Yellow)."""
        from trame_slicer.views import ViewLayoutDefinition

        if orientation not in self.views:
            make = {"Axial": ViewLayoutDefinition.axial_view, "Coronal": ViewLayoutDefinition.coronal_view,
                    "Sagittal": ViewLayoutDefinition.sagittal_view}[orientation]
            self.views[orientation] = self.app.view_manager.create_view(make(orientation))
        return self.views[orientation]

    def loadVolume(self, path: str, name: str):
        node = self.logics.volumes.AddArchetypeVolume(str(path), name, 0)
        if node is None:
            raise RuntimeError(f"could not read the volume {path}")
        return node

    def render(self, orientation: str, size_px: int = 360, centreRas: Optional[Sequence[float]] = None) -> np.ndarray:
        """(H, W, 3) uint8 of the slice view, the slice through ``centreRas`` (default: the background's centre)."""
        import vtk
        from vtk.util import numpy_support

        view = self.view(orientation)
        view.render_window().SetSize(size_px, size_px)
        view.fit_view_to_content()  # fits the background volume and sizes the slice node to the window
        if centreRas is not None:
            view._logic.GetSliceNode().JumpSliceByCentering(*centreRas)
        view.render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(view.render_window())
        grab.ReadFrontBufferOff()
        grab.Update()
        image = grab.GetOutput()
        width, height, _ = image.GetDimensions()
        pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)[..., :3]
        return np.ascontiguousarray(pixels[::-1])  # VTK's rows run bottom-up


def volumeCentreRas(volume) -> np.ndarray:
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    return np.array([(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2])


def writePng(pixels: np.ndarray, path: Path) -> None:
    """(H, W, 3) uint8 -> PNG through VTK's writer."""
    import vtk
    from vtk.util import numpy_support

    height, width, _ = pixels.shape
    image = vtk.vtkImageData()
    image.SetDimensions(width, height, 1)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(pixels[::-1]).reshape(-1, 3), deep=True)
    image.GetPointData().SetScalars(scalars)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(image)
    writer.Write()


def renderResult(fixedPath: str, movingPath: str, resultDir: str, out: Path, colorFiles: Path = DEFAULT_COLOR_FILES,
                 opacity: float = 0.5, grid: bool = True, size_px: int = 360) -> np.ndarray:
    """The three slice views of a result side by side (the module's display), written to ``out``; returns them."""
    from nephireg import protocol
    from NePhiRegistrationLib import sceneio

    scene = SliceScene(colorFiles)
    for orientation in ORIENTATIONS:
        scene.view(orientation)  # the views exist first, as in Slicer: the import sets their layers
    fixed = scene.loadVolume(fixedPath, "fixed")
    moving = scene.loadVolume(movingPath, "moving")
    options = sceneio.ImportOptions(jacobianOpacity=opacity)
    result = sceneio.importResult(scene.logics, protocol.read_manifest(resultDir), fixed, moving, options=options)
    if grid:
        sceneio.showTransformGrid(result.transform, fixed)
    centre = volumeCentreRas(fixed)
    panels = [scene.render(orientation, size_px, centre) for orientation in ORIENTATIONS]
    pixels = np.concatenate(panels, axis=1)
    writePng(pixels, out)
    return pixels


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixed", required=True, help="the fixed volume the result was computed on")
    parser.add_argument("--moving", required=True, help="the moving volume")
    parser.add_argument("--result", required=True, help="the engine's result folder (result.json)")
    parser.add_argument("--out", required=True, type=Path, help="PNG to write")
    parser.add_argument("--color-files", type=Path, default=DEFAULT_COLOR_FILES,
                        help="folder holding Slicer's share/ColorFiles (default: ../shared/slicer-colorfiles)")
    parser.add_argument("--opacity", type=float, default=0.5, help="heatmap opacity (the module's default 0.5)")
    parser.add_argument("--size", type=int, default=360, help="pixels per slice view (square)")
    args = parser.parse_args(argv)
    renderResult(args.fixed, args.moving, args.result, args.out, args.color_files, args.opacity, size_px=args.size)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
