"""The Slicer panel's decisions (``CPCLSegmentModuleLib.panel.PanelController``) and the module's survival in real use,
against slicer-core: pairs that survive deletion, scene close while jobs run, Label next, models saved with the
scene, module outputs never picked as inputs, one rasterisation per Train, organ + lesion, minutes, one API.

Issue 15: every test here failed on the module as it was (most because the decision lived in the Qt widget,
where no test could reach it). Skipped where slicer-core is not installed (Python >= 3.10).
"""

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core; Python >= 3.10)")
vtk = pytest.importorskip("vtk")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CPCLSegment"))

from CPCLSegmentLib import cli, jobs, settings, writers  # noqa: E402
from CPCLSegmentLib import io as cio  # noqa: E402
from CPCLSegmentLib.labels import build_label_array  # noqa: E402
from CPCLSegmentLib.errors import Cancelled, InputError  # noqa: E402
from CPCLSegmentModuleLib import environment, inputcheck, modelnode, panel  # noqa: E402
from CPCLSegmentModuleLib.export import export_inputs, export_volume  # noqa: E402
from CPCLSegmentModuleLib.inputcheck import check_inputs, CheckFailed  # noqa: E402
from CPCLSegmentModuleLib.logic import LogicCore  # noqa: E402
from CPCLSegmentModuleLib.models import model_nested, model_summary  # noqa: E402
from CPCLSegmentModuleLib.nodes import ensure_converter_rules, find_segment_id, labeled_arrays, segment_masks, segment_names  # noqa: E402
from CPCLSegmentModuleLib.options import compares_supervised, DEFAULT_MINUTES, module_settings, train_config  # noqa: E402
from CPCLSegmentModuleLib.panelsettings import PANEL_DEFAULTS  # noqa: E402
from CPCLSegmentModuleLib.results import import_segmentation  # noqa: E402
from CPCLSegmentModuleLib import attributes  # noqa: E402
from CPCLSegmentModuleLib.scene import is_module_output, nodes_by_class, OUTPUT_LABELS  # noqa: E402

from conftest import LUNGS  # noqa: E402
from slicer_scene import TINY, load_segmentation, load_volume, new_scene, one_thread_env  # noqa: E402

pytestmark = pytest.mark.slicer


def controller(scene, tmp_path, **kwargs):
    logic = LogicCore(scene, env=one_thread_env(), work_root=str(tmp_path / "work"), **kwargs)
    return panel.PanelController(logic)


def wait_for(c, kind, timeout=300):
    """Polls like the widget's timer until the job of ``kind`` is done."""
    deadline = time.time() + timeout
    while c.busy(kind) or c._discarded:
        c.poll()
        assert time.time() < deadline, f"{kind} did not finish: {c.take_log()[-5:]}"
        time.sleep(0.05)
    c.poll()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, ct_path, seg_path):
    """A model file trained once for this module through LogicCore (a few seconds: 20 iterations, width 4)."""
    scene = new_scene()
    volume = load_volume(scene, ct_path)
    segmentation = load_segmentation(scene, seg_path, volume=volume)
    logic = LogicCore(scene, env=one_thread_env(), work_root=str(tmp_path_factory.mktemp("tiny-model")))
    return logic.model_file(logic.train([(volume, segmentation)], [], LUNGS, **TINY))


@pytest.fixture
def chest(ct_path, seg_path):
    scene = new_scene()
    volume = load_volume(scene, ct_path)
    segmentation = load_segmentation(scene, seg_path, volume=volume)
    return scene, volume, segmentation


@pytest.fixture
def two_cases(ct_path, seg_path):
    scene = new_scene()
    v1, v2 = load_volume(scene, ct_path, "V1"), load_volume(scene, ct_path, "V2")
    s1, s2 = load_segmentation(scene, seg_path, "S1", volume=v1), load_segmentation(scene, seg_path, "S2", volume=v2)
    return scene, v1, s1, v2, s2


def pairs(c):
    return [(case.volume.GetName(), case.segmentation.GetName()) for case in c.cases()]


# ------------------------------------------------------------------------------------------ item 2


