"""NePhi Registration: deformable registration of two volumes with a background PyTorch engine.

Thin Slicer shell: the panel's behaviour is in ``NePhiRegistrationLib.widget``, one run in
``NePhiRegistrationLib.logic``, scene import in ``NePhiRegistrationLib.sceneio``. torch is never imported in
Slicer's process: the engine (``nephireg``) runs under PythonSlicer in its own process.
"""

import os
import shutil
import sys
import tempfile

import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from NePhiRegistrationLib import logic as runLogic
from NePhiRegistrationLib import sceneio
from NePhiRegistrationLib.parameters import NePhiRegistrationParameterNode
from NePhiRegistrationLib.runner import EngineProcess, RunStatus
from NePhiRegistrationLib.settings import RegistrationSettings


class NePhiRegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("NePhi Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["NePhiRegistration developers"]
        self.parent.helpText = _(
            "Deformable registration of a moving volume to a fixed volume with NePhi (neural deformation fields) "
            "or continuous Adam optimisation, run by a PyTorch engine in a background process. The result is a "
            "grid transform with a Jacobian-determinant heatmap and a quality summary. "
            '<a href="https://github.com/NePhiRegistration/SlicerNePhiRegistration#readme">Documentation</a>.')
        self.parent.acknowledgementText = _(
            "NePhi: Tian et al., 'NePhi: Neural Deformation Fields for Approximately Diffeomorphic Medical Image "
            "Registration', ECCV 2024. Continuous optimisation after Siebert et al. (ConvexAdam) and Heinrich "
            "(MIND-SSC). The engine runs on PyTorch, installed through Slicer's PyTorch extension.")
        slicer.app.connect("startupCompleted()", _registerSampleData)


def _registerSampleData():
    from NePhiRegistrationLib.sampledata import registerSampleData

    registerSampleData()


class NePhiRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.panel = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        from NePhiRegistrationLib.widget import RegistrationPanel

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/NePhiRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = NePhiRegistrationLogic()
        self.panel = RegistrationPanel(self.ui, lambda: self._parameterNode, sceneio.slicerLogics())
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self.panel is not None:
            self.panel.cleanup()
        self.removeObservers()

    def enter(self) -> None:
        if self.panel is not None:
            self.panel.invalidateAvailability()  # models may have been installed or removed meanwhile
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        if self.panel is not None:
            self.panel.cleanup()  # a run must not import into a closing scene
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            first = sceneio.defaultFixedVolume(slicer.mrmlScene)  # a plain scalar volume, as the selector lists
            if first:
                self._parameterNode.fixedVolume = first

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.panel.relabelChoices()
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)
            self.onParameterChanged()

    def onParameterChanged(self, caller=None, event=None) -> None:
        self.panel.updateState()


