#!/usr/bin/env python
"""Renders the Slicer panel from the real Qt Designer file into Resources/Screenshots/panel.png.

The Slicer application cannot be installed here, so the .ui file is loaded with a plain Qt binding
(PySide6, ``pip install PySide6-Essentials``) after swapping Slicer's custom widgets for the Qt classes
they look like: ``ctkCollapsibleButton`` -> a group box (expanded) or a flat header button (collapsed),
``qMRMLNodeComboBox`` / ``qMRMLCheckableNodeComboBox`` -> ``QComboBox`` showing a node name,
``ctkPathLineEdit`` -> ``QLineEdit``, ``qMRMLWidget`` -> ``QWidget``, ``qMRMLSegmentationShow3DButton`` ->
``QPushButton``. Every other widget, layout and property
comes from the file as it is, so a broken .ui file fails here. The widgets are then filled with a
realistic mid-training state (two labeled cases, loss, validation Dice) and grabbed.

    QT_QPA_PLATFORM=offscreen .venv/bin/python Utilities/render_panel.py [--out FILE] [--icons]

``--icons`` also draws the module and extension icons (CPCLSegment/Resources/Icons/CPCLSegment.png,
Resources/CPCLSegment.png) with Pillow.
"""

from __future__ import annotations

import argparse
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UI = ROOT / "CPCLSegment" / "Resources" / "UI" / "CPCLSegment.ui"
OUT = ROOT / "Resources" / "Screenshots" / "panel.png"

# Properties that only Slicer's classes have (dropped when the class is swapped for a Qt one).
SLICER_ONLY_PROPERTIES = {"nodeTypes", "showChildNodeTypes", "noneEnabled", "addEnabled", "removeEnabled", "collapsed",
                          "renameEnabled", "editEnabled", "baseName", "selectNodeUponCreation", "filters", "nameFilters",
                          "noneDisplay"}
NODE_NAMES = {
    "labeledVolumeSelector": "CT 03",
    "labeledSegmentationSelector": "CT 03 segmentation",
    "unlabeledSelector": "CT 04, CT 05, CT 06, CT 07, CT 08",
    "segmentVolumesSelector": "CT 09",
}


def _string_property(name: str, text: str) -> ET.Element:
    p = ET.Element("property", {"name": name})
    ET.SubElement(p, "string").text = text
    return p


def qt_only_ui(path: Path) -> bytes:
    """The .ui file with Slicer's custom widgets replaced by look-alike Qt widgets."""
    tree = ET.parse(path)
    root = tree.getroot()
    for parent in root.iter():
        for w in list(parent):
            if w.tag != "widget":
                continue
            cls, name = w.get("class"), w.get("name")
            if not (cls.startswith("ctk") or cls.startswith("qMRML")):
                continue
            props = {p.get("name"): p for p in w.findall("property")}
            collapsed = "collapsed" in props and props["collapsed"].findtext("bool") == "true"
            title = (props.get("text") if "text" in props else props.get("title"))
            title_text = title.findtext("string") if title is not None else ""
            for p in list(w.findall("property")):
                if p.get("name") in SLICER_ONLY_PROPERTIES or (cls == "ctkCollapsibleButton" and p.get("name") == "text"):
                    w.remove(p)
            if cls == "qMRMLWidget":
                w.set("class", "QWidget")
            elif cls in ("qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox"):
                w.set("class", "QComboBox")
                item = ET.SubElement(w, "item")
                item.append(_string_property("text", NODE_NAMES.get(name, "")))
            elif cls == "qMRMLSegmentationShow3DButton":
                w.set("class", "QPushButton")
            elif cls == "ctkPathLineEdit":
                w.set("class", "QLineEdit")
                w.append(_string_property("placeholderText", "(none: start from scratch)"))
            elif cls in ("ctkCollapsibleButton", "ctkCollapsibleGroupBox"):
                if collapsed:
                    w.set("class", "QPushButton")  # a collapsed section is just its header
                    for child in list(w):
                        if child.tag == "layout":
                            w.remove(child)
                    for p in list(w.findall("property")):
                        if p.get("name") == "title":
                            w.remove(p)
                    w.append(_string_property("text", "▸  " + title_text))
                    w.append(_string_property("objectName", name))
                    w.append(_string_property("styleSheet", "text-align: left; padding: 4px 6px; font-weight: bold;"))
                else:
                    w.set("class", "QGroupBox")
                    for p in list(w.findall("property")):
                        if p.get("name") == "title":
                            w.remove(p)
                    w.append(_string_property("title", "▾  " + title_text))
    for section in ("customwidgets", "connections"):
        for el in root.findall(section):
            root.remove(el)
    return ET.tostring(root, encoding="utf-8")