def test_deleting_a_node_drops_its_pair_and_never_re_pairs_the_rest(two_cases, tmp_path):
    scene, v1, s1, v2, s2 = two_cases
    c = controller(scene, tmp_path)
    assert pairs(c) == [("V1", "S1"), ("V2", "S2")]  # "add all segmented volumes" on first look
    scene.RemoveNode(s1)
    assert pairs(c) == [("V2", "S2")]  # not [("V1", "S2")]: V1 lost its labels, it did not get V2's
    assert any("'V1' + 'S1' removed" in line and "segmentation was deleted" in line for line in c.take_log())
    scene.RemoveNode(v2)
    assert pairs(c) == []
    # pairs added later keep their own partner, too
    s3 = load_segmentation(scene, str(Path(slicer_data()) / "Segmentation.seg.nrrd"), "S3", volume=v1)
    c.add_case(v1, s3)
    assert pairs(c) == [("V1", "S3")]


def slicer_data():
    import slicerio

    return os.path.join(os.path.dirname(slicerio.__file__), "data")


def test_pairs_survive_saving_and_loading_the_scene(two_cases, tmp_path):
    scene, v1, s1, v2, s2 = two_cases
    c = controller(scene, tmp_path)
    c.set_sparse(1, True)
    mrb = str(tmp_path / "scene.mrb")
    assert scene.WriteToMRB(mrb)
    loaded = new_scene(cache_dir=tmp_path / "cache")
    assert loaded.ReadFromMRB(mrb)
    c2 = controller(loaded, tmp_path / "second")
    assert pairs(c2) == [("V1", "S1"), ("V2", "S2")] and [case.sparse for case in c2.cases()] == [False, True]


# ------------------------------------------------------------------------------------------ item 7


def test_the_module_s_own_outputs_are_never_selected_automatically(chest, ct_path, tmp_path, tiny_model):
    scene, volume, segmentation = chest
    c = controller(scene, tmp_path)
    assert pairs(c) == [("CTChest", "Segmentation")]
    unlabeled_before = [v.GetName() for v in c.unlabeled()]
    model = c.core.load_model(tiny_model)
    # an uncertainty map (Label next) and a prediction (Segment) of the module
    heat_path = export_volume(volume, tmp_path / "heat.nrrd")
    heat = c.core.show_uncertainty({"volume": volume, "uncertainty": heat_path})
    prediction = c.core.segment(model, volume)
    labels = c.core.empty_segmentation_for(model, volume)
    assert is_module_output(heat) and is_module_output(prediction) and is_module_output(labels)
    assert [v.GetName() for v in c.unlabeled()] == unlabeled_before  # the heat map was not ticked as unlabeled
    assert c.add_all_cases() == 0 and pairs(c) == [("CTChest", "Segmentation")]  # the prediction is not a labeled case
    # a volume the user loads is an unlabeled candidate (the positive control)
    user = load_volume(scene, ct_path, "new CT")
    assert [v.GetName() for v in c.unlabeled()] == unlabeled_before + ["new CT"] and not is_module_output(user)
    # a first look at a scene that holds outputs (the panel's defaults): the user's volume only
    pnode = c.node
    pnode.RemoveNodeReferenceIDs("UnlabeledVolume")
    pnode.SetParameter("Initialized", "")
    assert [v.GetName() for v in c.unlabeled()] == ["new CT"]


# ------------------------------------------------------------------------------------------ items 3, 4, 11


def test_enabled_states_follow_the_jobs(chest, tmp_path, tiny_model):
    scene, volume, segmentation = chest
    c = controller(scene, tmp_path)
    empty = controller(new_scene(), tmp_path / "empty").view().enabled
    assert not empty["trainButton"] and not empty["segmentButton"] and not empty["saveModelButton"] and not empty["labelNextButton"]
    v = c.view().enabled
    assert v["trainButton"] and not v["stopButton"] and not v["segmentButton"]  # no model yet
    c.set_model(c.core.load_model(tiny_model))
    c.set_segment_volumes([volume])
    c.set_unlabeled([volume])
    c.rank_rows = [{"rank": 1, "volume": volume, "score": 0.5, "uncertainty": None}]
    c.select_rank_row(0)
    v = c.view().enabled
    assert v["segmentButton"] and v["saveModelButton"] and v["labelNextButton"] and v["rankButton"]
    c.segment()
    v = c.view().enabled
    assert not v["segmentButton"] and v["cancelSegmentButton"]
    assert not v["labelNextButton"]  # its pre-fill is a segmentation: not while one runs
    with pytest.raises(InputError, match="segmentation is running"):
        c.label_next()  # refused: no second, orphaned run
    with pytest.raises(InputError, match="running already"):
        c.segment()
    assert c.jobs["segment"] is not None and scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    wait_for(c, "segment")
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2
    assert ("show", (volume, None)) in c.take_effects()
    v = c.view().enabled
    assert v["segmentButton"] and v["labelNextButton"] and not v["cancelSegmentButton"]


