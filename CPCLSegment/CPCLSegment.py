"""CPCLSegment: fine-tune a 3D segmentation model on your labeled and unlabeled volumes (semi-supervised
cyclic prototype consistency learning), then segment new volumes into new segmentation nodes.

This file is glue only: the panel (``CPCLSegmentWidget``), a console API (``CPCLSegmentLogic``) and the
in-Slicer self-test. The node <-> file work lives in ``CPCLSegmentLogicCore.py`` (no Qt, tested with pytest
against slicer-core); training, segmentation and ranking run in a child process (``PythonSlicer -m
CPCLSegmentLib.cli``, see ``CPCLSegmentLib/jobs.py``) that the panel polls from a ``qt.QTimer``, so Slicer
never freezes and Cancel ends the process tree within seconds.

Console::

    logic = slicer.util.getModuleLogic("CPCLSegment")   # or CPCLSegmentLogic()
    model = logic.train(labeled=[(volumeNode, segmentationNode)], unlabeled=[otherVolumeNode],
                        segments=["right lung", "left lung"], iterations=300)
    segmentationNode = logic.segment(model, newVolumeNode)

Minimum Slicer: 5.8 (Python 3.9). Slicer >= 5.12 features (``slicer.packaging``) are used when present.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import qt
import vtk

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

import CPCLSegmentLogicCore as core
from CPCLSegmentLib import jobs
from CPCLSegmentLib.errors import Cancelled

# Packages the engine needs besides torch (torch comes from the PyTorch extension, never from pip here).
ENGINE_PACKAGES = {"monai": "monai>=1.3,<2", "slicerio": "slicerio>=1.1", "nrrd": "pynrrd>=1.0", "psutil": "psutil>=5.8",
                   "yaml": "pyyaml>=5.4", "tqdm": "tqdm>=4.60"}
TORCH_REQUIREMENT = ">=2.1"
DEVICE_CHOICES = ["auto", "cpu", "cuda", "mps"]  # deviceComboBox order
METHOD_CHOICES = ["cpcl", "mean_teacher", "supervised"]  # methodComboBox order


#
# CPCLSegment
#


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
Slicer stays usable, Stop keeps the model trained so far, Cancel discards it.
See the <a href="https://github.com/cpclsegment/SlicerCPCLSegment#readme">documentation</a>.
"""
        self.parent.acknowledgementText = """
CPCL: cyclic prototype consistency learning for semi-supervised medical image segmentation.
Background-process pattern after SlicerMONAIAuto3DSeg (A. Lasso).
"""


#
# CPCLSegmentLogic
#


