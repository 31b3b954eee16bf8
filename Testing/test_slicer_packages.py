"""The package view beside the Install button (``CPCLSegmentModuleLib.packageinfo``): installed versions against
the ranges the module needs, the PyTorch build and Python the training process reports; shown on request."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CPCLSegment"))

from CPCLSegmentModuleLib import packageinfo  # noqa: E402
from CPCLSegmentModuleLib.environment import Requirement  # noqa: E402

REQS = [Requirement("torch", ">=2.3"), Requirement("monai", ">=1.3,<2"), Requirement("slicerio", "")]


def test_each_requirement_says_installed_needed_and_status():
    probe = {"python": "3.9.10", "torch": {"version": "2.4.1", "cuda_build": "12.1"}}
    rows = packageinfo.package_rows(REQS, {"torch": "2.4.1+cu121", "monai": "2.0.1", "slicerio": None}, probe)
    assert rows[:3] == [("torch", "2.4.1+cu121 (CUDA 12.1)", ">=2.3", "ok"), ("monai", "2.0.1", ">=1.3,<2", "needs >=1.3,<2"),
                        ("slicerio", "—", "any", "not installed")]
    assert rows[3] == ("Python (training process)", "3.9.10", ">=3.9", "") and rows[4][0] == "CPCLSegment engine"
    assert packageinfo.summary(rows) == "1 of 3 packages ready"
    cpu = packageinfo.package_rows(REQS[:1], {"torch": "2.4.1"}, {"torch": {"version": "2.4.1"}})
    assert cpu[0][1] == "2.4.1 (CPU-only build)"
    assert packageinfo.package_rows(REQS[:1], {"torch": "2.4.1"}, None)[0][1] == "2.4.1"  # no device report yet
    assert packageinfo.package_rows([], {}, None)[0] == ("Python (training process)", "checking…", ">=3.9", "")


def test_the_panel_shows_the_packages_on_request_and_reads_them_again_after_a_new_probe(monkeypatch):
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (Python >= 3.10)")
    from CPCLSegmentModuleLib import panel
    from CPCLSegmentModuleLib.logic import LogicCore

    reads = []
    monkeypatch.setattr(packageinfo, "installed_versions", lambda names: reads.append(names) or {n: "1.0" for n in names})
    c = panel.PanelController(LogicCore(slicer.vtkMRMLScene()), observe=False)
    view = c.view()
    assert not view.visible["packagesTable"] and view.package_rows == [] and view.text["packagesButton"] == "Packages…"
    assert reads == []  # nothing read while hidden
    c.toggle_packages()
    view = c.view()
    assert view.visible["packagesTable"] and [r[0] for r in view.package_rows][:2] == ["torch", "monai"]
    assert view.text["packagesButton"].startswith("Hide packages (") and "packages ready" in view.text["packagesButton"]
    c.view()
    assert len(reads) == 1  # cached while the device report is the same
    c.probe = {"python": "3.11.2", "torch": {"version": "1.0"}}  # a new report (after an install)
    assert ("Python (training process)", "3.11.2", ">=3.9", "") in c.view().package_rows and len(reads) == 2
    c.toggle_packages()
    assert not c.view().visible["packagesTable"]
