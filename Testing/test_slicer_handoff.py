"""Labeled segmentations handed to the child as their ``.seg.nrrd`` (unchanged since loading, no transform, the
selected segments in one layer) or as a copy of their stored labelmap layer (edited or made in the scene): which ones,
that the Train click then rasterises none of them, that the child's labels on the volume's grid are the ones the
GUI-thread export gives, and that the segment names are every case's.
Skipped where slicer-core is not installed (Python >= 3.10)."""

import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core; Python >= 3.10)")
vtk = pytest.importorskip("vtk")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CPCLSegment"))

from CPCLSegmentLib import io as cio  # noqa: E402
from CPCLSegmentLib.labels import build_label_array  # noqa: E402
from CPCLSegmentModuleLib import inputcheck, panel  # noqa: E402
from CPCLSegmentModuleLib.export import export_inputs, export_segmentation, export_volume  # noqa: E402
from CPCLSegmentModuleLib.handoff import original_segmentation  # noqa: E402
from CPCLSegmentModuleLib.logic import LogicCore  # noqa: E402
from CPCLSegmentModuleLib.nodes import ensure_converter_rules, segment_names, world_ijk_to_ras  # noqa: E402
from CPCLSegmentModuleLib.segsnapshot import snapshot_segmentation  # noqa: E402

from slicer_scene import fingerprint, load_segmentation, load_volume, new_scene, one_thread_env, synthetic_volume  # noqa: E402

pytestmark = pytest.mark.slicer

LUNGS = ["right lung", "left lung"]


@pytest.fixture
def loaded_chest(ct_path, seg_path):
    """The chest CT and its segmentation read as File > Add data reads them (storage nodes in the scene)."""
    scene = new_scene()
    volume = load_volume(scene, ct_path, "CT", as_slicer_loads=True)
    segmentation = load_segmentation(scene, seg_path, "CT segmentation", volume=volume, as_slicer_loads=True)
    return scene, volume, segmentation


def engine_labels(seg_file, names, volume, folder, stem):
    """The class labels the child builds from ``seg_file`` on ``volume``'s grid (the volume as the child gets it)."""
    image_path = str(folder / f"{stem}.nrrd")
    export_volume(volume, image_path)
    image = cio.read_image(image_path)
    labels, missing = build_label_array(cio.read_segmentation(seg_file), names, image, image_path)
    return labels, missing


def test_a_segmentation_unchanged_since_loading_is_handed_over_as_its_file(loaded_chest, seg_path, overlapping_seg_path):
    scene, volume, segmentation = loaded_chest
    names = segment_names(segmentation)
    assert original_segmentation(segmentation, names) == seg_path
    segmentation.GetSegmentation().GetNthSegment(0).SetColor(1.0, 0.0, 0.0)  # recoloured: the file no longer says it
    assert original_segmentation(segmentation, names) is None
    again = load_segmentation(scene, seg_path, "again", volume=volume, as_slicer_loads=True)
    again.SetAndObserveTransformNodeID(scene.AddNewNodeByClass("vtkMRMLLinearTransformNode").GetID())
    assert not again.GetModifiedSinceRead() and original_segmentation(again, names) is None  # moved, not modified
    painted = load_segmentation(scene, seg_path, "painted", volume=volume, as_slicer_loads=True)
    image = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(painted, "Segment_1", image)
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(image, painted, "Segment_1")  # as an editor effect
    assert original_segmentation(painted, names) is None
    unscened = load_segmentation(scene, seg_path, "no storage node", volume=volume)
    assert original_segmentation(unscened, names) is None
    overlapping = load_segmentation(scene, overlapping_seg_path, "overlapping", volume=volume, as_slicer_loads=True)
    assert original_segmentation(overlapping, LUNGS) == overlapping_seg_path  # one layer: nothing overlaps
    assert original_segmentation(overlapping, LUNGS + ["overlapping sphere"]) is None  # two layers: the GUI check settles it


def test_the_child_reads_the_labels_the_gui_thread_export_gives(loaded_chest, tmp_path):
    """Engine labels from the original file == engine labels from the GUI-thread export (both nearest neighbour), on the
    volume's own grid, on a cropped and shifted grid, and on a coarser grid not aligned with the segmentation's (no
    voxel centre exactly half-way between two of the segmentation's, where the two may round differently)."""
    scene, volume, segmentation = loaded_chest
    names = ["left lung", "ribs", "right lung"]  # not the file's order: classes follow the selection
    source = original_segmentation(segmentation, names)
    assert_same_labels_as_the_gui_thread_export(scene, volume, segmentation, names, source, tmp_path)