class CPCLSegmentLogic(ScriptedLoadableModuleLogic):
    """Console / scripting API; a thin wrapper over ``CPCLSegmentLogicCore.LogicCore``.

    ``train`` and ``segment`` block by default (console, scripts, tests) while keeping Slicer's window
    painted; with ``wait=False`` they return a ``Run`` to poll (the panel does that).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        work_root = os.path.join(slicer.app.temporaryPath, "CPCLSegment")
        # PythonSlicer sets up Slicer's Python environment for the child (PythonSlicer.exe on Windows).
        self.core = core.LogicCore(slicer.mrmlScene, python=jobs.default_python(inside_slicer=True), work_root=work_root)

    # ------------------------------------------------------------------------------ console API

    def train(self, labeled: Sequence[Any], unlabeled: Optional[Sequence[Any]] = None, segments: Optional[Sequence[str]] = None,
              iterations: Optional[int] = None, wait: bool = True, on_event=None, out: Optional[str] = None, **settings: Any):
        """Trains a model from ``labeled`` = [(volumeNode, segmentationNode[, onlyPaintedSlices]), ...] and
        ``unlabeled`` = [volumeNode, ...]. Returns the model file path (``wait=True``) or a running ``Run``.
        Other settings: patch_size (X Y Z), device, init, lambda_max, beta, rampup, lr, method, width,
        spacing, seed, partial_segments, hold_out_last."""
        if iterations is not None:
            settings["iterations"] = iterations
        self.ensureDependencies(askConfirmation=not slicer.app.testingEnabled())
        run = self.core.start_training(labeled, list(unlabeled or []), segments, core.TrainSettings.from_kwargs(**settings), out)
        return self._wait(run, on_event) if wait else run

    def segment(self, model: str, volume: Any, wait: bool = True, on_event=None, weights: str = "teacher",
                device: str = "auto"):
        """Segments ``volume`` (a node or a list) into NEW segmentation node(s) named after it."""
        many = isinstance(volume, (list, tuple))
        run = self.core.start_segmentation(model, list(volume) if many else [volume], weights, device)
        if not wait:
            return run
        nodes = self._wait(run, on_event)
        return nodes if many else nodes[0]

    def rank(self, model: str, volumes: Sequence[Any], wait: bool = True, on_event=None):
        """Ranks volumes by the model's uncertainty (most useful to label first): a list of
        ``{rank, volume, score, uncertainty}``; ``self.core.show_uncertainty(row)`` shows a map."""
        run = self.core.start_ranking(model, list(volumes))
        return self._wait(run, on_event) if wait else run

    @staticmethod
    def _wait(run: core.Run, on_event=None):
        last = [0.0]

        def forward(event: Dict[str, Any]) -> None:
            if on_event is not None:
                on_event(event)
            if event.get("event") in ("warning", "error"):
                logging.warning(f"CPCLSegment: {event.get('message')}")
            if time.time() - last[0] > 0.2:
                last[0] = time.time()
                if event.get("event") == "progress":
                    logging.info(f"CPCLSegment: iteration {event['iteration']}/{event['of']}, "
                                 f"loss {event['loss'].get('total', float('nan')):.4f}, ETA {core.format_seconds(event.get('eta_s'))}")
                slicer.app.processEvents()  # keep the window painted while the console waits

        return run.wait(forward)

    # ------------------------------------------------------------------------------ scene helpers

    @staticmethod
    def segmentedVolumePairs() -> List[core.LabeledCase]:
        """Every segmentation in the scene paired with the volume it references (was drawn on)."""
        cases = []
        for seg in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"):
            volume = seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole())
            if volume is not None and volume.IsA("vtkMRMLScalarVolumeNode") and not volume.IsA("vtkMRMLLabelMapVolumeNode"):
                cases.append(core.LabeledCase(volume, seg))
        return cases

    @staticmethod
    def volumesWithoutSegmentation(exclude: Sequence[Any] = ()) -> List[Any]:
        """Scalar volumes that no segmentation references and that are not in ``exclude``."""
        referenced = set(v.GetID() for v in exclude if v is not None)
        for seg in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"):
            ref = seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole())
            if ref is not None:
                referenced.add(ref.GetID())
        return [v for v in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                if not v.IsA("vtkMRMLLabelMapVolumeNode") and v.GetID() not in referenced]

    # ------------------------------------------------------------------------------ dependencies

    @staticmethod
    def torchInstalled() -> bool:
        import importlib.util

        return importlib.util.find_spec("torch") is not None

    @staticmethod
    def missingPackages() -> List[str]:
        import importlib.util

        return [req for module, req in ENGINE_PACKAGES.items() if importlib.util.find_spec(module) is None]

    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """Installs what is missing: torch through the PyTorch extension (asks first: it is a multi-GB
        download), the other packages through ``slicer.packaging.pip_ensure`` (Slicer >= 5.12) or
        ``slicer.util.pip_install`` (torch is never pulled in as another package's dependency).
        Returns False if the user declined."""
        if not self.torchInstalled():
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise RuntimeError("CPCLSegment needs PyTorch: install the 'PyTorch' extension from the Extensions Manager, "
                                   "restart Slicer, and try again.") from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                        "CPCLSegment needs PyTorch, which is not installed yet. It is a large download (up to a few GB, "
                        "with GPU support when an NVIDIA GPU is present) and takes several minutes.\n\nInstall PyTorch now?",
                        "CPCLSegment: install PyTorch"):
                    return False
                torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
                if torch is None:
                    return False
        missing = self.missingPackages()
        if not missing:
            return True
        try:
            import slicer.packaging as packaging  # Slicer >= 5.12
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            requirements = packaging.load_requirements(os.path.join(os.path.dirname(__file__), "Resources", "requirements.txt"))
            packaging.pip_ensure(requirements, skip_packages=["torch", "SimpleITK", "numpy"], prompt_install=askConfirmation,
                                 requester="CPCLSegment")
        else:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    "CPCLSegment needs these Python packages: " + ", ".join(missing) + ".\n\nInstall them now?",
                    "CPCLSegment: install packages"):
                return False
            others = [r for r in missing if not r.startswith("monai")]
            if others:
                slicer.util.pip_install(others)
            if any(r.startswith("monai") for r in missing):
                # --no-deps: MONAI's own requirements are torch (installed above) and numpy (in Slicer)
                slicer.util.pip_install([ENGINE_PACKAGES["monai"], "--no-deps"])
        return not self.missingPackages()


#
# CPCLSegmentWidget
#


class CPCLSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Long work runs in ``Run`` objects polled by one QTimer (never on the GUI thread)."""

    POLL_MS = 250
    PLOT_REFRESH_S = 1.0

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[CPCLSegmentLogic] = None
        self._parameterNode = None
        self._updatingGUI = False
        self._runs: Dict[str, Optional[core.Run]] = {"train": None, "segment": None, "rank": None}
        self._rankRows: List[Dict[str, Any]] = []
        self._plot: Optional[core.TrainingPlot] = None
        self._plotUpdated = 0.0
        self._openInEditor: Optional[Any] = None
        self._backendChecked = False
        self.extraTrainSettings: Dict[str, Any] = {}  # for scripts and the self-test (e.g. width, spacing)

    # ------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CPCLSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CPCLSegmentLogic()

        for table in (self.ui.casesTable, self.ui.labelNextTable):
            header = table.horizontalHeader()
            header.setSectionResizeMode(qt.QHeaderView.Stretch)
            table.verticalHeader().setDefaultSectionSize(22)
        self.ui.initModelPathLineEdit.nameFilters = ["CPCLSegment model (*.pt)"]
        self.ui.installButton.visible = False
        # the .ui values are the engine's defaults: unchanged values are left to the engine
        self._advancedDefaults = {"lambda_max": self.ui.lambdaSpinBox.value, "beta": self.ui.betaSpinBox.value,
                                  "rampup": self.ui.rampUpSpinBox.value, "lr": self.ui.lrSpinBox.value}

        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.connect("timeout()", self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # buttons
        self.ui.installButton.connect("clicked(bool)", self.onInstallButton)
        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        self.ui.addAllCasesButton.connect("clicked(bool)", self.onAddAllCases)
        self.ui.removeCaseButton.connect("clicked(bool)", self.onRemoveCases)
        self.ui.checkInputsButton.connect("clicked(bool)", self.onCheckInputs)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.cancelTrainButton.connect("clicked(bool)", lambda: self.onCancel("train"))
        self.ui.resumeButton.connect("clicked(bool)", self.onResume)
        self.ui.showPlotButton.connect("clicked(bool)", self.onShowPlot)
        self.ui.saveModelButton.connect("clicked(bool)", self.onSaveModel)
        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModel)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.cancelSegmentButton.connect("clicked(bool)", lambda: self.onCancel("segment"))
        self.ui.rankButton.connect("clicked(bool)", self.onRank)
        self.ui.cancelRankButton.connect("clicked(bool)", lambda: self.onCancel("rank"))
        self.ui.labelNextButton.connect("clicked(bool)", self.onLabelNext)
        # settings -> parameter node
        for spin in (self.ui.iterationsSpinBox, self.ui.patchXSpinBox, self.ui.patchYSpinBox, self.ui.patchZSpinBox):
            spin.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        for spin in (self.ui.lambdaSpinBox, self.ui.betaSpinBox, self.ui.rampUpSpinBox, self.ui.lrSpinBox):
            spin.connect("valueChanged(double)", self.updateParameterNodeFromGUI)
        for box in (self.ui.partialSegmentsCheckBox, self.ui.holdOutCheckBox, self.ui.prefillCheckBox):
            box.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        for combo in (self.ui.deviceComboBox, self.ui.methodComboBox):
            combo.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.initModelPathLineEdit.connect("currentPathChanged(QString)", self.updateParameterNodeFromGUI)
        self.ui.segmentsList.connect("itemChanged(QListWidgetItem*)", self.updateParameterNodeFromGUI)
        self.ui.casesTable.connect("itemChanged(QTableWidgetItem*)", self.onCaseItemChanged)
        self.ui.unlabeledSelector.connect("checkedNodesChanged()", self.updateParameterNodeFromGUI)
        self.ui.segmentVolumesSelector.connect("checkedNodesChanged()", self.updateParameterNodeFromGUI)
        self.ui.unlabeledSelector.connect("nodeAdded(vtkMRMLNode*)", self.onVolumeAdded)
        self.ui.labelNextTable.connect("itemSelectionChanged()", self.updateButtons)

        self.initializeParameterNode()
        self.updateButtons()

    def cleanup(self) -> None:
        for kind, run in self._runs.items():
            if run is not None and not run.finished:
                run.cancel(block=True)
        self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.refreshSegmentsList()
        if not self._backendChecked:
            self._backendChecked = True
            qt.QTimer.singleShot(0, self.updateBackend)

    def exit(self) -> None:
        pass  # background jobs keep running (and being polled) while other modules are used

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onReload(self) -> None:
        # Make "Reload" pick up edits in the helper files too (importlib, not the removed imp module).
        for name in [n for n in list(sys.modules) if n == "CPCLSegmentLogicCore" or n.startswith("CPCLSegmentLib")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    # ----------------------------------------------------------------------------- parameter node

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        node = self._parameterNode
        if node.GetParameter("Initialized") != "1":
            wasModified = node.StartModify()
            node.SetParameter("Initialized", "1")
            node.SetParameter("Iterations", str(core.DEFAULT_ITERATIONS))
            for case in self.logic.segmentedVolumePairs():
                self._addCaseToNode(case.volume, case.segmentation, False)
            for v in self.logic.volumesWithoutSegmentation(self.cases()):
                node.AddNodeReferenceID("UnlabeledVolume", v.GetID())
            node.EndModify(wasModified)
        self.updateGUIFromParameterNode()

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = parameterNode
        if self._parameterNode is not None:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    def _refs(self, role: str) -> List[Any]:
        node = self._parameterNode
        return [node.GetNthNodeReference(role, i) for i in range(node.GetNumberOfNodeReferences(role))] if node else []

    def _json(self, key: str, default: Any) -> Any:
        text = self._parameterNode.GetParameter(key) if self._parameterNode else ""
        try:
            return json.loads(text) if text else default
        except ValueError:
            return default

    def _addCaseToNode(self, volume, segmentation, sparse: bool) -> None:
        node = self._parameterNode
        for c in self.cases():
            if c.volume is volume and c.segmentation is segmentation:
                return
        sparseList = self._json("CaseSparse", [])[: node.GetNumberOfNodeReferences("CaseVolume")]
        node.AddNodeReferenceID("CaseVolume", volume.GetID())
        node.AddNodeReferenceID("CaseSegmentation", segmentation.GetID())
        node.SetParameter("CaseSparse", json.dumps(sparseList + [bool(sparse)]))

    def cases(self) -> List[core.LabeledCase]:
        """The labeled cases listed in the panel (pairs whose nodes still exist)."""
        vols, segs = self._refs("CaseVolume"), self._refs("CaseSegmentation")
        sparse = self._json("CaseSparse", [])
        return [core.LabeledCase(v, s, bool(sparse[i]) if i < len(sparse) else False)
                for i, (v, s) in enumerate(zip(vols, segs)) if v is not None and s is not None]

    def _setCases(self, cases: Sequence[core.LabeledCase]) -> None:
        node = self._parameterNode
        wasModified = node.StartModify()
        node.RemoveNodeReferenceIDs("CaseVolume")
        node.RemoveNodeReferenceIDs("CaseSegmentation")
        for c in cases:
            node.AddNodeReferenceID("CaseVolume", c.volume.GetID())
            node.AddNodeReferenceID("CaseSegmentation", c.segmentation.GetID())
        node.SetParameter("CaseSparse", json.dumps([bool(c.sparse) for c in cases]))
        node.EndModify(wasModified)

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        node = self._parameterNode
        if node is None or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            cases = self.cases()
            table = self.ui.casesTable
            table.setRowCount(len(cases))
            for row, case in enumerate(cases):
                table.setItem(row, 0, qt.QTableWidgetItem(case.volume.GetName()))
                table.setItem(row, 1, qt.QTableWidgetItem(case.segmentation.GetName()))
                check = qt.QTableWidgetItem("")
                check.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled | qt.Qt.ItemIsSelectable)
                check.setCheckState(qt.Qt.Checked if case.sparse else qt.Qt.Unchecked)
                table.setItem(row, 2, check)
            self._fillSegmentsList(cases)
            self.ui.partialSegmentsCheckBox.checked = node.GetParameter("PartialSegments") == "true"
            self.ui.holdOutCheckBox.checked = node.GetParameter("HoldOut") == "true"
            self.ui.prefillCheckBox.checked = node.GetParameter("Prefill") == "true"
            self.ui.iterationsSpinBox.value = int(node.GetParameter("Iterations") or core.DEFAULT_ITERATIONS)
            patch = [int(v) for v in (node.GetParameter("PatchSize") or "0 0 0").split()][:3]
            for spin, v in zip((self.ui.patchXSpinBox, self.ui.patchYSpinBox, self.ui.patchZSpinBox), patch):
                spin.value = v
            device = node.GetParameter("Device") or "auto"
            self.ui.deviceComboBox.currentIndex = DEVICE_CHOICES.index(device) if device in DEVICE_CHOICES else 0
            method = node.GetParameter("Method") or "cpcl"
            self.ui.methodComboBox.currentIndex = METHOD_CHOICES.index(method) if method in METHOD_CHOICES else 0
            for key, spin in (("LambdaMax", self.ui.lambdaSpinBox), ("Beta", self.ui.betaSpinBox),
                              ("RampUp", self.ui.rampUpSpinBox), ("LearningRate", self.ui.lrSpinBox)):
                if node.GetParameter(key):
                    spin.value = float(node.GetParameter(key))
            self.ui.initModelPathLineEdit.currentPath = node.GetParameter("InitModel")
            for selector, role in ((self.ui.unlabeledSelector, "UnlabeledVolume"), (self.ui.segmentVolumesSelector, "SegmentVolume")):
                checked = {n.GetID() for n in self._refs(role) if n is not None}
                for volume in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
                    if volume.IsA("vtkMRMLLabelMapVolumeNode"):
                        continue
                    selector.setCheckState(volume, qt.Qt.Checked if volume.GetID() in checked else qt.Qt.Unchecked)
            self._updateModelInfo()
        finally:
            self._updatingGUI = False
        self.updateButtons()

    def updateParameterNodeFromGUI(self, *args) -> None:
        node = self._parameterNode
        if node is None or self._updatingGUI:
            return
        wasModified = node.StartModify()
        node.SetParameter("PartialSegments", "true" if self.ui.partialSegmentsCheckBox.checked else "false")
        node.SetParameter("HoldOut", "true" if self.ui.holdOutCheckBox.checked else "false")
        node.SetParameter("Prefill", "true" if self.ui.prefillCheckBox.checked else "false")
        node.SetParameter("Iterations", str(self.ui.iterationsSpinBox.value))
        node.SetParameter("PatchSize", " ".join(str(s.value) for s in (self.ui.patchXSpinBox, self.ui.patchYSpinBox, self.ui.patchZSpinBox)))
        node.SetParameter("Device", DEVICE_CHOICES[max(0, self.ui.deviceComboBox.currentIndex)])
        node.SetParameter("Method", METHOD_CHOICES[max(0, self.ui.methodComboBox.currentIndex)])
        node.SetParameter("LambdaMax", str(self.ui.lambdaSpinBox.value))
        node.SetParameter("Beta", str(self.ui.betaSpinBox.value))
        node.SetParameter("RampUp", str(self.ui.rampUpSpinBox.value))
        node.SetParameter("LearningRate", str(self.ui.lrSpinBox.value))
        node.SetParameter("InitModel", self.ui.initModelPathLineEdit.currentPath)
        unchecked = [self.ui.segmentsList.item(i).text() for i in range(self.ui.segmentsList.count)
                     if self.ui.segmentsList.item(i).checkState() != qt.Qt.Checked]
        known = self._json("SegmentsUnchecked", [])
        listed = {self.ui.segmentsList.item(i).text() for i in range(self.ui.segmentsList.count)}
        node.SetParameter("SegmentsUnchecked", json.dumps(sorted(set(unchecked) | (set(known) - listed))))
        for selector, role in ((self.ui.unlabeledSelector, "UnlabeledVolume"), (self.ui.segmentVolumesSelector, "SegmentVolume")):
            node.RemoveNodeReferenceIDs(role)
            for n in selector.checkedNodes():
                node.AddNodeReferenceID(role, n.GetID())
        node.EndModify(wasModified)

    # ------------------------------------------------------------------------------ inputs panel

    def _fillSegmentsList(self, cases: Sequence[core.LabeledCase]) -> None:
        names = core.segment_names(cases[0].segmentation) if cases else []
        unchecked = set(self._json("SegmentsUnchecked", []))
        lst = self.ui.segmentsList
        lst.clear()
        for name in names:
            item = qt.QListWidgetItem(name)
            item.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled)
            item.setCheckState(qt.Qt.Unchecked if name in unchecked else qt.Qt.Checked)
            seg = cases[0].segmentation.GetSegmentation()
            color = seg.GetSegment(core.find_segment_id(cases[0].segmentation, name)).GetColor()
            pixmap = qt.QPixmap(12, 12)
            pixmap.fill(qt.QColor(int(color[0] * 255), int(color[1] * 255), int(color[2] * 255)))
            item.setIcon(qt.QIcon(pixmap))
            lst.addItem(item)

    def refreshSegmentsList(self) -> None:
        if self._parameterNode is None:
            return
        self._updatingGUI = True
        try:
            self._fillSegmentsList(self.cases())
        finally:
            self._updatingGUI = False

    def checkedSegments(self) -> List[str]:
        lst = self.ui.segmentsList
        return [lst.item(i).text() for i in range(lst.count) if lst.item(i).checkState() == qt.Qt.Checked]

    def onAddCase(self) -> None:
        volume = self.ui.labeledVolumeSelector.currentNode()
        segmentation = self.ui.labeledSegmentationSelector.currentNode()
        if volume is None or segmentation is None:
            slicer.util.warningDisplay("Select a volume and its segmentation first.", "CPCLSegment")
            return
        node = self._parameterNode
        wasModified = node.StartModify()
        self._addCaseToNode(volume, segmentation, self.ui.sparseCheckBox.checked)
        # a labeled volume is not an unlabeled one by default
        self.ui.unlabeledSelector.setCheckState(volume, qt.Qt.Unchecked)
        self.updateParameterNodeFromGUI()
        node.EndModify(wasModified)

    def onAddAllCases(self) -> None:
        node = self._parameterNode
        wasModified = node.StartModify()
        for case in self.logic.segmentedVolumePairs():
            self._addCaseToNode(case.volume, case.segmentation, False)
            self.ui.unlabeledSelector.setCheckState(case.volume, qt.Qt.Unchecked)
        self.updateParameterNodeFromGUI()
        node.EndModify(wasModified)

    def onRemoveCases(self) -> None:
        rows = {index.row() for index in self.ui.casesTable.selectionModel().selectedRows()}
        self._setCases([c for i, c in enumerate(self.cases()) if i not in rows])

    def onCaseItemChanged(self, item) -> None:
        if self._updatingGUI or item.column() != 2:
            return
        cases = self.cases()
        if item.row() < len(cases):
            cases[item.row()].sparse = item.checkState() == qt.Qt.Checked
            self._setCases(cases)

    def onVolumeAdded(self, node) -> None:
        """New volumes are unlabeled candidates by default (unless a segmentation references them)."""
        if self._parameterNode is None or node is None or node.IsA("vtkMRMLLabelMapVolumeNode"):
            return
        qt.QTimer.singleShot(0, lambda: self._checkIfUnpaired(node))

    def _checkIfUnpaired(self, node) -> None:
        if self._parameterNode is None or slicer.mrmlScene.IsImporting():
            return
        if node in self.logic.volumesWithoutSegmentation(self.cases()):
            self.ui.unlabeledSelector.setCheckState(node, qt.Qt.Checked)

    def onCheckInputs(self) -> Optional[core.CheckResult]:
        with slicer.util.tryWithErrorDisplay("Failed to check the inputs.", waitCursor=True):
            self.refreshSegmentsList()
            result = core.check_inputs(self.cases(), self.checkedSegments(), self.ui.unlabeledSelector.checkedNodes(),
                                       self.ui.partialSegmentsCheckBox.checked, self.ui.holdOutCheckBox.checked)
            self.showCheck(result)
            return result
        return None

    def showCheck(self, result: core.CheckResult) -> None:
        colors = {"error": "#c62828", "warning": "#e65100", "info": "#555555"}
        lines = [f'<span style="color:{colors[level]}">{level}: {_html(msg)}</span>'
                 for level, msg in result.messages()]
        if result.ok:
            total = {}
            for counts in result.counts.values():
                for name, n in counts.items():
                    total[name] = total.get(name, 0) + n
            lines.insert(0, '<span style="color:#2e7d32">ready: ' + _html(", ".join(f"{k} {v} voxels" for k, v in total.items()))
                         + "</span>")
        self.ui.checkResultLabel.text = "<br>".join(lines)

    # ------------------------------------------------------------------------------ settings

    def trainSettings(self) -> core.TrainSettings:
        patch = [self.ui.patchXSpinBox.value, self.ui.patchYSpinBox.value, self.ui.patchZSpinBox.value]
        method = METHOD_CHOICES[max(0, self.ui.methodComboBox.currentIndex)]
        settings = core.TrainSettings(
            iterations=int(self.ui.iterationsSpinBox.value),
            patch_size=patch if all(patch) else None,
            device=DEVICE_CHOICES[max(0, self.ui.deviceComboBox.currentIndex)],
            init=self.ui.initModelPathLineEdit.currentPath or None,
            lambda_max=self._changed("lambda_max", self.ui.lambdaSpinBox.value),
            beta=self._changed("beta", self.ui.betaSpinBox.value),
            rampup=self._changed("rampup", self.ui.rampUpSpinBox.value),
            lr=self._changed("lr", self.ui.lrSpinBox.value),
            method=None if method == "cpcl" else method,
            partial_segments=self.ui.partialSegmentsCheckBox.checked,
            hold_out_last=self.ui.holdOutCheckBox.checked,
        )
        for key, value in self.extraTrainSettings.items():
            setattr(settings, key, value)
        return settings

    def _changed(self, key: str, value: float) -> Optional[float]:
        return None if abs(value - self._advancedDefaults[key]) < 1e-12 else value

    def updateBackend(self) -> None:
        if self.logic.torchInstalled():
            text, warning = core.compute_backend()
        else:
            text, warning = "PyTorch is not installed", "click 'Install dependencies…' (needs the PyTorch extension)"
        missing = self.logic.missingPackages()
        self.ui.installButton.visible = not self.logic.torchInstalled() or bool(missing)
        label = f"Compute: {text}"
        if warning:
            label += f'<br><span style="color:#e65100">{_html(warning)}</span>'
        elif missing:
            label += f'<br><span style="color:#e65100">missing packages: {_html(", ".join(missing))}</span>'
        self.ui.backendLabel.text = label

    def onInstallButton(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to install the dependencies.", waitCursor=True):
            self.logic.ensureDependencies(askConfirmation=True)
        self.updateBackend()

    # ------------------------------------------------------------------------------ model

    def modelPath(self) -> str:
        return self._parameterNode.GetParameter("Model") if self._parameterNode else ""

    def setModel(self, path: str) -> None:
        self._parameterNode.SetParameter("Model", path or "")
        self._updateModelInfo()

    def _updateModelInfo(self) -> None:
        path = self.modelPath()
        if not path:
            self.ui.modelInfoLabel.text = "No model yet: train one or load a model file."
        elif not os.path.isfile(path):
            self.ui.modelInfoLabel.text = f"Model file not found: {path}"
        else:
            info = f"Model: {path}"
            run = os.path.splitext(path)[0] + ".run.json"
            if os.path.isfile(run):
                try:
                    with open(run, encoding="utf-8") as f:
                        record = json.load(f)
                    info += (f"\nSegments: {', '.join(record.get('classes', [])[1:])}; {record.get('method')} "
                             f"({record.get('status')}), {len(record.get('losses', []))} iterations")
                except (OSError, ValueError):
                    pass
            self.ui.modelInfoLabel.text = info
        self.updateButtons()

    def onSaveModel(self) -> None:
        source = self.modelPath()
        if not source or not os.path.isfile(source):
            return
        target = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Save CPCLSegment model", "cpcl-model.pt",
                                                "CPCLSegment model (*.pt)")
        if not target:
            return
        if not target.lower().endswith(".pt"):
            target += ".pt"
        with slicer.util.tryWithErrorDisplay("Failed to save the model.", waitCursor=True):
            shutil.copyfile(source, target + ".tmp")
            os.replace(target + ".tmp", target)
            run = os.path.splitext(source)[0] + ".run.json"
            if os.path.isfile(run):
                shutil.copyfile(run, os.path.splitext(target)[0] + ".run.json")
            self.log(f"model saved to {target}")

    def onLoadModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Load CPCLSegment model", "", "CPCLSegment model (*.pt)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("This is not a usable CPCLSegment model file.", waitCursor=True):
            if self.logic.torchInstalled():
                record = self.logic.core.model_record(path)  # checks the file (format, version, classes)
                self.log(f"loaded {path}: segments {', '.join(c['name'] for c in record['classes'][1:])}")
            self.setModel(path)

    # ------------------------------------------------------------------------------ runs

    def _start(self, kind: str, run: core.Run) -> None:
        self._runs[kind] = run
        self._timer.start()
        self.updateButtons()

    def onTrain(self) -> None:
        if self._runs["train"] is not None:
            return
        with slicer.util.tryWithErrorDisplay("Training could not start.", waitCursor=True):
            if not self.logic.ensureDependencies(askConfirmation=not slicer.app.testingEnabled()):
                return
            check = self.onCheckInputs()
            if check is None or not check.ok:
                self.ui.unlabeledCollapsibleButton.collapsed = False
                return
            self._resetTrainingDisplay()
            run = self.logic.core.start_training(self.cases(), self.ui.unlabeledSelector.checkedNodes(), self.checkedSegments(),
                                                 self.trainSettings())
            self._parameterNode.SetParameter("LastRunDir", run.run_dir)
            self.log(f"training started: {run.run_dir}")
            self._start("train", run)

    def onResume(self) -> None:
        runDir = self._parameterNode.GetParameter("LastRunDir")
        with slicer.util.tryWithErrorDisplay("Training could not resume.", waitCursor=True):
            self._resetTrainingDisplay()
            self._start("train", self.logic.core.resume_training(runDir))
            self.log(f"training resumed: {runDir}")

    def _resetTrainingDisplay(self) -> None:
        self.ui.trainProgressBar.value = 0
        self.ui.trainProgressBar.setFormat("starting…")
        self.ui.lossLabel.text = ""
        self.ui.diceLabel.text = ""
        if self._plot is None:
            self._plot = core.TrainingPlot(slicer.mrmlScene)
        self._plot.reset()

    def onStop(self) -> None:
        run = self._runs["train"]
        if run is not None:
            run.stop()
            self.ui.trainProgressBar.setFormat("stopping after this iteration…")

    def onCancel(self, kind: str) -> None:
        run = self._runs.get(kind)
        if run is not None:
            run.cancel(block=False)  # terminate, then kill the process tree after a grace period, off the GUI thread
            if kind == "train":
                self.ui.trainProgressBar.setFormat("cancelling…")
            self.log(f"{kind}: cancel requested")

    def onShowPlot(self) -> None:
        if self._plot is None:
            self._plot = core.TrainingPlot(slicer.mrmlScene)
        self._plot.update()
        slicer.modules.plots.logic().ShowChartInLayout(self._plot.chart)

    def onSegment(self) -> None:
        volumes = self.ui.segmentVolumesSelector.checkedNodes()
        with slicer.util.tryWithErrorDisplay("Segmentation could not start.", waitCursor=True):
            if not volumes:
                raise ValueError("check at least one volume to segment")
            if not self.logic.ensureDependencies(askConfirmation=not slicer.app.testingEnabled()):
                return
            self.ui.segmentProgressBar.maximum = len(volumes)
            self.ui.segmentProgressBar.value = 0
            self.ui.segmentProgressBar.setFormat("starting…")
            self._start("segment", self.logic.core.start_segmentation(self.modelPath(), volumes,
                                                                       device=DEVICE_CHOICES[max(0, self.ui.deviceComboBox.currentIndex)]))

    def onRank(self) -> None:
        volumes = self.ui.unlabeledSelector.checkedNodes()
        with slicer.util.tryWithErrorDisplay("Ranking could not start.", waitCursor=True):
            if not volumes:
                raise ValueError("check the unlabeled volumes to rank (section 2)")
            self.ui.labelNextTable.setRowCount(0)
            self._discardRanking()
            self._start("rank", self.logic.core.start_ranking(self.modelPath(), volumes,
                                                               device=DEVICE_CHOICES[max(0, self.ui.deviceComboBox.currentIndex)]))

    def _discardRanking(self) -> None:
        for row in self._rankRows[:1]:
            if row.get("uncertainty"):
                shutil.rmtree(os.path.dirname(os.path.dirname(row["uncertainty"])), ignore_errors=True)
        self._rankRows = []

    def onLabelNext(self) -> None:
        rows = {i.row() for i in self.ui.labelNextTable.selectedIndexes()}
        if not rows or not self._rankRows:
            return
        row = self._rankRows[min(rows)]
        volume = row["volume"]
        with slicer.util.tryWithErrorDisplay("Could not prepare the volume for labeling.", waitCursor=True):
            foreground = None
            if row.get("uncertainty"):
                foreground = self.logic.core.show_uncertainty(row)
            slicer.util.setSliceViewerLayers(background=volume, foreground=foreground if foreground else "keep-current",
                                             foregroundOpacity=0.4 if foreground else None, fit=True)
            if self.ui.prefillCheckBox.checked:
                self._openInEditor = volume
                self.ui.segmentVolumesSelector.setCheckState(volume, qt.Qt.Checked)
                self._start("segment", self.logic.core.start_segmentation(self.modelPath(), [volume]))
            else:
                segmentation = self.logic.core.empty_segmentation_for(self.modelPath(), volume)
                self.openSegmentEditor(segmentation, volume)

    @staticmethod
    def openSegmentEditor(segmentation, volume) -> None:
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentation)
        editor.setSourceVolumeNode(volume)

    def onTimer(self) -> None:
        for kind, run in list(self._runs.items()):
            if run is None:
                continue
            for event in run.poll():
                self.onRunEvent(kind, event)
            if run.finished:
                self._runs[kind] = None
                self.onRunFinished(kind, run)
        if self._plot is not None and time.time() - self._plotUpdated > self.PLOT_REFRESH_S:
            self._plotUpdated = time.time()
            self._plot.update()
        if not any(self._runs.values()):
            self._timer.stop()
        self.updateButtons()

    def onRunEvent(self, kind: str, event: Dict[str, Any]) -> None:
        name = event.get("event")
        if name == "log":
            self.log(event.get("message", ""), console=False)
            return
        if name in ("warning", "error", "info"):
            self.log(f"{name}: {event.get('message')}")
        if kind == "train":
            self._onTrainEvent(event)
        elif kind == "segment" and name == "predict":
            self.ui.segmentProgressBar.value = event["index"]
            self.ui.segmentProgressBar.setFormat(f"{event['index']}/{event['of']} segmented")
        elif kind == "rank" and name == "rank":
            self.log(f"ranked {event.get('index')}/{event.get('of')}: score {event.get('score')}")

    def _onTrainEvent(self, event: Dict[str, Any]) -> None:
        name = event.get("event")
        if self._plot is not None:
            self._plot.add(event)
        if name == "summary":
            self.ui.trainProgressBar.setFormat(f"preparing ({event.get('device')}, patch {event.get('patch_size')})…")
        elif name == "preprocess":
            self.ui.trainProgressBar.setFormat(f"preparing {event.get('stage')} case {event.get('index')}/{event.get('of')}…")
        elif name == "progress":
            it, of = int(event["iteration"]), int(event["of"])
            self.ui.trainProgressBar.maximum = of
            self.ui.trainProgressBar.value = it
            self.ui.trainProgressBar.setFormat(f"iteration {it}/{of}, ETA {core.format_seconds(event.get('eta_s'))}")
            terms = ", ".join(f"{k} {v:.3f}" for k, v in (event.get("loss") or {}).items() if v is not None)
            self.ui.lossLabel.text = f"loss: {terms}; λ {event.get('lambda', 0):.3f}"
        elif name == "validation":
            dice = event.get("dice") or {}
            parts = []
            for seg, value in dice.items():
                text = "n/a" if value is None else f"{value:.3f}"
                parts.append(f'<span style="color:#c62828"><b>{_html(seg)} {text}</b></span>' if value == 0 else f"{_html(seg)} {text}")
            html = f"validation Dice ({_html(str(event.get('label') or 'iteration ' + str(event.get('iteration'))))}): " + ", ".join(parts)
            zero = event.get("zero_dice_segments") or [s for s, v in dice.items() if v == 0]
            if zero:
                html += ('<br><span style="color:#c62828">warning: ' + _html(", ".join(zero)) +
                         " still at Dice 0: check that segment's labels in every case (name, non-empty) before a long run</span>")
            self.ui.diceLabel.text = html

    def onRunFinished(self, kind: str, run: core.Run) -> None:
        try:
            result = run.result()
        except Cancelled:
            self.log(f"{kind} cancelled" + (": no model was written" if kind == "train" else ""))
            if kind == "train":
                self.ui.trainProgressBar.setFormat("cancelled: no model was kept")
            elif kind == "segment":
                self.ui.segmentProgressBar.setFormat("cancelled")
            self._openInEditor = None
            return
        except Exception as e:
            self.log(f"{kind} failed: {e}")
            if kind == "train":
                self.ui.trainProgressBar.setFormat("failed")
            self._openInEditor = None
            slicer.util.errorDisplay(f"CPCLSegment {kind} failed:\n{e}", "CPCLSegment")
            return
        if kind == "train":
            stopped = run.status == "stopped"
            self.ui.trainProgressBar.setFormat("stopped: model kept (Resume continues)" if stopped else "done")
            if not stopped:
                self.ui.trainProgressBar.value = self.ui.trainProgressBar.maximum
            self.setModel(result)
            self.log(f"model: {result}")
        elif kind == "segment":
            self.ui.segmentProgressBar.setFormat(f"done: {', '.join(n.GetName() for n in result)}")
            if result:
                volume = result[0].GetNodeReference(result[0].GetReferenceImageGeometryReferenceRole())
                slicer.util.setSliceViewerLayers(background=volume, fit=True)
            if self._openInEditor is not None and result:
                self.openSegmentEditor(result[0], self._openInEditor)
            self._openInEditor = None
        elif kind == "rank":
            self._rankRows = result
            table = self.ui.labelNextTable
            table.setRowCount(len(result))
            for i, row in enumerate(result):
                table.setItem(i, 0, qt.QTableWidgetItem(str(row["rank"])))
                table.setItem(i, 1, qt.QTableWidgetItem(row["volume"].GetName()))
                table.setItem(i, 2, qt.QTableWidgetItem(f"{row['score']:.4f}"))
            if result:
                table.selectRow(0)
            self.ui.labelNextCollapsibleButton.collapsed = False

    def updateButtons(self, *args) -> None:
        training = self._runs["train"] is not None
        segmenting = self._runs["segment"] is not None
        ranking = self._runs["rank"] is not None
        hasModel = bool(self.modelPath()) and os.path.isfile(self.modelPath())
        self.ui.trainButton.enabled = not training and bool(self._parameterNode) and bool(self.cases())
        self.ui.stopButton.enabled = training
        self.ui.cancelTrainButton.enabled = training
        runDir = self._parameterNode.GetParameter("LastRunDir") if self._parameterNode else ""
        self.ui.resumeButton.enabled = not training and core.LogicCore.can_resume(runDir)
        self.ui.segmentButton.enabled = hasModel and not segmenting
        self.ui.cancelSegmentButton.enabled = segmenting
        self.ui.rankButton.enabled = hasModel and not ranking
        self.ui.cancelRankButton.enabled = ranking
        self.ui.saveModelButton.enabled = hasModel
        self.ui.labelNextButton.enabled = hasModel and bool(self._rankRows) and bool(self.ui.labelNextTable.selectedIndexes())
        self.ui.removeCaseButton.enabled = bool(self.cases())

    def log(self, text: str, console: bool = True) -> None:
        if console:
            logging.info(f"CPCLSegment: {text}")
        edit = self.ui.logTextEdit
        edit.appendPlainText(text)
        if edit.document().characterCount() > 256 * 1024:  # keep the log small (as MONAIAuto3DSeg does)
            edit.setPlainText(edit.toPlainText()[-128 * 1024:])