def fill_demo_state(w) -> None:
    """A realistic moment: two labeled cases, training at 42 %, validation Dice shown."""
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QColor, QIcon, QPixmap
    from PySide6.QtWidgets import QComboBox, QHeaderView, QLabel, QListWidget, QProgressBar, QPushButton, QTableWidget, QTableWidgetItem

    def find(cls, name):
        child = w.findChild(cls, name)
        assert child is not None, f"{name} ({cls.__name__}) not found in the .ui file"
        return child

    from PySide6.QtWidgets import QSpinBox

    find(QLabel, "backendLabel").setText("Compute: CUDA GPU: NVIDIA GeForce RTX 3070 (8 GB)")
    iterations = w.findChild(QSpinBox, "iterationsSpinBox")  # absent while "Training settings" is drawn collapsed
    if iterations is not None:
        iterations.hide()  # "Train for N minutes" is the default; iterations are for experts
    find(QPushButton, "installButton").hide()
    find(QTableWidget, "packagesTable").hide()  # shown on request (Packages…)
    cases = find(QTableWidget, "casesTable")
    cases.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
    rows = [("CT 01", "CT 01 segmentation", False), ("CT 02", "CT 02 segmentation", False), ("CT 03", "CT 03 segmentation", True)]
    cases.setRowCount(len(rows))
    for r, (vol, seg, sparse) in enumerate(rows):
        cases.setItem(r, 0, QTableWidgetItem(vol))
        cases.setItem(r, 1, QTableWidgetItem(seg))
        check = QTableWidgetItem("")
        check.setFlags(Qt.ItemIsUserCheckable | Qt.ItemIsEnabled)
        check.setCheckState(Qt.Checked if sparse else Qt.Unchecked)
        cases.setItem(r, 2, check)
    cases.verticalHeader().setDefaultSectionSize(22)  # as the module sets it
    cases.setMaximumHeight(22 * (len(rows) + 1) + 6)
    segments = find(QListWidget, "segmentsList")
    for name, rgb, on in (("right lung", (22, 197, 71), True), ("left lung", (197, 25, 99), True), ("ribs", (241, 214, 145), False)):
        pix = QPixmap(12, 12)
        pix.fill(QColor(*rgb))
        from PySide6.QtWidgets import QListWidgetItem

        item = QListWidgetItem(QIcon(pix), name)
        item.setFlags(Qt.ItemIsUserCheckable | Qt.ItemIsEnabled)
        item.setCheckState(Qt.Checked if on else Qt.Unchecked)
        segments.addItem(item)
    segments.setMaximumHeight(64)
    find(QLabel, "checkResultLabel").setText(
        '<span style="color:#2e7d32">ready: right lung 103350 voxels, left lung 101100 voxels</span><br>'
        '<span style="color:#555555">info: case 3 (\'CT 03\' + \'CT 03 segmentation\'): only the painted slices count as labeled</span>')
    bar = find(QProgressBar, "trainProgressBar")
    bar.setMaximum(300)
    bar.setValue(126)
    bar.setFormat("iteration 126/300, ETA 2 min 41 s")
    find(QLabel, "lossLabel").setText("loss: supervised 0.412, forward 0.031, backward 0.187, total 0.546; λ 0.052")
    find(QLabel, "diceLabel").setText("validation Dice (iteration 120): right lung 0.871, left lung 0.846")
    find(QPushButton, "trainButton").setEnabled(False)
    find(QPushButton, "resumeButton").setEnabled(False)
    find(QLabel, "modelInfoLabel").setText("No model yet: train one or load a model file.")
    find(QPushButton, "showPlotButton").setEnabled(True)
    for name in ("saveModelButton", "segmentButton", "cancelSegmentButton"):
        find(QPushButton, name).setEnabled(False)
    seg_bar = find(QProgressBar, "segmentProgressBar")
    seg_bar.setValue(0)
    seg_bar.setFormat("")
    find(QComboBox, "labeledVolumeSelector")