def test_label_next_opens_a_segmentation_empty_or_prefilled(chest, tmp_path, tiny_model):
    scene, volume, segmentation = chest
    c = controller(scene, tmp_path)
    c.set_model(c.core.load_model(tiny_model))
    c.rank_rows = [{"rank": 1, "volume": volume, "score": 0.5, "uncertainty": None}]
    c.select_rank_row(0)
    c.label_next()
    effects = c.take_effects()
    edit = [value for kind, value in effects if kind == "edit"]
    assert len(edit) == 1 and edit[0][1] is volume and segment_names(edit[0][0]) == LUNGS
    assert edit[0][0].GetAttribute(attributes.OUTPUT) == OUTPUT_LABELS
    scene.RemoveNode(edit[0][0])  # deleted: the next Label next makes a new one (else it reopens this one)
    c.set_setting("prefill", True)
    c.label_next()
    assert c.busy("segment") and not c.view().enabled["labelNextButton"]
    wait_for(c, "segment")
    edit = [value for kind, value in c.take_effects() if kind == "edit"]
    assert len(edit) == 1 and edit[0][1] is volume and edit[0][0].GetName() == "CTChest labels"
    assert edit[0][0].GetAttribute(attributes.OUTPUT) == OUTPUT_LABELS


def test_closing_the_scene_while_jobs_run_keeps_the_model_and_drops_stale_results(chest, tmp_path, tiny_model):
    scene, volume, segmentation = chest
    c = controller(scene, tmp_path)
    c.set_model(c.core.load_model(tiny_model))
    c.set_segment_volumes([volume])
    for name, value in (("length_mode", "iterations"), ("iterations", 15), ("width", 4), ("patch_size", [64, 64, 16]),
                        ("device", "cpu")):
        c.set_setting(name, value)
    train_job = c.train()
    seg_job = c.segment()
    seg_dir = seg_job.work_dir
    scene.Clear(0)  # File > Close scene while both run
    assert not c.closing and c.cases() == []  # the new scene's defaults (nothing in it)
    assert c.jobs["segment"] is None and seg_job in c._discarded
    assert any("training continues" in line for line in c.log)
    wait_for(c, "train")
    assert train_job.status == "done"
    model = c.model()  # no AttributeError, model not lost: it is in the new scene and selected there
    assert model is not None and scene.GetNodeByID(model.GetID()) is model
    assert os.path.isfile(c.core.model_file(model))
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0  # the old scene's segmentation was not imported
    assert seg_job.status == "cancelled" or not os.path.exists(seg_dir)
    assert not os.path.exists(seg_dir)
    assert c.node.GetParameter("LastRunDir") == train_job.work_dir


def test_one_logic_api_and_run_is_folded_into_job():
    import ast

    from CPCLSegmentModuleLib import logic as logic_module

    assert not hasattr(logic_module, "Run") and not hasattr(logic_module, "TrainSettings")
    assert hasattr(jobs.Job, "result") and "collect" in jobs.Job.__init__.__code__.co_varnames
    app = ROOT / "CPCLSegment" / "CPCLSegmentAppLib"
    tree = ast.parse((app / "consolelogic.py").read_text(encoding="utf-8"))
    logic = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CPCLSegmentLogic")
    methods = {f.name: f for f in logic.body if isinstance(f, ast.FunctionDef)}
    for name in ("train", "segment", "rank"):
        body = [b for b in methods[name].body if not (isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant))]
        assert len(body) == 1 and isinstance(body[0], ast.Return), f"CPCLSegmentLogic.{name} must only call the core"
        call = body[0].value
        assert isinstance(call, ast.Call) and ast.unparse(call.func) == f"self.core.{name}"
    text = "\n".join(ast.unparse(n) for name in ("widget", "widgetview")
                     for n in ast.parse((app / f"{name}.py").read_text(encoding="utf-8")).body if isinstance(n, ast.ClassDef))
    for decision in ("start_training", "start_segmentation", "check_inputs", "segmented_volume_pairs", "volumes_without_segmentation",
                     "GetNodeReference", "SetParameter"):
        assert decision not in text, f"the widget decides itself ({decision}); decisions belong to PanelController"


