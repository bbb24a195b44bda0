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
