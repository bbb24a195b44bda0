"""sceneio (inputs -> files, result -> scene) on a real MRML scene: Slicer's MRML, Logic and Segmentations
libraries from the ``slicer-core`` wheel (scene built as Slicer builds it, by ``trame-slicer``'s SlicerApp).

Nothing here is a stand-in: the export, the readers (transforms logic ``AddTransform``, volumes logic
``AddArchetypeVolume``), the storage nodes and the transform nodes are Slicer's own. The engine result of the
geometry test is a real (small) engine run.
"""

import os

import numpy as np
import pytest
import SimpleITK as sitk
from slicer_scene import add_segmentation, add_volume, array_of, matrix4, new_app, node_ids

from nephireg import protocol
from nephireg.geometry import LPS_TO_RAS, Grid

GRID = Grid(size=(20, 16, 12), spacing=(1.5, 2.0, 3.0), origin=(12.0, -30.0, 40.0),
            direction=tuple(np.round(np.array([[0.9800666, -0.1986693, 0.0], [0.1986693, 0.9800666, 0.0],
                                               [0.0, 0.0, 1.0]]), 7).ravel()))
DRAWN = (slice(3, 8), slice(4, 10), slice(5, 12))  # [k, j, i] of the drawn segment: 5 x 6 x 7 voxels


@pytest.fixture
def env(tmp_path):
    from NePhiRegistrationLib import selftest

    app = new_app()
    fixedArray, movingArray = selftest.volumeArraysOnGrid(GRID)
    app.fixed = add_volume(app.scene, fixedArray, GRID.ijk_to_ras(), "fixed")
    app.moving = add_volume(app.scene, movingArray, GRID.ijk_to_ras(), "moving")
    app.folder = tmp_path
    return app


def drawn_mask() -> np.ndarray:
    mask = np.zeros(GRID.shape_zyx, dtype=np.uint8)
    mask[DRAWN] = 1
    return mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def translation(scene, offset_ras, name="manual alignment"):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    matrix = np.eye(4)
    matrix[:3, 3] = offset_ras
    node.SetMatrixTransformToParent(matrix4(matrix))
    return node


def synthetic_result(folder, grid=GRID, inverse=False):
    """An engine-shaped result folder (transform, Jacobian, result.json; the inverse on request) without torch."""
    from NePhiRegistrationLib import selftest

    manifest, displacement = selftest.writeSyntheticResult(str(folder), grid)
    if inverse:  # to the contract: an ITK displacement field over the moving image, moving -> fixed (here: -u)
        from nephireg.io import write_transform

        write_transform(-displacement, grid, os.path.join(folder, "inverse.h5"))
        manifest["files"]["inverse"] = os.path.join(folder, "inverse.h5")
    return manifest, displacement


# -- inputs --------------------------------------------------------------------------------------------------------
def test_segmentation_mask_is_exported_on_the_full_grid_and_leaves_no_node_not_even_its_colour_table(env):
    mask = add_segmentation(env.scene, env.logics.segmentations, drawn_mask(), GRID.ijk_to_ras(), "lungs")
    before = node_ids(env.scene)
    path = env.sceneio.writeMask(env.logics, mask, env.fixed, str(env.folder / "fixed-mask.nrrd"))
    written = sitk.ReadImage(path)
    assert written.GetSize() == GRID.size  # the full reference grid, not cropped to the segment
    np.testing.assert_allclose(written.GetOrigin(), GRID.origin, atol=1e-6)
    assert (sitk.GetArrayFromImage(written) > 0).sum() == 5 * 6 * 7
    assert node_ids(env.scene) == before  # no label map, display node or "lungs_ColorTable" (Slicer 5.10+) left
    assert env.scene.GetFirstNodeByName("lungs_ColorTable") is None


def test_a_segmentation_with_every_segment_hidden_is_refused_not_exported_whole(env):
    mask = add_segmentation(env.scene, env.logics.segmentations, drawn_mask(), GRID.ijk_to_ras())
    mask.GetDisplayNode().SetAllSegmentsVisibility(False)
    before = node_ids(env.scene)
    with pytest.raises(ValueError, match="no visible segment"):
        env.sceneio.writeMask(env.logics, mask, env.fixed, str(env.folder / "m.nrrd"))
    assert node_ids(env.scene) == before and not (env.folder / "m.nrrd").exists()


def test_segmentation_without_display_node_is_a_clear_error(env):
    mask = env.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "bare")
    with pytest.raises(ValueError, match="no display node"):
        env.sceneio.writeMask(env.logics, mask, env.fixed, str(env.folder / "m.nrrd"))


