"""``CPCLSegment.py`` itself, executed: the module class, the console logic and the widget, on slicer-core's real
scene with the real ``CPCLSegment.ui`` turned into stand-in widgets (no Qt here: ``qt`` and the scripted-module
base classes are replaced by small fakes that record what the widget does).

The widget is a thin mapping of ``PanelController.view()`` to widgets; this checks that mapping end to end:
setup binds every widget, the settings widgets write their setting by name, the buttons reach the controller,
an error shows one dialog, a deleted segmentation empties the cases table, and Train → Segment runs real jobs
from the widget's timer. Skipped where slicer-core is not installed (Python >= 3.10).
"""

import importlib
import sys
import time
import types
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core; Python >= 3.10)")

ROOT = Path(__file__).resolve().parents[1]
UI = ROOT / "CPCLSegment" / "Resources" / "UI" / "CPCLSegment.ui"
sys.path.insert(0, str(ROOT / "CPCLSegment"))

from conftest import LUNGS  # noqa: E402
from slicer_scene import load_segmentation, load_volume, new_scene, one_thread_env  # noqa: E402

pytestmark = pytest.mark.slicer

CHECKED, UNCHECKED = 2, 0
FOCUS = {}  # "widget": the fake widget with the keyboard focus
DIALOGS, SETTINGS, DOCUMENTS = [], {}, {}  # file dialogs opened (their arguments), QSettings, the documents folder


class FakeWidget:
    """One widget of the .ui file: the properties the module reads and writes, signals, and the bits of the
    table / list / checkable-combo / text-edit API it calls."""

    def __init__(self, name, cls, props):
        self.name, self.cls, self._props = name, cls, props
        self._slots = {}
        self.enabled, self.visible, self.text, self.format = True, True, props.get("text", ""), ""
        self.checked = props.get("checked") == "true"
        self.value = float(props["value"]) if "value" in props else 0
        if cls == "QSpinBox":
            self.value = int(self.value)
        self.currentIndex, self.currentPath, self.collapsed = 0, "", props.get("collapsed") == "true"
        self.maximum, self.nameFilters = 100, []
        self.rows, self.items, self.lines = {}, [], []
        self._checked_nodes, self._current_node, self._current_item = [], None, None

    # Qt plumbing
    def connect(self, signal, slot):
        self._slots.setdefault(signal, []).append(slot)

    def emit(self, signal, *args):
        for slot in self._slots.get(signal, []):
            slot(*args[:_positional(slot, len(args))])

    def click(self):
        assert self.enabled, f"{self.name} is disabled"
        self.emit("clicked(bool)", False)

    def property(self, name):
        return self._props.get("dynamic", {}).get(name)

    def hasFocus(self):
        return FOCUS.get("widget") is self

    def isAncestorOf(self, other):
        return False

    def metaObject(self):
        return types.SimpleNamespace(className=lambda: self.cls)

    def setMRMLScene(self, scene):
        self.scene = scene

    # progress bar
    def setFormat(self, text):
        self.format = text

    # tables
    def setRowCount(self, n):
        self.rows = {k: v for k, v in self.rows.items() if k[0] < n}
        self.row_count = n

    def setItem(self, row, column, item):
        self.rows[(row, column)] = item

    def horizontalHeader(self):
        return types.SimpleNamespace(setSectionResizeMode=lambda mode: None)

    def verticalHeader(self):
        return types.SimpleNamespace(setDefaultSectionSize=lambda size: None)

    def selectionModel(self):
        return types.SimpleNamespace(selectedRows=lambda: [])

    def selectedIndexes(self):
        return []

    def selectRow(self, row):
        self.selected_row = row

    # list
    def clear(self):
        self.items = []

    def addItem(self, item):
        self.items.append(item)

    def currentItem(self):
        return self._current_item

    def setCurrentItem(self, item):
        self._current_item = item

    # node selectors
    def currentNode(self):
        return self._current_node

    def setCurrentNode(self, node):
        self._current_node = node

    def checkedNodes(self):
        return list(self._checked_nodes)

    def setCheckState(self, node, state):
        if state == CHECKED and node not in self._checked_nodes:
            self._checked_nodes.append(node)
        elif state != CHECKED and node in self._checked_nodes:
            self._checked_nodes.remove(node)

    # qMRMLSegmentationShow3DButton
    def setSegmentationNode(self, node):
        self.segmentation_node = node

    # log
    def appendPlainText(self, text):
        self.lines.append(text)

    def document(self):
        return types.SimpleNamespace(characterCount=lambda: sum(len(line) for line in self.lines))

    def toPlainText(self):
        return "\n".join(self.lines)

    def setPlainText(self, text):
        self.lines = [text]


