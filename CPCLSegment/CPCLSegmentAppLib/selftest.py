"""The in-Slicer self-test (``CPCLSegmentTest``, run by Slicer's "Reload and Test" and ``--testing``): the console
API and the full panel flow (train in the background, Cancel, train, segment) on slicerio's chest CT with tiny
settings, a few minutes on a CPU. It installs the module's packages before anything imports them (a fresh Slicer
has none). ``CPCLSegment.py`` exposes it under its own name, where Slicer's ``runTest`` finds it.
"""

from __future__ import annotations

import os
import time

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from CPCLSegmentModuleLib.models import is_model_node
from CPCLSegmentModuleLib.nodes import segment_names, volume_array

from .consolelogic import CPCLSegmentLogic


class CPCLSegmentTest(ScriptedLoadableModuleTest):
    """In-Slicer tests: the console API and the full panel flow (train in the background, Cancel, train,
    segment, save the scene) on slicerio's chest CT with tiny settings (a few minutes on a CPU)."""

    TINY = {"width": 4, "spacing": [6.1, 6.1, 10.0], "iterations": 20, "patch_size": [64, 64, 16], "device": "cpu"}

    def setUp(self):
        # Install what is missing first (a fresh Slicer has no slicerio / MONAI): nothing below imports them before.
        CPCLSegmentLogic().ensureDependencies(ask=False)
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ConsoleLogic()
        self.setUp()
        self.test_PanelFlow()

    def loadChest(self):
        import slicerio

        folder = os.path.join(os.path.dirname(slicerio.__file__), "data")
        volume = slicer.util.loadVolume(os.path.join(folder, "CTChest4.nrrd"))
        segmentation = slicer.util.loadSegmentation(os.path.join(folder, "Segmentation.seg.nrrd"))
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        return volume, segmentation

    def test_ConsoleLogic(self):
        self.delayDisplay("Console API: train and segment")
        volume, segmentation = self.loadChest()
        before = volume_array(volume).copy()
        logic = CPCLSegmentLogic()
        model = logic.train(labeled=[(volume, segmentation)], unlabeled=[volume], segments=["right lung", "left lung"], **self.TINY)
        self.assertTrue(is_model_node(model))
        self.assertTrue(os.path.isfile(logic.core.model_file(model)))
        result = logic.segment(model, volume)
        self.assertEqual(segment_names(result), ["right lung", "left lung"])
        self.assertEqual(result.GetNodeReference(result.GetReferenceImageGeometryReferenceRole()), volume)
        self.assertTrue((volume_array(volume) == before).all())
        self.delayDisplay("Console API passed")

    def _waitFor(self, widget, kind, timeout=600, until=None):
        start = time.time()
        while widget.controller.busy(kind):
            slicer.app.processEvents()
            if until is not None and until():
                return
            self.assertLess(time.time() - start, timeout, f"{kind} did not finish")
            time.sleep(0.05)

    def test_PanelFlow(self):
        self.delayDisplay("Panel: add case, train, cancel, train, segment")
        volume, segmentation = self.loadChest()
        slicer.util.selectModule("CPCLSegment")
        widget = slicer.modules.CPCLSegmentWidget
        c = widget.controller
        c.remove_cases(range(len(c.cases())))
        widget.ui.labeledVolumeSelector.setCurrentNode(volume)
        widget.ui.labeledSegmentationSelector.setCurrentNode(segmentation)
        widget.ui.addCaseButton.click()
        self.assertEqual(len(c.cases()), 1)
        for name, _, _ in c.segment_choices():
            c.set_segment_checked(name, name in ("right lung", "left lung"))
        self.assertEqual(c.checked_segments(), ["right lung", "left lung"])
        c.set_unlabeled([volume])
        for name, value in (("length_mode", "iterations"), ("iterations", 30), ("patch_size", [64, 64, 16]), ("device", "cpu"),
                            ("width", 4)):
            c.set_setting(name, value)
        widget.refresh()
        self.assertEqual(widget.ui.iterationsSpinBox.value, 30)

        # Cancel: no model, no node
        nodesBefore = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
        widget.ui.trainButton.click()
        self._waitFor(widget, "train", until=lambda: widget.ui.trainProgressBar.value > 0)
        widget.ui.cancelTrainButton.click()
        start = time.time()
        self._waitFor(widget, "train", timeout=30)
        self.assertLess(time.time() - start, 10)
        self.assertIsNone(c.model())
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), nodesBefore)

        # Train to the end
        widget.ui.trainButton.click()
        self._waitFor(widget, "train")
        self.assertIsNotNone(c.model())
        self.assertEqual(widget.ui.trainProgressBar.value, 30)

        # Segment
        c.set_segment_volumes([volume])
        widget.refresh()
        widget.ui.segmentButton.click()
        self._waitFor(widget, "segment")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), nodesBefore + 1)
        self.delayDisplay("Panel flow passed")
