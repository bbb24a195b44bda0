"""Pre-alignment on synthetic blob volumes with an anisotropic, oblique grid and known transforms.

Convention under test: ``moving`` is made by resampling ``fixed`` through a known transform K onto the moving grid,
so moving(y) = fixed(K(y)): the moving point y shows the fixed point K(y). The fixed point x therefore shows up at
y = K^-1(x) in the moving image, and prealign must return T ~ K^-1 (fixed -> moving, resampling direction).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared_data
from nephireg.geometry import Grid
from nephireg.io import image_from_array, resample_to
from nephireg.prealign import MODES, prealign

SIZE = (40, 36, 30)  # (i, j, k) voxels
SPACING = (2.0, 1.6, 2.6)  # mm, anisotropic


def oblique_direction() -> tuple:
    """Rotation by 25 degrees about a tilted axis: no voxel axis lies along x, y or z."""
    axis = np.array([0.3, -0.5, 0.8])
    return tuple(rotation(axis, 25.0).ravel())


def rotation(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.deg2rad(degrees)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def blob_grid(origin=(-30.0, 12.0, -25.0)) -> Grid:
    return Grid(SIZE, SPACING, origin, oblique_direction())


def blob_image(grid: Grid) -> sitk.Image:
    """A smooth, asymmetric volume: seven Gaussian blobs (sigma 5-9 mm, weights 0.4-1) around the field-of-view
    centre, about 0 at the border, so its moments and its alignment are well defined. Values in about [0, 1]."""
    rng = np.random.default_rng(7)
    points = grid.physical_points()  # (nz, ny, nx, 3) LPS mm
    centre = grid.center_physical()
    values = np.zeros(points.shape[:3])
    for _ in range(7):
        c = centre + rng.uniform(-14.0, 14.0, 3)
        sigma = rng.uniform(5.0, 9.0)
        values += rng.uniform(0.4, 1.0) * np.exp(-np.sum((points - c) ** 2, axis=-1) / (2 * sigma**2))
    return image_from_array((values / values.max()).astype(np.float32), grid)


def blob_mask(image: sitk.Image) -> sitk.Image:
    return sitk.Cast(image > 0.15, sitk.sitkUInt8)


def moving_through(fixed: sitk.Image, known: sitk.Transform, grid: Grid = None) -> sitk.Image:
    """moving(y) = fixed(known(y)) on ``grid`` (the fixed grid by default)."""
    return resample_to(fixed, grid or Grid.of(fixed), known)


def mapping_error_mm(transform: sitk.Transform, expected: sitk.Transform, mask: sitk.Image) -> np.ndarray:
    """(n,) mm: ||T(x) - expected(x)|| over the fixed mask's voxel centres."""
    points = Grid.of(mask).physical_points()[sitk.GetArrayViewFromImage(mask) > 0]
    got = np.array([transform.TransformPoint(tuple(p)) for p in points])
    want = np.array([expected.TransformPoint(tuple(p)) for p in points])
    return np.linalg.norm(got - want, axis=1)


def affine(matrix: np.ndarray, translation, center) -> sitk.AffineTransform:
    t = sitk.AffineTransform(3)
    t.SetCenter(tuple(float(c) for c in center))
    t.SetMatrix(tuple(float(v) for v in np.asarray(matrix).ravel()))
    t.SetTranslation(tuple(float(v) for v in translation))
    return t


@pytest.fixture(scope="module")
def fixed() -> sitk.Image:
    return blob_image(blob_grid())


def test_none_is_identity(fixed):
    moving = moving_through(fixed, sitk.TranslationTransform(3, (5.0, 0.0, 0.0)))
    t = prealign(fixed, moving, "none")
    assert isinstance(t, sitk.TranslationTransform)
    assert t.TransformPoint((1.0, -2.0, 3.0)) == pytest.approx((1.0, -2.0, 3.0))


@pytest.mark.parametrize("mode", ["preset", "similarity", ""])
def test_bad_mode_names_the_valid_ones(fixed, mode):
    with pytest.raises(ValueError, match="none, center, moments, rigid, affine"):
        prealign(fixed, fixed, mode)
    assert MODES == ("none", "center", "moments", "rigid", "affine")


def test_center_follows_the_field_of_view(fixed):
    """Moving grid = fixed grid shifted by d with the content riding along: T(x) = x + d exactly."""
    d = np.array([7.0, -5.0, 4.0])
    grid = blob_grid()
    moved_grid = Grid(grid.size, grid.spacing, tuple(np.asarray(grid.origin) + d), grid.direction)
    moving = moving_through(fixed, sitk.TranslationTransform(3, tuple(-d)), moved_grid)  # moving(y) = fixed(y - d)
    t = prealign(fixed, moving, "center")
    assert isinstance(t, sitk.TranslationTransform)
    np.testing.assert_allclose(t.GetOffset(), d, atol=1e-6)


def test_center_uses_mask_centroids_when_both_given(fixed):
    d = np.array([-6.0, 3.0, 8.0])
    moving = moving_through(fixed, sitk.TranslationTransform(3, tuple(-d)))  # same grid, content moved by d
    assert np.allclose(prealign(fixed, moving, "center").GetOffset(), 0.0)  # same grids: no shift
    t = prealign(fixed, moving, "center", blob_mask(fixed), blob_mask(moving))
    assert np.linalg.norm(np.asarray(t.GetOffset()) - d) < 1.0


@pytest.mark.parametrize("masked", [False, True])
def test_moments_recover_a_translation(fixed, masked):
    d = np.array([6.0, 4.0, -5.0])
    moving = moving_through(fixed, sitk.TranslationTransform(3, tuple(-d)))
    masks = (blob_mask(fixed), blob_mask(moving)) if masked else (None, None)
    t = prealign(fixed, moving, "moments", *masks)
    assert isinstance(t, sitk.TranslationTransform)
    assert np.linalg.norm(np.asarray(t.GetOffset()) - d) < 1.0