def test_rerun_under_the_previous_result_exports_the_moving_mask_where_it_was_drawn(env, tmp_path):
    manifest, _ = synthetic_result(tmp_path / "previous")
    env.sceneio.importResult(env.logics, manifest, env.fixed, env.moving)
    assert env.moving.GetParentTransformNode() is not None  # the moving volume sits under its previous result
    mask = add_segmentation(env.scene, env.logics.segmentations, drawn_mask(), GRID.ijk_to_ras())
    paths = env.sceneio.writeInputs(env.logics, str(env.folder), env.fixed, env.moving, movingMask=mask)
    exported = sitk.GetArrayFromImage(sitk.ReadImage(paths["movingMask"])) > 0
    assert dice(exported, drawn_mask() > 0) == 1.0  # not resampled through the old transform (was 0.73)
    assert paths["initialTransform"] is None  # a previous result is replaced, not started from


@pytest.mark.parametrize("parent_class", ["vtkMRMLGridTransformNode", "vtkMRMLBSplineTransformNode"])
def test_a_moving_volume_under_a_non_linear_user_transform_is_refused_before_anything_is_written(env, parent_class):
    users = env.scene.AddNewNodeByClass(parent_class, "user warp")
    env.moving.SetAndObserveTransformNodeID(users.GetID())
    with pytest.raises(ValueError) as caught:
        env.sceneio.writeInputs(env.logics, str(env.folder), env.fixed, env.moving)
    message = str(caught.value)
    assert "'moving'" in message and "'user warp'" in message and "Harden" in message
    assert list(env.folder.iterdir()) == []


def test_a_fixed_volume_under_any_transform_is_refused(env):
    env.fixed.SetAndObserveTransformNodeID(translation(env.scene, (1.0, 0.0, 0.0)).GetID())
    with pytest.raises(ValueError, match="'fixed'.*'manual alignment'"):
        env.sceneio.writeInputs(env.logics, str(env.folder), env.fixed, env.moving)


def test_an_output_transform_under_a_parent_is_refused(env):
    output = env.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "my output")
    output.SetAndObserveTransformNodeID(translation(env.scene, (0.0, 5.0, 0.0), "outer").GetID())
    with pytest.raises(ValueError, match="'my output' is under the transform 'outer'"):
        env.sceneio.writeInputs(env.logics, str(env.folder), env.fixed, env.moving, outputTransform=output)


def test_a_moving_volume_under_a_linear_chain_is_written_with_it_as_the_initial_transform(env):
    inner = env.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "inner")
    rotation = np.eye(4)
    rotation[:3, :3] = [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]  # 90 degrees about S
    inner.SetMatrixTransformToParent(matrix4(rotation))
    outer = translation(env.scene, (4.0, -2.0, 7.0), "outer")
    inner.SetAndObserveTransformNodeID(outer.GetID())
    env.moving.SetAndObserveTransformNodeID(inner.GetID())
    paths = env.sceneio.writeInputs(env.logics, str(env.folder), env.fixed, env.moving)
    itk = sitk.ReadTransform(paths["initialTransform"])
    toWorld = array_of(_matrix_to_world(inner))  # moving local RAS -> world RAS
    for ras in ((0.0, 0.0, 0.0), (10.0, -20.0, 35.0), (-7.5, 3.25, 1.0)):
        # the file is the resampling direction (world/fixed -> moving) in LPS: it must undo toWorld
        world = toWorld[:3, :3] @ np.array(ras) + toWorld[:3, 3]
        mapped = LPS_TO_RAS @ np.array(itk.TransformPoint(tuple(LPS_TO_RAS @ world)))
        np.testing.assert_allclose(mapped, ras, atol=1e-6)


def _matrix_to_world(node):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetMatrixTransformToWorld(matrix)
    return matrix


def test_the_fixed_volume_default_skips_label_maps_and_other_subclasses(env):
    import slicer

    from NePhiRegistrationLib import selftest

    scene = slicer.vtkMRMLScene()
    add_volume(scene, drawn_mask(), GRID.ijk_to_ras(), "labels", "vtkMRMLLabelMapVolumeNode")
    assert env.sceneio.defaultFixedVolume(scene) is None
    plain = add_volume(scene, selftest.volumeArraysOnGrid(GRID)[0], GRID.ijk_to_ras(), "ct")
    assert env.sceneio.defaultFixedVolume(scene) is plain


def test_holds_transform_only_when_the_node_holds_something(env, tmp_path):
    sceneio = env.sceneio
    for empty in ("vtkMRMLGridTransformNode", "vtkMRMLBSplineTransformNode", "vtkMRMLLinearTransformNode"):
        assert not sceneio.holdsTransform(env.scene.AddNewNodeByClass(empty)), empty
    assert sceneio.holdsTransform(translation(env.scene, (0.0, 0.0, 1.0)))
    manifest, _ = synthetic_result(tmp_path / "r")
    assert sceneio.holdsTransform(sceneio.importResult(env.logics, manifest, env.fixed, env.moving).transform)