def _positional(slot, n):
    """How many signal arguments PythonQt passes: as many as the slot takes (all with ``*args``)."""
    import inspect

    params = inspect.signature(slot).parameters.values()
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return n
    return min(n, sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty))


def load_ui(path):
    widgets = {}
    for w in ET.parse(path).getroot().iter("widget"):
        props = {"dynamic": {}}
        for p in w.findall("property"):
            value = next(iter(p), None)
            text = value.text if value is not None else None
            if p.get("stdset") == "0":
                props["dynamic"][p.get("name")] = int(text) if value.tag == "number" else text
            else:
                props[p.get("name")] = text
        widgets[w.get("name")] = FakeWidget(w.get("name"), w.get("class"), props)
    return widgets


class Item:
    def __init__(self, text=""):
        self._text, self._state = text, UNCHECKED

    def text(self):
        return self._text

    def setFlags(self, flags):
        pass

    def setCheckState(self, state):
        self._state = state

    def checkState(self):
        return self._state

    def setIcon(self, icon):
        pass


class Timer:
    def __init__(self):
        self.active = False

    def setInterval(self, ms):
        pass

    def connect(self, signal, slot):
        self.slot = slot

    def start(self):
        self.active = True

    def stop(self):
        self.active = False

    def isActive(self):
        return self.active


def fake_qt():
    qt = types.ModuleType("qt")
    qt.Qt = types.SimpleNamespace(Checked=CHECKED, Unchecked=UNCHECKED, ItemIsUserCheckable=16, ItemIsEnabled=32, ItemIsSelectable=1,
                                  WaitCursor=3)
    qt.QTimer = Timer
    qt.QHeaderView = types.SimpleNamespace(Stretch=1)
    qt.QTableWidgetItem = Item
    qt.QListWidgetItem = Item
    qt.QPixmap = lambda w, h: types.SimpleNamespace(fill=lambda color: None)
    qt.QColor = lambda *rgb: rgb
    qt.QIcon = lambda pixmap: pixmap
    qt.QFileDialog = types.SimpleNamespace(getSaveFileName=lambda *a: DIALOGS.append(a) or "",
                                           getOpenFileName=lambda *a: DIALOGS.append(a) or "")
    qt.QSettings = lambda: types.SimpleNamespace(value=lambda key, default=None: SETTINGS.get(key, default),
                                                 setValue=SETTINGS.__setitem__)
    qt.QStandardPaths = types.SimpleNamespace(DocumentsLocation=1, writableLocation=lambda where: DOCUMENTS.get("path", ""))
    qt.QApplication = types.SimpleNamespace(focusWidget=lambda: FOCUS.get("widget"))
    qt.QObject = type("QObject", (), {"__init__": lambda self, *a: None})
    qt.QEvent = types.SimpleNamespace(Close=19)
    return qt


def fake_scripted_module(tmp_path):
    mod = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent
            self.layout = types.SimpleNamespace(addWidget=lambda w: None)

        def setup(self):
            pass

        def resourcePath(self, relative):
            return str(ROOT / "CPCLSegment" / "Resources" / relative)

        def onReload(self):
            pass

    mod.ScriptedLoadableModule = ScriptedLoadableModule
    mod.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    mod.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    mod.ScriptedLoadableModuleTest = unittest.TestCase
    return mod


