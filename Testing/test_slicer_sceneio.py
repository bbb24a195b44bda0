"""sceneio (inputs -> files, result -> scene) against a stand-in scene that records every node added or removed.

The stand-in mimics what Slicer's C++ does where it matters here (checked against Slicer's source):
``ExportSegmentsToLabelmapNode`` creates a display node and a ``<labelmap name>_ColorTable`` colour node, and
crops the label map to the segments unless ``EXTENT_REFERENCE_GEOMETRY`` is passed; ``loadTransform`` adds a node
that owns the transform object. What it cannot show (real VTK/ITK geometry) is covered by the in-Slicer self-test.
"""

import importlib
import json
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "NePhiRegistration"))

EXTENT_REFERENCE_GEOMETRY = 0  # vtkSegmentation's enum value (any distinct int would do here)
EXTENT_UNION_OF_EFFECTIVE_SEGMENTS = 3


class Node:
    def __init__(self, scene, className, name=""):
        self.scene, self.className, self.name = scene, className, name
        self.id = None
        self.attributes, self.references = {}, {}
        self.parent = None
        self.displayIDs = []
        self.colorID = None
        self.storageID = None
        self.transform = None
        self.grid = None  # stand-in geometry: (size, origin)
        self.unregistered = False

    # identity
    def GetID(self):
        return self.id

    def GetName(self):
        return self.name

    def IsA(self, className):
        return className == self.className or (className == "vtkMRMLTransformNode" and "Transform" in self.className)

    # attributes and references
    def SetAttribute(self, key, value):
        self.attributes[key] = value

    def GetAttribute(self, key):
        return self.attributes.get(key)

    def GetMovingNodeReferenceRole(self):
        return "spatialRegistrationMoving"

    def GetFixedNodeReferenceRole(self):
        return "spatialRegistrationFixed"

    def SetNodeReferenceID(self, role, nodeID):
        self.references[role] = nodeID

    def GetNodeReferenceID(self, role):
        return self.references.get(role)

    # transforms
    def GetParentTransformNode(self):
        return self.parent

    def SetAndObserveTransformNodeID(self, nodeID):
        self.parent = self.scene.GetNodeByID(nodeID) if nodeID else None

    def SetAndObserveTransformFromParent(self, transform):
        self.transform = transform

    def GetTransformFromParent(self):
        return self.transform

    # display and storage
    def CreateDefaultDisplayNodes(self):
        if not self.displayIDs:
            self.displayIDs.append(self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode").GetID())

    def GetDisplayNode(self):
        return self.scene.GetNodeByID(self.displayIDs[0]) if self.displayIDs else None

    def GetNumberOfDisplayNodes(self):
        return len(self.displayIDs)

    def GetNthDisplayNodeID(self, index):
        return self.displayIDs[index]

    def GetColorNodeID(self):
        return self.colorID

    def SetAndObserveColorNodeID(self, nodeID):
        self.colorID = nodeID

    def AutoWindowLevelOff(self):
        pass

    def SetWindowLevel(self, window, level):
        pass

    def SetInterpolate(self, interpolate):
        pass

    def GetStorageNode(self):
        return self.scene.GetNodeByID(self.storageID) if self.storageID else None

    def SetAndObserveStorageNodeID(self, nodeID):
        self.storageID = nodeID

    # a storage node's part
    def SetFileName(self, path):
        self.fileName = path

    def SetUseCompression(self, flag):
        pass

    def WriteData(self, node):
        Path(self.fileName).write_text(json.dumps({"name": node.GetName(), "grid": node.grid}))
        return 1

    def UnRegister(self, owner):
        self.unregistered = True


class Scene:
    def __init__(self):
        self.nodes, self.counter, self.created = {}, 0, []

    def _add(self, node):
        self.counter += 1
        node.id = f"{node.className}{self.counter}"
        self.nodes[node.id] = node
        return node

    def AddNewNodeByClass(self, className, name=""):
        return self._add(Node(self, className, name or className))

    def CreateNodeByClass(self, className):
        node = Node(self, className)
        self.created.append(node)
        return node

    def RemoveNode(self, node):
        self.nodes.pop(node.GetID(), None)

    def GetNodeByID(self, nodeID):
        return self.nodes.get(nodeID)

    def GenerateUniqueName(self, name):
        return name

    def ids(self):
        return set(self.nodes)


class SegmentationsLogic:
    def __init__(self, scene, succeed=True):
        self.scene, self.succeed, self.calls = scene, succeed, []

    def ExportVisibleSegmentsToLabelmapNode(self, segmentation, labelmap, reference=None,
                                            extent=EXTENT_UNION_OF_EFFECTIVE_SEGMENTS):
        self.calls.append((segmentation, labelmap, reference, extent))
        # like vtkSlicerSegmentationsModuleLogic: cropped to the segments unless the reference extent is asked for
        labelmap.grid = reference.grid if extent == EXTENT_REFERENCE_GEOMETRY else [[5, 6, 7], [9.0, 9.0, 9.0]]
        labelmap.CreateDefaultDisplayNodes()
        color = self.scene.AddNewNodeByClass("vtkMRMLColorTableNode", labelmap.GetName() + "_ColorTable")
        labelmap.GetDisplayNode().SetAndObserveColorNodeID(color.GetID())
        return self.succeed


@pytest.fixture
def env(monkeypatch, tmp_path):
    scene = Scene()
    segmentations = SegmentationsLogic(scene)
    loaded = {"transforms": [], "volumeError": None}

    def load_transform(path):
        node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "loaded")
        node.transform = object()  # stands for the vtkOrientedGridTransform the node owns
        node.storageID = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode").GetID()
        loaded["transforms"].append(node.transform)
        return node

    def load_volume(path, properties):
        if loaded["volumeError"]:
            raise RuntimeError(loaded["volumeError"])
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", properties["name"])
        node.storageID = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode").GetID()
        return node

    slicer = types.ModuleType("slicer")
    slicer.mrmlScene = scene
    slicer.util = types.SimpleNamespace(loadTransform=load_transform, loadVolume=load_volume,
                                        setSliceViewerLayers=lambda **kwargs: None)
    slicer.modules = types.SimpleNamespace(segmentations=types.SimpleNamespace(logic=lambda: segmentations))
    slicer.vtkSegmentation = types.SimpleNamespace(EXTENT_REFERENCE_GEOMETRY=EXTENT_REFERENCE_GEOMETRY)
    monkeypatch.setitem(sys.modules, "slicer", slicer)
    monkeypatch.delitem(sys.modules, "NePhiRegistrationLib.sceneio", raising=False)
    sceneio = importlib.import_module("NePhiRegistrationLib.sceneio")
    fixed = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fixed")
    fixed.grid = [[20, 16, 12], [12.0, -30.0, 40.0]]
    moving = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "moving")
    moving.grid = [[18, 16, 14], [0.0, 0.0, 0.0]]
    yield types.SimpleNamespace(sceneio=sceneio, scene=scene, segmentations=segmentations, loaded=loaded,
                                fixed=fixed, moving=moving, folder=tmp_path)
    sys.modules.pop("NePhiRegistrationLib.sceneio", None)


