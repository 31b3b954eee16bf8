"""CPCLSegment: fine-tune a 3D segmentation model on your labeled and unlabeled volumes (semi-supervised
cyclic prototype consistency learning), then segment new volumes into new segmentation nodes.

This file is glue only: the panel (``CPCLSegmentWidget``, a thin mapping of ``PanelController.view()`` to
Qt), the console API (``CPCLSegmentLogic``, which calls ``LogicCore``: the same train / segment / rank the
panel runs) and the in-Slicer self-test. Every decision lives in the Qt-free ``CPCLSegmentModuleLib``
package (tested with pytest against slicer-core); training, segmentation and ranking run in a child process
(``PythonSlicer -m CPCLSegmentLib.cli``, see ``CPCLSegmentLib/jobs.py``) that the panel polls from a
``qt.QTimer``, so Slicer never freezes and Cancel ends the process tree within seconds. The module imports no
torch into this process (the child reports the devices, package metadata the versions); only installing PyTorch
does: the PyTorch extension's ``installTorch`` imports it here once it is installed.

Console::

    logic = slicer.util.getModuleLogic("CPCLSegment")   # or CPCLSegmentLogic()
    model = logic.train(labeled=[(volumeNode, segmentationNode)], unlabeled=[otherVolumeNode],
                        segments=["right lung", "left lung"], minutes=10)
    segmentationNode = logic.segment(model, newVolumeNode)

Minimum Slicer: 5.8 (Python 3.9). Slicer >= 5.12 features (``slicer.packaging``) are used when present.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, List, Optional, Sequence

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

from CPCLSegmentLib import jobs
from CPCLSegmentLib.errors import CPCLError
from CPCLSegmentModuleLib import environment, panel, panelguard, sampledata
from CPCLSegmentModuleLib.logic import LogicCore
from CPCLSegmentModuleLib.models import is_model_node
from CPCLSegmentModuleLib.nodes import segment_names, volume_array


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
Slicer stays usable, Stop keeps the model trained so far, Cancel discards it. The model is saved with the scene.
See the <a href="https://github.com/cpclsegment/SlicerCPCLSegment#readme">documentation</a>.
"""
        self.parent.acknowledgementText = """
CPCL: cyclic prototype consistency learning for semi-supervised medical image segmentation.
Background-process pattern after SlicerMONAIAuto3DSeg (A. Lasso).
"""
        # Sample Data: the chest CT + segmentation (from the slicerio package, nothing downloaded), once Slicer has started
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """Offers the chest CT + its segmentation in the Sample Data module (category "CPCLSegment")."""
    try:
        import SampleData
    except ImportError:  # a Slicer built without the Sample Data module
        return
    sampledata.register(SampleData.SampleDataLogic, os.path.join(os.path.dirname(__file__), "Resources", "Icons", "CPCLSegment.png"))


#
# Installing dependencies (the decisions are environment.ensure_dependencies; these are Slicer's installers)
#


class SlicerInstaller(environment.Installer):
    """PyTorch through the PyTorch extension; the other packages through ``slicer.packaging.pip_ensure``
    (Slicer >= 5.12) or ``slicer.util.pip_install`` (torch never as another package's dependency)."""

    def confirm(self, text: str) -> bool:
        return slicer.util.confirmOkCancelDisplay(text, "CPCLSegment: install")

    def install_torch(self, requirement: str) -> bool:
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise environment.DependencyError("CPCLSegment needs PyTorch: install the 'PyTorch' extension from the Extensions "
                                              "Manager, restart Slicer, and try again.") from None
        # installTorch imports torch here once it is installed (PyTorchUtils does); no CUDA call is made.
        return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=requirement) is not None

    def install_packages(self, requirements: List[str], ask: bool) -> None:
        try:
            import slicer.packaging as packaging  # Slicer >= 5.12
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            # raises RuntimeError when the user declines (environment.ensure_dependencies reports it)
            # skip_in_testing=False: pip_ensure skips every install in testing mode by default, where the module's own
            # self-test (CPCLSegmentTest, run with --testing) needs the packages it is about to import
            packaging.pip_ensure(requirements, skip_packages=environment.SKIP_PACKAGES, prompt_install=ask, requester="CPCLSegment",
                                 skip_in_testing=False)
            return
        if ask and not self.confirm("CPCLSegment needs these Python packages: " + ", ".join(requirements) + ".\n\nInstall them now?"):
            raise environment.DependencyError("the Python packages " + ", ".join(requirements) + " were not installed (declined)")
        others = [r for r in requirements if not r.lower().startswith("monai")]
        if others:
            slicer.util.pip_install(others)
        for r in requirements:
            if r.lower().startswith("monai"):
                # --no-deps: MONAI's own requirements are torch (from the PyTorch extension) and numpy (in Slicer)
                slicer.util.pip_install([r, "--no-deps"])


