"""The Slicer module at a study's scale, against slicer-core: the user's nodes are never modified by an export, Label
next reuses its nodes, a sequence's proxy volume is refused, one training at a time across console and panel, and the
GUI thread's work per click. Skipped where slicer-core is not installed (Python >= 3.10)."""

import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core; Python >= 3.10)")
vtk = pytest.importorskip("vtk")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CPCLSegment"))

from CPCLSegmentLib.errors import Cancelled, InputError  # noqa: E402
from CPCLSegmentModuleLib import panel  # noqa: E402
from CPCLSegmentModuleLib.export import export_inputs, export_segmentation, export_volume  # noqa: E402
from CPCLSegmentModuleLib.logic import LogicCore  # noqa: E402
from CPCLSegmentModuleLib.nodes import ensure_converter_rules, segment_masks, segment_names, volume_array  # noqa: E402

from slicer_scene import new_scene, one_thread_env, synthetic_volume  # noqa: E402

pytestmark = pytest.mark.slicer

SURFACE = "Closed surface"
LABELMAP = "Binary labelmap"


def controller(scene, tmp_path):
    return panel.PanelController(LogicCore(scene, env=one_thread_env(), work_root=str(tmp_path / "work")))


def small_volume(scene, name="small", shape=(40, 48, 56), spacing=2.0):
    """A synthetic int16 volume (numpy ``(k, j, i)`` = ``shape``) with ``spacing`` mm voxels, in ``scene``."""
    node = synthetic_volume(scene, name, shape)
    node.SetSpacing(spacing, spacing, spacing)
    return node


def small_case(scene, name="small", shape=(40, 48, 56)):
    """A synthetic volume with a segmentation of one box segment ("box") drawn on it."""
    from vtk.util import numpy_support

    volume = small_volume(scene, name, shape)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[10:30, 12:36, 14:42] = 1
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{name} labels")
    image = vtk.vtkImageData()
    image.SetDimensions(shape[2], shape[1], shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(labels.ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    labelmap.SetAndObserveImageData(image)
    labelmap.SetSpacing(*volume.GetSpacing())
    ensure_converter_rules()
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} segmentation")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    scene.RemoveNode(labelmap)
    segmentation.GetSegmentation().GetNthSegment(0).SetName("box")
    return volume, segmentation


def surface_only(scene, volume):
    """A segmentation whose source is two closed surfaces (spheres, as from a model / STL import): no labelmap."""
    ensure_converter_rules()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "surfaces")
    node.SetSourceRepresentationToClosedSurface()
    for name, center in (("left", (30.0, 48.0, 40.0)), ("right", (80.0, 48.0, 40.0))):
        sphere = vtk.vtkSphereSource()
        sphere.SetCenter(*center)
        sphere.SetRadius(15.0)
        sphere.SetThetaResolution(24)
        sphere.SetPhiResolution(24)
        sphere.Update()
        node.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), name)
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    seg = node.GetSegmentation()
    assert not seg.ContainsRepresentation(LABELMAP) and seg.GetSourceRepresentationName() == SURFACE
    return node


def surface_state(node):
    """What an export must not change: source, representations, each segment's surface points, the node's MTime."""
    from vtk.util import numpy_support

    seg = node.GetSegmentation()
    state = [seg.GetSourceRepresentationName(), seg.ContainsRepresentation(LABELMAP)]
    for i in range(seg.GetNumberOfSegments()):
        poly = seg.GetNthSegment(i).GetRepresentation(SURFACE)
        state.append(numpy_support.vtk_to_numpy(poly.GetPoints().GetData()).sum())
    return state, node.GetMTime(), seg.GetMTime()


