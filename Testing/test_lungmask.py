"""Lung masks derived from CT: a synthetic thorax phantom, the shared lung pair (skipped without it), errors."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared_data
from nephireg.errors import InputError
from nephireg.geometry import Grid
from nephireg.lungmask import lung_mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * float(np.count_nonzero(a & b)) / float(np.count_nonzero(a) + np.count_nonzero(b))


def ellipsoid(shape_zyx, center_ijk, radii_ijk) -> np.ndarray:
    k, j, i = np.meshgrid(*(np.arange(n, dtype=float) for n in shape_zyx), indexing="ij")
    ci, cj, ck = center_ijk
    ri, rj, rk = radii_ijk
    return ((i - ci) / ri) ** 2 + ((j - cj) / rj) ** 2 + ((k - ck) / rk) ** 2 <= 1.0


def thorax_phantom(n: int = 48, spacing=(3.0, 3.0, 4.0), direction=None):
    """(CT in HU, true lungs uint8 array [k, j, i]): a ~0 HU body ellipsoid in -1000 HU air holding two -850 HU
    lung ellipsoids, each crossed by bright (+40 HU) 'vessels' that the mask must include."""
    shape = (n, n, n)
    rng = np.random.default_rng(0)
    ct = np.full(shape, -1000.0)
    ct[ellipsoid(shape, (23.5, 23.5, 23.5), (21, 16, 22))] = 20.0
    lungs = ellipsoid(shape, (14, 23, 24), (7, 10, 15)) | ellipsoid(shape, (33, 23, 24), (7, 10, 15))
    ct[lungs] = -850.0
    k, j, i = np.meshgrid(*(np.arange(m) for m in shape), indexing="ij")
    for ci in (12, 16, 31, 35):  # vertical vessels, 2 voxels thick, inside each lung
        vessel = (np.abs(i - ci) <= 1) & (np.abs(j - 23) <= 1) & lungs
        ct[vessel] = 40.0
    ct[(np.abs(k - 24) <= 0) & (np.abs(j - 20) <= 1) & lungs] = 40.0  # a horizontal one
    ct += rng.normal(0.0, 15.0, shape)
    image = sitk.GetImageFromArray(ct.astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin((-70.0, 20.0, -1200.0))
    if direction is not None:
        image.SetDirection(direction)
    return image, lungs.astype(np.uint8)


def test_phantom_lungs_found_with_vessels_inside():
    ct, truth = thorax_phantom()
    mask = lung_mask(ct)
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert mask.GetSize() == ct.GetSize() and mask.GetOrigin() == ct.GetOrigin()
    got = sitk.GetArrayFromImage(mask)
    assert set(np.unique(got).tolist()) == {0, 1}
    assert dice(got, truth) >= 0.9
    # The vessels inside the lungs (bright, more than 2 voxels from the lung surface, where they are holes of the
    # air mask) are inside the mask; the body and outside air are not.
    ct_array = sitk.GetArrayFromImage(ct)
    interior = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray(truth), [2, 2, 2])) > 0
    vessels = (ct_array > -200) & interior
    assert np.count_nonzero(vessels) > 500
    assert np.mean(got[vessels]) > 0.99
    assert got[0, 0, 0] == 0 and got[24, 23, 2] == 0  # outside air, body wall


def test_lung_touching_the_border_is_kept():
    """A crop through one lung (as the shared pair is cropped around one lung): the cut lung touches the volume's
    border and must not be mistaken for the air around the body."""
    ct, truth = thorax_phantom()
    cropped = ct[:26, :, :]  # i in [0, 26): cuts the right-hand lung (i 26..40) away, left lung inside
    truth_cropped = truth[:, :, :26]
    got = sitk.GetArrayFromImage(lung_mask(cropped))
    assert dice(got, truth_cropped) >= 0.9
    cut = ct[:21, :, :]  # i in [0, 21): cuts through the left lung (i 7..21): it touches the i = 20 face
    truth_cut = truth[:, :, :21]
    assert np.count_nonzero(truth_cut[:, :, -1]) > 50
    assert dice(sitk.GetArrayFromImage(lung_mask(cut)), truth_cut) >= 0.9


def test_oblique_anisotropic_grid():
    angle = np.deg2rad(20.0)
    c, s = np.cos(angle), np.sin(angle)
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    ct, truth = thorax_phantom(spacing=(2.5, 3.0, 4.5), direction=direction)
    assert dice(sitk.GetArrayFromImage(lung_mask(ct)), truth) >= 0.9


def test_not_ct_raises_input_error():
    ct, _ = thorax_phantom()
    mri_like = sitk.RescaleIntensity(ct, 0.0, 1.0)  # an MRI-like [0, 1] image: nothing is below -400
    with pytest.raises(InputError, match="no lung found"):
        lung_mask(mri_like)
    body_only = sitk.GetImageFromArray(np.where(ellipsoid((32, 32, 32), (16, 16, 16), (14, 14, 14)), 30.0, -1000.0))
    with pytest.raises(InputError, match="Hounsfield"):
        lung_mask(body_only)  # CT of a phantom without lungs: only the outside air is air


def test_project_thorax_phantom():
    """The engine's own synthetic thorax (demo and pipeline tests derive its lung masks through this module)."""
    from nephireg.synthetic import rotation_direction, thorax_phantom

    grid = Grid((56, 48, 36), (3.0, 3.3, 4.2), (-80.0, -70.0, -300.0), rotation_direction((7.0, -5.0, 10.0)))
    ct, truth = thorax_phantom(grid, seed=3)
    assert dice(sitk.GetArrayFromImage(lung_mask(ct)), sitk.GetArrayFromImage(truth)) >= 0.95  # measured 0.976


