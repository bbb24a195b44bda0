"""nephireg.binary_morphology against SimpleITK's own filters with the ball kernel, voxel for voxel."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from nephireg import binary_morphology as bm

RADII = ([1, 1, 1], [2, 2, 2], [1, 2, 1], [2, 2, 1], [3, 3, 2], [0, 1, 2])


def test_the_ball_is_itks():
    """ITK's ball of radius 1 is the 3x3x3 block without its 8 corners; radius 2 holds 81 voxels. The kernel read
    off a dilated single voxel is the same set as ours for every radius."""
    assert len(bm.ball_offsets([1, 1, 1])) == 19 and (1, 1, 1) not in bm.ball_offsets([1, 1, 1])
    assert len(bm.ball_offsets([2, 2, 2])) == 81
    for radius in RADII:
        size = [2 * r + 3 for r in radius]
        point = np.zeros(size[::-1], dtype=np.uint8)
        centre = tuple(n // 2 for n in point.shape)
        point[centre] = 1
        kernel = sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray(point), radius, sitk.sitkBall, 0, 1))
        itk = {tuple(int(v) for v in np.subtract(index, centre)) for index in np.argwhere(kernel)}
        assert itk == set(bm.ball_offsets(radius)), radius


@pytest.mark.parametrize("radius", RADII)
def test_the_same_voxels_as_simpleitk(radius):
    """Random masks of every density, touching the borders (where erosion counts the outside as foreground and
    closing pads with background): dilate, erode, open and close give SimpleITK's masks exactly."""
    rng = np.random.default_rng(sum(radius))
    for trial in range(8):
        shape = tuple(rng.integers(4, 24, 3)) if trial < 6 else (1, 9, 7) if trial == 6 else (6, 1, 1)  # thin
        mask = rng.random(shape) < (0.1, 0.3, 0.5, 0.7, 0.9, 0.97, 0.5, 0.5)[trial]
        image = sitk.GetImageFromArray(mask.astype(np.uint8))

        def simpleitk(result: sitk.Image) -> np.ndarray:
            return sitk.GetArrayFromImage(result) > 0

        assert np.array_equal(bm.dilate(mask, radius), simpleitk(sitk.BinaryDilate(image, radius, sitk.sitkBall, 0, 1)))
        assert np.array_equal(bm.erode(mask, radius), simpleitk(sitk.BinaryErode(image, radius, sitk.sitkBall, 0, 1)))
        assert np.array_equal(bm.opening(mask, radius), simpleitk(sitk.BinaryMorphologicalOpening(image, radius)))
        assert np.array_equal(bm.closing(mask, radius), simpleitk(sitk.BinaryMorphologicalClosing(image, radius)))


def test_nonzero_is_foreground_and_bad_radii_are_refused():
    labels = np.zeros((5, 5, 5), dtype=np.uint8)
    labels[2, 2, 2] = 2
    assert np.array_equal(bm.dilate(labels, [1, 1, 1]), bm.dilate(labels > 0, [1, 1, 1]))
    assert bm.ball_radius_voxels(2.5, (1.37, 1.37, 2.5)) == [2, 2, 1]
    assert bm.ball_radius_voxels(0.1, (2.0, 2.0, 2.0)) == [1, 1, 1]  # at least one voxel
    with pytest.raises(ValueError, match="at least 0"):
        bm.dilate(labels, [1, -1, 1])
    with pytest.raises(ValueError, match="3D"):
        bm.erode(np.zeros((4, 4)), [1, 1, 1])