def test_a_closed_surface_segmentation_is_exported_from_a_copy_the_user_s_node_unchanged(tmp_path):
    scene = new_scene()
    volume = small_volume(scene)
    surfaces = surface_only(scene, volume)
    names = ["left", "right"]
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 8.0)  # 8 mm to the right: the masks must follow the surfaces' transform
    transform.SetMatrixTransformToParent(m)
    surfaces.SetAndObserveTransformNodeID(transform.GetID())
    before = surface_state(surfaces)

    masks = segment_masks(volume, surfaces, names)
    export_segmentation(volume, surfaces, names, str(tmp_path / "out.seg.nrrd"))
    check, files = export_inputs([(volume, surfaces)], names, [], False, False, False, str(tmp_path / "inputs"))

    assert surface_state(surfaces) == before  # source, representations, content and the node untouched
    assert check.ok and len(files.labeled) == 1, check.errors
    # the reference: the user's node converted the old way (in place, on a scene copy under the same transform)
    reference = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reference")
    reference.GetSegmentation().DeepCopy(surfaces.GetSegmentation())
    reference.SetAndObserveTransformNodeID(transform.GetID())
    reference.GetSegmentation().CreateRepresentation(LABELMAP)
    expected = segment_masks(volume, reference, names)
    for name in names:
        assert masks[name].sum() > 500
        agree = (masks[name] == expected[name]).mean()
        assert agree > 0.99, (name, agree)
    surfaces.SetAndObserveTransformNodeID(None)
    moved_back = segment_masks(volume, surfaces, names)  # untransformed: the masks did move
    assert not np.array_equal(moved_back["left"], masks["left"])


def test_label_next_again_reuses_the_volume_s_uncertainty_map_and_segmentation(tmp_path, monkeypatch):
    scene = new_scene()
    volume, other = small_volume(scene, "CT 1"), small_volume(scene, "CT 2")
    c = controller(scene, tmp_path)
    monkeypatch.setattr(c, "model", lambda: "model")  # the segments a new segmentation gets, without a trained model
    monkeypatch.setattr(c.core, "model_classes", lambda model: [{"name": "background"}, {"name": "liver", "color": [1, 0, 0]}])
    maps = []
    for n in range(2):
        path = tmp_path / f"map-{n}.nrrd"
        export_volume(small_volume(scene, f"map {n}", spacing=2.0 + n), str(path))  # told apart by their spacing
        maps.append(str(path))
    scene.RemoveNode(scene.GetFirstNodeByName("map 0"))
    scene.RemoveNode(scene.GetFirstNodeByName("map 1"))
    volumes_before = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")

    def label_next(volume, uncertainty):
        c.rank_rows = [{"rank": 1, "volume": volume, "score": 0.5, "uncertainty": uncertainty}]
        c.select_rank_row(0)
        c.label_next()
        effects = c.take_effects()
        return ([v for k, v in effects if k == "show"][0][1], [v for k, v in effects if k == "edit"][0][0])

    heat, seg = label_next(volume, maps[0])
    assert heat.GetSpacing() == (2.0, 2.0, 2.0)
    seg.GetSegmentation().AddEmptySegment("mine", "my own segment")  # the user's edit
    c.set_setting("prefill", True)  # even so: the volume's segmentation is reopened, no pre-fill replaces it
    heat2, seg2 = label_next(volume, maps[1])  # a new ranking's map for the same volume
    assert heat2 is heat and seg2 is seg and "my own segment" in segment_names(seg2) and not c.busy("segment")
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes_before + 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert heat.GetSpacing() == (3.0, 3.0, 3.0)  # the new map was read into the reused node
    c.set_setting("prefill", False)
    heat3, seg3 = label_next(other, maps[0])  # another volume: its own map and segmentation
    assert heat3 is not heat and seg3 is not seg
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2


def test_one_training_at_a_time_a_blocking_console_train_refuses_the_panel_s(tmp_path):
    """A blocking console ``train()`` keeps Slicer's window alive (its tick runs the event loop), so the panel's
    Train can be clicked meanwhile: it is refused, whichever ``LogicCore`` (panel, console, a script's) started the
    first one."""
    from CPCLSegmentModuleLib.trainrun import refuse_second_training

    scene = new_scene()
    volume, segmentation = small_case(scene)
    c = controller(scene, tmp_path)  # the panel, with its own LogicCore
    seen = {}

    def tick():  # while the console's train() blocks: the user clicks the panel's Train
        if "error" in seen:
            return
        try:
            c.train()
            seen["error"] = None
        except InputError as e:
            seen["error"] = str(e)
        for job in (c.jobs["train"], LogicCore.training):
            if job is not None:
                job.cancel(block=False)

    console = LogicCore(scene, env=one_thread_env(), work_root=str(tmp_path / "console"), tick=tick)
    with pytest.raises(Cancelled):
        console.train([(volume, segmentation)], [], ["box"], iterations=500, width=4, patch_size=[32, 32, 16], device="cpu")
    assert seen["error"] is not None and "training is running already" in seen["error"], seen
    assert c.jobs["train"] is None
    refuse_second_training(LogicCore.training)  # ended: the next one may start