def segmentation(env):
    node = env.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lungs")
    node.CreateDefaultDisplayNodes()
    return node


# -- inputs --------------------------------------------------------------------------------------------------------
def test_segmentation_mask_is_exported_on_the_full_reference_grid_and_leaves_no_node(env):
    mask = segmentation(env)
    before = env.scene.ids()
    path = env.sceneio.writeMask(mask, env.fixed, str(env.folder / "fixed-mask.nrrd"))
    (_, _, reference, extent), = env.segmentations.calls
    assert reference is env.fixed and extent == EXTENT_REFERENCE_GEOMETRY
    assert json.loads(Path(path).read_text())["grid"] == env.fixed.grid  # full grid, not cropped to the segment
    assert env.scene.ids() == before  # label map, its display node and its _ColorTable all removed
    storage, = env.scene.created  # never added to the scene, and released
    assert storage.className == "vtkMRMLVolumeArchetypeStorageNode" and storage.unregistered


def test_failed_mask_export_leaves_no_node(env):
    mask = segmentation(env)
    env.segmentations.succeed = False
    before = env.scene.ids()
    with pytest.raises(RuntimeError, match="Could not export"):
        env.sceneio.writeMask(mask, env.fixed, str(env.folder / "m.nrrd"))
    assert env.scene.ids() == before