def test_a_declined_install_stops_the_console_train(chest, tmp_path):
    scene, volume, segmentation = chest

    def declined():
        raise environment.DependencyError("PyTorch is not installed (installation declined)")

    logic = LogicCore(scene, work_root=str(tmp_path / "work"), ensure_dependencies=declined)
    for call in (lambda: logic.train([(volume, segmentation)], [], LUNGS, **TINY), lambda: logic.segment("any.pt", volume),
                 lambda: logic.rank("any.pt", [volume])):
        with pytest.raises(environment.DependencyError, match="declined"):
            call()
    assert not os.path.exists(tmp_path / "work") or os.listdir(tmp_path / "work") == []


# ------------------------------------------------------------------------------------------ item 5


@pytest.mark.parametrize("how", ["mrb", "directory"])
def test_the_model_is_saved_with_the_scene_and_segments_after_the_temp_folder_is_gone(chest, tmp_path, how):
    scene, volume, segmentation = chest
    work = tmp_path / "Slicer temp" / "CPCLSegment"
    logic = LogicCore(scene, env=one_thread_env(), work_root=str(work))
    model = logic.train([(volume, segmentation)], [], LUNGS, **dict(TINY, iterations=8))
    c = panel.PanelController(logic)
    c.set_model(model)
    cached = logic.model_file(model)
    assert cached.startswith(str(work))
    # save the scene the way Slicer's scene writer does (Modules/Loadable/Data/qSlicerSceneWriter.cxx: .mrb with
    # vtkMRMLScene::WriteToMRB; a folder with SaveSceneToSlicerDataBundleDirectory), then lose the temp folder
    if how == "mrb":
        saved = str(tmp_path / "saved scene.mrb")
        assert scene.WriteToMRB(saved)
    else:
        saved = str(tmp_path / "saved scene")
        os.makedirs(saved)  # the scene writer makes the folder first (qSlicerSceneWriter::writeToDirectory)
        assert scene.SaveSceneToSlicerDataBundleDirectory(saved)
    shutil.rmtree(tmp_path / "Slicer temp")  # a reboot empties Slicer's temporary folder
    c.close()
    loaded = new_scene(cache_dir=tmp_path / "cache")
    if how == "mrb":
        assert loaded.ReadFromMRB(saved)
    else:
        mrml = next(str(p) for p in Path(saved).glob("*.mrml"))
        loaded.SetURL(mrml)
        assert loaded.Connect()
    logic2 = LogicCore(loaded, env=one_thread_env(), work_root=str(tmp_path / "new temp"))
    c2 = panel.PanelController(logic2)
    restored = c2.model()
    assert restored is not None and model_summary(restored)["segments"] == LUNGS
    assert "saved with the scene" in c2.model_text()
    volume2 = loaded.GetFirstNodeByName("CTChest")
    c2.set_segment_volumes([volume2])
    c2.segment()
    wait_for(c2, "segment")
    outputs = [n for n in nodes_by_class(loaded, "vtkMRMLSegmentationNode") if is_module_output(n)]
    assert len(outputs) == 1 and segment_names(outputs[0]) == LUNGS
    assert logic2.model_file(restored).startswith(str(tmp_path / "new temp"))  # re-created from the node


def test_a_corrupted_model_node_is_refused(chest, tmp_path, tiny_model):
    scene, volume, segmentation = chest
    logic = LogicCore(scene, work_root=str(tmp_path / "work"))
    model = logic.load_model(tiny_model)
    model.SetAttribute(attributes.FILE, "")  # no cached file: the data node's text is decoded
    data = modelnode.payload_node(model)
    data.SetText(data.GetText()[:-8] + "AAAAAAAA")
    with pytest.raises(InputError, match="no intact model"):
        logic.model_file(model)