def _html(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


#
# CPCLSegmentTest
#


class CPCLSegmentTest(ScriptedLoadableModuleTest):
    """In-Slicer tests: the console API and the full panel flow (train in the background, Stop, Cancel,
    segment) on slicerio's chest CT with tiny settings (a few minutes on a CPU)."""

    TINY = {"width": 4, "spacing": [6.1, 6.1, 10.0]}

    def setUp(self):
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
        before = core.volume_array(volume).copy()
        logic = CPCLSegmentLogic()
        model = logic.train(labeled=[(volume, segmentation)], unlabeled=[volume], segments=["right lung", "left lung"],
                            iterations=20, patch_size=[64, 64, 16], device="cpu", **self.TINY)
        self.assertTrue(os.path.isfile(model))
        result = logic.segment(model, volume)
        self.assertEqual(core.segment_names(result), ["right lung", "left lung"])
        self.assertEqual(result.GetNodeReference(result.GetReferenceImageGeometryReferenceRole()), volume)
        self.assertTrue((core.volume_array(volume) == before).all())
        self.delayDisplay("Console API passed")

    def _waitFor(self, widget, kind, timeout=600, until=None):
        start = time.time()
        while widget._runs[kind] is not None:
            slicer.app.processEvents()
            if until is not None and until():
                return
            self.assertLess(time.time() - start, timeout, f"{kind} did not finish")
            time.sleep(0.05)

    def test_PanelFlow(self):
        self.delayDisplay("Panel: add case, train, stop, cancel, segment")
        volume, segmentation = self.loadChest()
        slicer.util.selectModule("CPCLSegment")
        widget = slicer.modules.CPCLSegmentWidget
        widget.extraTrainSettings = dict(self.TINY)
        widget._setCases([])
        widget.ui.labeledVolumeSelector.setCurrentNode(volume)
        widget.ui.labeledSegmentationSelector.setCurrentNode(segmentation)
        widget.ui.addCaseButton.click()
        self.assertEqual(len(widget.cases()), 1)
        for i in range(widget.ui.segmentsList.count):
            item = widget.ui.segmentsList.item(i)
            item.setCheckState(qt.Qt.Checked if item.text() in ("right lung", "left lung") else qt.Qt.Unchecked)
        self.assertEqual(widget.checkedSegments(), ["right lung", "left lung"])
        widget.ui.unlabeledSelector.setCheckState(volume, qt.Qt.Checked)
        widget.ui.iterationsSpinBox.value = 30
        widget.ui.patchXSpinBox.value, widget.ui.patchYSpinBox.value, widget.ui.patchZSpinBox.value = 64, 64, 16
        widget.ui.deviceComboBox.currentIndex = DEVICE_CHOICES.index("cpu")

        # Cancel: no model, no node
        nodesBefore = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
        widget.ui.trainButton.click()
        self._waitFor(widget, "train", until=lambda: widget.ui.trainProgressBar.value > 0)
        widget.ui.cancelTrainButton.click()
        start = time.time()
        self._waitFor(widget, "train", timeout=30)
        self.assertLess(time.time() - start, 10)
        self.assertEqual(widget.modelPath(), "")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), nodesBefore)

        # Train to the end
        widget.ui.trainButton.click()
        self._waitFor(widget, "train")
        self.assertTrue(os.path.isfile(widget.modelPath()))
        self.assertEqual(widget.ui.trainProgressBar.value, 30)

        # Segment
        widget.ui.segmentVolumesSelector.setCheckState(volume, qt.Qt.Checked)
        widget.ui.segmentButton.click()
        self._waitFor(widget, "segment")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), nodesBefore + 1)
        self.delayDisplay("Panel flow passed")
