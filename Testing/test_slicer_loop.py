"""The label -> train loop in the panel (``CPCLSegmentModuleLib.panelloop``) against slicer-core: the segmentation
Label next opened is added as a labeled case in one click (before the held-out case, no longer a module output),
and the panel says how the held-out Dice changed from the last round. Skipped where slicer-core is not installed."""

import sys
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core; Python >= 3.10)")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CPCLSegment"))

from CPCLSegmentLib.errors import InputError  # noqa: E402
from CPCLSegmentModuleLib import panel  # noqa: E402
from CPCLSegmentModuleLib.logic import LogicCore  # noqa: E402
from CPCLSegmentModuleLib.nodes import find_segment_id, segment_names  # noqa: E402
from CPCLSegmentModuleLib.panelloop import painted  # noqa: E402
from CPCLSegmentModuleLib.results import empty_segmentation  # noqa: E402
from CPCLSegmentModuleLib import attributes  # noqa: E402
from CPCLSegmentModuleLib.scene import is_module_output, segmented_volume_pairs  # noqa: E402

from conftest import LUNGS  # noqa: E402
from slicer_scene import TINY, load_segmentation, load_volume, new_scene, one_thread_env  # noqa: E402

pytestmark = pytest.mark.slicer
CLASSES = [{"name": "background"}] + [{"name": n, "color": (0.5, 0.5, 0.5)} for n in LUNGS]


def controller(scene, tmp_path):
    return panel.PanelController(LogicCore(scene, env=one_thread_env(), work_root=str(tmp_path / "work")))


@pytest.fixture
def three(ct_path, seg_path):
    """Two labeled cases (V1, V2: V2 held out) and an unlabeled V3."""
    scene = new_scene()
    v1, v2, v3 = (load_volume(scene, ct_path, n) for n in ("V1", "V2", "V3"))
    s1 = load_segmentation(scene, seg_path, "S1", volume=v1)
    s2 = load_segmentation(scene, seg_path, "S2", volume=v2)
    return scene, v1, s1, v2, s2, v3


def paint_from(target, source):
    """'Corrects' a label-next segmentation: its lung segments get the source's voxels."""
    for name in LUNGS:
        target.GetSegmentation().RemoveSegment(find_segment_id(target, name))
        target.GetSegmentation().CopySegmentFromSegmentation(source.GetSegmentation(), find_segment_id(source, name))


def names(c):
    return [(case.volume.GetName(), case.segmentation.GetName()) for case in c.cases()]


def test_add_as_labeled_case_adds_the_corrected_segmentation_before_the_held_out_case(three, tmp_path):
    scene, v1, s1, v2, s2, v3 = three
    c = controller(scene, tmp_path)
    c.set_setting("hold_out_last", True)
    assert names(c) == [("V1", "S1"), ("V2", "S2")] and [v.GetName() for v in c.unlabeled()] == ["V3"]
    assert not c.view().enabled["addLabeledCaseButton"]
    with pytest.raises(InputError, match="Label next first"):
        c.add_labeled_case()
    seg = empty_segmentation(scene, v3, CLASSES)  # what Label next opens (the model's segments, empty)
    c.start_labeling(seg)
    assert seg not in [p.segmentation for p in segmented_volume_pairs(scene)]  # "Add all" leaves it out: unreviewed
    view = c.view()
    assert view.enabled["addLabeledCaseButton"] and "V3 labels" in view.text["addLabeledCaseButton"]
    with pytest.raises(InputError, match="'V3 labels' is empty"):
        c.add_labeled_case()
    assert not painted(seg)
    paint_from(seg, s1)
    assert painted(seg)
    surface_only = empty_segmentation(scene, v3, CLASSES, "surface only")  # a closed surface, no labelmap
    surface_only.GetSegmentation().CopySegmentFromSegmentation(s1.GetSegmentation(), find_segment_id(s1, "right lung"))
    surface_only.GetSegmentation().CreateRepresentation("Closed surface")
    surface_only.GetSegmentation().SetSourceRepresentationName("Closed surface")
    surface_only.GetSegmentation().RemoveRepresentation("Binary labelmap")
    assert painted(surface_only)
    case = c.add_labeled_case()
    assert case.volume is v3 and case.segmentation is seg
    assert names(c) == [("V1", "S1"), ("V3", "V3 labels"), ("V2", "S2")]  # V2 stays the held-out case
    assert c.unlabeled() == [] and not is_module_output(seg) and seg.GetAttribute(attributes.OUTPUT) is None
    assert c.labeling() is None and not c.view().enabled["addLabeledCaseButton"]
    assert any("added to the labeled cases" in line for line in c.take_log())
    # without a held-out case the new case goes last
    c.set_setting("hold_out_last", False)
    seg4 = empty_segmentation(scene, v1, CLASSES, "V1 again")
    paint_from(seg4, s1)
    c.start_labeling(seg4)
    c.add_labeled_case()
    assert names(c)[-1] == ("V1", "V1 again")