def test_mask_export_keeps_a_colour_node_it_did_not_create(env):
    mask = segmentation(env)
    shared = env.scene.AddNewNodeByClass("vtkMRMLColorTableNode", "GenericAnatomyColors")

    def export(segmentationNode, labelmap, reference=None, extent=None):
        labelmap.grid = reference.grid
        labelmap.CreateDefaultDisplayNodes()
        labelmap.GetDisplayNode().SetAndObserveColorNodeID(shared.GetID())
        return True

    env.segmentations.ExportVisibleSegmentsToLabelmapNode = export
    before = env.scene.ids()
    env.sceneio.writeMask(mask, env.fixed, str(env.folder / "m.nrrd"))
    assert env.scene.ids() == before and shared.GetID() in env.scene.ids()


def test_segmentation_without_display_node_is_a_clear_error(env):
    mask = env.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "bare")
    with pytest.raises(ValueError, match="no display node"):
        env.sceneio.writeMask(mask, env.fixed, str(env.folder / "m.nrrd"))


@pytest.mark.parametrize("which", ["fixed", "moving"])
def test_an_input_under_a_user_transform_is_refused_before_anything_is_written(env, which):
    users = env.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "manual alignment")
    getattr(env, which).parent = users
    with pytest.raises(ValueError) as caught:
        env.sceneio.writeInputs(str(env.folder), env.fixed, env.moving)
    message = str(caught.value)
    assert f"'{which}'" in message and "'manual alignment'" in message and "Harden" in message
    assert list(env.folder.iterdir()) == []


def test_rerun_may_replace_a_previous_nephi_result_of_the_same_moving_volume(env):
    previous = env.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "previous result")
    previous.SetAttribute(env.sceneio.RESULT_ATTRIBUTE, "1")
    previous.SetNodeReferenceID(previous.GetMovingNodeReferenceRole(), env.moving.GetID())
    env.moving.parent = previous
    paths = env.sceneio.writeInputs(str(env.folder), env.fixed, env.moving)
    assert Path(paths["moving"]).is_file()
    previous.SetNodeReferenceID(previous.GetMovingNodeReferenceRole(), "another volume")
    with pytest.raises(ValueError, match="previous result"):
        env.sceneio.checkInputTransforms(env.fixed, env.moving)


# -- result import -------------------------------------------------------------------------------------------------
MANIFEST = {"files": {"transform": "t.h5", "jacobian": "j.nrrd"}}


def test_import_hands_the_loaded_transform_over_without_a_copy(env):
    before = env.scene.ids()
    result = env.sceneio.importResult(MANIFEST, env.fixed, env.moving)
    loaded, = env.loaded["transforms"]
    assert result.transform.GetTransformFromParent() is loaded  # the same object: no DeepCopy
    added = env.scene.ids() - before
    # the new transform, the Jacobian volume and its display node; the loaded node and storage nodes are gone
    assert added == {result.transform.GetID(), result.jacobianVolume.GetID(), *result.jacobianVolume.displayIDs}
    assert result.transform.GetAttribute(env.sceneio.RESULT_ATTRIBUTE) == "1"
    assert result.transform.GetNodeReferenceID("spatialRegistrationMoving") == env.moving.GetID()
    assert env.moving.GetParentTransformNode() is result.transform


def test_failed_import_leaves_the_users_output_node_untouched(env):
    output = env.scene.AddNewNodeByClass("vtkMRMLTransformNode", "my output")
    original = object()
    output.transform = original
    env.loaded["volumeError"] = "jacobian.nrrd is unreadable"
    before = env.scene.ids()
    with pytest.raises(RuntimeError, match="unreadable"):
        env.sceneio.importResult(MANIFEST, env.fixed, env.moving, output)
    assert output.GetTransformFromParent() is original and output.references == {} and output.attributes == {}
    assert env.scene.ids() == before and env.moving.GetParentTransformNode() is None


def test_import_into_the_users_node_when_everything_loaded(env):
    output = env.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "my output")
    result = env.sceneio.importResult(MANIFEST, env.fixed, env.moving, output)
    assert result.transform is output and output.GetTransformFromParent() is env.loaded["transforms"][0]


def test_import_refuses_to_replace_a_transform_put_on_the_moving_volume_during_the_run(env):
    env.moving.parent = env.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "set meanwhile")
    before = env.scene.ids()
    with pytest.raises(ValueError, match="set meanwhile"):
        env.sceneio.importResult(MANIFEST, env.fixed, env.moving)
    assert env.scene.ids() == before
