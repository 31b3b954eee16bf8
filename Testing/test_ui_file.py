"""The panel's Qt Designer file, checked without Qt: valid XML, known widget classes, and every ``ui.<name>``
the module code uses exists (with the class the code expects). Utilities/render_panel.py also loads it
with a real Qt binding and renders Resources/Screenshots/panel.png."""

import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UI = ROOT / "CPCLSegment" / "Resources" / "UI" / "CPCLSegment.ui"
WIDGET = [ROOT / "CPCLSegment" / "CPCLSegmentAppLib" / f"{name}.py" for name in ("widget", "widgetview")]

# Qt widget classes (QtWidgets) that may appear in a Slicer .ui file.
QT_WIDGETS = {
    "QWidget", "QLabel", "QPushButton", "QToolButton", "QCheckBox", "QRadioButton", "QComboBox", "QSpinBox",
    "QDoubleSpinBox", "QLineEdit", "QTextEdit", "QPlainTextEdit", "QListWidget", "QTableWidget", "QTreeWidget",
    "QProgressBar", "QGroupBox", "QFrame", "QSlider", "QTabWidget", "QStackedWidget", "QScrollArea", "QSplitter",
}
QT_LAYOUTS = {"QVBoxLayout", "QHBoxLayout", "QFormLayout", "QGridLayout"}
# CTK and Slicer MRML widgets used here, with the Qt class each extends (as Slicer's own .ui files declare them).
SLICER_WIDGETS = {
    "qMRMLWidget": "QWidget",
    "qMRMLNodeComboBox": "QWidget",
    "qMRMLCheckableNodeComboBox": "qMRMLNodeComboBox",
    "ctkCollapsibleButton": "QWidget",
    "ctkCollapsibleGroupBox": "QGroupBox",
    "ctkPathLineEdit": "QWidget",
    # Modules/Loadable/Segmentations/Widgets/qMRMLSegmentationShow3DButton.h: a ctkMenuButton, no setMRMLScene
    "qMRMLSegmentationShow3DButton": "ctkMenuButton",
}


def _tree():
    return ET.parse(UI).getroot()


def _widgets():
    return {w.get("name"): w.get("class") for w in _tree().iter("widget")}


def test_ui_file_parses_and_has_the_slicer_module_shape():
    root = _tree()
    assert root.tag == "ui" and root.get("version") == "4.0"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == root.findtext("class") == "CPCLSegment"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "widget names must be unique"


def test_every_class_is_qt_ctk_or_qmrml():
    root = _tree()
    declared = {c.findtext("class"): c.findtext("extends") for c in root.iter("customwidget")}
    for name, cls in _widgets().items():
        assert cls in QT_WIDGETS or cls in SLICER_WIDGETS, f"{name}: unknown widget class {cls}"
        if cls in SLICER_WIDGETS:
            assert declared.get(cls) == SLICER_WIDGETS[cls], f"{cls} must be declared as a custom widget extending {SLICER_WIDGETS[cls]}"
    for layout in root.iter("layout"):
        assert layout.get("class") in QT_LAYOUTS
    for cls, header in ((c.findtext("class"), c.findtext("header")) for c in root.iter("customwidget")):
        assert header == f"{cls}.h"


def test_every_mrml_selector_gets_the_scene():
    root = _tree()
    widgets = _widgets()
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)" and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    selectors = {n for n, cls in widgets.items() if cls.startswith("qMRML") and cls not in ("qMRMLWidget", "qMRMLSegmentationShow3DButton")}
    assert selectors and selectors == receivers


def test_every_ui_name_used_by_the_module_exists_with_the_expected_class():
    widgets = _widgets()
    code = "\n".join(p.read_text(encoding="utf-8") for p in WIDGET)
    used = set(re.findall(r"\.ui\.(\w+)", code))
    assert len(used) > 30
    missing = sorted(used - set(widgets))
    assert not missing, f"the widget uses ui names missing from the .ui file: {missing}"
    # the code calls checkedNodes() / setCheckState(node, ...) on these, currentNode() on those
    for name in ("unlabeledSelector", "segmentVolumesSelector"):
        assert widgets[name] == "qMRMLCheckableNodeComboBox"
    for name in ("labeledVolumeSelector", "labeledSegmentationSelector"):
        assert widgets[name] == "qMRMLNodeComboBox"
    assert widgets["initModelPathLineEdit"] == "ctkPathLineEdit"
    for name in ("casesTable", "labelNextTable"):
        assert widgets[name] == "QTableWidget"


def _prop(widget_name, prop_name):
    for w in _tree().iter("widget"):
        if w.get("name") == widget_name:
            for p in w.findall("property"):
                if p.get("name") == prop_name:
                    return next(iter(p)).text
    return None