@pytest.mark.parametrize("name", ["baseline", "followup"])
def test_shared_lung_pair_dice(name):
    ct = sitk.ReadImage(str(shared_data("lung-ct-pair", f"3DCT_lung_{name}.mha")))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data("lung-ct-pair", f"3DCT_lung_{name}_mask.mha"))))
    got = sitk.GetArrayFromImage(lung_mask(ct))
    # Measured 0.975 (baseline) and 0.979 (follow-up) on the 2x in-plane block-averaged CT (docs/prealign.md);
    # the issue asks for >= 0.9.
    assert dice(got, reference) >= 0.97


# -- The engine's phantom with the features of real scans (nephireg.synthetic.thorax_phantom options) ----------------

def engine_phantom(size=(64, 56, 40), spacing=(3.0, 3.3, 4.0), angles=(0.0, 0.0, 0.0), **features):
    from nephireg.synthetic import rotation_direction, thorax_phantom

    grid = Grid(size, spacing, (-80.0, -70.0, -300.0), rotation_direction(angles))
    return thorax_phantom(grid, seed=1, **features)


def one_lung_crop(ct: sitk.Image, truth: sitk.Image):
    """Cropped around the right lung as the shared pair is: the lung touches the medial (i-max) face, the body
    reaches every face, outside air is left only in the corners of the axial slices."""
    box = (slice(4, 28), slice(10, 46), slice(8, 31))  # i, j, k: the lung is cut at the top and bottom too
    cropped, lungs = ct[box], truth[box]
    border = sitk.GetArrayViewFromImage(lungs)
    assert np.count_nonzero(border[:, :, -1]) > 100  # the lung is cut by the crop
    return cropped, lungs


def resampled_truth(truth: sitk.Image, angles) -> np.ndarray:
    from nephireg.synthetic import tilted

    return sitk.GetArrayFromImage(tilted(sitk.Cast(truth, sitk.sitkFloat32), angles, 0.0)) > 0.5


def test_phantom_with_airways_joining_both_lungs():
    """An uncropped thorax whose trachea and main bronchi join both lungs into one air region."""
    ct, truth = engine_phantom(size=(72, 64, 44), spacing=(3.0, 3.0, 4.0), angles=(4.0, -3.0, 6.0), airways=True)
    got = sitk.GetArrayFromImage(lung_mask(ct))
    lungs = sitk.GetArrayFromImage(truth) > 0
    assert dice(got, lungs) >= 0.95  # measured 0.977 (the airways are in the mask, not in the truth)
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(lungs.astype(np.uint8))))
    for label in (1, 2):  # both lungs, each almost entirely
        assert np.mean(got[labels == label]) > 0.95


def test_patient_table_is_not_a_lung():
    """A table under the back: its hollow core (-950 HU, larger than either lung, touching the volume's border only
    on its thin ends) is air-like; the former border-contact rule took it for the lung (Dice 0.49)."""
    ct, truth = engine_phantom(size=(64, 72, 40), spacing=(3.0, 3.0, 4.0), table=True, airways=True)
    array = sitk.GetArrayFromImage(ct)
    core = (array < -900) & (array > -990)
    core_ml = np.count_nonzero(core) * 36.0 / 1000.0
    lung_ml = np.count_nonzero(sitk.GetArrayFromImage(truth)) * 36.0 / 1000.0 / 2.0
    assert core_ml > lung_ml  # the table core is the largest air-like region inside the volume
    got = sitk.GetArrayFromImage(lung_mask(ct))
    assert dice(got, sitk.GetArrayFromImage(truth)) >= 0.95  # measured 0.975
    from nephireg.synthetic import TABLE_SHELL_MM

    grid = Grid.of(ct)
    y_mm = (grid.physical_points() - grid.center_physical())[..., 1]  # posterior is +y
    body_back_mm = 0.75 * (72 - 1) * 3.0 / 2.0  # the phantom's body ellipse reaches 0.75 of the half extent
    assert not np.any(got[y_mm >= body_back_mm + TABLE_SHELL_MM])  # nothing of the table's core


