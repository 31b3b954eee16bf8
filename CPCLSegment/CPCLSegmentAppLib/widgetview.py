"""The panel's view side: ``PanelController.view()`` shown on the ``.ui`` widgets (enabled and visible flags,
texts, progress, tables, settings, keyed by the ``.ui`` object names), the settings widgets read back by the
setting they name (their ``cpclSetting`` property), and the effects the controller queues (an error dialog, show
volumes, open the Segment Editor, show the plot). Decides nothing: what to show is ``CPCLSegmentModuleLib``'s.
A mixin of ``CPCLSegmentWidget``, which owns ``ui``, ``controller``, ``_settingWidgets``, ``_shown``,
``_updating`` and the poll ``_timer``.
"""

from __future__ import annotations

import logging

import qt
import vtk

import slicer

from CPCLSegmentModuleLib import panelguard


class WidgetViewMixin:
    """``refresh()`` maps the controller's view to Qt; ``_settingFromWidgets`` maps a settings widget back."""

    def _currentSegment(self) -> str:
        item = self.ui.segmentsList.currentItem()
        return item.text() if item is not None else ""

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
