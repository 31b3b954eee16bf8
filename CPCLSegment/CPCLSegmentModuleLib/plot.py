"""The training plot: loss and validation-Dice curves in MRML table + plot nodes (shown in a Slicer plot view)."""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer


class TrainingPlot:
    """Loss and validation-Dice curves in MRML table + plot nodes (shown in a Slicer plot view)."""

    LOSS_COLUMNS = ("total", "supervised", "forward", "backward")
    COLORS = {"total": (0.1, 0.1, 0.1), "supervised": (0.12, 0.47, 0.71), "forward": (1.0, 0.5, 0.05),
              "backward": (0.17, 0.63, 0.17), "mean Dice": (0.84, 0.15, 0.16)}

    def __init__(self, scene: Any, name: str = "CPCLSegment training") -> None:
        self.scene = scene
        self.name = name
        self.loss: Dict[str, List[float]] = {"iteration": []}
        self.dice: Dict[str, List[float]] = {"iteration": [], "mean Dice": []}
        self.loss_table = self._node("vtkMRMLTableNode", f"{name} loss")
        self.dice_table = self._node("vtkMRMLTableNode", f"{name} validation Dice")
        self.chart = self._node("vtkMRMLPlotChartNode", f"{name} chart")
        self.chart.SetTitle("CPCLSegment training")
        self.chart.SetXAxisTitle("iteration")
        self.chart.SetYAxisTitle("loss / Dice")
        self.chart.SetLegendVisibility(True)
        self.series: Dict[str, Any] = {}

    def _node(self, cls: str, name: str) -> Any:
        node = self.scene.GetFirstNode(name, cls)
        if node is None:
            node = self.scene.AddNewNodeByClass(cls, name)
        return node

    def reset(self) -> None:
        self.loss = {"iteration": []}
        self.dice = {"iteration": [], "mean Dice": []}
        self.chart.RemoveAllPlotSeriesNodeIDs()
        for s in self.series.values():
            self.scene.RemoveNode(s)
        self.series = {}
        self.loss_table.RemoveAllColumns()
        self.dice_table.RemoveAllColumns()

    def _series(self, column: str, table: Any, dashed: bool = False) -> Any:
        if column not in self.series:
            s = self._node("vtkMRMLPlotSeriesNode", f"{self.name} {column}")
            s.SetAndObserveTableNodeID(table.GetID())
            s.SetXColumnName("iteration")
            s.SetYColumnName(column)
            s.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            s.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle if dashed else slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
            s.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleDash if dashed else slicer.vtkMRMLPlotSeriesNode.LineStyleSolid)
            s.SetColor(*self.COLORS.get(column, (0.5, 0.2, 0.6)))
            self.chart.AddAndObservePlotSeriesNodeID(s.GetID())
            self.series[column] = s
        return self.series[column]

    def add(self, event: Dict[str, Any]) -> None:
        """Feeds a ``progress`` or ``validation`` event; other events are ignored."""
        kind = event.get("event")
        if kind == "progress":
            self.loss["iteration"].append(float(event["iteration"]))
            losses = event.get("loss") or {}
            n = len(self.loss["iteration"])
            for key, value in losses.items():
                col = self.loss.setdefault(key, [float("nan")] * (n - 1))
                col.append(float(value) if value is not None else float("nan"))
            for key, col in self.loss.items():
                if len(col) < n:
                    col.append(float("nan"))
        elif kind == "validation" and event.get("mean_dice") is not None and event.get("iteration"):
            self.dice["iteration"].append(float(event["iteration"]))
            self.dice["mean Dice"].append(float(event["mean_dice"]))
            n = len(self.dice["iteration"])
            for seg, value in (event.get("dice") or {}).items():
                col = self.dice.setdefault(f"Dice {seg}", [float("nan")] * (n - 1))
                col.append(float("nan") if value is None else float(value))
            for col in self.dice.values():
                if len(col) < n:
                    col.append(float("nan"))

    def update(self) -> None:
        """Copies the collected values into the table nodes (call at most a few times per second)."""
        _fill_table(self.loss_table, self.loss)
        _fill_table(self.dice_table, self.dice)
        for column in self.loss:
            if column != "iteration" and (column in self.LOSS_COLUMNS or column == "mean_teacher"):
                self._series(column, self.loss_table)
        if self.dice["iteration"]:
            self._series("mean Dice", self.dice_table, dashed=True)


def _fill_table(table_node: Any, columns: Dict[str, List[float]]) -> None:
    """Table content from equal-length columns (like slicer.util.updateTableFromArray, without slicer.util)."""
    table = table_node.GetTable()
    if table is None:
        return
    wasModified = table_node.StartModify()
    table_node.RemoveAllColumns()
    for name, values in columns.items():
        arr = numpy_support.numpy_to_vtk(np.asarray(values, dtype=np.float32), deep=True, array_type=vtk.VTK_FLOAT)
        arr.SetName(name)
        table_node.AddColumn(arr)
    table_node.Modified()
    table_node.EndModify(wasModified)