@pytest.fixture
def module(monkeypatch, tmp_path, ct_path, seg_path):
    """``CPCLSegment.py`` imported with the fakes, a chest CT scene, and a record of the GUI calls."""
    scene = new_scene()
    volume = load_volume(scene, ct_path)
    segmentation = load_segmentation(scene, seg_path, volume=volume)
    calls = {"errors": [], "layers": [], "modules": [], "connected": []}
    widgets = load_ui(UI)
    root = FakeWidget("CPCLSegment", "qMRMLWidget", {"dynamic": {}})
    monkeypatch.setitem(sys.modules, "qt", fake_qt())
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", fake_scripted_module(tmp_path))
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(
        temporaryPath=str(tmp_path / "Slicer temp"), processEvents=lambda: None, testingEnabled=lambda: True,
        defaultScenePath=str(tmp_path / "Slicer scenes"),
        setOverrideCursor=lambda cursor: None, restoreOverrideCursor=lambda: None,
        connect=lambda signal, slot: calls["connected"].append((signal, slot))), raising=False)
    util = slicer.util
    monkeypatch.setattr(util, "loadUI", lambda path: root, raising=False)
    monkeypatch.setattr(util, "childWidgetVariables", lambda w: types.SimpleNamespace(**widgets), raising=False)
    monkeypatch.setattr(util, "findChildren", lambda w: list(widgets.values()), raising=False)
    monkeypatch.setattr(util, "errorDisplay", lambda text, title=None, **kw: calls["errors"].append(text), raising=False)
    monkeypatch.setattr(util, "setSliceViewerLayers", lambda **kw: calls["layers"].append(kw), raising=False)
    monkeypatch.setattr(util, "selectModule", lambda name: calls["modules"].append(name), raising=False)
    monkeypatch.setattr(util, "mainWindow", lambda: None, raising=False)  # no main window: no exit guard installed
    forget_module_file()  # imported afresh with this test's fakes
    mod = importlib.import_module("CPCLSegment")
    # the child processes get this checkout's engine and one torch thread (as the other slicer-core tests)
    from CPCLSegmentModuleLib.logic import LogicCore

    original = LogicCore.__init__

    def init(self, *args, **kwargs):
        kwargs["env"] = one_thread_env()
        original(self, *args, **kwargs)

    monkeypatch.setattr(LogicCore, "__init__", init)
    yield mod, scene, volume, segmentation, widgets, calls
    forget_module_file()


def forget_module_file():
    """The module file and the package that imports ``qt`` and the scripted-module base classes (faked per test)."""
    for name in [n for n in sys.modules if n == "CPCLSegment" or n.startswith("CPCLSegmentAppLib")]:
        del sys.modules[name]


def run_timer(widget, kind, timeout=300):
    deadline = time.time() + timeout
    while widget.controller.busy(kind):
        assert widget._timer.isActive(), "the poll timer stopped while a job runs"
        widget.onTimer()
        assert time.time() < deadline, f"{kind} did not finish"
        time.sleep(0.05)
    widget.onTimer()