# -- result import -------------------------------------------------------------------------------------------------
def test_import_through_the_module_logics_names_once_detaches_storage_and_interpolates_linearly(env, tmp_path):
    manifest, _ = synthetic_result(tmp_path / "r")
    warped = str(tmp_path / "r" / "warped.nrrd")
    sitk.WriteImage(sitk.ReadImage(manifest["files"]["jacobian"]), warped)
    manifest["files"]["warped"] = warped
    composite = env.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    before = node_ids(env.scene)
    options = env.sceneio.ImportOptions(createWarpedVolume=True)
    result = env.sceneio.importResult(env.logics, manifest, env.fixed, env.moving, options=options)
    assert result.warpedVolume.GetName() == "moving warped"  # made unique once, not "moving warped_1"
    assert result.jacobianVolume.GetName() == "moving Jacobian determinant"
    assert result.transform.GetName() == "moving to fixed (NePhi)"
    for node in (result.transform, result.warpedVolume, result.jacobianVolume):
        assert node.GetStorageNode() is None  # not tied to the temp folder that is deleted next
    added = node_ids(env.scene) - before
    displays = {result.warpedVolume.GetDisplayNodeID(), result.jacobianVolume.GetDisplayNodeID()}
    assert added == {result.transform.GetID(), result.warpedVolume.GetID(), result.jacobianVolume.GetID(), *displays}
    assert result.transform.GetTransformFromParent().GetInterpolationModeAsString() == "Linear"
    assert result.transform.GetAttribute(env.sceneio.RESULT_ATTRIBUTE) == "1"
    assert result.transform.GetNodeReferenceID(result.transform.GetMovingNodeReferenceRole()) == env.moving.GetID()
    assert env.moving.GetParentTransformNode() is result.transform
    assert composite.GetBackgroundVolumeID() == env.fixed.GetID()
    assert composite.GetForegroundVolumeID() == result.jacobianVolume.GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.5)
    display = result.jacobianVolume.GetDisplayNode()
    assert (display.GetWindow(), display.GetLevel()) == (2.0, 1.0)


def test_failed_import_leaves_the_scene_and_the_users_output_node_untouched(env, tmp_path):
    manifest, _ = synthetic_result(tmp_path / "r")
    output = translation(env.scene, (1.0, 2.0, 3.0), "my output")
    os.remove(manifest["files"]["jacobian"])
    before = node_ids(env.scene)
    with pytest.raises(RuntimeError, match="Could not read the volume"):
        env.sceneio.importResult(env.logics, manifest, env.fixed, env.moving, output)
    assert node_ids(env.scene) == before and env.moving.GetParentTransformNode() is None
    assert array_of(output.GetMatrixTransformToParent())[:3, 3].tolist() == [1.0, 2.0, 3.0]
    assert output.GetAttribute(env.sceneio.RESULT_ATTRIBUTE) is None


def test_import_refuses_a_transform_put_on_the_fixed_volume_during_the_run(env, tmp_path):
    manifest, _ = synthetic_result(tmp_path / "r")
    env.fixed.SetAndObserveTransformNodeID(translation(env.scene, (0.0, 1.0, 0.0), "set meanwhile").GetID())
    before = node_ids(env.scene)
    with pytest.raises(ValueError, match="set meanwhile"):
        env.sceneio.importResult(env.logics, manifest, env.fixed, env.moving)
    assert node_ids(env.scene) == before


def test_the_inverse_is_imported_as_a_second_node_on_request(env, tmp_path):
    manifest, displacement = synthetic_result(tmp_path / "r", inverse=True)
    plain = env.sceneio.importResult(env.logics, manifest, env.fixed, env.moving)
    assert plain.inverseTransform is None
    options = env.sceneio.ImportOptions(importInverse=True)
    result = env.sceneio.importResult(env.logics, manifest, env.fixed, env.moving, options=options)
    inverse = result.inverseTransform
    assert inverse.GetName() == "fixed to moving (NePhi inverse)" and inverse.GetStorageNode() is None
    assert inverse.GetNodeReferenceID(inverse.GetMovingNodeReferenceRole()) == env.fixed.GetID()
    assert env.moving.GetParentTransformNode() is result.transform  # the inverse is applied to nothing
    itk = sitk.ReadTransform(manifest["files"]["inverse"])
    lps = GRID.index_to_physical()[:3, :3] @ np.array([6.4, 7.5, 3.2]) + np.array(GRID.origin)
    got = np.array(inverse.GetTransformFromParent().TransformPoint(tuple(LPS_TO_RAS @ lps)))
    np.testing.assert_allclose(got, LPS_TO_RAS @ np.array(itk.TransformPoint(tuple(lps))), atol=1e-5)
    del manifest["files"]["inverse"]
    before = node_ids(env.scene)
    with pytest.raises(RuntimeError, match="no inverse"):
        env.sceneio.importResult(env.logics, manifest, env.fixed, env.moving, options=options)
    assert node_ids(env.scene) == before