def assert_same_labels_as_the_gui_thread_export(scene, volume, segmentation, names, seg_file, tmp_path):
    """The engine's labels from ``seg_file`` equal its labels from the GUI-thread export on three grids: the volume's
    own, a cropped and shifted one, and a coarser one not aligned with the segmentation's."""
    for stem, shape, first, scale in (("same", (34, 128, 128), (0, 0, 0), 1.0), ("cropped", (27, 110, 95), (5, 10, 3), 1.0),
                                      ("coarse", (20, 75, 76), (0.137, 0.213, 0.071), 1.618)):
        target = grid_volume(scene, volume, shape, first, scale, stem)
        exported = str(tmp_path / f"{stem}.seg.nrrd")
        export_segmentation(target, segmentation, names, exported, later_wins=True)  # what the GUI thread writes
        ours, missing = engine_labels(seg_file, names, target, tmp_path, stem)
        theirs, missing_before = engine_labels(exported, names, target, tmp_path, stem)
        assert missing == missing_before == [] and set(np.unique(ours)) == {0, 1, 2, 3}
        assert np.array_equal(ours, theirs), (stem, int((ours != theirs).sum()))


def grid_volume(scene, volume, shape, first, scale, name):
    """A new volume of ``shape`` (k, j, i) whose voxel (0, 0, 0) lies at ``volume``'s voxel ``first`` (i, j, k) and whose
    voxels are ``scale`` times ``volume``'s."""
    ijk_to_ras = world_ijk_to_ras(volume)
    m = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            m.SetElement(r, c, ijk_to_ras.GetElement(r, c) * scale)
        m.SetElement(r, 3, ijk_to_ras.GetElement(r, 3) + sum(ijk_to_ras.GetElement(r, c) * first[c] for c in range(3)))
    node = synthetic_volume(scene, name, shape)
    node.SetIJKToRASMatrix(m)
    return node


def test_the_train_click_rasterises_no_segmentation_in_one_layer_without_a_transform(loaded_chest, seg_path, tmp_path, monkeypatch):
    scene, volume, segmentation = loaded_chest
    calls = []
    original = inputcheck.segment_masks
    monkeypatch.setattr(inputcheck, "segment_masks", lambda *a, **k: calls.append(a[1].GetName()) or original(*a, **k))
    check, files = export_inputs([(volume, segmentation)], LUNGS, [volume], False, False, False, str(tmp_path / "in"), write=False)
    assert check.ok and calls == [] and check.rasterised == 0 and check.files == {0: seg_path}
    assert files.labeled == [(files.volume_files[volume.GetID()], seg_path, False)] and files.handoff.writes == []
    assert [c["name"] for c in check.classes()[1:]] == LUNGS  # names, colours, IDs from the node
    assert check.classes()[1]["color"] == list(segmentation.GetSegmentation().GetSegment("Segment_5").GetColor())
    for name in ("right lung (edited)", "right lung"):  # renamed and back: the same names, but changed since read
        segmentation.GetSegmentation().GetSegment("Segment_5").SetName(name)
    check, files = export_inputs([(volume, segmentation)], LUNGS, [], False, False, False, str(tmp_path / "in2"), write=False)
    assert calls == [] and check.rasterised == 0 and check.snapshots == 1  # a copy of its layer, written later
    assert files.labeled[0][1].endswith("labeled-000.seg.nrrd") and len(files.handoff.writes) == 1
    segmentation.SetAndObserveTransformNodeID(scene.AddNewNodeByClass("vtkMRMLLinearTransformNode").GetID())
    check, files = export_inputs([(volume, segmentation)], LUNGS, [], False, False, False, str(tmp_path / "in3"), write=False)
    assert calls == ["CT segmentation"] and check.rasterised == 1 and check.snapshots == 0  # moved: rasterised


