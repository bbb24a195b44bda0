"""Slice-view rendering of a result through Slicer's own displayable managers (slicer-core + trame-slicer, offscreen).

A small known field: u = (f(x), 0, 0) with f' = +0.4 in one band, 0 in the middle band and -0.4 in the third, so
det J = 1.4, 1 and 0.6 there (computed by the engine's own ``jacobian_determinant``). The result is imported by the
module's ``sceneio.importResult`` and drawn by ``Resources/Screenshots/render_slice_views.py`` (the README picture's
code). Pixels: where det J = 1 the overlay has the colour table's centre colour, where det J > 1 the red side and
where det J < 1 the blue side; at opacity 0.5 it is half the fixed volume's grey; the transform grid draws lines.
Needs Slicer's colour tables (``../shared/slicer-colorfiles``): skipped with the reason without them.
"""

import importlib.util
import os

import numpy as np
import pytest
from slicer_scene import COLOR_FILES, REPO, add_volume, array_of, load_sceneio, require_slicer_core

from nephireg import protocol
from nephireg.geometry import Grid

GRID = Grid(size=(36, 30, 5), spacing=(2.0, 2.0, 3.0), origin=(-36.0, -30.0, -6.0),
            direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
SLOPE = 0.4  # df/dx in the outer bands


def known_field(grid: Grid = GRID) -> np.ndarray:
    """(Z, Y, X, 3) LPS mm: u_x = f(x), f' = +SLOPE for x < -12, 0 for -12 <= x <= 12, -SLOPE for x > 12 (mm)."""
    x = grid.physical_points()[..., 0]
    f = np.where(x < -12.0, SLOPE * (x + 12.0), np.where(x > 12.0, -SLOPE * (x - 12.0), 0.0))
    field = np.zeros(tuple(grid.shape_zyx) + (3,))
    field[..., 0] = f
    return field


@pytest.fixture(scope="module")
def renderer():
    require_slicer_core()
    if not (COLOR_FILES / "share" / "ColorFiles").is_dir():
        pytest.skip(f"needs Slicer's colour files at {COLOR_FILES} (../shared, absent on a fresh clone)")
    path = REPO / "Resources" / "Screenshots" / "render_slice_views.py"
    spec = importlib.util.spec_from_file_location("render_slice_views", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result_dir(tmp_path_factory):
    from nephireg.io import image_from_array, write_image, write_transform
    from nephireg.jacobian import jacobian_determinant

    out = tmp_path_factory.mktemp("known")
    field = known_field()
    write_transform(field, GRID, os.path.join(out, protocol.OUTPUT_FILES["transform"]))
    det = jacobian_determinant(field, GRID)
    write_image(image_from_array(det.astype(np.float32), GRID), os.path.join(out, protocol.OUTPUT_FILES["jacobian"]))
    files = {key: protocol.OUTPUT_FILES[key] for key in ("transform", "jacobian")}
    protocol.write_manifest(str(out), {"files": files, "metrics": {}})
    return str(out), det


def rendered(renderer, result_dir, opacity, grid=False, size=240):
    sceneio = load_sceneio()
    scene = renderer.SliceScene()
    view = scene.view("Axial")
    fixed = add_volume(scene.scene, np.full(GRID.shape_zyx, 100.0, dtype=np.float32), GRID.ijk_to_ras(), "fixed")
    fixed.GetDisplayNode().AutoWindowLevelOff()
    fixed.GetDisplayNode().SetWindowLevel(200.0, 100.0)  # the constant 100 shows as mid grey
    moving = add_volume(scene.scene, np.zeros(GRID.shape_zyx, dtype=np.float32), GRID.ijk_to_ras(), "moving")
    options = sceneio.ImportOptions(jacobianOpacity=opacity)
    result = sceneio.importResult(scene.logics, protocol.read_manifest(result_dir), fixed, moving, options=options)
    if grid:
        sceneio.showTransformGrid(result.transform, fixed)
    centre = renderer.volumeCentreRas(fixed)
    pixels = scene.render("Axial", size, centre)
    result.scene = scene  # kept alive with the result: a destroyed colour logic removes its colour nodes
    return pixels, view, result


def pixel_at(pixels, view, lps_x_mm):
    """The pixel (row, column) where the axial slice shows the LPS point (x, 0, 0)."""
    xy_to_ras = array_of(view._logic.GetSliceNode().GetXYToRAS())
    xy = np.linalg.solve(xy_to_ras, np.array([-lps_x_mm, 0.0, 0.0, 1.0]))
    return pixels[pixels.shape[0] - 1 - int(round(xy[1])), int(round(xy[0]))].astype(float)


def lut_colour(result, value):
    """The colour the Jacobian's display maps ``value`` to: window/level onto 0..255, then the table (RGB 0..255)."""
    display = result.jacobianVolume.GetDisplayNode()
    table = display.GetColorNode()
    low = display.GetLevel() - display.GetWindow() / 2
    index = (value - low) / display.GetWindow() * (table.GetNumberOfColors() - 1)
    colours = [np.array(table.GetLookupTable().GetTableValue(int(i)))[:3] * 255 for i in (np.floor(index),
                                                                                          np.ceil(index))]
    return colours


def test_heatmap_pixels_show_the_colour_table_centre_at_det_1_and_its_two_sides(renderer, result_dir):
    directory, det = result_dir
    pixels, view, result = rendered(renderer, directory, opacity=1.0)
    assert result.jacobianVolume.GetDisplayNode().GetColorNodeID() == "vtkMRMLColorTableNodeFileDivergingBlueRed.txt"
    np.testing.assert_allclose([det[2, 15, 2], det[2, 15, 18], det[2, 15, 33]], [1 + SLOPE, 1.0, 1 - SLOPE],
                               atol=1e-6)
    centre = pixel_at(pixels, view, 0.0)
    assert min(np.abs(centre - c).max() for c in lut_colour(result, 1.0)) <= 3.0, centre
    expanded, compressed = pixel_at(pixels, view, -26.0), pixel_at(pixels, view, 26.0)
    assert min(np.abs(expanded - c).max() for c in lut_colour(result, 1 + SLOPE)) <= 3.0, expanded
    assert min(np.abs(compressed - c).max() for c in lut_colour(result, 1 - SLOPE)) <= 3.0, compressed
    assert expanded[0] > expanded[2] + 40 and compressed[2] > compressed[0] + 40  # red side, blue side


def test_opacity_blends_the_heatmap_over_the_fixed_volume_and_the_grid_draws_lines(renderer, result_dir):
    directory, _ = result_dir
    opaque, view, result = rendered(renderer, directory, opacity=1.0)
    half, _, _ = rendered(renderer, directory, opacity=0.5)
    grey = 255.0 * 0.5  # the constant 100 at window 200 / level 100
    for x in (-26.0, 0.0, 26.0):
        expected = 0.5 * pixel_at(opaque, view, x) + 0.5 * grey
        np.testing.assert_allclose(pixel_at(half, view, x), expected, atol=3.0)
    gridded, _, _ = rendered(renderer, directory, opacity=0.5, grid=True)
    changed = np.abs(gridded.astype(int) - half.astype(int)).max(axis=2) > 30
    assert 0.005 < changed.mean() < 0.5  # grid lines over part of the view, not a blank or a filled view