def test_a_loaded_model_shows_a_short_text_and_a_same_size_cached_file_is_not_trusted(chest, tmp_path, tiny_model):
    """What Slicer's views render of a model (the Texts plugin's tooltip: the node's text) stays short; the
    model file is in a hidden data node. A cached file of the same size but other content (a resumed run's
    newer file) is not used: the node's own model is written again, checked by SHA-256."""
    scene, volume, segmentation = chest
    logic = LogicCore(scene, work_root=str(tmp_path / "work"))
    copy = tmp_path / "model copy.pt"
    shutil.copyfile(tiny_model, copy)
    model = logic.load_model(str(copy))
    assert len(model.GetText()) <= modelnode.DESCRIPTION_LIMIT and "right lung" in model.GetText()
    assert modelnode.payload_node(model).GetHideFromEditors()
    cached = logic.model_file(model)
    original = Path(cached).read_bytes()
    changed = bytearray(original)
    changed[-100] ^= 0xFF
    Path(cached).write_bytes(bytes(changed))  # same size, other content
    again = logic.model_file(model)
    assert Path(again).read_bytes() == original


def test_save_and_load_model_files_keep_the_nesting(chest, tmp_path, tiny_model):
    scene, volume, segmentation = chest
    logic = LogicCore(scene, work_root=str(tmp_path / "work"))
    model = logic.load_model(tiny_model)
    model.SetAttribute(attributes.NESTED, json.dumps({"right lung": ["left lung"]}))
    target = logic.save_model(model, str(tmp_path / "exported model.pt"))
    again = logic.load_model(target)
    assert model_nested(again) == {"right lung": ["left lung"]} and again is not model


# ------------------------------------------------------------------------------------------ item 8


def test_train_rasterises_each_case_at_most_once(two_cases, tmp_path, monkeypatch):
    scene, v1, s1, v2, s2 = two_cases
    s2.SetAndObserveTransformNodeID(scene.AddNewNodeByClass("vtkMRMLLinearTransformNode").GetID())  # S2: rasterised
    calls = []
    original = segment_masks
    monkeypatch.setattr(inputcheck, "segment_masks", lambda *a, **k: calls.append(a[1].GetName()) or original(*a, **k))
    c = controller(scene, tmp_path)
    c.set_setting("device", "cpu")
    job = c.train()  # check + export + start, as the Train button does
    job.cancel()
    assert calls == ["S2"] and job.check.rasterised == 1 and job.check.snapshots == 1  # S1: a copy of its layer
    assert "ready" in c.text["checkResultLabel"]  # the check shown is that same pass
    with pytest.raises(Cancelled):
        job.wait(timeout=30)


