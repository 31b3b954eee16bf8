"""Models in the scene (slicer-core): the node Slicer's views render holds a short text, the model file is in a
data node that never gets a subject-hierarchy item, one Modified per store, and saving / loading the scene
round-trips the model byte for byte."""

import hashlib
import os
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core; Python >= 3.10)")
vtk = pytest.importorskip("vtk")

from CPCLSegmentModuleLib import attributes, modelnode  # noqa: E402

from slicer_scene import new_scene  # noqa: E402


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(os.urandom(3 * 2**20 + 17))  # the node code never parses the file: any bytes do
    return str(path)


CLASSES = [{"name": "background", "color": [0, 0, 0]}, {"name": "right lung", "color": [0.1, 0.8, 0.3], "extra": "x" * 10}]


def test_the_model_node_text_stays_short_and_the_data_node_is_hidden_before_it_enters_the_scene(tmp_path, model_file):
    scene = new_scene()
    added = []

    def on_added(caller, event, node):
        added.append((node.GetName(), node.GetHideFromEditors(), len(node.GetText() or "")))

    on_added.CallDataType = vtk.VTK_OBJECT
    scene.AddObserver(scene.NodeAddedEvent, on_added)
    node = modelnode.store_model(scene, model_file, "lungs", classes=CLASSES, summary={"method": "cpcl", "iterations": 8})
    # what the Texts subject-hierarchy plugin's tooltip shows is the model node's text: short, and it names the model
    text = node.GetText()
    assert len(text) <= modelnode.DESCRIPTION_LIMIT and "lungs" in text and "right lung" in text and "cpcl" in text
    assert all(len(v or "") < 4000 for v in (node.GetAttribute(n) for n in node.GetAttributeNames()))
    assert not node.GetHideFromEditors() and modelnode.is_model_node(node)
    data = modelnode.payload_node(node)
    assert modelnode.is_model_data_node(data) and data.GetHideFromEditors()  # slicer-core is 5.13: private nodes are saved
    # the data node was hidden when it entered the scene (Slicer gives no subject-hierarchy item to a node hidden then)
    assert (data.GetName(), True, len(data.GetText())) in [(n, bool(h), t) for n, h, t in added]
    assert open(model_file, "rb").read() == modelnode.model_bytes(node)


def test_one_modified_per_store_and_the_old_data_node_goes(tmp_path, model_file):
    scene = new_scene()
    node = modelnode.store_model(scene, model_file, "lungs", classes=CLASSES)
    first = modelnode.payload_node(node)
    events = []
    node.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda *a: events.append(1))
    Path(model_file).write_bytes(os.urandom(1000))
    same = modelnode.store_model(scene, model_file, node=node, summary={"status": "stopped"})
    assert same is node and len(events) == 1
    assert scene.GetNodeByID(first.GetID()) is None and modelnode.model_bytes(node) == Path(model_file).read_bytes()


def test_a_cached_file_is_matched_by_its_sha256_not_its_size(tmp_path, model_file):
    scene = new_scene()
    node = modelnode.store_model(scene, model_file, "lungs")
    assert modelnode.file_matches(model_file, node)
    other = bytearray(Path(model_file).read_bytes())
    other[100] ^= 0xFF  # same size, other content (e.g. the run folder's file after Stop -> Resume)
    Path(model_file).write_bytes(bytes(other))
    assert not modelnode.file_matches(model_file, node)


@pytest.mark.parametrize("how", ["mrb", "directory"])
def test_saving_and_loading_the_scene_round_trips_the_model(tmp_path, model_file, how):
    scene = new_scene()
    node = modelnode.store_model(scene, model_file, "lungs", classes=CLASSES)
    want = hashlib.sha256(Path(model_file).read_bytes()).hexdigest()
    if how == "mrb":
        saved = str(tmp_path / "saved.mrb")
        assert scene.WriteToMRB(saved)
    else:
        saved = str(tmp_path / "saved")
        os.makedirs(saved)
        assert scene.SaveSceneToSlicerDataBundleDirectory(saved)
    loaded = new_scene(cache_dir=tmp_path / "cache")
    if how == "mrb":
        assert loaded.ReadFromMRB(saved)
    else:
        loaded.SetURL(next(str(p) for p in Path(saved).glob("*.mrml")))
        assert loaded.Connect()
    again = loaded.GetFirstNodeByName("lungs")
    assert modelnode.is_model_node(again) and len(again.GetText()) <= modelnode.DESCRIPTION_LIMIT
    assert modelnode.payload_node(again).GetHideFromEditors()
    assert hashlib.sha256(modelnode.model_bytes(again)).hexdigest() == want