@pytest.mark.slow  # a whole training run; the labels themselves are compared above
def test_a_model_trained_from_a_handed_over_file_has_the_node_s_segments(loaded_chest, seg_path, tmp_path):
    from slicer_scene import TINY

    scene, volume, segmentation = loaded_chest
    core = LogicCore(scene, env=one_thread_env(), work_root=str(tmp_path / "work"))
    job = core.train([(volume, segmentation)], [], LUNGS, wait=False, **TINY)
    assert job.args[job.args.index("--labeled") + 2] == seg_path and job.check.rasterised == 0
    model = job.wait(timeout=600)
    from CPCLSegmentLib.childinfo import model_info

    classes = model_info(core.model_file(model))["classes"]  # what the child read from the file
    seg = segmentation.GetSegmentation()
    expected = [(n, [round(c, 4) for c in seg.GetSegment(seg.GetSegmentIdBySegmentName(n)).GetColor()]) for n in LUNGS]
    assert [(c["name"], [round(v, 4) for v in c["color"]]) for c in classes[1:]] == expected


def test_without_segments_named_a_training_learns_every_case_s_segments(ct_path, seg_path, tmp_path):
    scene = new_scene()
    v1, v2 = load_volume(scene, ct_path, "V1"), load_volume(scene, ct_path, "V2")
    s1 = load_segmentation(scene, seg_path, "S1", volume=v1)
    s2 = load_segmentation(scene, seg_path, "S2", volume=v2)
    s2.GetSegmentation().GetSegment("Segment_7").SetName("skin")  # only the second case has "skin" (and no "tissue")
    core = LogicCore(scene, env=one_thread_env(), work_root=str(tmp_path / "work"))
    plan = core.prepare_training([(v1, s1), (v2, s2)], [], None, iterations=20, device="cpu")
    assert plan["record"]["segments"] == segment_names(s1) + ["skin"]
    assert plan["args"][plan["args"].index("--segments") + 1:][:8] == segment_names(s1) + ["skin"]


def paint(node, segment_id, modifier):
    """Adds ``modifier`` (1 inside) to the segment as Segment Editor's Paint does by default (``MODE_MERGE_MASK``,
    overwriting every other segment, vtkSlicerSegmentEditorLogic): the segments stay in one labelmap layer."""
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    seg = node.GetSegmentation()
    others = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
    assert logic.SetBinaryLabelmapToSegment(modifier, node, segment_id, logic.MODE_MERGE_MASK, None, False, others)


def modifier(like, box=None, value=None):
    """A binary labelmap on ``like``'s grid: 1 inside ``box`` ((k, j, i) slices), else where ``like`` is ``value``."""
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    image.DeepCopy(like)
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    e = image.GetExtent()
    grid = voxels.reshape(e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    if box is None:
        grid[...] = grid == value
    else:
        grid[...] = 0
        grid[box] = 1
    image.Modified()
    return image


def edited(scene, volume, segmentation):
    """The loaded segmentation corrected in the scene: a box painted into 'right lung' over its neighbours."""
    seg = segmentation.GetSegmentation()
    paint(segmentation, seg.GetSegmentIdBySegmentName("right lung"), modifier(seg.GetLayerDataObject(0), np.s_[10:20, 40:80, 20:70]))
    assert segmentation.GetModifiedSinceRead() and seg.GetNumberOfLayers() == 1
    return segmentation


def made(scene, volume, segmentation):
    """A segmentation made in the scene from scratch (no storage node): empty segments painted one by one."""
    ensure_converter_rules()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "made here")
    node.SetSourceRepresentationToBinaryLabelmap()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    seg, source = node.GetSegmentation(), segmentation.GetSegmentation()
    for name in ["ribs", "left lung", "right lung"]:
        sid = source.GetSegmentIdBySegmentName(name)
        mask = modifier(source.GetLayerDataObject(source.GetLayerIndex(sid)), value=source.GetSegment(sid).GetLabelValue())
        paint(node, seg.AddEmptySegment("", name, source.GetSegment(sid).GetColor()), mask)
    assert node.GetStorageNode() is None and seg.GetNumberOfLayers() == 1
    return node