def big_ct_scene(n_segments=3, shape=(300, 512, 512)):
    """A 512 x 512 x 300 CT (int16) with ``n_segments`` nested box segments, as Slicer holds them."""
    scene = new_scene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "big CT")
    arr = np.full(shape, -1000, dtype=np.int16)
    arr[40:260, 80:430, 80:430] = 40
    from vtk.util import numpy_support

    image = vtk.vtkImageData()
    image.SetDimensions(shape[2], shape[1], shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(arr.ravel(), deep=True, array_type=vtk.VTK_SHORT))
    volume.SetAndObserveImageData(image)
    volume.SetSpacing(0.8, 0.8, 1.5)
    volume.CreateDefaultDisplayNodes()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "big labels")
    labels = np.zeros(shape, dtype=np.uint8)
    for s in range(n_segments):
        lo = 50 + 30 * s
        labels[lo:lo + 120, lo + 60:lo + 260, lo + 60:lo + 260] = s + 1
    limage = vtk.vtkImageData()
    limage.SetDimensions(shape[2], shape[1], shape[0])
    limage.GetPointData().SetScalars(numpy_support.numpy_to_vtk(labels.ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    labelmap.SetAndObserveImageData(limage)
    labelmap.SetSpacing(0.8, 0.8, 1.5)
    ensure_converter_rules()
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "big segmentation")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    scene.RemoveNode(labelmap)
    return scene, volume, segmentation


def test_gui_thread_time_from_train_to_the_child_starting(tmp_path):
    """Item 8's measurement: a 512 x 512 x 300 CT with 3 segments, one labeled case, the CT also unlabeled; the
    time ``PanelController.train`` (the Train button) takes on the GUI thread until the child process runs.
    The goal is under 2 s on a desktop (docs/slicer.md records the measurement); the bound here is loose
    because this 2-core test machine runs other work."""
    scene, volume, segmentation = big_ct_scene()
    c = controller(scene, tmp_path)
    assert pairs(c) == [("big CT", "big segmentation")] and len(c.checked_segments()) == 3
    c.set_unlabeled([volume])
    c.set_setting("device", "cpu")
    t0 = time.perf_counter()
    job = c.train()
    seconds = time.perf_counter() - t0
    try:
        while job.proc is None and not job.finished:  # written from a worker thread, checked on this one, then the child starts
            c.poll()
            time.sleep(0.02)
        assert job.proc is not None and job.status == "running"
        assert job.check.rasterised == 0 and job.check.snapshots == 1  # its labelmap layer copied, not rasterised
    finally:
        job.cancel()
    print(f"\nGUI-thread time from Train to the child starting (512x512x300, 3 segments): {seconds:.2f} s")
    (tmp_path / "measurement.txt").write_text(f"{seconds:.3f}\n")
    assert seconds < 10.0


# ------------------------------------------------------------------------------------------ item 9


def organ_and_lesion(scene, volume, segmentation):
    """Adds a "lesion" inside "left lung" (overlapping it, as Slicer's editor stores nested structures)."""
    arrays = labeled_arrays(volume, segmentation, ["left lung"])
    lesion = np.zeros_like(arrays.masks["left lung"])
    k, j, i = [int(np.median(a)) for a in np.nonzero(arrays.masks["left lung"])]
    lesion[k - 3:k + 3, j - 8:j + 8, i - 8:i + 8] = True
    lesion &= arrays.masks["left lung"]
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*volume.GetImageData().GetDimensions())
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(lesion.astype(np.uint8).ravel(), deep=True,
                                                                array_type=vtk.VTK_UNSIGNED_CHAR))
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    image.SetImageToWorldMatrix(m)
    segment = slicer.vtkSegment()  # its own labelmap: a separate layer, so it may overlap the lung (as the editor allows)
    segment.SetName("lesion")
    segment.SetColor(1.0, 1.0, 0.0)
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName(), image)
    segmentation.GetSegmentation().AddSegment(segment, "lesion")
    masks = segment_masks(volume, segmentation, ["left lung", "lesion"])
    assert masks["lesion"].sum() > 100 and (masks["lesion"] & masks["left lung"]).sum() == masks["lesion"].sum()
    return masks


def test_organ_and_lesion_a_later_segment_wins_and_predictions_nest_again(chest, tmp_path):
    scene, volume, segmentation = chest
    masks = organ_and_lesion(scene, volume, segmentation)
    names = ["left lung", "lesion"]
    res = check_inputs([(volume, segmentation)], names, [])
    assert not res.ok and "'left lung' and 'lesion' overlap" in res.errors[0] and "later segment" in res.errors[0]
    res, files = export_inputs([(volume, segmentation)], names, [], False, False, True, str(tmp_path))
    assert res.ok and any("'lesion', wins there" in m for m in res.infos)
    assert res.nested() == {"left lung": ["lesion"]}
    image, seg_path, _ = files.labeled[0]
    labels, missing = build_label_array(cio.read_segmentation(seg_path), names, cio.read_image(image), image)
    assert missing == [] and (labels[masks["lesion"]] == 2).all()  # the engine sees no overlap: the lesion won
    assert (labels[masks["left lung"] & ~masks["lesion"]] == 1).all()
    # a prediction (one label map, the later segment winning) is written back nested: the lung holds its lesion again
    predicted = cio.read_image(image)
    classes = [{k: v for k, v in c.items() if k != "terminology"} for c in res.classes()]  # the engine's (dict) terminology
    writers.write_seg_nrrd(str(tmp_path / "prediction.seg.nrrd"), labels, predicted, classes)
    node = import_segmentation(scene, str(tmp_path / "prediction.seg.nrrd"), volume, nested=res.nested())
    back = segment_masks(volume, node, names)
    assert np.array_equal(back["lesion"], masks["lesion"]) and np.array_equal(back["left lung"], masks["left lung"])
    plain = import_segmentation(scene, str(tmp_path / "prediction.seg.nrrd"), volume)  # without nesting: as predicted
    assert not (segment_masks(volume, plain, names)["left lung"] & masks["lesion"]).any()