def test_the_module_file_sets_up_and_its_widget_maps_the_controller(module):
    mod, scene, volume, segmentation, ui, calls = module
    parent = types.SimpleNamespace()
    mod.CPCLSegment(parent)
    assert parent.title == "CPCL Segment" and parent.categories == ["Segmentation"]
    assert calls["connected"] == [("startupCompleted()", mod.sampledata.register_with_slicer)]  # the chest CT in Sample Data
    widget = mod.CPCLSegmentWidget()
    widget.setup()
    widget.enter()  # starts the environment probe in a child process
    c = widget.controller
    assert calls["errors"] == []
    assert ui["casesTable"].row_count == 1 and ui["casesTable"].rows[(0, 0)].text() == "CTChest"
    assert [i.text() for i in ui["segmentsList"].items] == segment_names(segmentation)
    assert ui["trainButton"].enabled and not ui["segmentButton"].enabled and not ui["stopButton"].enabled
    assert ui["minutesSpinBox"].visible and not ui["iterationsSpinBox"].visible and ui["minutesSpinBox"].value == 10.0
    assert ui["backendLabel"].text.startswith("Compute:")
    # "Start from": the combo lists the controller's choices; choosing one writes it, the view shows its widgets
    assert ui["startFromComboBox"].items == [label for _, label in c.start_choices()]
    ui["startFromComboBox"].emit("currentIndexChanged(int)", len(ui["startFromComboBox"].items) - 2)
    assert c.start_from() == "file" and ui["initModelPathLineEdit"].visible and ui["startFromComboBox"].currentIndex > 0
    ui["startFromComboBox"].emit("currentIndexChanged(int)", 0)
    assert c.start_from() == "none" and not ui["initModelPathLineEdit"].visible
    run_timer(widget, "probe")
    assert ui["backendLabel"].text.startswith("Compute: CPU") or "CUDA" in ui["backendLabel"].text

    # a settings widget writes its setting by name; the view shows it back
    ui["lengthModeComboBox"].currentIndex = 1
    ui["lengthModeComboBox"].emit("currentIndexChanged(int)", 1)
    assert c.setting("length_mode") == "iterations" and ui["iterationsSpinBox"].visible and not ui["minutesSpinBox"].visible
    ui["iterationsSpinBox"].value = 12
    ui["iterationsSpinBox"].emit("valueChanged(int)", 12)
    for axis, v in zip("XYZ", (64, 64, 16)):
        ui[f"patch{axis}SpinBox"].value = v
        ui[f"patch{axis}SpinBox"].emit("valueChanged(int)", v)
    ui["deviceComboBox"].currentIndex = 1
    ui["deviceComboBox"].emit("currentIndexChanged(int)", 1)
    assert c.train_values()["iterations"] == 12 and c.setting("patch_size") == [64, 64, 16] and c.setting("device") == "cpu"
    c.set_setting("width", 4)  # no widget for it: the console / expert way

    # segments: untick all but the lungs through the list's items
    for item in ui["segmentsList"].items:
        item.setCheckState(CHECKED if item.text() in LUNGS else UNCHECKED)
        ui["segmentsList"].emit("itemChanged(QListWidgetItem*)", item)
    assert c.checked_segments() == LUNGS

    # an error shows one dialog
    ui["segmentButton"].enabled = True  # as if clicked before the view disabled it
    ui["segmentButton"].click()
    assert len(calls["errors"]) == 1 and "check at least one volume" in calls["errors"][0]

    # Check inputs, then Train to the end from the timer, then Segment
    ui["checkInputsButton"].click()
    assert "ready" in ui["checkResultLabel"].text
    ui["trainButton"].click()
    assert not ui["trainButton"].enabled and ui["stopButton"].enabled and widget._timer.isActive()
    run_timer(widget, "train")
    assert calls["errors"] == [calls["errors"][0]], calls["errors"]
    assert "saved with the scene" in ui["modelInfoLabel"].text and ui["trainProgressBar"].format == "done"
    assert ui["trainButton"].enabled and ui["saveModelButton"].enabled and not widget._timer.isActive()
    ui["segmentVolumesSelector"].setCheckState(volume, CHECKED)
    ui["segmentVolumesSelector"].emit("checkedNodesChanged()")
    assert ui["segmentButton"].enabled
    ui["segmentButton"].click()
    run_timer(widget, "segment")
    assert calls["layers"] and calls["layers"][-1]["background"] is volume
    assert ui["segmentProgressBar"].format.startswith("done: CTChest segmentation")
    # the result is what Show 3D shows; the model list has the trained model; the package view opens on request
    assert ui["segmentationShow3DButton"].segmentation_node.GetName().startswith("CTChest segmentation")
    assert ui["modelsTable"].row_count == 1 and ui["modelsTable"].rows[(0, 0)].text() == c.model().GetName()
    assert ui["outputSegmentationSelector"].baseName == "CTChest segmentation"
    assert not ui["packagesTable"].visible
    ui["packagesButton"].click()
    assert ui["packagesTable"].visible and ui["packagesTable"].rows[(0, 0)].text() == "torch"

    # deleting the segmentation empties the cases table (the pair is dropped, with a line in the log)
    scene.RemoveNode(segmentation)
    widget.refresh()
    assert ui["casesTable"].row_count == 0 and not ui["trainButton"].enabled
    assert any("removed from the labeled cases" in line for line in ui["logTextEdit"].lines)
    widget.cleanup()