def sequence_with_proxy(scene, frame_volume):
    """A two-frame sequence of ``frame_volume`` and a browser showing it: the browser adds a proxy *copy* to the scene
    (NodeAdded first, the browser's reference to it after), as loading a 4-D volume does."""
    for cls in (slicer.vtkMRMLSequenceNode, slicer.vtkMRMLSequenceBrowserNode):
        scene.RegisterNodeClass(cls())
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "cine")
    for t in ("0", "1"):
        sequence.SetDataNodeAtValue(frame_volume, t)
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "cine browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    proxy = browser.AddProxyNode(frame_volume, sequence, True)
    assert proxy is not None and browser.IsProxyNodeID(proxy.GetID())
    return browser, proxy


def test_a_sequence_s_shown_frame_is_not_ticked_and_is_refused_with_a_message_naming_it(tmp_path):
    scene = new_scene()
    volume, segmentation = small_case(scene, "CT")
    c = controller(scene, tmp_path)
    assert [case.volume for case in c.cases()] == [volume]  # the panel has looked at the scene: new volumes get ticked
    frame = small_volume(new_scene(), "frame")  # a volume outside this scene: the sequence's data
    slicer.mrmlScene = scene
    browser, proxy = sequence_with_proxy(scene, frame)
    plain = small_volume(scene, "another CT")
    assert c.unlabeled() == [plain]  # the plain volume is ticked, the sequence's proxy is not
    assert all(v.GetID() != proxy.GetID() for v in c.unlabeled())
    assert proxy.GetID() not in c.view().unlabeled

    c.set_unlabeled([plain, proxy])  # ticked by hand: refused, with the node and the sequence named
    check = c.check()
    assert not check.ok
    message = " ".join(check.errors)
    assert proxy.GetName() in message and "cine browser" in message and "frame" in message
    with pytest.raises(InputError, match="sequence"):
        c.core.start_segmentation("a model", [proxy])


# ------------------------------------------------------------------------------------ the GUI thread's work per click


