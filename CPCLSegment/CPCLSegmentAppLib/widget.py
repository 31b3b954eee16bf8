"""The panel widget Slicer instantiates (``CPCLSegmentWidget``): Qt signals call ``PanelController`` actions, a
``qt.QTimer`` polls the background jobs, ``refresh()`` (``WidgetViewMixin``) shows ``controller.view()``; and the
main window's exit guard (``ExitGuard``). Every decision is ``CPCLSegmentModuleLib.panel.PanelController``'s.
``CPCLSegment.py`` exposes the widget under its own name, where Slicer finds it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional

import qt

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from CPCLSegmentLib.errors import CPCLError
from CPCLSegmentModuleLib import panel, panelguard, sampledata

from .consolelogic import CPCLSegmentLogic
from .widgetview import WidgetViewMixin


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


class CPCLSegmentWidget(WidgetViewMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
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

        self._connectActions()
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

    def _connectActions(self) -> None:
        """Buttons, selectors and tables to the controller's actions."""
        c = self.controller
        act = self._act
        self.ui.installButton.connect("clicked(bool)", self.onInstall)
        self.ui.packagesButton.connect("clicked(bool)", lambda: act(c.toggle_packages))
        self.ui.addCaseButton.connect("clicked(bool)", lambda: act(c.add_case, self.ui.labeledVolumeSelector.currentNode(),
                                                                   self.ui.labeledSegmentationSelector.currentNode(),
                                                                   self.ui.sparseCheckBox.checked))
        self.ui.addAllCasesButton.connect("clicked(bool)", lambda: act(c.add_all_cases))
        self.ui.removeCaseButton.connect("clicked(bool)", lambda: act(c.remove_cases, self._selectedRows(self.ui.casesTable)))
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
        for name in [n for n in list(sys.modules) if n.startswith(("CPCLSegmentAppLib", "CPCLSegmentModuleLib", "CPCLSegmentLib"))]:
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
            self._act(sampledata.register_with_slicer)  # slicerio (the sample's files) may have just been installed

    def _withDependencies(self, fn) -> None:
        self.logic.ensureDependencies()
        fn()

    def _fromGUI(self, fn, *args) -> None:
        if not self._updating:
            self._act(fn, *args)

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
