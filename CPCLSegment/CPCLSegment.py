"""CPCLSegment: fine-tune a 3D segmentation model on your labeled and unlabeled volumes (semi-supervised
cyclic prototype consistency learning), then segment new volumes into new segmentation nodes.

This file is the module only: the classes Slicer looks up by the module's name live in packages (Slicer loads
every top-level ``.py`` of a module folder as a module): the panel (``CPCLSegmentWidget``, a thin mapping of
``PanelController.view()`` to Qt), the console API (``CPCLSegmentLogic``, which calls ``LogicCore``: the same
train / segment / rank the panel runs) and the in-Slicer self-test (``CPCLSegmentTest``) are in
``CPCLSegmentAppLib``; every decision lives in the Qt-free ``CPCLSegmentModuleLib`` package (tested with pytest
against slicer-core). Training, segmentation and ranking run in a child process (``PythonSlicer -m
CPCLSegmentLib.cli``, see ``CPCLSegmentLib/jobs.py``) that the panel polls from a ``qt.QTimer``, so Slicer never
freezes and Cancel ends the process tree within seconds. The module imports no torch into this process (the child
reports the devices, package metadata the versions); only installing PyTorch does: the PyTorch extension's
``installTorch`` imports it here once it is installed.

Console::

    logic = slicer.util.getModuleLogic("CPCLSegment")   # or CPCLSegmentLogic()
    model = logic.train(labeled=[(volumeNode, segmentationNode)], unlabeled=[otherVolumeNode],
                        segments=["right lung", "left lung"], minutes=10)
    segmentationNode = logic.segment(model, newVolumeNode)

Minimum Slicer: 5.8 (Python 3.9). Slicer >= 5.12 features (``slicer.packaging``) are used when present.
"""

from __future__ import annotations

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModule

from CPCLSegmentAppLib.consolelogic import CPCLSegmentLogic
from CPCLSegmentAppLib.selftest import CPCLSegmentTest
from CPCLSegmentAppLib.widget import CPCLSegmentWidget
from CPCLSegmentModuleLib import sampledata

# Slicer finds the module's logic, widget and self-test by name in this file (<Module>Logic, <Module>Widget, <Module>Test)
__all__ = ["CPCLSegment", "CPCLSegmentLogic", "CPCLSegmentTest", "CPCLSegmentWidget"]


class CPCLSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CPCL Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []  # the PyTorch extension is needed only to install torch
        self.parent.contributors = ["CPCLSegment developers"]
        self.parent.helpText = """
Fine-tune a 3D segmentation model on a few segmented volumes and many unsegmented ones (semi-supervised
cyclic prototype consistency learning, CPCL), then segment new volumes. Training runs in the background:
Slicer stays usable, Stop keeps the model trained so far, Cancel discards it. The model is saved with the scene.
See the <a href="https://github.com/cpclsegment/SlicerCPCLSegment#readme">documentation</a>.
"""
        self.parent.acknowledgementText = """
CPCL: cyclic prototype consistency learning for semi-supervised medical image segmentation.
Background-process pattern after SlicerMONAIAuto3DSeg (A. Lasso).
"""
        # Sample Data: the chest CT + segmentation (from the slicerio package, nothing downloaded), once Slicer has started
        slicer.app.connect("startupCompleted()", sampledata.register_with_slicer)
