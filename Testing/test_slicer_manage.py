"""Outputs, models and run folders in the panel (``CPCLSegmentModuleLib.panelmanage``) against slicer-core: the output
segmentation (new, or an existing node overwritten; never a labeled case's), what Show 3D shows, the model list
(rename, delete, keep only the latest) and the run folders (listed with sizes, removable unless in use).
Skipped where slicer-core is not installed."""

import os
import sys
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core; Python >= 3.10)")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CPCLSegment"))

from CPCLSegmentLib.errors import InputError  # noqa: E402
from CPCLSegmentModuleLib import modelnode, panel  # noqa: E402
from CPCLSegmentModuleLib.logic import LogicCore  # noqa: E402
from CPCLSegmentModuleLib.nodes import segment_names  # noqa: E402
from CPCLSegmentModuleLib.results import import_segmentation  # noqa: E402
from CPCLSegmentModuleLib import attributes  # noqa: E402
from CPCLSegmentModuleLib.scene import OUTPUT_SEGMENTATION  # noqa: E402

from conftest import LUNGS  # noqa: E402
from slicer_scene import load_segmentation, load_volume, new_scene  # noqa: E402

pytestmark = pytest.mark.slicer


@pytest.fixture
def chest(tmp_path, ct_path, seg_path):
    scene = new_scene()
    volume = load_volume(scene, ct_path)
    segmentation = load_segmentation(scene, seg_path, volume=volume)
    c = panel.PanelController(LogicCore(scene, work_root=str(tmp_path / "work")))
    return c, scene, volume, segmentation


def add_model(scene, tmp_path, name, created, size=1000):
    path = tmp_path / f"{name}.pt"
    path.write_bytes(b"x" * size)
    node = modelnode.store_model(scene, str(path), name, classes=[{"name": "background"}] + [{"name": n} for n in LUNGS])
    node.SetAttribute(attributes.CREATED, created)
    return node


def test_the_output_is_new_or_an_existing_node_overwritten_never_a_labeled_case(chest, tmp_path, seg_path, monkeypatch):
    c, scene, volume, segmentation = chest
    c.set_segment_volumes([volume])
    view = c.view()
    assert view.output_segmentation is None and view.output_base_name == "CTChest segmentation"
    assert c.output_targets([volume]) is None  # "Create new segmentation"
    c.set_output_segmentation(segmentation)  # the labeled case's own segmentation: refused, never overwritten
    with pytest.raises(InputError, match="'Segmentation' is a labeled case's segmentation"):
        c.output_targets([volume])
    target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my result")
    c.set_output_segmentation(target)
    assert c.view().output_segmentation == target.GetID() and c.output_targets([volume]) == [target]
    with pytest.raises(InputError, match="check one volume"):
        c.output_targets([volume, volume])
    with pytest.raises(InputError, match="not a segmentation"):
        c.set_output_segmentation(volume)
    # the Segment button hands the target to the run; Label next's pre-fill never uses it
    seen = []
    monkeypatch.setattr(c.core, "start_segmentation", lambda model, volumes, **kw: seen.append(kw["targets"]) or _Job())
    monkeypatch.setattr(c, "model", lambda: object())
    c.segment()
    c.jobs["segment"] = None
    c.segment([volume], names=["x"])
    assert seen == [[target], None]
    # the result replaces the target's segments (its name kept), referenced to the volume, marked as an output
    out = import_segmentation(scene, seg_path, volume, target=target)
    assert out is target and target.GetName() == "my result" and "right lung" in segment_names(target)
    assert target.GetAttribute(attributes.OUTPUT) == OUTPUT_SEGMENTATION
    assert target.GetNodeReference(target.GetReferenceImageGeometryReferenceRole()) is volume
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2  # no new node


class _Job:
    work_dir = None


def test_show_3d_shows_the_output_else_the_last_result(chest):
    c, scene, volume, segmentation = chest
    assert c.view().shown_in_3d is None
    result = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CTChest segmentation")
    c.segmentation_done([result])
    assert c.view().shown_in_3d == result.GetID()
    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "chosen")
    c.set_output_segmentation(other)
    assert c.view().shown_in_3d == other.GetID()


def test_the_model_list_renames_deletes_and_keeps_only_the_latest(chest, tmp_path):
    c, scene, volume, segmentation = chest
    old = add_model(scene, tmp_path, "round 1", "2026-01-01 10:00:00", 3 * 2**20)
    mid = add_model(scene, tmp_path, "round 2", "2026-01-02 10:00:00")
    new = add_model(scene, tmp_path, "round 3", "2026-01-03 10:00:00")
    view = c.view()
    assert view.model_rows[0] == ("round 1", "3.0 MB", "2026-01-01 10:00:00", "right lung, left lung")
    assert [r[0] for r in view.model_rows] == ["round 1", "round 2", "round 3"] and view.model_row is None
    c.select_model_row(1)
    assert c.model() is mid and c.view().model_row == 1
    c.rename_model(1, "  lungs v2 ")
    assert mid.GetName() == "lungs v2" and modelnode.payload_node(mid).GetName() == "lungs v2 data"
    with pytest.raises(InputError, match="needs a name"):
        c.rename_model(1, " ")
    with pytest.raises(InputError, match="select a model"):
        c.delete_models([7])
    assert c.delete_models([0]) == ["round 1"] and scene.GetNodeByID(old.GetID()) is None
    assert c.keep_latest_model() == ["lungs v2"] and c.model() is new
    assert [r[0] for r in c.view().model_rows] == ["round 3"] and not c.view().enabled["keepLatestModelButton"]
    assert sum(1 for n in (scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())) if modelnode.is_model_data_node(n)) == 1


def test_run_folders_are_listed_with_sizes_and_removed_unless_in_use(chest, tmp_path):
    c, scene, volume, segmentation = chest
    work = Path(c.core.work_root)
    stopped = work / "train-20260101-100000-a"
    (stopped / "inputs").mkdir(parents=True)
    (stopped / "inputs" / "image-000.nrrd").write_bytes(b"x" * 2 * 2**20)
    (stopped / "model.pt.checkpoint.pt").write_bytes(b"x" * 10)
    old = work / "segment-20251201-100000-b"
    old.mkdir()
    (old / "volume-000.nrrd").write_bytes(b"x" * 2048)
    (work / "models").mkdir()  # cached model files: not a run folder
    assert c.view().run_rows == [] and "Press List" in c.view().text["runFoldersLabel"]
    rows = c.list_run_folders()
    assert [r["name"] for r in rows] == [stopped.name, old.name] or [r["name"] for r in rows] == [old.name, stopped.name]
    view = c.view()
    by_name = {r[0]: r for r in view.run_rows}
    assert by_name[stopped.name][1:3] == ("train", "2.0 MB") and by_name[stopped.name][4] == "stopped: Resume continues it"
    assert by_name[old.name][2] == "2.0 kB" and "2 run folder(s), 2.0 MB" in view.text["runFoldersLabel"]
    c.node.SetParameter("LastRunDir", str(stopped))  # Resume needs it: in use
    removed = c.remove_run_folders(list(range(len(rows))))
    assert removed == [str(old)] and not old.exists() and stopped.exists() and (work / "models").exists()
    assert any("kept (in use): " + stopped.name in line for line in c.take_log())
    assert [r[0] for r in c.view().run_rows] == [stopped.name]
    c.node.SetParameter("LastRunDir", "")
    c.list_run_folders()
    assert c.remove_run_folders([0]) == [str(stopped)] and not os.path.exists(stopped)