@pytest.mark.parametrize("make", [edited, made])
def test_a_segmentation_edited_or_made_in_the_scene_is_handed_over_as_a_copy_of_its_layer(loaded_chest, tmp_path, monkeypatch,
                                                                                          make):
    """No rasterisation at the click; the copy written later; the child's labels from it == from the GUI-thread export,
    on the volume's grid, a cropped and shifted one and a coarser one; the user's node untouched."""
    scene, volume, segmentation = loaded_chest
    segmentation = make(scene, volume, segmentation)
    names = ["left lung", "ribs", "right lung"]
    calls = []
    original = inputcheck.segment_masks
    monkeypatch.setattr(inputcheck, "segment_masks", lambda *a, **k: calls.append(a[1].GetName()) or original(*a, **k))
    before = fingerprint(volume, segmentation)
    check, files = export_inputs([(volume, segmentation)], names, [], False, False, False, str(tmp_path / "in"), write=False)
    handed = files.labeled[0][1]
    assert check.ok and calls == [] and check.rasterised == 0 and check.snapshots == 1 and check.files == {}
    assert handed == str(tmp_path / "in" / "labeled-000.seg.nrrd") and len(files.handoff.writes) == 1  # the layer (the volume: its file)
    files.handoff.write_all()
    assert fingerprint(volume, segmentation) == before and not list((tmp_path / "in").glob("*partial*"))
    assert [c["name"] for c in check.classes()[1:]] == names
    assert_same_labels_as_the_gui_thread_export(scene, volume, segmentation, names, handed, tmp_path)
    segments = {s.name: s for s in cio.read_segmentation(handed).segments}
    seg = segmentation.GetSegmentation()
    for name in names:
        assert list(segments[name].color) == pytest.approx(list(seg.GetSegment(seg.GetSegmentIdBySegmentName(name)).GetColor()))


def test_no_copy_of_a_layer_where_the_gui_thread_must_settle_it(loaded_chest, overlapping_seg_path):
    scene, volume, segmentation = loaded_chest
    segmentation = edited(scene, volume, segmentation)
    assert snapshot_segmentation(segmentation, LUNGS) is not None
    segmentation.SetAndObserveTransformNodeID(scene.AddNewNodeByClass("vtkMRMLLinearTransformNode").GetID())
    assert snapshot_segmentation(segmentation, LUNGS) is None  # moved: the GUI thread resamples through the transform
    overlapping = load_segmentation(scene, overlapping_seg_path, "overlapping", volume=volume, as_slicer_loads=True)
    overlapping.GetSegmentation().GetNthSegment(0).SetColor(1.0, 0.0, 0.0)
    assert snapshot_segmentation(overlapping, LUNGS) is not None  # one layer: nothing overlaps
    assert snapshot_segmentation(overlapping, LUNGS + ["overlapping sphere"]) is None  # two layers, and no volume given
    assert snapshot_segmentation(overlapping, ["no such segment"]) is None


def add_lesion_layer(volume, segmentation):
    """A "lesion" in a labelmap layer of its own on the volume's grid, inside "left lung" (overlapping it, as Segment
    Editor stores nested structures when overwriting other segments is off)."""
    from vtk.util import numpy_support

    from CPCLSegmentModuleLib.nodes import segment_masks

    lung = segment_masks(volume, segmentation, ["left lung"])["left lung"]
    k, j, i = [int(np.median(a)) for a in np.nonzero(lung)]
    lesion = np.zeros_like(lung)
    lesion[k - 3:k + 3, j - 8:j + 8, i - 8:i + 8] = True
    lesion &= lung
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*volume.GetImageData().GetDimensions())
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(lesion.astype(np.uint8).ravel(), deep=True,
                                                                array_type=vtk.VTK_UNSIGNED_CHAR))
    image.SetImageToWorldMatrix(world_ijk_to_ras(volume))
    segment = slicer.vtkSegment()
    segment.SetName("lesion")
    segment.SetColor(1.0, 1.0, 0.0)
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName(), image)
    segmentation.GetSegmentation().AddSegment(segment, "lesion")
    assert segmentation.GetSegmentation().GetNumberOfLayers() == 2 and lesion.sum() > 100