#
# CPCLSegmentLogic
#


class CPCLSegmentLogic(ScriptedLoadableModuleLogic):
    """Console / scripting API: ``train``, ``segment`` and ``rank`` are ``LogicCore``'s (the panel runs the same).

    They block by default (console, scripts, tests) while keeping Slicer's window painted; with
    ``wait=False`` they return the running ``jobs.Job`` (``poll()``, ``finished``, ``stop()``, ``cancel()``,
    ``result()``). Each first makes sure the packages are installed (asking first; a declined install is an
    error, nothing starts).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        work_root = os.path.join(slicer.app.temporaryPath, "CPCLSegment")
        # PythonSlicer sets up Slicer's Python environment for the child (PythonSlicer.exe on Windows).
        self.core = LogicCore(slicer.mrmlScene, python=jobs.default_python(inside_slicer=True), work_root=work_root,
                                   ensure_dependencies=self.ensureDependencies, tick=slicer.app.processEvents)

    def train(self, labeled: Sequence[Any], unlabeled: Sequence[Any] = (), segments: Optional[Sequence[str]] = None,
              wait: bool = True, on_event=None, out: Optional[str] = None, **settings: Any):
        """Trains a model from ``labeled`` = [(volumeNode, segmentationNode[, onlyPaintedSlices]), ...] and
        ``unlabeled`` = [volumeNode, ...]; returns the model node (saved with the scene). Settings: any
        TrainConfig field by name (``minutes``, ``iterations``, ``patch_size=[X, Y, Z]``, ``lr``, ...) and
        ``device``, ``init``, ``spacing``, ``partial_segments``, ``hold_out_last``, ``compare_supervised`` (with a
        held-out case: also train supervised-only, keep the better; off unless asked), ``later_wins``."""
        return self.core.train(labeled, unlabeled, segments, wait=wait, on_event=on_event, out=out, **settings)

    def segment(self, model, volume, wait: bool = True, on_event=None, weights: str = "teacher", device: str = "auto",
                name: Optional[str] = None):
        """Segments ``volume`` (a node or a list) into NEW segmentation node(s) named after it."""
        return self.core.segment(model, volume, wait=wait, on_event=on_event, weights=weights, device=device, name=name)

    def rank(self, model, volumes: Sequence[Any], wait: bool = True, on_event=None, score: str = "auto", device: str = "auto"):
        """Ranks volumes by the model's uncertainty (most useful to label first): a list of
        ``{rank, volume, score, uncertainty}``; ``self.core.show_uncertainty(row)`` shows a map."""
        return self.core.rank(model, volumes, wait=wait, on_event=on_event, score=score, device=device)

    def ensureDependencies(self, ask: Optional[bool] = None) -> None:
        """Installs what is missing or too old (``Resources/requirements.txt``), asking first; raises
        ``environment.DependencyError`` when declined or failed."""
        environment.ensure_dependencies(SlicerInstaller(), ask=not slicer.app.testingEnabled() if ask is None else ask)


#
# CPCLSegmentWidget
#


class ExitGuard(qt.QObject):
    """Filters the main window's close event: while jobs run, Slicer's exit asks first (``CPCLSegmentWidget.mayLeave``);
    a "No" ignores the event, so Slicer stays open and the jobs keep running."""

    def __init__(self, widget) -> None:
        super().__init__()
        self.widget = widget

    def eventFilter(self, obj, event) -> bool:
        if event.type() == qt.QEvent.Close and not self.widget.mayLeave("exit"):
            event.ignore()
            return True
        return False


class CPCLSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: Qt signals call ``PanelController`` actions; ``refresh()`` shows ``controller.view()``."""

    POLL_MS = 250

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[CPCLSegmentLogic] = None
        self.controller: Optional[panel.PanelController] = None
        self._updating = False
        self._observed = None
        self._probed = False
        self._shown: dict = {}

    # ------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CPCLSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CPCLSegmentLogic()
        self.controller = panel.PanelController(self.logic.core)

        for table in (self.ui.casesTable, self.ui.labelNextTable, self.ui.modelsTable, self.ui.runFoldersTable, self.ui.packagesTable):
            table.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
            table.verticalHeader().setDefaultSectionSize(22)
        self.ui.initModelPathLineEdit.nameFilters = ["PyTorch model (*.pt *.pth)", "All files (*)"]

        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.connect("timeout()", self.onTimer)

        c = self.controller
        act = self._act
        self.ui.installButton.connect("clicked(bool)", self.onInstall)
        self.ui.packagesButton.connect("clicked(bool)", lambda: act(c.toggle_packages))
        self.ui.addCaseButton.connect("clicked(bool)", lambda: act(c.add_case, self.ui.labeledVolumeSelector.currentNode(),
                                                                   self.ui.labeledSegmentationSelector.currentNode(),
                                                                   self.ui.sparseCheckBox.checked))
        self.ui.addAllCasesButton.connect("clicked(bool)", lambda: act(c.add_all_cases))
        self.ui.removeCaseButton.connect("clicked(bool)", lambda: act(c.remove_cases, sorted(
            {i.row() for i in self.ui.casesTable.selectionModel().selectedRows()})))
        self.ui.moveSegmentUpButton.connect("clicked(bool)", lambda: act(c.move_segment, self._currentSegment(), -1))
        self.ui.moveSegmentDownButton.connect("clicked(bool)", lambda: act(c.move_segment, self._currentSegment(), +1))
        self.ui.checkInputsButton.connect("clicked(bool)", lambda: act(c.check, busy=True))
        self.ui.trainButton.connect("clicked(bool)", lambda: act(self._withDependencies, c.train, busy=True))
        self.ui.stopButton.connect("clicked(bool)", lambda: act(c.stop))
        self.ui.cancelTrainButton.connect("clicked(bool)", lambda: act(c.cancel, "train"))
        self.ui.resumeButton.connect("clicked(bool)", lambda: act(self._withDependencies, c.resume))
        self.ui.showPlotButton.connect("clicked(bool)", lambda: act(c.show_plot))
        self.ui.saveModelButton.connect("clicked(bool)", self.onSaveModel)
        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModel)
        self.ui.segmentButton.connect("clicked(bool)", lambda: act(self._withDependencies, c.segment, busy=True))
        self.ui.cancelSegmentButton.connect("clicked(bool)", lambda: act(c.cancel, "segment"))
        self.ui.rankButton.connect("clicked(bool)", lambda: act(self._withDependencies, c.rank, busy=True))
        self.ui.cancelRankButton.connect("clicked(bool)", lambda: act(c.cancel, "rank"))
        self.ui.labelNextButton.connect("clicked(bool)", lambda: act(c.label_next, busy=True))
        self.ui.addLabeledCaseButton.connect("clicked(bool)", lambda: act(c.add_labeled_case))
        self.ui.startFromComboBox.connect("currentIndexChanged(int)", self.onStartFromChanged)
        self.ui.rescanModelsButton.connect("clicked(bool)", lambda: act(c.find_local_models, busy=True))
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                                   lambda node: self._fromGUI(c.set_output_segmentation, node))
        self.ui.modelsTable.connect("itemSelectionChanged()", self.onModelSelection)
        self.ui.renameModelButton.connect("clicked(bool)", self.onRenameModel)
        self.ui.deleteModelButton.connect("clicked(bool)", lambda: self._confirmed("Remove the selected models from the scene?")
                                          and act(c.delete_models, self._selectedRows(self.ui.modelsTable)))
        self.ui.keepLatestModelButton.connect("clicked(bool)", lambda: self._confirmed("Remove every model but the newest?")
                                              and act(c.keep_latest_model))
        self.ui.listRunFoldersButton.connect("clicked(bool)", lambda: act(c.list_run_folders, busy=True))
        self.ui.removeRunFoldersButton.connect("clicked(bool)", lambda: self._confirmed(
            "Remove the selected run folders? A stopped run's folder cannot be resumed afterwards.")
            and act(c.remove_run_folders, self._selectedRows(self.ui.runFoldersTable), busy=True))
        self.ui.labelNextTable.connect("itemSelectionChanged()", self.onRankSelection)
        self.ui.casesTable.connect("itemChanged(QTableWidgetItem*)", self.onCaseItemChanged)
        self.ui.segmentsList.connect("itemChanged(QListWidgetItem*)", self.onSegmentItemChanged)
        self.ui.unlabeledSelector.connect("checkedNodesChanged()",
                                          lambda: self._fromGUI(c.set_unlabeled, self.ui.unlabeledSelector.checkedNodes()))
        self.ui.segmentVolumesSelector.connect("checkedNodesChanged()",
                                               lambda: self._fromGUI(c.set_segment_volumes, self.ui.segmentVolumesSelector.checkedNodes()))
        # Every widget whose "cpclSetting" property names a setting (a TrainConfig field or a panel setting) is bound here.
        self._settingWidgets = [w for w in slicer.util.findChildren(uiWidget) if w.property("cpclSetting")]
        for w in self._settingWidgets:
            signal = {"QCheckBox": "toggled(bool)", "QSpinBox": "valueChanged(int)", "QDoubleSpinBox": "valueChanged(double)",
                      "QComboBox": "currentIndexChanged(int)", "ctkPathLineEdit": "currentPathChanged(QString)"}[self._kind(w)]
            w.connect(signal, lambda *args, name=str(w.property("cpclSetting")): self._fromGUI(self._settingFromWidgets, name))

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, lambda caller, event: self.refresh())
        self._exitGuard = ExitGuard(self)  # Slicer's exit asks first while jobs run
        if slicer.util.mainWindow() is not None:
            slicer.util.mainWindow().installEventFilter(self._exitGuard)
        self.refresh()

    def cleanup(self) -> None:
        self._timer.stop()
        if slicer.util.mainWindow() is not None:
            slicer.util.mainWindow().removeEventFilter(self._exitGuard)
        self.removeObservers()
        if self.controller is not None:
            self.controller.close()

    def enter(self) -> None:
        if not self._probed:
            self._probed = True
            self._act(self.controller.start_probe)  # the child reports devices: the module imports no torch here
        self.refresh()

    def exit(self) -> None:
        pass  # background jobs keep running (and being polled) while other modules are used

    def mayLeave(self, action: str) -> bool:
        """Whether to go on with ``action`` ("reload", "exit"): asks first while jobs run (panelguard.leave_question)."""
        c = self.controller
        question = panelguard.leave_question([k for k, j in c.jobs.items() if j is not None], action) if c else None
        return question is None or slicer.util.confirmYesNoDisplay(question.text, "CPCLSegment")

    def onReload(self) -> None:
        if not self.mayLeave("reload"):
            return  # the jobs keep running, the module stays as it is
        # Make "Reload" pick up edits in the helper packages too (importlib, not the removed imp module).
        for name in [n for n in list(sys.modules) if n.startswith(("CPCLSegmentModuleLib", "CPCLSegmentLib"))]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    # ------------------------------------------------------------------------------ actions

    def _act(self, fn, *args, busy: bool = False) -> bool:
        """Runs a controller action; an error is shown once (one dialog) and logged. True if it succeeded."""
        ok = True
        if busy:
            slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            fn(*args)
        except Exception as e:
            ok = False
            if busy:
                slicer.app.restoreOverrideCursor()
                busy = False
            logging.error(f"CPCLSegment: {panel.error_text(e)}", exc_info=not isinstance(e, CPCLError))
            slicer.util.errorDisplay(panel.error_text(e), "CPCLSegment")
        finally:
            if busy:
                slicer.app.restoreOverrideCursor()
        self.refresh()
        return ok

    def onInstall(self) -> None:
        if self._act(self.logic.ensureDependencies, True, busy=True):
            self._act(self.controller.start_probe)
            self._act(registerSampleData)  # slicerio (the sample's files) may have just been installed

    def _withDependencies(self, fn) -> None:
        self.logic.ensureDependencies()
        fn()

    def _fromGUI(self, fn, *args) -> None:
        if not self._updating:
            self._act(fn, *args)

    def _currentSegment(self) -> str:
        item = self.ui.segmentsList.currentItem()
        return item.text() if item is not None else ""

    def onCaseItemChanged(self, item) -> None:
        if not self._updating and item.column() == 2:
            self._act(self.controller.set_sparse, item.row(), item.checkState() == qt.Qt.Checked)

    def onSegmentItemChanged(self, item) -> None:
        if not self._updating:
            self._act(self.controller.set_segment_checked, item.text(), item.checkState() == qt.Qt.Checked)

    def onRankSelection(self) -> None:
        if not self._updating:
            rows = sorted({i.row() for i in self.ui.labelNextTable.selectedIndexes()})
            self._act(self.controller.select_rank_row, rows[0] if rows else None)

    def onStartFromChanged(self, index: int) -> None:
        rows = self._shown.get("start") or []
        if not self._updating and 0 <= index < len(rows):
            self._act(self.controller.set_start_from, rows[index][0])

    @staticmethod
    def _selectedRows(table) -> List[int]:
        return sorted({i.row() for i in table.selectionModel().selectedRows()})

    @staticmethod
    def _confirmed(text: str) -> bool:
        return slicer.util.confirmOkCancelDisplay(text, "CPCLSegment")

    def onModelSelection(self) -> None:
        rows = self._selectedRows(self.ui.modelsTable)
        if len(rows) == 1:  # one model selected: it becomes the panel's model (several: to delete them)
            self._fromGUI(self.controller.select_model_row, rows[0])

    def onRenameModel(self) -> None:
        rows = self._selectedRows(self.ui.modelsTable)
        if rows:
            name = qt.QInputDialog.getText(slicer.util.mainWindow(), "Rename model", "New name:", qt.QLineEdit.Normal,
                                           self.controller.view().model_rows[rows[0]][0])
            if name:
                self._act(self.controller.rename_model, rows[0], name)

    MODEL_FOLDER_KEY = "CPCLSegment/ModelFolder"

    def _modelPath(self) -> str:
        """Where the model dialogs open: the last model folder, Slicer's default scene folder, the documents folder."""
        model = self.controller.model()
        documents = qt.QStandardPaths.writableLocation(qt.QStandardPaths.DocumentsLocation)
        return panelguard.model_save_path(model.GetName() if model is not None else "",
                                          [str(qt.QSettings().value(self.MODEL_FOLDER_KEY) or ""), slicer.app.defaultScenePath, documents])

    def onSaveModel(self) -> None:
        target = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Save CPCLSegment model", self._modelPath(),
                                                "CPCLSegment model (*.pt)")
        if target and self._act(self.controller.save_model, target, busy=True):
            qt.QSettings().setValue(self.MODEL_FOLDER_KEY, os.path.dirname(target))

    def onLoadModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Load CPCLSegment model", os.path.dirname(self._modelPath()),
                                              "CPCLSegment model (*.pt)")
        if path:
            qt.QSettings().setValue(self.MODEL_FOLDER_KEY, os.path.dirname(path))
            self._act(self.controller.load_model, path)  # checked in a child process; becomes the model when usable

    def onTimer(self) -> None:
        try:
            self.controller.poll()
        finally:
            self.refresh()

    # ------------------------------------------------------------------------------ settings <-> widgets

    @staticmethod
    def _kind(w) -> str:
        return w.metaObject().className()

    def _settingFromWidgets(self, name: str) -> None:
        widgets = [w for w in self._settingWidgets if w.property("cpclSetting") == name]
        values = [self._widgetValue(w, name) for w in sorted(widgets, key=lambda w: int(w.property("cpclIndex") or 0))]
        self.controller.set_setting(name, values if len(values) > 1 else values[0])

    def _widgetValue(self, w, name: str):
        kind = self._kind(w)
        if kind == "QCheckBox":
            return bool(w.checked)
        if kind == "QSpinBox":
            return int(w.value)
        if kind == "QDoubleSpinBox":
            return float(w.value)
        if kind == "QComboBox":
            return self.controller.choices(name)[max(0, w.currentIndex)]
        return str(w.currentPath)

    def _showSetting(self, w, name: str, value) -> None:
        kind = self._kind(w)
        value = panelguard.widget_value(value, int(w.property("cpclIndex") or 0), kind in ("QSpinBox", "QDoubleSpinBox"))
        if not panelguard.write_into_widget(self._editing(w), self._widgetValue(w, name), value):
            return  # the user is typing into it, or it shows the value already
        if kind == "QCheckBox":
            w.checked = bool(value)
        elif kind in ("QSpinBox", "QDoubleSpinBox"):
            w.value = value
        elif kind == "QComboBox":
            choices = list(self.controller.choices(name) or [])
            w.currentIndex = choices.index(value) if value in choices else 0
        else:
            w.currentPath = str(value or "")

    @staticmethod
    def _editing(w) -> bool:
        """The user is editing ``w``: it (or its line edit) has the keyboard focus."""
        focus = qt.QApplication.focusWidget()
        return focus is not None and (w.hasFocus() or w.isAncestorOf(focus))

    # ------------------------------------------------------------------------------ view -> Qt

    def refresh(self, *args) -> None:
        """Shows the controller's state: enabled / visible flags, texts, progress, tables, settings."""
        c = self.controller
        if c is None or self._updating or c.closing:
            return
        node = c.node
        if node is not self._observed:  # re-observe after a scene close or load
            if self._observed is not None:
                self.removeObserver(self._observed, vtk.vtkCommand.ModifiedEvent, self.refresh)
            self._observed = node
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.refresh)
        view = c.view()
        self._updating = True
        try:
            for name, enabled in view.enabled.items():
                getattr(self.ui, name).enabled = enabled
            for name, visible in view.visible.items():
                getattr(self.ui, name).visible = visible
            for name, text in view.text.items():
                getattr(self.ui, name).text = text
            for name, (value, maximum, text) in view.progress.items():
                bar = getattr(self.ui, name)
                bar.maximum, bar.value = max(1, maximum), value
                bar.setFormat(text or "%p%")
            if self._shown.get("cases") != view.cases:
                self._shown["cases"] = view.cases
                self._fillCases(view.cases)
            if self._shown.get("segments") != view.segments:
                self._shown["segments"] = view.segments
                self._fillSegments(view.segments)
            if self._shown.get("rank") != view.rank_rows:
                self._shown["rank"] = view.rank_rows
                self._fillRanking(view.rank_rows, c.selected_rank_row)
            self._showStart(view)
            self._showManage(view)
            for w in self._settingWidgets:
                name = str(w.property("cpclSetting"))
                self._showSetting(w, name, view.settings.get(name))
            for selector, checked in ((self.ui.unlabeledSelector, view.unlabeled), (self.ui.segmentVolumesSelector, view.segment_volumes)):
                shown = sorted(n.GetID() for n in selector.checkedNodes())
                if shown != sorted(checked):
                    for volume in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
                        if not volume.IsA("vtkMRMLLabelMapVolumeNode"):
                            selector.setCheckState(volume, qt.Qt.Checked if volume.GetID() in checked else qt.Qt.Unchecked)
        finally:
            self._updating = False
        for line in c.take_log():
            self.log(line)
        for effect, value in c.take_effects():
            self._do(effect, value)
        if c.running() and not self._timer.isActive():
            self._timer.start()
        elif not c.running() and self._timer.isActive():
            self._timer.stop()

    def _showStart(self, view) -> None:
        combo = self.ui.startFromComboBox
        if self._shown.get("start") != view.start_rows:
            self._shown["start"] = view.start_rows
            combo.clear()
            for _, label in view.start_rows:
                combo.addItem(label)
        keys = [key for key, _ in view.start_rows]
        combo.currentIndex = keys.index(view.start_from) if view.start_from in keys else 0
        for name, filters in view.filters.items():
            getattr(self.ui, name).filters = filters

    def _showManage(self, view) -> None:
        for name, rows in (("modelsTable", view.model_rows), ("runFoldersTable", view.run_rows), ("packagesTable", view.package_rows)):
            if self._shown.get(name) != rows:
                self._shown[name] = rows
                self._fillTable(getattr(self.ui, name), rows)
        if view.model_row is not None and self._shown.get("model_row") != (view.model_row, view.model_rows):
            self._shown["model_row"] = (view.model_row, view.model_rows)  # only when it changed: a selection of several stays
            self.ui.modelsTable.selectRow(view.model_row)
        selector = self.ui.outputSegmentationSelector
        selector.baseName = view.output_base_name
        output = slicer.mrmlScene.GetNodeByID(view.output_segmentation) if view.output_segmentation else None
        if selector.currentNode() is not output:
            selector.setCurrentNode(output)
        if self._shown.get("3d") != view.shown_in_3d:
            self._shown["3d"] = view.shown_in_3d
            self.ui.segmentationShow3DButton.setSegmentationNode(slicer.mrmlScene.GetNodeByID(view.shown_in_3d) if view.shown_in_3d else None)

    @staticmethod
    def _fillTable(table, rows) -> None:
        table.setRowCount(len(rows))
        for i, row in enumerate(rows):
            for j, text in enumerate(row):
                table.setItem(i, j, qt.QTableWidgetItem(str(text)))

    def _fillCases(self, cases) -> None:
        table = self.ui.casesTable
        table.setRowCount(len(cases))
        for row, (volume, segmentation, sparse) in enumerate(cases):
            table.setItem(row, 0, qt.QTableWidgetItem(volume))
            table.setItem(row, 1, qt.QTableWidgetItem(segmentation))
            check = qt.QTableWidgetItem("")
            check.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled | qt.Qt.ItemIsSelectable)
            check.setCheckState(qt.Qt.Checked if sparse else qt.Qt.Unchecked)
            table.setItem(row, 2, check)

    def _fillSegments(self, segments) -> None:
        lst = self.ui.segmentsList
        current = self._currentSegment()
        lst.clear()
        for name, color, checked in segments:
            item = qt.QListWidgetItem(name)
            item.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled | qt.Qt.ItemIsSelectable)
            item.setCheckState(qt.Qt.Checked if checked else qt.Qt.Unchecked)
            pixmap = qt.QPixmap(12, 12)
            pixmap.fill(qt.QColor(int(color[0] * 255), int(color[1] * 255), int(color[2] * 255)))
            item.setIcon(qt.QIcon(pixmap))
            lst.addItem(item)
            if name == current:
                lst.setCurrentItem(item)

    def _fillRanking(self, rows, selected) -> None:
        table = self.ui.labelNextTable
        table.setRowCount(len(rows))
        for i, (rank, volume, score) in enumerate(rows):
            table.setItem(i, 0, qt.QTableWidgetItem(str(rank)))
            table.setItem(i, 1, qt.QTableWidgetItem(volume))
            table.setItem(i, 2, qt.QTableWidgetItem(f"{score:.4f}"))
        if selected is not None and rows:
            table.selectRow(selected)

    def _do(self, effect: str, value) -> None:
        """Carries out what the controller asked the GUI to do."""
        if effect == "error":
            slicer.util.errorDisplay(value, "CPCLSegment")
        elif effect == "expand":
            getattr(self.ui, value).collapsed = False
        elif effect == "show":
            volume, foreground = value
            if foreground is not None:
                slicer.util.setSliceViewerLayers(background=volume, foreground=foreground, foregroundOpacity=0.4, fit=True)
            elif volume is not None:
                slicer.util.setSliceViewerLayers(background=volume, fit=True)
        elif effect == "edit":
            segmentation, volume = value
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            editor.setSegmentationNode(segmentation)
            editor.setSourceVolumeNode(volume)
        elif effect == "plot":
            slicer.modules.plots.logic().ShowChartInLayout(value)

    def log(self, text: str) -> None:
        logging.info(f"CPCLSegment: {text}")
        edit = self.ui.logTextEdit
        edit.appendPlainText(text)
        if edit.document().characterCount() > 256 * 1024:  # keep the log small (as MONAIAuto3DSeg does)
            edit.setPlainText(edit.toPlainText()[-128 * 1024:])


#
# CPCLSegmentTest
#


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