def test_the_panel_offers_the_order_and_trains_with_it(chest, tmp_path):
    scene, volume, segmentation = chest
    organ_and_lesion(scene, volume, segmentation)
    c = controller(scene, tmp_path)
    for name, _, _ in c.segment_choices():
        c.set_segment_checked(name, name in ("left lung", "lesion"))
    c.move_segment("lesion", -10)  # to the top: then the lung would win and the lesion vanish
    assert c.checked_segments() == ["lesion", "left lung"]
    c.move_segment("lesion", +10)
    assert c.checked_segments() == ["left lung", "lesion"]
    assert c.view().enabled["moveSegmentDownButton"]
    with pytest.raises(CheckFailed, match="overlap"):
        c.train()
    assert "overlap" in c.text["checkResultLabel"]
    c.set_setting("later_wins", True)
    for name, value in (("length_mode", "iterations"), ("iterations", 6), ("width", 4), ("patch_size", [64, 64, 16]),
                        ("device", "cpu")):
        c.set_setting(name, value)
    c.train()
    wait_for(c, "train")
    model = c.model()
    assert model_nested(model) == {"left lung": ["lesion"]} and "left lung contains lesion" in c.model_text()


# ------------------------------------------------------------------------------------------ item 10


def test_the_panel_trains_for_minutes_by_default_iterations_for_experts(chest, tmp_path):
    scene, volume, segmentation = chest
    c = controller(scene, tmp_path)
    assert c.setting("length_mode") == "minutes" and c.view().visible["minutesSpinBox"] and not c.view().visible["iterationsSpinBox"]
    values = c.train_values()
    assert values["minutes"] == PANEL_DEFAULTS["minutes"] and "iterations" not in values
    plan = c.core.prepare_training(c.cases(), [], LUNGS, **values)
    args = cli.build_parser().parse_args(plan["args"])
    request = cli.build_train_request(args)  # what the child will train: about 10 minutes, iterations planned
    assert request.config.minutes == 10.0
    shutil.rmtree(plan["run_dir"])
    c.set_setting("length_mode", "iterations")
    c.set_setting("iterations", 40)
    c.set_setting("minutes", 3.0)  # kept for later, not used in iterations mode
    values = c.train_values()
    assert values["iterations"] == 40 and "minutes" not in values
    plan = c.core.prepare_training(c.cases(), [], LUNGS, **values)
    request = cli.build_train_request(cli.build_parser().parse_args(plan["args"]))
    assert request.config.iterations == 40 and request.config.minutes is None
    assert not c.view().visible["minutesSpinBox"] and c.view().visible["iterationsSpinBox"]
    shutil.rmtree(plan["run_dir"])
    # the console: minutes unless iterations are given
    assert train_config({}) == {"minutes": DEFAULT_MINUTES} and train_config({"minutes": 2.5}) == {"minutes": 2.5}


# ------------------------------------------------------------------------------------------ issue 16 (settings)


def test_a_new_train_config_field_reaches_the_panel_and_the_console_without_other_edits(chest, tmp_path, monkeypatch):
    scene, volume, segmentation = chest
    extended = dataclasses.make_dataclass(
        "TrainConfig", [("warmup_fraction", float, dataclasses.field(default=0.0, metadata={"flag": "--warmup-fraction", "help": "x"}))],
        bases=(settings.TrainConfig,))
    monkeypatch.setattr(settings, "TrainConfig", extended)
    c = controller(scene, tmp_path)
    assert c.is_setting("warmup_fraction") and c.default("warmup_fraction") == 0.0
    c.set_setting("warmup_fraction", 0.25)  # what the widget does for a widget whose cpclSetting is "warmup_fraction"
    assert c.view().settings["warmup_fraction"] == 0.25 and c.train_values()["warmup_fraction"] == 0.25
    plan = c.core.prepare_training(c.cases(), [], LUNGS, **c.train_values())
    with open(plan["args"][plan["args"].index("--config") + 1], encoding="utf-8") as f:
        assert json.load(f)["warmup_fraction"] == 0.25
    shutil.rmtree(plan["run_dir"])
    console = c.core.prepare_training([(volume, segmentation)], [], LUNGS, warmup_fraction=0.5)  # the console's keyword
    assert console["config"]["warmup_fraction"] == 0.5
    shutil.rmtree(console["run_dir"])
    with pytest.raises(InputError, match="warmup_fraction must be a number"):
        train_config({"warmup_fraction": "a lot"})