def test_an_older_scene_s_model_node_is_upgraded_and_removal_takes_the_data(tmp_path, model_file):
    import base64

    scene = new_scene()
    old = scene.AddNewNodeByClass("vtkMRMLTextNode", "old model")
    data = Path(model_file).read_bytes()
    old.SetAttribute(attributes.OUTPUT, modelnode.OUTPUT_MODEL)
    old.SetAttribute(attributes.SHA256, hashlib.sha256(data).hexdigest())
    old.SetAttribute(attributes.BYTES, str(len(data)))
    old.SetText(base64.b64encode(data).decode("ascii"))  # how the module stored models before
    assert modelnode.model_bytes(old) == data
    modelnode.upgrade_model_node(scene, old)
    assert len(old.GetText()) <= modelnode.DESCRIPTION_LIMIT and modelnode.model_bytes(old) == data
    payload = modelnode.payload_node(old)
    modelnode.remove_model(scene, old)
    assert scene.GetNodeByID(payload.GetID()) is None


# ------------------------------------------------------------------------------ the model list, run folders


def test_model_list_rename_and_keep_only_the_latest(tmp_path, model_file):
    from CPCLSegmentModuleLib import modellist

    scene = new_scene()
    first = modelnode.store_model(scene, model_file, "round 1", classes=CLASSES)
    first.SetAttribute(attributes.CREATED, "2026-01-01 10:00:00")
    second = modelnode.store_model(scene, model_file, "round 2", classes=CLASSES)
    rows = modellist.model_rows(scene)
    assert [r["name"] for r in rows] == ["round 1", "round 2"] and rows[1]["segments"] == ["right lung"]
    assert rows[0]["megabytes"] == pytest.approx(3.0, abs=0.05)
    modellist.rename_model(second, "lungs v2")
    assert second.GetName() == "lungs v2" and modelnode.payload_node(second).GetName() == "lungs v2 data"
    data_of_first = modelnode.payload_node(first)
    assert modellist.keep_latest(scene) == ["round 1"]
    assert scene.GetNodeByID(first.GetID()) is None and scene.GetNodeByID(data_of_first.GetID()) is None
    assert [r["node"] for r in modellist.model_rows(scene)] == [second]


def test_old_run_folders_are_listed_and_removable_except_those_in_use(tmp_path):
    from CPCLSegmentModuleLib import modellist

    root = tmp_path / "CPCLSegment"
    for name in ("train-20260101-100000-aaa", "train-20260102-100000-bbb", "segment-20260103-100000-ccc", "models"):
        (root / name / "inputs").mkdir(parents=True)
        (root / name / "inputs" / "volume-000.nrrd").write_bytes(b"x" * 1000)
    (root / "train-20260102-100000-bbb" / "model.pt.checkpoint.pt").write_bytes(b"c")
    rows = modellist.run_folders(str(root), in_use=[str(root / "train-20260101-100000-aaa")])
    assert sorted(r["name"] for r in rows) == ["segment-20260103-100000-ccc", "train-20260101-100000-aaa", "train-20260102-100000-bbb"]
    by = {r["name"]: r for r in rows}
    assert by["train-20260101-100000-aaa"]["in_use"] and by["train-20260102-100000-bbb"]["resumable"]
    assert by["segment-20260103-100000-ccc"]["bytes"] == 1000
    removed = modellist.remove_run_folders(rows, str(root))
    assert sorted(os.path.basename(p) for p in removed) == ["segment-20260103-100000-ccc", "train-20260102-100000-bbb"]
    assert (root / "train-20260101-100000-aaa").is_dir() and (root / "models").is_dir()