class NePhiRegistrationLogic(ScriptedLoadableModuleLogic):
    """Scripting entry point. Example (Slicer's Python console)::

        logic = slicer.util.getModuleLogic("NePhiRegistration")
        result = logic.register(fixed, moving, method="adam", preset="lung-ct", iterations=200)
        print(result["metrics"]["folding_percent"], result["transform"].GetName())
    """

    def __init__(self, processFactory=EngineProcess) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.processFactory = processFactory

    def getParameterNode(self):
        return NePhiRegistrationParameterNode(super().getParameterNode())

    def startRegistration(self, fixedNode, movingNode, method="adam", preset="generic", fixedMask=None,
                          movingMask=None, outputTransform=None, createWarpedVolume=False, createJacobianVolume=True,
                          applyTransformToMoving=True, showJacobianHeatmap=True, importInverse=False, callback=None,
                          onFinished=None, installTorch=True, python=None, **expert):
        """Start a run and return its :class:`RegistrationJob` (call ``job.poll()`` regularly, or ``job.wait()``).
        ``callback(progressState)`` gets progress; ``importInverse``: also load the inverse map (moving -> fixed)
        as a second transform node; ``expert``: iterations, regularization, gridSpacingMm, affinePrealignment,
        device, modelPath, keepTemporaryFiles, seed. A moving volume under a linear transform is registered
        starting from it, and the result replaces that parent."""
        settings = RegistrationSettings.fromOptions(method, preset, writeWarped=createWarpedVolume, **expert)
        if installTorch and python is None:
            runLogic.ensureTorch(askConfirmation=not slicer.app.testingEnabled())
        options = sceneio.ImportOptions(createWarpedVolume, createJacobianVolume, applyTransformToMoving,
                                        showJacobianHeatmap, 0.5, importInverse)
        job = runLogic.RegistrationJob(fixedNode, movingNode, settings, fixedMask, movingMask, outputTransform, options,
                                       python=python, processFactory=self.processFactory, onProgress=callback,
                                       onFinished=onFinished, logics=sceneio.slicerLogics())
        job.start()
        return job

    def register(self, fixedNode, movingNode, method="adam", preset="generic", wait=True, **kwargs):
        """Register ``movingNode`` to ``fixedNode``. Blocking by default: returns ``{"transform", "warpedVolume",
        "jacobianVolume", "metrics"}`` or raises RuntimeError with the engine's message and log tail. With
        ``wait=False`` returns the running job instead. Keywords: see :meth:`startRegistration`."""
        job = self.startRegistration(fixedNode, movingNode, method, preset, **kwargs)
        if not wait:
            return job
        outcome = job.wait()
        if outcome.status != RunStatus.SUCCEEDED or job.result is None:
            raise RuntimeError(job.error or outcome.describe())
        result = job.result
        return {"transform": result.transform, "warpedVolume": result.warpedVolume,
                "jacobianVolume": result.jacobianVolume, "inverseTransform": result.inverseTransform,
                "metrics": result.metrics}


class NePhiRegistrationTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (ctest or the Reload & Test button). The first two tests need no torch."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_importSyntheticField()
        self.setUp()
        self.test_linearParentIsTheInitialTransformAndIsReplaced()
        self.setUp()
        self.test_failedRunLeavesSceneUnchanged()
        self.setUp()
        self.test_failedMaskedRunLeavesSceneUnchanged()
        self.setUp()
        self.test_realEngine()

    def _volumes(self):
        from NePhiRegistrationLib import selftest

        fixedArray, movingArray = selftest.volumeArraysOnGrid()
        ijkToRas = selftest.TEST_GRID.ijk_to_ras()
        fixed = slicer.util.addVolumeFromArray(fixedArray, ijkToRas, "fixed")
        moving = slicer.util.addVolumeFromArray(movingArray, ijkToRas, "moving")
        return fixed, moving

    def test_importSyntheticField(self):
        import numpy as np
        import SimpleITK as sitk

        from NePhiRegistrationLib import result as resultLib
        from NePhiRegistrationLib import selftest

        self.delayDisplay("Import a synthetic displacement field (no torch)")
        fixed, moving = self._volumes()
        folder = tempfile.mkdtemp(prefix="NePhi test ünïcode ")
        try:
            manifest, displacement = selftest.writeSyntheticResult(os.path.join(folder, "out"))
            nodes = sceneio.importResult(sceneio.slicerLogics(), manifest, fixed, moving, None, sceneio.ImportOptions())
            itkTransform = sitk.ReadTransform(manifest["files"]["transform"])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        transformNode = nodes.transform
        self.assertEqual(transformNode.GetNodeReferenceID(transformNode.GetMovingNodeReferenceRole()), moving.GetID())
        self.assertEqual(transformNode.GetNodeReferenceID(transformNode.GetFixedNodeReferenceRole()), fixed.GetID())
        self.assertEqual(moving.GetTransformNodeID(), transformNode.GetID())
        self.assertIsNone(transformNode.GetStorageNode())  # not tied to the deleted temp file
        # The node maps points like ITK maps the file (RAS = LPS with x, y negated), and like route B: both
        # interpolate trilinearly (the imported node is set to linear), so they agree to float precision, at voxel
        # centres and between them (a cubic node would differ by up to 0.1 mm between centres).
        self.assertEqual(transformNode.GetTransformFromParent().GetInterpolationModeAsString(), "Linear")
        grid = selftest.TEST_GRID
        image, direction = resultLib.displacementToVtk(displacement, grid)
        routeB = slicer.vtkOrientedGridTransform()
        routeB.SetGridDirectionMatrix(direction)
        routeB.SetDisplacementGridData(image)
        routeB.SetInterpolationModeToLinear()
        for index in ((3.2, 4.7, 2.1), (10.0, 8.5, 6.3), (15.5, 12.2, 9.9), (4.0, 5.0, 6.0), (11.0, 9.0, 3.0)):
            lps = grid.index_to_physical()[:3, :3] @ np.array(index) + np.array(grid.origin)
            expected = np.array(itkTransform.TransformPoint(tuple(lps))) * [-1, -1, 1]
            ras = lps * [-1, -1, 1]
            got = np.array(transformNode.GetTransformFromParent().TransformPoint(tuple(ras)))
            np.testing.assert_allclose(got, expected, atol=1e-4)
            np.testing.assert_allclose(np.array(routeB.TransformPoint(tuple(ras))), expected, atol=1e-4)
        jacobian = nodes.jacobianVolume
        display = jacobian.GetDisplayNode()
        self.assertEqual(display.GetColorNodeID(), resultLib.JACOBIAN_COLOR_NODE_ID)
        self.assertIsNotNone(slicer.mrmlScene.GetNodeByID(resultLib.JACOBIAN_COLOR_NODE_ID))  # the node exists
        self.assertIsNotNone(display.GetColorNode())
        self.assertAlmostEqual(display.GetWindow(), 2.0)
        self.assertAlmostEqual(display.GetLevel(), 1.0)
        np.testing.assert_allclose(slicer.util.arrayFromVolume(jacobian), selftest.analyticJacobian(), rtol=1e-5)
        for composite in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):  # none without a main window
            self.assertEqual(composite.GetForegroundVolumeID(), jacobian.GetID())
            self.assertEqual(composite.GetBackgroundVolumeID(), fixed.GetID())
        sceneio.showTransformGrid(transformNode, fixed)
        self.assertEqual(jacobian.GetName(), "moving Jacobian determinant")  # named once, no "_1"
        self.delayDisplay("Synthetic field imported")

    def test_linearParentIsTheInitialTransformAndIsReplaced(self):
        import numpy as np
        import SimpleITK as sitk

        from NePhiRegistrationLib import selftest

        self.delayDisplay("A moving volume under a linear transform: the run starts from it, the result replaces it")
        fixed, moving = self._volumes()
        manual = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "manual alignment")
        shift = vtk.vtkMatrix4x4()
        shift.SetElement(0, 3, 5.0)  # RAS mm, moving -> world
        manual.SetMatrixTransformToParent(shift)
        moving.SetAndObserveTransformNodeID(manual.GetID())
        logics = sceneio.slicerLogics()
        folder = tempfile.mkdtemp(prefix="NePhi test ")
        try:
            paths = sceneio.writeInputs(logics, folder, fixed, moving)
            initial = sitk.ReadTransform(paths["initialTransform"])  # fixed -> moving in LPS: x_LPS + 5
            np.testing.assert_allclose(initial.TransformPoint((0.0, 0.0, 0.0)), (5.0, 0.0, 0.0), atol=1e-9)
            manifest, _ = selftest.writeSyntheticResult(os.path.join(folder, "out"))
            nodes = sceneio.importResult(logics, manifest, fixed, moving)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.assertEqual(moving.GetTransformNodeID(), nodes.transform.GetID())
        self.assertIsNone(nodes.transform.GetParentTransformNode())
        self.assertEqual(nodes.transform.GetNodeReferenceID(sceneio.INITIAL_TRANSFORM_ROLE), manual.GetID())
        self.delayDisplay("Linear parent handled")

    def _sceneNodeIDs(self):
        return {slicer.mrmlScene.GetNthNode(i).GetID() for i in range(slicer.mrmlScene.GetNumberOfNodes())}

    def _segmentationMask(self, volume):
        """A segmentation with one segment much smaller than ``volume`` (an export cropped to the segment would
        show as a smaller grid)."""
        import numpy as np

        from NePhiRegistrationLib import selftest

        array = np.zeros(slicer.util.arrayFromVolume(volume).shape, dtype=np.uint8)
        array[3:8, 4:10, 5:12] = 1
        labelmap = slicer.util.addVolumeFromArray(array, selftest.TEST_GRID.ijk_to_ras(), "mask label",
                                                  nodeClassName="vtkMRMLLabelMapVolumeNode")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mask")
        segmentation.CreateDefaultDisplayNodes()
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation)
        slicer.mrmlScene.RemoveNode(labelmap)
        return segmentation

    def _failingRun(self, masked: bool):
        import SimpleITK as sitk

        from NePhiRegistrationLib.engine import findPythonSlicer

        fixed, moving = self._volumes()
        mask = self._segmentationMask(fixed) if masked else None
        before = self._sceneNodeIDs()
        python = findPythonSlicer() or sys.executable
        failing = "import sys; print('simulated engine failure', file=sys.stderr); sys.exit(1)"

        def factory(command, outDir, **kwargs):
            return EngineProcess([python, "-c", failing], outDir, **kwargs)

        logic = NePhiRegistrationLogic(processFactory=factory)
        job = logic.startRegistration(fixed, moving, method="adam", fixedMask=mask, installTorch=False,
                                      python=python, keepTemporaryFiles=masked)
        outcome = job.wait()
        self.assertEqual(outcome.status, RunStatus.FAILED)
        self.assertIn("simulated engine failure", job.error)
        self.assertEqual(self._sceneNodeIDs(), before)  # no temp label map, display or colour node left
        self.assertIsNone(moving.GetTransformNodeID())
        if masked:  # the exported mask lies on the fixed volume's full grid (the engine rejects anything else)
            try:
                written = sitk.ReadImage(os.path.join(job.folder, "fixed-mask.nrrd"))
                self.assertEqual(written.GetSize(), fixed.GetImageData().GetDimensions())
                self.assertEqual(int(sitk.GetArrayFromImage(written).astype(bool).sum()), 5 * 6 * 7)
            finally:
                shutil.rmtree(job.folder, ignore_errors=True)

    def test_failedRunLeavesSceneUnchanged(self):
        self.delayDisplay("A failing engine leaves the scene as it was")
        self._failingRun(masked=False)

    def test_failedMaskedRunLeavesSceneUnchanged(self):
        self.delayDisplay("A failing engine with a segmentation mask leaves the scene as it was")
        self._failingRun(masked=True)

    def test_realEngine(self):
        from NePhiRegistrationLib import availability
        from NePhiRegistrationLib.sampledata import sampleFiles

        if not availability.torchFound():
            self.delayDisplay("PyTorch is not installed: real-engine test skipped")
            return
        self.delayDisplay("Register the synthetic demo pair with the real engine")
        (_, fixedPath, _), (_, movingPath, _) = sampleFiles()
        fixed = slicer.util.loadVolume(fixedPath)
        moving = slicer.util.loadVolume(movingPath)
        result = NePhiRegistrationLogic().register(fixed, moving, method="adam", preset="generic", iterations=30,
                                                   methodOptions={"levels": [4], "coarse_iterations": 0},
                                                   installTorch=False, python=runLogic.pythonSlicer())
        self.assertIsNotNone(result["transform"])
        self.assertLess(result["metrics"]["folding_percent"], 1.0)
        self.assertEqual(moving.GetTransformNodeID(), result["transform"].GetID())
        self.delayDisplay("Real engine test passed")