@pytest.mark.parametrize("padding", [-1024.0, -2048.0])
def test_cropped_tilted_and_padded(padding):
    """The issue's follow-up case: a CT cropped around one lung (the lung touches the border), then rotated, the
    corners that come from outside the field of view padded with -1024 or -2048 HU, which join the cut lung."""
    from nephireg.synthetic import tilted

    ct, truth = one_lung_crop(*engine_phantom())
    angles = (12.0, -6.0, 8.0)
    got = sitk.GetArrayFromImage(lung_mask(tilted(ct, angles, padding)))
    assert dice(got, resampled_truth(truth, angles)) >= 0.95  # measured 0.970 (the former rule: no lung found)


def test_reconstruction_circle_clips_the_corners():
    """The issue's baseline case: the corners outside a reconstruction circle at -2048 HU, on a crop whose body
    reaches the border and whose lung touches it: the padding joins the cut lung (the former border-contact rule
    took the whole for the air around the body and found no lung)."""
    from nephireg.synthetic import reconstruction_circle

    ct, truth = one_lung_crop(*engine_phantom())
    clipped = reconstruction_circle(ct, radius_mm=50.0)
    values = sitk.GetArrayViewFromImage(clipped)
    assert np.count_nonzero(values == -2048.0) > 0.2 * values.size
    lungs = (sitk.GetArrayFromImage(truth) > 0) & (values != -2048.0)
    # Measured 0.934. The circle also clips the lung's corners here, and the body's hull then misses the lung
    # between the circle and the hull's chord (on the shared pair, with the corners clipped and not the lung,
    # Dice stays 0.974 / 0.976).
    assert dice(sitk.GetArrayFromImage(lung_mask(clipped)), lungs) >= 0.9


def test_body_hull_holds_a_cut_lung_and_not_the_outside_air():
    from nephireg.lungmask import body_hull

    ct, truth = one_lung_crop(*engine_phantom())
    hull = sitk.GetArrayFromImage(body_hull(ct)) > 0
    assert np.mean(hull[sitk.GetArrayFromImage(truth) > 0]) > 0.99
    array = sitk.GetArrayFromImage(ct)
    corner_air = array[:, :3, :3] < -950  # outside air in the crop's (anterior, right) corner
    assert np.count_nonzero(corner_air) > 0 and not np.any(hull[:, :3, :3][corner_air])


def test_convex_hull_of_a_slice():
    from nephireg.lungmask import convex_hulls_2d

    section = np.zeros((7, 9), dtype=np.uint8)
    section[1, 2] = section[1, 6] = section[5, 6] = 1  # a right triangle's corners
    hull = convex_hulls_2d(section[None])[0]
    rows, cols = np.nonzero(hull)
    assert hull.sum() == 15  # 5 + 4 + 3 + 2 + 1 pixel centres on or inside the triangle
    assert np.all(cols - rows >= 1) and np.all((rows >= 1) & (rows <= 5) & (cols <= 6))
    line = np.zeros((4, 5), dtype=np.uint8)
    line[2, 1:4] = 1
    assert np.array_equal(convex_hulls_2d(line[None])[0], line)  # collinear: the pixels themselves
    assert not convex_hulls_2d(np.zeros((2, 3, 3), dtype=np.uint8)).any()


def _in_hull_by_half_planes(points: np.ndarray, shape) -> np.ndarray:
    """The pixel centres in the convex hull of ``points`` (n, 2) (at least three, not all on one line): on the
    inner side of (or on) every line through two of the points that has all of them on one side."""
    r, c = np.mgrid[:shape[0], :shape[1]]
    inside = np.ones(shape, dtype=bool)
    for a in points:
        for b in points:
            if np.array_equal(a, b):
                continue
            side = (b[0] - a[0]) * (points[:, 1] - a[1]) - (b[1] - a[1]) * (points[:, 0] - a[0])
            if np.all(side >= 0):
                inside &= (b[0] - a[0]) * (c - a[1]) - (b[1] - a[1]) * (r - a[0]) >= 0
    return inside


def _collinear(points: np.ndarray) -> bool:
    d = points - points[0]
    far = d[np.argmax(np.abs(d).sum(axis=1))]
    return not np.any(d[:, 0] * far[1] - d[:, 1] * far[0])


def test_convex_hulls_match_the_half_plane_definition():
    """Random sparse sections, several at once (one call fills all): every pixel centre on or inside the hull of
    the nonzero pixels, none outside, exactly (integer arithmetic: pixels on an edge count)."""
    from nephireg.lungmask import convex_hulls_2d

    rng = np.random.default_rng(5)
    sections = (rng.random((60, 13, 17)) < rng.uniform(0.005, 0.08, (60, 1, 1))).astype(np.uint8)
    hulls = convex_hulls_2d(sections)
    checked = 0
    for section, hull in zip(sections, hulls):
        points = np.argwhere(section)
        if len(points) < 3 or _collinear(points):
            continue  # fewer than three points or all on one line: the spans, checked above
        assert np.array_equal(hull.astype(bool), _in_hull_by_half_planes(points, section.shape))
        checked += 1
    assert checked > 40