def test_the_module_can_point_the_child_at_a_preprocessing_cache_and_its_exports_hit_it(chest, tmp_path):
    """``cache_dir`` (a module setting) reaches the child as ``--cache-dir``; the same node exported for two runs
    has the same content identity, so the second run reuses the first one's preprocessed cases."""
    from CPCLSegmentLib.prepcache import content_digest

    scene, volume, segmentation = chest
    c = controller(scene, tmp_path)
    plans = [c.core.prepare_training([(volume, segmentation)], [], LUNGS, cache_dir=str(tmp_path / "cache")) for _ in range(2)]
    try:
        request = cli.build_train_request(cli.build_parser().parse_args(plans[0]["args"]))
        assert request.options.cache_dir == str(tmp_path / "cache")
        for offset in (1, 2):  # the image, the segmentation
            files = [p["args"][p["args"].index("--labeled") + offset] for p in plans]
            assert files[0] != files[1] and content_digest(files[0]) == content_digest(files[1])
    finally:
        for p in plans:
            shutil.rmtree(p["run_dir"])


# ------------------------------------------------------------------------------------------ issue 12 (safety net)


def test_with_a_held_out_case_the_panel_checks_the_unlabeled_volumes_help_when_asked(two_cases, tmp_path):
    """The comparison with supervised-only is off until asked on every surface (one default, ``RunOptions``); asked, with a held-out case and unlabeled volumes the child gets
    ``--compare-supervised``, so the run keeps whichever model scores better on the held-out case."""
    scene, v1, s1, v2, s2 = two_cases
    c = controller(scene, tmp_path)
    assert c.setting("compare_supervised") is False and not c.view().enabled["compareSupervisedCheckBox"]  # no held-out case
    c.set_unlabeled([v2])

    def child_request(**extra):
        plan = c.core.prepare_training(c.cases(), c.unlabeled(), LUNGS, **dict(c.train_values(), **extra))
        try:
            return cli.build_train_request(cli.build_parser().parse_args(plan["args"]))
        finally:
            shutil.rmtree(plan["run_dir"])

    c.set_setting("compare_supervised", True)
    assert not child_request().options.compare_supervised  # nothing to compare on
    c.set_setting("hold_out_last", True)
    assert c.view().enabled["compareSupervisedCheckBox"]
    request = child_request()
    assert request.options.compare_supervised and len(request.validation) == 1 and request.unlabeled
    assert not child_request(method="supervised").options.compare_supervised  # nothing to compare against
    c.set_setting("compare_supervised", False)
    assert not child_request().options.compare_supervised  # the user turned it off
    c.set_setting("compare_supervised", True)
    c.set_unlabeled([])
    assert not child_request().options.compare_supervised  # no unlabeled volumes: supervised-only is what trains
    assert not compares_supervised(dict(module_settings(), hold_out_last=True), {}, ["a volume"])  # the console's default
    assert compares_supervised(dict(module_settings(), hold_out_last=True, compare_supervised=True), {}, ["a volume"])


def test_segment_names_are_the_union_of_every_case_and_each_case_says_what_it_lacks(two_cases, tmp_path):
    scene, v1, s1, v2, s2 = two_cases
    s1.GetSegmentation().RemoveSegment(find_segment_id(s1, "right lung"))  # the first case lacks one segment
    res = check_inputs([(v1, s1), (v2, s2)])
    assert "right lung" in res.segments and len(res.segments) == 7  # not only the first case's six
    assert any("'right lung' is missing from 'S1'" in w for w in res.warnings)
    c = controller(scene, tmp_path)
    c.add_case(v1, s1)
    c.add_case(v2, s2)
    assert "right lung" in [name for name, _, _ in c.segment_choices()]


def test_a_pre_filled_label_next_that_fails_to_start_leaves_nothing_to_open(chest, tmp_path, monkeypatch):
    """Otherwise the next plain Segment would open the Segment Editor over the wrong volume."""
    scene, volume, segmentation = chest
    c = controller(scene, tmp_path)
    monkeypatch.setattr(c, "model", lambda: segmentation)  # any node: the start below fails before using it
    c.rank_rows, c.selected_rank_row = [{"volume": volume}], 0
    c.set_setting("prefill", True)

    def fail(*args, **kwargs):
        raise InputError("the segmentation could not start")

    monkeypatch.setattr(c, "segment", fail)
    with pytest.raises(InputError, match="could not start"):
        c.label_next()
    assert c.open_in_editor is None