def test_rigid_recovers_rotation_and_translation(fixed):
    grid = Grid.of(fixed)
    known = sitk.Euler3DTransform()
    known.SetCenter(tuple(grid.center_physical() + [3.0, -2.0, 1.0]))
    known.SetRotation(np.deg2rad(6.0), np.deg2rad(-4.0), np.deg2rad(5.0))
    known.SetTranslation((5.0, -4.0, 3.0))
    moving = moving_through(fixed, known)
    t = prealign(fixed, moving, "rigid", blob_mask(fixed), blob_mask(moving))
    assert isinstance(t, sitk.Euler3DTransform)
    error = mapping_error_mm(t, known.GetInverse(), blob_mask(fixed))
    before = mapping_error_mm(sitk.TranslationTransform(3), known.GetInverse(), blob_mask(fixed))
    assert before.mean() > 5.0
    assert error.mean() < 0.5 and error.max() < 1.0


@pytest.mark.parametrize("masked", [False, True])
def test_affine_recovers_scale_shear_rotation(fixed, masked):
    grid = Grid.of(fixed)
    matrix = 1.06 * rotation([1.0, 0.4, -0.2], 5.0) @ np.array([[1.0, 0.03, 0.0], [0.0, 0.97, 0.02], [0.0, 0.0, 1.0]])
    known = affine(matrix, (-4.0, 5.0, 3.0), grid.center_physical())
    moving = moving_through(fixed, known)
    masks = (blob_mask(fixed), blob_mask(moving)) if masked else (None, None)
    t = prealign(fixed, moving, "affine", *masks)
    assert isinstance(t, sitk.AffineTransform)
    error = mapping_error_mm(t, known.GetInverse(), blob_mask(fixed))
    assert error.mean() < 0.5 and error.max() < 1.0


def test_translation_result_composes_and_registration_repeats(fixed):
    """Rigid/affine results are plain transforms with their centre set; the same input gives the same answer."""
    known = sitk.TranslationTransform(3, (-3.0, 2.0, 4.0))
    moving = moving_through(fixed, known)
    a = prealign(fixed, moving, "affine")
    b = prealign(fixed, moving, "affine")
    np.testing.assert_allclose(a.GetParameters(), b.GetParameters(), atol=1e-6)
    np.testing.assert_allclose(a.GetCenter(), Grid.of(fixed).center_physical(), atol=1e-9)
    composite = sitk.CompositeTransform([a, sitk.TranslationTransform(3, (1.0, 0.0, 0.0))])
    x = tuple(Grid.of(fixed).center_physical())
    y = np.asarray(composite.TransformPoint(x))
    np.testing.assert_allclose(y, np.asarray(a.TransformPoint(tuple(np.asarray(x) + [1.0, 0.0, 0.0]))), atol=1e-9)
    assert np.linalg.norm(np.asarray(a.TransformPoint(x)) - np.asarray(known.GetInverse().TransformPoint(x))) < 1.0


def lung_pair():
    """The shared lung pair normalised as the lung-ct preset does ([-1000, 0] HU -> [0, 1]), its derived lung masks
    and the 51 landmark pairs (fixed = baseline)."""
    from nephireg.io import read_points
    from nephireg.lungmask import lung_mask

    images, masks = [], []
    for name in ("baseline", "followup"):
        ct = sitk.ReadImage(str(shared_data("lung-ct-pair", f"3DCT_lung_{name}.mha")))
        masks.append(lung_mask(ct))
        images.append(sitk.Cast(sitk.Clamp(sitk.Cast(ct, sitk.sitkFloat32), sitk.sitkFloat32, -1000.0, 0.0) / 1000.0
                                + 1.0, sitk.sitkFloat32))
    points = [read_points(shared_data("lung-ct-pair", f"landmarks_{n}_51.txt")) for n in ("baseline", "followup")]
    return images, masks, points


def test_shared_lung_pair_landmarks():
    """Measured (docs/prealign.md): before 35.27 mm mean; center with lung masks 4.63; affine unmasked about 5.4."""
    from nephireg.prealign import landmark_errors

    (fixed, moving), (fixed_mask, moving_mask), (fixed_points, moving_points) = lung_pair()
    before = landmark_errors(prealign(fixed, moving, "none"), fixed_points, moving_points)
    assert before.mean() == pytest.approx(35.27, abs=0.01)
    centre = landmark_errors(prealign(fixed, moving, "center", fixed_mask, moving_mask), fixed_points, moving_points)
    assert centre.mean() < 5.0 and np.median(centre) < 5.0
    fitted = landmark_errors(prealign(fixed, moving, "affine"), fixed_points, moving_points)
    assert fitted.mean() < 6.5


@pytest.mark.parametrize("linear", [np.eye(3), rotation([0.2, 1.0, -0.4], 7.0) * 1.03])
def test_composed_prealignment_maps_each_voxel_through_the_affine(linear):
    """phi(x) = A(x + u(x)): the translation shortcut and the general product both agree with the definition."""
    from nephireg.compose import compose_prealignment
    from nephireg.geometry import apply_affine

    grid = blob_grid()
    u = np.random.default_rng(0).normal(scale=3.0, size=grid.shape_zyx + (3,))
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = (12.5, -4.0, 30.0)
    points = grid.physical_points()
    expected = apply_affine(matrix, points + u) - points
    before = u.copy()
    assert np.allclose(compose_prealignment(grid, u, matrix), expected, atol=1e-9)
    assert np.array_equal(u, before)  # the method's field is not changed in place