def _setting_widgets():
    """(widget name, class, setting name, index) of every widget bound to a setting by its cpclSetting property."""
    out = []
    for w in _tree().iter("widget"):
        props = {p.get("name"): p for p in w.findall("property")}
        if "cpclSetting" in props:
            assert props["cpclSetting"].get("stdset") == "0", "cpclSetting must be a dynamic property (stdset=0)"
            index = int(props["cpclIndex"].findtext("number")) if "cpclIndex" in props else 0
            out.append((w.get("name"), w.get("class"), props["cpclSetting"].findtext("string"), index))
    return out


def test_settings_start_collapsed():
    assert _prop("settingsCollapsibleButton", "collapsed") == "true"
    assert _prop("advancedGroupBox", "collapsed") == "true"


def test_every_bound_widget_names_a_setting_and_shows_its_default():
    """The panel binds widgets to settings by name (TrainConfig fields or the panel's own); each widget's value
    in the .ui file is that setting's default, and a combo box lists exactly the setting's choices."""
    pytest.importorskip("slicer", reason="slicer-core is not installed (Python >= 3.10)")
    sys.path.insert(0, str(ROOT / "CPCLSegment"))
    from CPCLSegmentModuleLib.panel import PanelController

    bound = _setting_widgets()
    names = {s for _, _, s, _ in bound}
    assert {"minutes", "iterations", "length_mode", "lambda_max", "beta", "rampup", "lr", "method", "patch_size", "device",
            "later_wins"} <= names
    for widget, cls, setting, index in bound:
        assert PanelController.is_setting(setting), f"{widget}: {setting!r} is neither a TrainConfig field nor a panel setting"
        default = PanelController.default(setting)
        if isinstance(default, list) or setting == "patch_size":
            default = default[index] if default else 0  # X Y Z; None (planned) shows as 0, "auto"
        if cls in ("QSpinBox", "QDoubleSpinBox"):
            value = _prop(widget, "value")
            assert float(value or 0) == pytest.approx(float(default)), f"{widget} shows {value}, the default of {setting} is {default}"
        elif cls == "QCheckBox":
            assert (_prop(widget, "checked") == "true") == bool(default), widget
        elif cls == "QComboBox":
            items = [i.findtext("property/string") for i in next(w for w in _tree().iter("widget") if w.get("name") == widget).findall("item")]
            choices = list(PanelController.choices(setting))
            assert len(items) == len(choices), f"{widget} lists {items}, {setting} has the choices {choices}"
            assert choices.index(default) == 0, f"{widget}: the default {default!r} must be the first item"
    assert [i.findtext("property/string") for i in next(w for w in _tree().iter("widget") if w.get("name") == "deviceComboBox").findall("item")] \
        == ["auto", "CPU", "GPU (CUDA)", "Apple GPU (MPS)"]


def test_every_name_the_panel_view_sets_is_a_widget():
    pytest.importorskip("slicer", reason="slicer-core is not installed (Python >= 3.10)")
    sys.path.insert(0, str(ROOT / "CPCLSegment"))
    import slicer
    from CPCLSegmentModuleLib import panel
    from CPCLSegmentModuleLib.logic import LogicCore

    slicer.mrmlScene = slicer.vtkMRMLScene()
    view = panel.PanelController(LogicCore(slicer.mrmlScene), observe=False).view()
    widgets = _widgets()
    for group in (view.enabled, view.visible, view.text, view.progress):
        missing = sorted(set(group) - set(widgets))
        assert not missing, f"the panel view sets widgets missing from the .ui file: {missing}"


def test_ui_file_loads_in_a_real_qt_binding(tmp_path):
    """Loads the .ui with PySide6 (optional: `pip install PySide6-Essentials`) and renders the panel."""
    import os
    import subprocess
    import sys

    import pytest

    pytest.importorskip("PySide6.QtUiTools", reason="PySide6 is optional (pip install PySide6-Essentials)")
    out = tmp_path / "panel.png"
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    proc = subprocess.run([sys.executable, str(ROOT / "Utilities" / "render_panel.py"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width == 440 and height > 800


def test_iterations_tooltip_names_the_short_run_threshold():
    from CPCLSegmentLib.settings import SHORT_COPY_PASTE_RUN

    tips = [w.findtext("./property[@name='toolTip']/string") for w in ET.parse(UI).iter("widget") if w.get("name") == "iterationsSpinBox"]
    assert tips and f"shorter than {SHORT_COPY_PASTE_RUN} scored below supervised-only" in tips[0]


def test_minutes_tooltip_says_short_budgets_start_supervised_only():
    from CPCLSegmentLib.settings import SHORT_COPY_PASTE_RUN

    tips = [w.findtext("./property[@name='toolTip']/string") for w in ET.parse(UI).iter("widget") if w.get("name") == "minutesSpinBox"]
    assert tips and f"too few for {SHORT_COPY_PASTE_RUN} semi-supervised iterations" in tips[0]
    assert "supervised-only for the first half of their iterations, then with the unlabeled volumes" in tips[0]