def segment_names(segmentation):
    from CPCLSegmentModuleLib.nodes import segment_names

    return segment_names(segmentation)


def test_a_refresh_never_rewrites_the_setting_widget_the_user_is_typing_into(module):
    mod, scene, volume, segmentation, ui, calls = module
    widget = mod.CPCLSegmentWidget()
    widget.setup()
    c, box = widget.controller, ui["lrSpinBox"]
    FOCUS["widget"] = box
    try:
        box.value = 0.15  # the user is typing 0.155 and has typed 0.15 so far
        c.set_setting("lr", 0.002)  # meanwhile the state changes and the panel refreshes
        widget.refresh()
        assert box.value == 0.15
    finally:
        FOCUS.pop("widget")
    widget.refresh()  # once the user has left the box, it shows the state
    assert box.value == 0.002
    widget.cleanup()


def test_reload_and_exit_ask_first_while_training_runs_and_no_keeps_it(module, monkeypatch):
    mod, scene, volume, segmentation, ui, calls = module
    window = types.SimpleNamespace(filters=[])
    window.installEventFilter = window.filters.append
    window.removeEventFilter = window.filters.remove
    asked = []
    monkeypatch.setattr(slicer.util, "mainWindow", lambda: window, raising=False)
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", lambda text, title=None, **kw: asked.append(text) or False,
                        raising=False)
    reloads = []
    monkeypatch.setattr(sys.modules["slicer.ScriptedLoadableModule"].ScriptedLoadableModuleWidget, "onReload",
                        lambda self: reloads.append(1))
    widget = mod.CPCLSegmentWidget()
    widget.setup()
    assert window.filters == [widget._exitGuard]
    close = types.SimpleNamespace(type=lambda: 19, ignored=[])
    close.ignore = lambda: close.ignored.append(1)
    widget.onReload()  # nothing runs: no question
    assert reloads == [1] and asked == [] and widget._exitGuard.eventFilter(window, close) is False

    running = types.SimpleNamespace(finished=False, poll=lambda: [], cancel=lambda **kw: None)
    widget.controller.jobs["train"] = running
    widget.onReload()  # "No": the module is not reloaded, training keeps running
    assert reloads == [1] and len(asked) == 1 and "training is running" in asked[0]
    assert widget._exitGuard.eventFilter(window, close) is True and close.ignored == [1]  # exit: "No" keeps Slicer open
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", lambda text, title=None, **kw: True, raising=False)
    widget.onReload()
    assert reloads == [1, 1] and widget._exitGuard.eventFilter(window, close) is False
    widget.controller.jobs["train"] = None
    widget.cleanup()
    assert window.filters == []


def test_the_model_dialogs_open_in_slicer_s_scene_folder_then_in_the_last_model_folder(module, tmp_path, monkeypatch):
    mod, scene, volume, segmentation, ui, calls = module
    (tmp_path / "Slicer scenes").mkdir()
    monkeypatch.chdir(tmp_path)
    SETTINGS.clear()
    DIALOGS.clear()
    widget = mod.CPCLSegmentWidget()
    widget.setup()
    widget.onSaveModel()
    assert DIALOGS[-1][2] == str(tmp_path / "Slicer scenes" / "cpcl-model.pt")  # not "cpcl-model.pt" in the working directory
    (tmp_path / "models").mkdir()
    SETTINGS[mod.CPCLSegmentWidget.MODEL_FOLDER_KEY] = str(tmp_path / "models")
    widget.onLoadModel()
    widget.onSaveModel()
    assert DIALOGS[-2][2] == str(tmp_path / "models") and DIALOGS[-1][2] == str(tmp_path / "models" / "cpcl-model.pt")
    widget.cleanup()