def loaded(scene, path, name):
    """A volume read from ``path`` through a storage node of its own (as File > Add data leaves it)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node)
    return node


def test_a_volume_unchanged_since_loading_is_handed_over_as_its_file_any_other_is_written_later(tmp_path):
    from CPCLSegmentLib import io as cio
    from CPCLSegmentModuleLib.handoff import Handoff, original_file

    scene = new_scene()
    made = small_volume(scene, "made")
    export_volume(made, str(tmp_path / "ct.nrrd"))
    volume = loaded(scene, tmp_path / "ct.nrrd", "CT")
    assert original_file(volume) == str(tmp_path / "ct.nrrd") and original_file(made) is None
    handoff = Handoff(str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    assert handoff.volume(volume, "v0") == str(tmp_path / "ct.nrrd") and handoff.writes == []
    path = handoff.volume(made, "v1")
    assert path == str(tmp_path / "run" / "v1.nrrd") and len(handoff.writes) == 1 and not (tmp_path / "run" / "v1.nrrd").exists()
    handoff.write_all()
    expected = cio.read_image(str(tmp_path / "ct.nrrd"))  # what Slicer's own writer made of the same node
    written = cio.read_image(path)
    import SimpleITK as sitk

    assert np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(expected))
    assert np.allclose(written.GetDirection(), expected.GetDirection()) and np.allclose(written.GetOrigin(), expected.GetOrigin())
    assert np.allclose(written.GetSpacing(), expected.GetSpacing())
    first = Path(path).read_bytes()
    again = Handoff(str(tmp_path / "run"))
    again.volume(made, "v1")
    again.write_all()
    assert Path(path).read_bytes() == first  # the same node twice: the same bytes (the preprocessing cache's identity)

    volume.SetSpacing(3.0, 3.0, 3.0)  # changed since loading: written like any other
    assert original_file(volume) is None
    other = loaded(scene, tmp_path / "ct.nrrd", "CT again")
    volume_array(other)  # reading leaves it unchanged
    assert original_file(other) is not None
    other.GetImageData().Modified()  # what slicer.util.arrayFromVolumeModified does after an edit
    assert original_file(other) is None
    third = loaded(scene, tmp_path / "ct.nrrd", "CT under a transform")
    third.SetAndObserveTransformNodeID(scene.AddNewNodeByClass("vtkMRMLLinearTransformNode").GetID())
    assert original_file(third) is None


def test_the_train_click_writes_no_volume_on_the_gui_thread_and_the_child_starts_once_the_files_are_written(tmp_path):
    scene = new_scene()
    made = small_volume(scene, "made")
    export_volume(made, str(tmp_path / "ct.nrrd"))
    scene.RemoveNode(made)
    c = controller(scene, tmp_path)
    volume = loaded(scene, tmp_path / "ct.nrrd", "CT")
    in_memory, segmentation = small_case(scene, "drawn")
    c.add_case(in_memory, segmentation)
    c.set_unlabeled([volume, in_memory])
    for name, value in (("length_mode", "iterations"), ("iterations", 500), ("width", 4), ("patch_size", [32, 32, 16]),
                        ("device", "cpu")):
        c.set_setting(name, value)
    job = c.train()
    inputs = Path(job.work_dir) / "inputs"
    assert job.args[job.args.index("--unlabeled") + 1] == str(tmp_path / "ct.nrrd")  # handed over as it is
    labeled_image = job.args[job.args.index("--labeled") + 1]
    assert Path(labeled_image).parent == inputs and labeled_image.endswith("labeled-000.nrrd")
    deadline = time.time() + 120
    while job.proc is None and not job.finished:  # written from a worker thread, checked on this one, then the child starts
        assert time.time() < deadline
        c.poll()
        time.sleep(0.02)
    assert job.proc is not None and sorted(p.name for p in inputs.iterdir()) == ["labeled-000.nrrd", "labeled-000.seg.nrrd"]
    assert not list(inputs.glob("*.partial"))
    job.cancel()
    while c.busy("train"):
        c.poll()
        time.sleep(0.05)
    assert (tmp_path / "ct.nrrd").exists()  # the user's file is never removed with the run folder


def test_a_job_cancelled_while_its_files_are_written_never_starts_its_child_and_a_failed_write_fails_it(tmp_path):
    from CPCLSegmentModuleLib.handoff import PreparedJob

    gate = []

    def slow(cancelled):
        while not cancelled():
            time.sleep(0.01)
        gate.append("saw cancel")

    job = PreparedJob(["probe"], module="CPCLSegmentLib.childinfo", env=one_thread_env(), prepare=slow).start()
    assert job.status == "running" and job.proc is None
    job.cancel(block=False)
    with pytest.raises(Cancelled):
        job.wait(timeout=30)
    assert job.proc is None and gate == ["saw cancel"]

    def broken(cancelled):
        raise InputError("cannot write volume 'CT' to /nowhere: disk full")

    job = PreparedJob(["probe"], module="CPCLSegmentLib.childinfo", env=one_thread_env(), prepare=broken).start()
    from CPCLSegmentLib.jobs import JobError

    with pytest.raises(JobError, match="disk full"):
        job.wait(timeout=30)
    assert job.proc is None and job.status == "failed"


def test_each_segmentation_result_becomes_a_node_as_the_child_reports_it_and_a_cancel_removes_them(tmp_path, monkeypatch):
    import threading

    from CPCLSegmentModuleLib import results

    read_on = []
    read_result = results.read_result

    def recorded(path):
        read_on.append(threading.current_thread())
        return read_result(path)

    monkeypatch.setattr(results, "read_result", recorded)
    scene = new_scene()
    volumes = [small_volume(scene, f"CT {n}") for n in range(2)]
    c = controller(scene, tmp_path)
    model = tmp_path / "placeholder.pt"
    model.write_bytes(b"not read by the click")
    c.model = lambda: str(model)
    job = c.segment(volumes)
    _, seg = small_case(scene, "result source")
    result = tmp_path / "result-0.seg.nrrd"
    export_segmentation(volumes[0], seg, ["box"], str(result))
    before = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    job._queue.put({"event": "predict", "index": 1, "of": 2, "image": "CT 0", "output": str(result)})  # the child's event

    def unread(*args):
        raise AssertionError("the GUI thread read the result file")

    monkeypatch.setattr(slicer, "vtkMRMLSegmentationStorageNode", unread)
    deadline = time.time() + 60
    while scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before:  # read on a worker, built on a later poll
        c.poll()
        assert time.time() < deadline
        time.sleep(0.02)
    monkeypatch.undo()
    assert read_on and read_on[0] is not threading.main_thread()
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before + 1 and c.busy("segment")
    c.cancel("segment")
    deadline = time.time() + 60
    while c.busy("segment"):
        c.poll()
        assert time.time() < deadline
        time.sleep(0.05)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before  # cancelled: no result left behind


@pytest.mark.slow
def test_the_gui_thread_benchmark_runs_small(tmp_path):
    """``bench/gui_thread.py --small``: every click timed, every job cancelled, the results written."""
    import json
    import subprocess

    from conftest import child_env

    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gui_thread.py"), "--small", "--out", str(tmp_path)],
                          env=child_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = json.loads((tmp_path / "gui_thread_small.json").read_text())["after"]
    assert [(r["volumes"], r["source"]) for r in run["rows"]] == [(1, "loaded from files"), (2, "loaded from files"), (1, "in memory")]
    for row in run["rows"]:
        for key in ("train_click_s", "train_until_child_s", "segment_click_s", "segment_until_child_s"):
            assert 0 <= row[key] < 60, (key, row)
    assert run["import_one_result_s"] > 0 and "| 2 | loaded from files |" in (tmp_path / "gui_thread_small.md").read_text()


def test_a_result_cropped_to_its_segments_reads_into_the_same_segments_on_the_volume_s_grid(tmp_path):
    """The child writes each result as only the box around its segments (``--crop-to-segments``): Slicer reads a file a
    fraction of the size (the GUI-thread cost of each result) into the same voxels, names and colours on the volume's
    grid as the whole-grid file."""
    import SimpleITK as sitk

    from CPCLSegmentLib.writers import write_seg_nrrd
    from CPCLSegmentModuleLib.results import import_segmentation

    scene = new_scene()
    shape = (40, 48, 56)
    volume = small_volume(scene, "CT", shape)
    export_volume(volume, str(tmp_path / "ct.nrrd"))
    reference = sitk.ReadImage(str(tmp_path / "ct.nrrd"))
    labels = np.zeros(shape, dtype=np.int16)
    labels[5:12, 20:30, 31:50] = 1
    labels[9:17, 22:26, 40:44] = 2
    classes = [{"name": "background", "label_value": 0}, {"name": "liver", "color": [0.8, 0.3, 0.2], "label_value": 1},
               {"name": "tumour", "color": [0.1, 0.9, 0.1], "label_value": 2},
               {"name": "spleen", "color": [0.2, 0.2, 0.9], "label_value": 3}]  # empty: still listed
    full, cropped = str(tmp_path / "full.seg.nrrd"), str(tmp_path / "cropped.seg.nrrd")
    write_seg_nrrd(full, labels, reference, classes, compression_level=0)
    write_seg_nrrd(cropped, labels, reference, classes, compression_level=0, crop=True)
    assert Path(cropped).stat().st_size < Path(full).stat().st_size / 20
    nodes = [import_segmentation(scene, path, volume) for path in (full, cropped)]
    seen = []
    for node in nodes:
        seg = node.GetSegmentation()
        names = segment_names(node)
        masks = segment_masks(volume, node, names)
        seen.append((names, [tuple(seg.GetNthSegment(i).GetColor()) for i in range(seg.GetNumberOfSegments())],
                     {n: np.flatnonzero(m).tolist() for n, m in masks.items()}))
    assert seen[0] == seen[1] and seen[1][0] == ["liver", "tumour", "spleen"]
    assert np.array_equal(segment_masks(volume, nodes[1], ["liver"])["liver"], labels == 1)
    c = controller(scene, tmp_path)
    c.model = lambda: full  # not read by the click
    job = c.segment([volume])
    assert "--crop-to-segments" in job.args
    c.cancel("segment")
    while c.busy("segment"):
        c.poll()
        time.sleep(0.05)


def written_like_slicer_writes(node, path, tmp_path):
    """Whether the .nrrd at ``path`` holds ``node``'s voxels and geometry as Slicer's own writer writes them now."""
    import SimpleITK as sitk
    from CPCLSegmentLib import io as cio

    export_volume(node, str(tmp_path / "expected.nrrd"))
    expected, written = cio.read_image(str(tmp_path / "expected.nrrd")), cio.read_image(str(path))
    return (np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(expected))
            and np.allclose(written.GetDirection(), expected.GetDirection()) and np.allclose(written.GetOrigin(), expected.GetOrigin())
            and np.allclose(written.GetSpacing(), expected.GetSpacing()))


def test_a_volume_made_in_the_scene_is_not_copied_at_the_click_and_one_edited_while_written_is_written_again(tmp_path, monkeypatch):
    import threading

    from vtk.util import numpy_support

    from CPCLSegmentModuleLib import handoff as handoff_module
    from CPCLSegmentModuleLib.handoff import Handoff, PreparedJob

    scene = new_scene()
    made = small_volume(scene, "made")
    voxels = numpy_support.vtk_to_numpy(made.GetImageData().GetPointData().GetScalars())
    handoff = Handoff(str(tmp_path / "run"))
    path = handoff.volume(made, "v0")
    assert np.shares_memory(handoff.live[0].voxels, voxels)  # a view of the node's voxels: nothing copied at the click
    halfway, edited, first = threading.Event(), threading.Event(), []
    write_voxels = handoff_module._write_voxels

    def paused(f, data):  # the first write stops halfway until the GUI thread has edited the voxels
        flat = memoryview(data).cast("B")
        if first:
            return write_voxels(f, data)
        first.append(1)
        f.write(flat[: len(flat) // 2])
        halfway.set()
        assert edited.wait(30)
        f.write(flat[len(flat) // 2:])

    monkeypatch.setattr(handoff_module, "_write_voxels", paused)
    job = PreparedJob(["probe"], module="CPCLSegmentLib.childinfo", env=one_thread_env(), prepare=handoff.write_all,
                      verify=handoff.verify).start()
    assert halfway.wait(30)
    voxels[: voxels.size // 4] += 7  # an edit of the half already written, as slicer.util.arrayFromVolume allows,
    made.GetImageData().Modified()  # then what slicer.util.arrayFromVolumeModified does
    edited.set()
    deadline = time.time() + 60
    while job.proc is None and not job.finished:  # the GUI thread's poll compares, the worker writes it again
        assert time.time() < deadline
        job.poll()
        time.sleep(0.02)
    assert job.proc is not None and handoff.rewritten == ["made"]
    job.cancel()
    assert written_like_slicer_writes(made, path, tmp_path)  # the edited voxels, never a mix of before and after


def test_a_volume_given_other_voxels_or_geometry_before_the_check_is_written_again_a_removed_node_is_not(tmp_path):
    import vtk

    from CPCLSegmentModuleLib.handoff import Handoff

    scene = new_scene()
    moved, replaced, removed, kept, emptied = (small_volume(scene, name) for name in ("moved", "replaced", "removed", "kept", "emptied"))
    handoff = Handoff(str(tmp_path / "run"))
    paths = [handoff.volume(v, v.GetName()) for v in (moved, replaced, removed, kept)]
    handoff.write_all()
    at_click = volume_array(removed)
    moved.SetSpacing(3.0, 3.0, 3.0)
    other = vtk.vtkImageData()
    other.DeepCopy(replaced.GetImageData())
    other.GetPointData().GetScalars().SetValue(0, 1234)
    replaced.SetAndObserveImageData(other)
    scene.RemoveNode(removed)
    assert handoff.verify() == ["moved", "replaced"] and len(handoff.writes) == 2
    handoff.write_all()
    assert handoff.verify() == []
    for node, path in ((moved, paths[0]), (replaced, paths[1]), (kept, paths[3])):
        assert written_like_slicer_writes(node, path, tmp_path), node.GetName()
    from CPCLSegmentLib import io as cio
    import SimpleITK as sitk

    assert np.array_equal(sitk.GetArrayFromImage(cio.read_image(paths[2])), at_click)  # its voxels, kept alive

    handoff.volume(emptied, "emptied")
    handoff.write_all()
    emptied.SetAndObserveImageData(None)
    with pytest.raises(InputError, match="'emptied' has no voxels"):
        handoff.verify()


def test_a_volume_that_keeps_changing_while_written_fails_the_job_naming_it(tmp_path):
    from CPCLSegmentLib.jobs import JobError
    from CPCLSegmentModuleLib.handoff import MAX_REWRITES, Handoff, PreparedJob

    scene = new_scene()
    made = small_volume(scene, "made")
    handoff = Handoff(str(tmp_path / "run"))
    handoff.volume(made, "v0")

    def edited_then_verified():  # an edit on the GUI thread before every check
        made.GetImageData().Modified()
        return handoff.verify()

    job = PreparedJob(["probe"], module="CPCLSegmentLib.childinfo", env=one_thread_env(), prepare=handoff.write_all,
                      verify=edited_then_verified).start()
    with pytest.raises(JobError, match="'made' kept changing while written"):
        job.wait(timeout=60)
    assert job.proc is None and handoff.rewritten == ["made"] * MAX_REWRITES
