"""Engine result -> VTK (route B of SLICER.md), checked against SimpleITK's reading of the same transform file.

vtkOrientedGridTransform (Slicer's vtkAddon) is not in the pip ``vtk`` package; :func:`oriented_grid_displacement`
reproduces its rule (continuous index = inv(direction @ diag(spacing)) (p - origin), trilinear vectors there),
using VTK's own vtkGridTransform for the interpolation on an index-space copy of the same image data.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "NePhiRegistration"))

vtk = pytest.importorskip("vtk")
sitk = pytest.importorskip("SimpleITK")

from nephireg.geometry import LPS_TO_RAS, Grid  # noqa: E402
from nephireg.synthetic import rotation_direction  # noqa: E402
from NePhiRegistrationLib import result  # noqa: E402
from NePhiRegistrationLib.selftest import TEST_GRID, analyticJacobian, syntheticDisplacement  # noqa: E402

OBLIQUE = Grid(size=(17, 13, 9), spacing=(1.3, 2.1, 3.4), origin=(-20.0, 15.0, -40.0),
               direction=rotation_direction((12.0, -9.0, 25.0)))


def oriented_grid_displacement(image, direction4, ras_points):
    """What vtkOrientedGridTransform adds to each RAS point (Slicer's vtkAddon rule)."""
    origin = np.array(image.GetOrigin())
    spacing = np.array(image.GetSpacing())
    direction = np.array([[direction4.GetElement(r, c) for c in range(3)] for r in range(3)])
    to_index = np.linalg.inv(direction @ np.diag(spacing))
    index_image = vtk.vtkImageData()
    index_image.DeepCopy(image)
    index_image.SetOrigin(0.0, 0.0, 0.0)
    index_image.SetSpacing(1.0, 1.0, 1.0)
    grid_transform = vtk.vtkGridTransform()
    grid_transform.SetDisplacementGridData(index_image)
    grid_transform.SetInterpolationModeToLinear()
    out = []
    for p in ras_points:
        index = to_index @ (p - origin)
        out.append(np.array(grid_transform.TransformPoint(*index)) - index)
    return np.array(out)


def random_inner_points(grid, n=40, seed=0):
    """LPS points strictly inside the grid (no extrapolation question)."""
    rng = np.random.default_rng(seed)
    index = rng.uniform(0.6, np.asarray(grid.size) - 1.6, size=(n, 3))
    return index @ (grid.direction_matrix @ np.diag(grid.spacing)).T + np.asarray(grid.origin)


@pytest.mark.parametrize("grid", [OBLIQUE, TEST_GRID], ids=["oblique-anisotropic", "rotated-z"])
def test_vtk_grid_maps_points_like_simpleitk_reads_the_file(tmp_path, grid):
    displacement = syntheticDisplacement(grid, amplitude_mm=4.0)
    rng = np.random.default_rng(1)
    displacement = displacement + rng.normal(scale=0.8, size=displacement.shape)  # not linear: interpolation counts
    field = sitk.GetImageFromArray(displacement, isVector=True)
    field.SetSpacing(grid.spacing)
    field.SetOrigin(grid.origin)
    field.SetDirection(grid.direction)
    path = tmp_path / "transform.h5"
    sitk.WriteTransform(sitk.DisplacementFieldTransform(field), str(path))
    itk_transform = sitk.ReadTransform(str(path))

    read_displacement, read_grid = result.readDisplacementTransform(str(path))
    assert read_grid == grid or np.allclose(read_grid.index_to_physical(), grid.index_to_physical())
    image, direction = result.displacementToVtk(read_displacement, read_grid)

    lps = random_inner_points(grid)
    ras = lps @ LPS_TO_RAS.T
    expected_ras = np.array([itk_transform.TransformPoint(tuple(p)) for p in lps]) @ LPS_TO_RAS.T
    got_ras = ras + oriented_grid_displacement(image, direction, ras)
    # VTK's grid interpolation is float-precise (~1e-5 mm off ITK's double maths even for double data; the same
    # code runs in Slicer's vtkOrientedGridTransform), so micrometre agreement is what "exact" means here.
    np.testing.assert_allclose(got_ras, expected_ras, atol=1e-4)
    # a wrong convention would be off by millimetres, not micrometres
    assert np.abs(expected_ras - ras).max() > 1.0


def test_vtk_image_geometry_is_the_grid_in_ras():
    image, direction = result.displacementToVtk(np.zeros(OBLIQUE.shape_zyx + (3,)), OBLIQUE)
    assert image.GetDimensions() == OBLIQUE.size
    np.testing.assert_allclose(image.GetSpacing(), OBLIQUE.spacing)
    # voxel (i, j, k) centre in RAS via VTK's own oriented image = Grid.ijk_to_ras()
    oriented = vtk.vtkImageData()
    oriented.SetOrigin(image.GetOrigin())
    oriented.SetSpacing(image.GetSpacing())
    oriented.SetDimensions(image.GetDimensions())
    oriented.SetDirectionMatrix([direction.GetElement(r, c) for r in range(3) for c in range(3)])
    for index in ((0, 0, 0), (16, 0, 3), (5, 12, 8)):
        point = [0.0, 0.0, 0.0]
        oriented.TransformIndexToPhysicalPoint(*index, point)
        expected = OBLIQUE.ijk_to_ras() @ np.array([*index, 1.0])
        np.testing.assert_allclose(point, expected[:3], atol=1e-9)


def test_vectors_are_ras_and_in_vtk_point_order():
    displacement = np.zeros(OBLIQUE.shape_zyx + (3,))
    displacement[2, 3, 4] = (1.0, 2.0, 3.0)  # [k, j, i] LPS
    image, _ = result.displacementToVtk(displacement, OBLIQUE)
    point_id = image.ComputePointId([4, 3, 2])
    assert image.GetPointData().GetScalars().GetTuple3(point_id) == (-1.0, -2.0, 3.0)
    assert image.GetPointData().GetScalars().GetNumberOfComponents() == 3


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="does not match"):
        result.displacementToVtk(np.zeros((3, 4, 5, 3)), OBLIQUE)