def test_a_run_from_a_linear_parent_replaces_it_and_a_rerun_starts_from_it_again(env, tmp_path):
    manual = translation(env.scene, (2.0, 0.0, 0.0))
    env.moving.SetAndObserveTransformNodeID(manual.GetID())
    manifest, _ = synthetic_result(tmp_path / "r")
    result = env.sceneio.importResult(env.logics, manifest, env.fixed, env.moving)
    assert env.moving.GetParentTransformNode() is result.transform and result.transform.GetParentTransformNode() is None
    assert result.transform.GetNodeReferenceID(env.sceneio.INITIAL_TRANSFORM_ROLE) == manual.GetID()
    assert env.sceneio.initialTransformNode(env.moving) is manual  # re-running starts from the manual alignment
    assert env.scene.GetNodeByID(manual.GetID()) is manual  # the user's node stays in the scene


# -- geometry, end to end ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_oblique_anisotropic_volume_registered_and_loaded_maps_world_points_as_itk_maps_the_file(env, tmp_path,
                                                                                              one_torch_thread):
    from nephireg.inputs import Request
    from nephireg.pipeline import register

    fixedPath = env.sceneio.writeVolume(env.logics, env.fixed, str(tmp_path / "fixed.nrrd"))
    movingPath = env.sceneio.writeVolume(env.logics, env.moving, str(tmp_path / "moving.nrrd"))
    assert env.fixed.GetStorageNode() is None  # the user's node was not re-pointed at the temp file
    written = Grid.of(sitk.ReadImage(fixedPath))  # the node's RAS geometry, written as LPS
    np.testing.assert_allclose(written.ijk_to_ras(), array_of(_ijk_to_ras(env.fixed)), atol=1e-5)
    out = tmp_path / "out"
    register(Request(fixedPath, movingPath, str(out), method="adam", preset="generic", prealign="none",
                     options={"iterations": 30, "levels": [4], "coarse_iterations": 0}, write_overview=False))
    manifest = protocol.read_manifest(str(out))
    options = env.sceneio.ImportOptions(importInverse=True)  # the engine's inverse.h5 as a second node
    result = env.sceneio.importResult(env.logics, manifest, env.fixed, env.moving, options=options)
    itk = sitk.ReadTransform(manifest["files"]["transform"])
    itkInverse = sitk.ReadTransform(manifest["files"]["inverse"])
    inverse = result.inverseTransform.GetTransformFromParent()
    node = result.transform.GetTransformFromParent()
    rng = np.random.default_rng(0)
    centres = rng.integers(1, np.array(GRID.size) - 1, size=(40, 3)).astype(float)
    between = rng.uniform(1.0, np.array(GRID.size) - 2.0, size=(40, 3))
    moved = 0.0
    for index in np.vstack([centres, between]):
        lps = GRID.index_to_physical()[:3, :3] @ index + np.array(GRID.origin)
        expected = LPS_TO_RAS @ np.array(itk.TransformPoint(tuple(lps)))
        got = np.array(node.TransformPoint(tuple(LPS_TO_RAS @ lps)))  # FromParent: fixed RAS -> moving RAS
        np.testing.assert_allclose(got, expected, atol=1e-4)
        moved = max(moved, float(np.linalg.norm(expected - LPS_TO_RAS @ lps)))
        # the inverse node (moving -> fixed) maps as SimpleITK maps inverse.h5, and brings phi(x) back near x
        back = np.array(inverse.TransformPoint(tuple(got)))
        np.testing.assert_allclose(back, LPS_TO_RAS @ np.array(itkInverse.TransformPoint(tuple(LPS_TO_RAS @ got))),
                                   atol=1e-4)
        assert np.linalg.norm(back - LPS_TO_RAS @ lps) < 0.25  # mm (voxels 1.5-3 mm)
    assert moved > 0.5  # mm: a real displacement was compared, not the identity
    for lps in GRID.corners_physical():  # the moving image's last voxel layers: inside the inverse's lattice
        ras = LPS_TO_RAS @ lps
        expected = LPS_TO_RAS @ np.array(itkInverse.TransformPoint(tuple(lps)))
        np.testing.assert_allclose(np.array(inverse.TransformPoint(tuple(ras))), expected, atol=1e-4)
        assert np.linalg.norm(expected - ras) > 0.1  # moved: not the identity ITK applies beyond a field's buffer


def _ijk_to_ras(node):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix
