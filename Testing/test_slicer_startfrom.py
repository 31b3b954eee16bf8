"""The panel's "Start from" choice (``CPCLSegmentModuleLib.startfrom``) against slicer-core: nothing, a model in the
scene, a file, a folder, or the MONAIAuto3DSeg models found on this computer (a fixture folder written the way the
extension unpacks its models, see test_pretrained.py); the choice becomes the run's ``--init``. Nothing is
downloaded. Skipped where slicer-core is not installed."""

import sys
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core; Python >= 3.10)")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CPCLSegment"))

from CPCLSegmentLib.errors import InputError  # noqa: E402
from CPCLSegmentModuleLib import modelnode, panel  # noqa: E402
from CPCLSegmentModuleLib.logic import LogicCore  # noqa: E402
from CPCLSegmentModuleLib.startfrom import PATH_FILTERS  # noqa: E402

from conftest import LUNGS  # noqa: E402
from slicer_scene import load_segmentation, load_volume, new_scene  # noqa: E402
from test_pretrained import auto3dseg_folder  # noqa: E402

pytestmark = pytest.mark.slicer


@pytest.fixture
def setup(tmp_path, ct_path, seg_path):
    scene = new_scene()
    volume = load_volume(scene, ct_path)
    load_segmentation(scene, seg_path, volume=volume)
    root = tmp_path / "MONAIAuto3DSeg" / "models"
    folder = auto3dseg_folder(root / "lungs-ct-v1.0.0" / "model")
    (root / "interrupted-download").mkdir()
    model_file = tmp_path / "ours.pt"
    model_file.write_bytes(b"not read here")
    classes = [{"name": "background"}] + [{"name": n} for n in LUNGS]
    model = modelnode.store_model(scene, str(model_file), "Round 1", classes=classes)
    c = panel.PanelController(LogicCore(scene, work_root=str(tmp_path / "work")))
    c.auto3dseg_root = str(root)
    return c, scene, model, str(folder), tmp_path


def test_the_choices_list_nothing_scene_models_local_auto3dseg_models_a_file_and_a_folder(setup):
    c, scene, model, folder, tmp_path = setup
    rows = c.start_choices()
    assert [k for k, _ in rows] == ["none", f"node:{model.GetID()}", f"auto3dseg:{folder}", "file", "folder"]
    assert dict(rows)[f"auto3dseg:{folder}"] == "MONAIAuto3DSeg: lungs-ct-v1.0.0 (CT, 2 segments)"
    assert dict(rows)[f"node:{model.GetID()}"] == "Model in the scene: Round 1"
    view = c.view()
    assert view.start_rows == rows and view.start_from == "none" and c.start_init() is None
    assert not view.visible["initModelPathLineEdit"] and not view.enabled["keepModelSegmentsCheckBox"]

    c.set_start_from(f"auto3dseg:{folder}")
    view = c.view()
    assert view.start_from == f"auto3dseg:{folder}" and c.start_init() == folder
    assert view.text["startFromInfoLabel"] == "CT; segments: right lung, Spleen" and view.enabled["keepModelSegmentsCheckBox"]

    c.set_start_from(f"node:{model.GetID()}")
    assert c.start_init() is model and c.view().text["startFromInfoLabel"] == "segments: right lung, left lung"
    scene.RemoveNode(model)  # the chosen model was deleted: back to nothing, never a stale ID
    assert c.start_from() == "none" and c.start_init() is None

    c.set_start_from("file")
    view = c.view()
    assert view.visible["initModelPathLineEdit"] and view.filters["initModelPathLineEdit"] == PATH_FILTERS["file"]
    with pytest.raises(InputError, match="choose the starting model's file"):
        c.start_init()
    c.set_setting("init", folder)  # a folder is not a file
    with pytest.raises(InputError, match="is not one"):
        c.start_init()
    c.set_start_from("folder")
    assert c.start_init() == folder and c.view().filters["initModelPathLineEdit"] == PATH_FILTERS["folder"]
    with pytest.raises(InputError, match="not a starting point"):
        c.set_start_from("auto3dseg:/elsewhere")


def test_a_panel_saved_with_a_starting_file_keeps_it_and_a_vanished_auto3dseg_folder_is_refused(setup):
    c, scene, model, folder, tmp_path = setup
    c.set_setting("init", str(tmp_path / "ours.pt"))
    assert c.start_from() == "file" and c.start_init() == str(tmp_path / "ours.pt")
    c.set_start_from(f"auto3dseg:{folder}")
    import shutil

    shutil.rmtree(folder)
    with pytest.raises(InputError, match="is gone"):
        c.start_init()
    assert [k for k, _ in c.start_choices()][2] == f"auto3dseg:{folder}"  # looked for once...
    c.find_local_models()
    assert [k for k, _ in c.start_choices()] == ["none", f"node:{model.GetID()}", "file", "folder"]  # ...and again on request


def test_the_choice_becomes_the_runs_init(setup, monkeypatch):
    c, scene, model, folder, tmp_path = setup
    c.set_start_from(f"auto3dseg:{folder}")
    seen = {}

    def start_training(cases, unlabeled, segments, **values):
        seen.update(values)
        plan = c.core.prepare_training(cases, unlabeled, segments, **values)
        seen["args"] = plan["args"]
        raise InputError("stop here")

    monkeypatch.setattr(c.core, "start_training", start_training)
    for name in [n for n, _, _ in c.segment_choices()]:
        c.set_segment_checked(name, name in LUNGS)
    with pytest.raises(InputError, match="stop here"):
        c.train()
    assert seen["init"] == folder
    args = seen["args"]
    assert args[args.index("--init") + 1] == folder
    c.set_start_from("none")
    with pytest.raises(InputError, match="stop here"):
        c.train()
    assert seen["init"] is None and "--init" not in seen["args"]