@pytest.mark.parametrize("later_wins", [False, True])
def test_segments_in_separate_layers_are_copied_and_their_overlaps_refused_or_settled_as_when_rasterised(
        loaded_chest, tmp_path, monkeypatch, later_wins):
    scene, volume, segmentation = loaded_chest
    segmentation = edited(scene, volume, segmentation)
    add_lesion_layer(volume, segmentation)
    names = ["left lung", "lesion", "right lung"]
    rasterised = inputcheck.check_inputs([(volume, segmentation)], names, [], later_wins=later_wins)  # the GUI thread's check
    calls = []
    original = inputcheck.segment_masks
    monkeypatch.setattr(inputcheck, "segment_masks", lambda *a, **k: calls.append(a[1].GetName()) or original(*a, **k))
    before = fingerprint(volume, segmentation)
    check, files = export_inputs([(volume, segmentation)], names, [], False, False, later_wins, str(tmp_path / "in"), write=False)
    assert calls == [] and check.rasterised == 0 and check.snapshots == 1  # the two layers copied, nothing rasterised
    assert (check.errors, check.warnings, check.infos) == (rasterised.errors, rasterised.warnings, rasterised.infos)
    assert check.counts == rasterised.counts and check.overlap == rasterised.overlap and check.nested() == rasterised.nested()
    if not later_wins:
        assert not check.ok and "segments 'left lung' and 'lesion' overlap" in check.errors[0]
        return
    assert check.ok and check.nested() == {"left lung": ["lesion"]}
    files.handoff.write_all()
    assert fingerprint(volume, segmentation) == before
    assert_same_labels_as_the_gui_thread_export(scene, volume, segmentation, names, files.labeled[0][1], tmp_path)
    coarse = grid_volume(scene, volume, (20, 75, 76), (0.137, 0.213, 0.071), 1.618, "coarse")  # layers not on its grid
    check, _ = export_inputs([(coarse, segmentation)], names, [], False, False, True, str(tmp_path / "coarse"), write=False)
    assert check.rasterised == 1 and check.snapshots == 0


def layer_voxels(segmentation, name):
    """A zero-copy numpy view of the stored labelmap layer holding segment ``name`` (``(k, j, i)``) and that layer."""
    from vtk.util import numpy_support

    seg = segmentation.GetSegmentation()
    image = seg.GetLayerDataObject(seg.GetLayerIndex(seg.GetSegmentIdBySegmentName(name)))
    e = image.GetExtent()
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return voxels.reshape(e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1), image


def test_layers_are_captured_without_a_copy_and_written_again_when_edited_before_the_child_starts(loaded_chest, tmp_path):
    """The click keeps views of the stored layers (no copy); an edit between the write and the child's start, as
    Segment Editor makes it (voxels changed in place, then ``Modified()``), is found on the GUI thread and written again
    when the check's counts stay the same; where they change, the job fails asking for a new start."""
    from CPCLSegmentLib.errors import InputError

    scene, volume, segmentation = loaded_chest
    segmentation = edited(scene, volume, segmentation)
    add_lesion_layer(volume, segmentation)
    names = ["left lung", "lesion", "right lung"]
    snap = snapshot_segmentation(segmentation, names, volume)
    assert len(snap.layers) == 2
    for layer, name in zip(snap.layers, ["left lung", "lesion"]):
        assert np.shares_memory(layer, layer_voxels(segmentation, name)[0])  # a view, not a copy
    check, files = export_inputs([(volume, segmentation)], names, [], False, False, True, str(tmp_path / "in"), write=False)
    assert check.ok and check.snapshots == 1
    files.handoff.write_all()
    assert files.handoff.verify() == [] and files.handoff.writes == []  # unchanged: the child may start
    lesion, image = layer_voxels(segmentation, "lesion")
    lung = inputcheck.segment_masks(volume, segmentation, ["left lung"])["left lung"]
    inside, free = np.argwhere(lesion == 1)[0], np.argwhere(lung & (lesion == 0))[0]
    lesion[tuple(inside)], lesion[tuple(free)] = 0, 1  # one lesion voxel moved within the lung: the same counts
    image.Modified()
    assert files.handoff.verify() == ["CT segmentation"] and len(files.handoff.writes) == 1
    files.handoff.write_all()
    assert files.handoff.verify() == []
    assert_same_labels_as_the_gui_thread_export(scene, volume, segmentation, names, files.labeled[0][1], tmp_path)
    lesion[tuple(free)] = 0  # one voxel fewer: the counts the check saw are no longer the node's
    image.Modified()
    with pytest.raises(InputError, match="'CT segmentation' changed after the inputs were checked"):
        files.handoff.verify()


def test_one_layer_is_captured_without_a_copy_and_written_again_when_edited(loaded_chest, tmp_path):
    scene, volume, segmentation = loaded_chest
    segmentation = edited(scene, volume, segmentation)
    names = ["left lung", "ribs", "right lung"]
    check, files = export_inputs([(volume, segmentation)], names, [], False, False, False, str(tmp_path / "in"), write=False)
    voxels, image = layer_voxels(segmentation, "ribs")
    files.handoff.write_all()
    seg = segmentation.GetSegmentation()
    ribs = seg.GetSegment(seg.GetSegmentIdBySegmentName("ribs")).GetLabelValue()
    voxels[12:16, 50:60, 30:40] = ribs  # painted over the lungs there, in place
    image.Modified()
    assert files.handoff.verify() == ["CT segmentation"]
    files.handoff.write_all()
    assert_same_labels_as_the_gui_thread_export(scene, volume, segmentation, names, files.labeled[0][1], tmp_path)


# ------------------------------------------------------------------- results read on a worker thread


def stored_segments(node):
    """What a segmentation node holds, as comparable values: each segment (ID, name, colour, label value, tags,
    auto-generated flags, layer) and each layer (extent, image-to-world matrix, voxels)."""
    from vtk.util import numpy_support

    from CPCLSegmentModuleLib.nodes import matrix_to_array, segment_ids, segment_tag

    seg = node.GetSegmentation()
    segments = []
    for sid in segment_ids(node):
        s = seg.GetSegment(sid)
        tags = {t: segment_tag(s, t) for t in ("TerminologyEntry", "Segmentation.Status", "Some field")}
        segments.append((sid, s.GetName(), tuple(round(c, 5) for c in s.GetColor()), s.GetLabelValue(), tags,
                         s.GetNameAutoGenerated(), s.GetColorAutoGenerated(), seg.GetLayerIndex(sid)))
    layers = []
    for n in range(seg.GetNumberOfLayers()):
        image = seg.GetLayerDataObject(n)
        m = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(m)
        scalars = image.GetPointData().GetScalars()
        voxels = numpy_support.vtk_to_numpy(scalars) if scalars is not None else np.zeros(0)
        layers.append((tuple(image.GetExtent()), np.round(matrix_to_array(m), 5).tolist(), voxels.astype(np.int64).tolist()))
    return segments, layers


def test_a_result_read_on_a_worker_thread_makes_the_node_slicer_s_reader_makes(seg_path, overlapping_seg_path, ct_path, tmp_path):
    import SimpleITK as sitk

    from CPCLSegmentLib.writers import write_seg_nrrd
    from CPCLSegmentModuleLib.resultread import add_segments, read_result
    from CPCLSegmentModuleLib.results import import_segmentation, nest_segments, read_segmentation_result

    reference = sitk.ReadImage(str(ct_path))
    labels = np.zeros(sitk.GetArrayFromImage(reference).shape, dtype=np.int16)
    k, j, i = labels.shape
    labels[k // 4:k // 2, j // 4:j // 2, i // 4:i // 2] = 1
    labels[k // 2:3 * k // 4, j // 3:j // 2, i // 3:2 * i // 3] = 2
    classes = [{"name": "background", "label_value": 0},
               {"name": "organ", "color": [0.8, 0.2, 0.1], "label_value": 1, "segment_id": "organ_id",
                "terminology": {"contextName": "Segmentation category and type - 3D Slicer General Anatomy list",
                                "category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]}},
               {"name": "lesion", "color": [0.1, 0.9, 0.1], "label_value": 2}]
    result = str(tmp_path / "result.seg.nrrd")
    write_seg_nrrd(result, labels, reference, classes, crop=True)
    nested = nest_segments(result, {"organ": ["lesion"]}, str(tmp_path / "nested.seg.nrrd"))
    scene = new_scene()
    for path in (seg_path, overlapping_seg_path, result, nested):
        by_slicer = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "by Slicer's reader")
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(path))
        assert storage.ReadData(by_slicer)
        read = read_result(str(path))
        assert read is not None, path
        by_worker = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "read on a worker thread")
        add_segments(by_worker, read)
        assert stored_segments(by_worker) == stored_segments(by_slicer), path
    volume = load_volume(scene, ct_path, "CT")
    read = read_segmentation_result(result, {"organ": ["lesion"]})  # the nesting restored before, on the worker
    node = import_segmentation(scene, result, volume, nested={"organ": ["lesion"]}, read=read)
    assert stored_segments(node) == stored_segments(import_segmentation(scene, result, volume, nested={"organ": ["lesion"]}))
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is volume and node.GetDisplayNode() is not None