def test_rounds_say_how_the_held_out_dice_changed(three, tmp_path, seg_path):
    scene, v1, s1, v2, s2, v3 = three
    c = controller(scene, tmp_path)
    assert c.view().text["roundLabel"] == ""
    c.set_setting("hold_out_last", True)
    c.start_round("run-1")
    assert c.finish_round("run-other", {"validation_mean_dice": 0.9}) is None  # not the run the panel started
    assert c.finish_round("run-1", {"validation_mean_dice": 0.7}) == "held-out Dice (V2): 0.700 (first round with this held-out case)"
    c.add_case(v3, load_segmentation(scene, seg_path, "S3", volume=v3))
    c.start_round("run-2")
    assert c.finish_round("run-2", {"validation_mean_dice": 0.6}).startswith("held-out Dice (V3): 0.600 (the last round held out 'V2'")
    # the case added through the loop goes before the held-out case: the same case is scored again
    c.remove_cases([2])
    seg = empty_segmentation(scene, v3, CLASSES)
    paint_from(seg, s1)
    c.start_labeling(seg)
    c.add_labeled_case()
    c.start_round("run-3")
    assert c.finish_round("run-3", {"validation_mean_dice": 0.65}) is not None
    c.start_round("run-4")
    c.finish_round("run-4", {"validation_mean_dice": 0.6})
    assert "held-out Dice (V2): 0.600 (-0.050 since the last round)" == c.view().text["roundLabel"]
    # a resumed run replaces its own round
    c.start_round("run-4")
    c.finish_round("run-4", {"validation_mean_dice": 0.75})
    assert len(c.rounds()) == 4 and "+0.100 since the last round" in c.round_text()
    # a round without a held-out case shows nothing
    c.set_setting("hold_out_last", False)
    c.start_round("run-5")
    c.finish_round("run-5", {"validation_mean_dice": None})
    assert c.round_text() == ""


@pytest.mark.slow
def test_the_loop_through_real_rounds(three, tmp_path):
    """Train (V2 held out) -> Label next on V3 -> correct -> add -> train: the panel says the Dice change."""
    scene, v1, s1, v2, s2, v3 = three
    c = controller(scene, tmp_path)
    for name, value in (("hold_out_last", True), ("compare_supervised", False), ("length_mode", "iterations"),
                        ("iterations", TINY["iterations"]), ("width", TINY["width"]), ("patch_size", TINY["patch_size"]),
                        ("device", "cpu"), ("seed", 0)):
        c.set_setting(name, value)
    for n in segment_names(s1):
        c.set_segment_checked(n, n in LUNGS)
    c.train()
    wait_for(c, "train")
    first = c.view().text["roundLabel"]
    assert first.startswith("held-out Dice (V2): ") and "first round" in first, c.take_log()[-5:]
    c.rank_rows = [{"rank": 1, "volume": v3, "score": 0.5, "uncertainty": None}]
    c.select_rank_row(0)
    c.label_next()  # an empty segmentation with the model's segments, opened in the editor
    seg = c.labeling()
    assert seg is not None and [v for k, v in c.take_effects() if k == "edit"] == [(seg, v3)]
    paint_from(seg, s1)
    c.add_labeled_case()
    c.train()
    wait_for(c, "train")
    second = c.view().text["roundLabel"]
    assert second.startswith("held-out Dice (V2): ") and "since the last round, 1 → 2 labeled cases" in second


def wait_for(c, kind, timeout=300):
    import time

    deadline = time.time() + timeout
    while c.busy(kind):
        c.poll()
        assert time.time() < deadline, f"{kind} did not finish"
        time.sleep(0.05)
    c.poll()