def render(out: Path) -> Path:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice
    from PySide6.QtGui import QFont
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setStyle("Fusion")
    font = QFont("DejaVu Sans", 9)
    app.setFont(font)
    buffer = QBuffer()
    buffer.setData(QByteArray(qt_only_ui(UI)))
    buffer.open(QIODevice.ReadOnly)
    loader = QUiLoader()
    widget = loader.load(buffer)
    if widget is None:
        raise SystemExit(f"Qt could not load {UI}: {loader.errorString()}")
    fill_demo_state(widget)
    widget.setWindowTitle("CPCL Segment")
    widget.resize(440, 100)
    widget.adjustSize()
    widget.resize(440, widget.sizeHint().height() - 30)  # without most of the bottom spacer
    app.processEvents()
    out.parent.mkdir(parents=True, exist_ok=True)
    if not widget.grab().save(str(out)):
        raise SystemExit(f"could not write {out}")
    return out


def draw_icons() -> None:
    """The module icon and the extension icon: a labeled blob and an unlabeled one joined by a cycle."""
    from PIL import Image, ImageDraw

    def icon(size: int) -> Image.Image:
        s = size / 128.0
        img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        d = ImageDraw.Draw(img)
        d.rounded_rectangle([2 * s, 2 * s, 126 * s, 126 * s], radius=22 * s, fill=(32, 52, 84, 255))
        # cyclic arrows (forward: labeled -> unlabeled, backward: unlabeled -> labeled)
        d.arc([24 * s, 24 * s, 104 * s, 104 * s], start=200, end=340, fill=(255, 193, 7, 255), width=int(7 * s))
        d.arc([24 * s, 24 * s, 104 * s, 104 * s], start=20, end=160, fill=(255, 193, 7, 255), width=int(7 * s))
        d.polygon([(98 * s, 34 * s), (110 * s, 52 * s), (90 * s, 52 * s)], fill=(255, 193, 7, 255))
        d.polygon([(30 * s, 94 * s), (18 * s, 76 * s), (38 * s, 76 * s)], fill=(255, 193, 7, 255))
        # labeled case: filled green segment; unlabeled case: outlined grey volume
        d.ellipse([30 * s, 44 * s, 62 * s, 84 * s], fill=(22, 197, 71, 255), outline=(255, 255, 255, 255), width=int(3 * s))
        d.ellipse([68 * s, 44 * s, 100 * s, 84 * s], fill=(120, 140, 170, 255), outline=(255, 255, 255, 255), width=int(3 * s))
        return img

    for path in (ROOT / "CPCLSegment" / "Resources" / "Icons" / "CPCLSegment.png", ROOT / "Resources" / "CPCLSegment.png"):
        path.parent.mkdir(parents=True, exist_ok=True)
        icon(128).save(path)
        print(f"wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(OUT), help=f"PNG to write (default {OUT.relative_to(ROOT)})")
    parser.add_argument("--icons", action="store_true", help="also draw the module and extension icons")
    args = parser.parse_args(argv)
    if args.icons:
        draw_icons()
    print(f"wrote {render(Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