def test_selftest_jacobian_is_the_analytic_determinant():
    """The in-Slicer self-test compares the imported Jacobian with this analytic map; check it here with the
    engine's finite-difference Jacobian (a wrong formula would differ by far more than discretisation)."""
    jac = pytest.importorskip("nephireg.jacobian")
    numeric = jac.jacobian_determinant(syntheticDisplacement(TEST_GRID), TEST_GRID)
    analytic = analyticJacobian(TEST_GRID)
    inner = (slice(1, -1),) * 3
    np.testing.assert_allclose(numeric[inner], analytic[inner], atol=2e-3)


def test_summary_lines_show_folding_range_runtime_and_similarity():
    lines = result.summaryLines({"folding_percent": 0.25, "jacobian_min": 0.41, "jacobian_max": 1.9,
                                 "ncc_before": 0.71, "ncc_after": 0.93, "similarity_region": "mask",
                                 "runtime_s": 12.5})
    text = "\n".join(lines)
    assert "Folding (det J <= 0): 0.25%" in text
    assert "det J min: 0.41" in text and "det J max: 1.9" in text
    assert "ncc: 0.71 before -> 0.93 after" in text
    assert "Runtime: 12.5 s" in text and "similarity region: mask" in text
    assert result.manifestMetrics({"metrics": {"a": {"b": 1}, "c": 2}}) == {"a_b": 1, "c": 2}


def test_selftest_writes_what_the_engine_writes(tmp_path):
    """The in-Slicer self-test's synthetic result is a valid engine result folder (protocol manifest, ITK
    displacement field readable back exactly, Jacobian on the fixed grid)."""
    from NePhiRegistrationLib.selftest import writeSyntheticResult

    manifest, displacement = writeSyntheticResult(str(tmp_path / "out dir ü"))
    read_back, grid = result.readDisplacementTransform(manifest["files"]["transform"])
    np.testing.assert_allclose(read_back, displacement, atol=1e-12)
    assert np.allclose(grid.index_to_physical(), TEST_GRID.index_to_physical())
    jacobian = sitk.ReadImage(manifest["files"]["jacobian"])
    assert jacobian.GetSize() == TEST_GRID.size and jacobian.GetPixelID() == sitk.sitkFloat32
    assert manifest["metrics"]["folding_percent"] == 0.0
