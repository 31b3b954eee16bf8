"""Issue 14, "never lose or corrupt a user's data": hostile inputs through ``cpcl-segment`` (in-process
``cli.main``, so most cases cost milliseconds), each giving a clear error (exit 2, the file or flag named) or the
right result, with every input byte-identical afterwards. The random version is ``test_fuzz.py`` (slow tier)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CPCLSegmentLib import cleanup, cli, pipeline, preflight, writers
from CPCLSegmentLib import io as cio
from CPCLSegmentLib.labels import build_label_array
from CPCLSegmentLib.console import Reporter
from CPCLSegmentLib.errors import Cancelled, InputError, OutputError
from CPCLSegmentLib.companions import checkpoint_path
from CPCLSegmentLib.modelfile import load_model
from CPCLSegmentLib.prediction import compatibility_warnings
from CPCLSegmentLib.preparation import LabeledInput, TrainRequest, inspect_cases, resolve_classes
from CPCLSegmentLib.settings import RunOptions

from conftest import COARSE_SPACING, LUNGS, sha256, small_config, timing_trainer, user_folder

SPACING = [str(v) for v in COARSE_SPACING]
TINY = ["--iterations", "2", "--patch-size", "32", "32", "16", "--width", "4", "--spacing", *SPACING, "--device", "cpu"]


@pytest.fixture()
def data(tmp_path, ct_path, seg_path):
    """A user's folder: the CT as .nii.gz and .nrrd, its segmentation, hashed before the test."""
    folder = user_folder(tmp_path / "data", ct_path, seg_path)
    files = {p: sha256(p) for p in folder.iterdir()}
    yield folder
    for p, h in files.items():
        assert p.exists() and sha256(p) == h, f"{p} was changed"


def run(capsys, *args):
    """``cli.main`` in-process: (exit code, stderr, JSON events on stdout)."""
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    events = [json.loads(line) for line in out.out.splitlines() if line.startswith("{")]
    return code, out.err, events


def refused(capsys, *args, words=()):
    code, err, _ = run(capsys, *args)
    assert code == 2, err
    assert "internal error" not in err and "Traceback" not in err
    for w in words:
        assert str(w) in err, (w, err)
    return err


# --------------------------------------------------------------------------- outputs that are inputs


def test_an_output_that_would_replace_an_input_is_refused_naming_both(data, trained, capsys):
    model, _, _ = trained
    ct, nrrd, seg = data / "ct.nii.gz", data / "ct.nrrd", data / "ct.seg.nrrd"
    # predict onto its own input, through a symbolic link to it, and through a hard link (another name)
    refused(capsys, "predict", "--model", model, "--image", ct, "--out", ct, words=["--out", "ct.nii.gz", "--image"])
    os.symlink(ct, data / "link.nii.gz")
    refused(capsys, "predict", "--model", model, "--image", ct, "--out", data / "link.nii.gz", words=["link.nii.gz", "also the --image"])
    os.link(nrrd, data / "other name.nrrd")
    refused(capsys, "predict", "--model", model, "--image", nrrd, "--out", data / "other name.nrrd", words=["other name.nrrd"])
    # several images into their own folder, in their own format: every input would be replaced
    refused(capsys, "predict", "--model", model, "--image", ct, data / "other name.nrrd", "--out", data, "--format", ".nrrd",
            words=["other name.nrrd", "also the --image"])
    # a read-only input is refused the same way (the check is by path, not by permission)
    os.chmod(ct, 0o444)
    refused(capsys, "predict", "--model", model, "--image", ct, "--out", ct, words=["ct.nii.gz"])
    os.chmod(ct, 0o644)
    # predict onto the model, rank onto an image, an uncertainty map onto an input, train onto --init
    refused(capsys, "predict", "--model", model, "--image", ct, "--out", model, words=["--model"])
    refused(capsys, "rank", "--model", model, "--images", ct, "--out", ct, words=[".csv"])
    sitk.WriteImage(sitk.ReadImage(str(nrrd)), str(data / "ct-uncertainty.nrrd"))
    refused(capsys, "rank", "--model", model, "--images", nrrd, data / "ct-uncertainty.nrrd", "--uncertainty-dir", data,
            words=["ct-uncertainty.nrrd", "--uncertainty-dir"])
    os.remove(data / "ct-uncertainty.nrrd")
    before = sha256(model)
    refused(capsys, "train", "--labeled", ct, seg, "--init", model, "--out", model, *TINY, words=["also the --init model"])
    assert sha256(model) == before
    # train --out an unlabeled image: refused before any work (a model file ends in .pt)
    refused(capsys, "train", "--labeled", ct, seg, "--unlabeled", ct, "--out", ct, *TINY, words=["--out", ".pt"])
    os.remove(data / "link.nii.gz")
    os.remove(data / "other name.nrrd")


def test_out_without_pt_empty_or_unwritable_fails_before_any_work(data, capsys, tmp_path):
    ct, seg = data / "ct.nrrd", data / "ct.seg.nrrd"
    for out, words in (("mymodel", ["mymodel.pt"]), ("", ["--out is empty"]), (str(data), ["is a folder"]),
                       (str(data / "ct.nrrd" / "m.pt"), ["is a file, not a folder"])):
        code, err, events = run(capsys, "train", "--labeled", ct, seg, "--out", out, "--progress", "json", *TINY)
        assert code == 2 and all(w in err for w in words), err
        assert [e["event"] for e in events] == ["error"]  # nothing ran: no summary, no preprocessing
    refused(capsys, "train", "--labeled", ct, seg, "--out", tmp_path / "m.pt", "--work-dir", ct, *TINY, words=["--work-dir", "is a file"])
    refused(capsys, "demo", "--out", ct, words=["is a file, not a folder"])
    refused(capsys, "predict", "--model", ct, "--image", ct, "--out", "", words=["--out is empty"])


# ------------------------------------------------------------------------------------- verified reads


def _truncate(path, fraction=0.6):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * fraction)])


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mha", ".nrrd", ".seg.nrrd", "label.nii.gz"])
def test_a_truncated_file_is_refused_with_the_reason(ext, tmp_path, ct_path, seg_path):
    """ITK reads a truncated NIfTI without a word (the missing voxels become zeros): every read is verified."""
    image = sitk.ReadImage(ct_path)
    path = tmp_path / ("scan" + ext.replace("label", ""))
    if ext == ".seg.nrrd":
        shutil.copy(seg_path, path)
    elif ext == "label.nii.gz":
        sitk.WriteImage(sitk.Cast(image > 0, sitk.sitkUInt8), str(path))
    else:
        sitk.WriteImage(image, str(path), useCompression=ext != ".nii")
    _truncate(path)
    with pytest.raises(InputError) as e:
        (cio.read_segmentation if "seg" in ext or "label" in ext else cio.read_image)(str(path))
    text = str(e.value)
    assert path.name in text
    reason = {".nii.gz": "ends early", ".nii": "header promises", ".mha": "data not read completely", ".nrrd": "expected",
              ".seg.nrrd": "expected", "label.nii.gz": "ends early"}[ext]
    assert reason in text, text  # ITK's real reason, not its source-file location


def test_a_damaged_gzip_stream_and_folders_where_files_belong(tmp_path, ct_path, capsys):
    path = tmp_path / "flipped.nii.gz"
    sitk.WriteImage(sitk.ReadImage(ct_path), str(path))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="flipped.nii.gz"):
        cio.read_image(str(path))
    folder = tmp_path / "not a series"
    folder.mkdir()
    with pytest.raises(InputError, match="is a folder without a DICOM series"):
        cio.read_image(str(folder))
    capsys.readouterr()
    with pytest.raises(InputError, match="is a folder; give a file"):
        cio.read_segmentation(str(folder))
    assert "HDF5" not in capsys.readouterr().err  # ITK's HDF5 probe never sees a folder
    err = refused(capsys, "info", folder, words=["is a folder, not a model file"])
    assert "not found" not in err


# ------------------------------------------------------------------------------------- checked writes


@pytest.mark.parametrize("name", ["pred.nii.gz", "pred.seg.nrrd", "pred.nrrd"])
def test_a_full_disk_that_the_writer_does_not_report_is_caught(name, tmp_path, ct_path, monkeypatch):
    """ITK's NIfTI writer can end 'successfully' with a short file on a full disk: the written file is verified."""
    image = cio.read_image(ct_path)
    labels = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    labels[10:20, 30:60, 30:60] = 1
    classes = [{"name": "background", "label_value": 0}, {"name": "box", "label_value": 1, "color": [1, 0, 0]}]
    target = tmp_path / name
    writers.write_prediction(str(target), labels, image, classes)
    before = target.read_bytes()
    real_write, real_seg = sitk.WriteImage, None

    def short_write(img, path, *a, **k):  # writes, then loses the end, and says nothing
        real_write(img, path, *a, **k)
        _truncate(path, 0.3)

    import slicerio

    real_seg = slicerio.write_segmentation

    def short_seg(path, seg, *a, **k):
        real_seg(path, seg, *a, **k)
        _truncate(path, 0.3)

    monkeypatch.setattr(sitk, "WriteImage", short_write)
    monkeypatch.setattr(slicerio, "write_segmentation", short_seg)
    calls = []  # room before the write (so it starts), none after it (the disk filled up meanwhile)
    monkeypatch.setattr(writers, "free_bytes", lambda path: calls.append(path) or (10**12 if len(calls) == 1 else 0))
    with pytest.raises(OutputError) as e:
        writers.write_prediction(str(target), labels * 0, image, classes)
    assert "no space left on /" in str(e.value) and name in str(e.value) and "unchanged" in str(e.value)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary file left


def test_outputs_get_normal_permissions_from_the_umask(tmp_path, ct_path):
    image = cio.read_image(ct_path)
    labels = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    old = os.umask(0o002)
    try:
        writers.write_label_image(str(tmp_path / "a.nii.gz"), labels, image, [0, 1])
        with writers.atomic_path(str(tmp_path / "b.json")) as tmp:
            open(tmp, "w").write("{}")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.nii.gz").st_mode & 0o777 == 0o664
    assert os.stat(tmp_path / "b.json").st_mode & 0o777 == 0o664
    os.chmod(tmp_path / "a.nii.gz", 0o640)  # replacing a file keeps its permissions
    writers.write_label_image(str(tmp_path / "a.nii.gz"), labels, image, [0, 1])
    assert os.stat(tmp_path / "a.nii.gz").st_mode & 0o777 == 0o640


def test_json_and_copies_the_slicer_side_writes_are_strict_atomic_and_checked(tmp_path):
    """``write_json`` refuses what strict JSON cannot hold (NaN, a non-JSON type) and leaves the previous file as
    it was; ``copy_file`` and ``write_bytes`` replace a file whole or not at all (a damaged model is refused)."""
    target = tmp_path / "command.json"
    writers.write_json(str(target), {"out": "m.pt", "seg": ["a"]})
    before = target.read_bytes()
    assert json.loads(before) == {"out": "m.pt", "seg": ["a"]}
    with pytest.raises(ValueError, match="cannot write .*command.json"):
        writers.write_json(str(target), {"lr": float("nan")})
    with pytest.raises(TypeError, match="cannot write .*command.json"):
        writers.write_json(str(target), {"when": object()})
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["command.json"]
    writers.copy_file(str(target), str(tmp_path / "copy.json"))
    assert (tmp_path / "copy.json").read_bytes() == before
    with pytest.raises(OutputError, match="failed its check"):
        writers.write_bytes(str(tmp_path / "model.pt"), b"not a zip")
    assert not (tmp_path / "model.pt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["command.json", "copy.json"]


# ------------------------------------------------------------------------------- values and files


CONFIGS = {
    "iterations ten": ('{"iterations": "ten"}', "iterations must be a whole number"),
    "width 2.5": ('{"width": 2.5}', "width must be a whole number"),
    "compile yes": ('{"compile": "yes"}', "compile must be true or false"),
    "negative weight": ('{"consistency_weight": -5}', "consistency_weight must be a finite number >= 0"),
    "negative validation": ('{"validation_every": -3}', "validation_every must be >= 0"),
    "not a mapping": ("[1, 2, 3]", "must hold a mapping"),
    "number keys (YAML)": ("1: 2\n", "setting names must be text"),
    "broken YAML": ("a: [1, 2\n", "cannot read config file"),
    "not UTF-8": (b"lr: 0.1 \xff\xfe\n", "is not UTF-8 text"),
    "seed too large": ('{"seed": 18446744073709551616}', "seed"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_a_bad_config_file_is_an_input_error_naming_it(case, data, capsys, tmp_path):
    text, words = CONFIGS[case]
    path = tmp_path / ("settings.yaml" if "YAML" in case or "UTF" in case else "settings.json")
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    refused(capsys, "train", "--labeled", data / "ct.nrrd", data / "ct.seg.nrrd", "--out", tmp_path / "m.pt", "--config", path,
            "--device", "cpu", words=[words])  # no flags that would override the file's values


CASE_LISTS = {
    "list of numbers": ("cases.json", "[1, 2]", "entry 1: expected a case"),
    "image not text": ("cases.json", '[{"image": 5, "segmentation": "x"}]', "image must be text"),
    "role list": ("cases.json", '{"labeled": 5}', "'labeled' must be a list"),
    "unknown key": ("cases.json", '{"labelled": []}', "unknown key"),
    "unknown role": ("cases.csv", "image,segmentation,role\nct.nrrd,ct.seg.nrrd,teacher\n", "unknown role 'teacher'"),
    "extra columns": ("cases.csv", "image,segmentation\nct.nrrd,ct.seg.nrrd,oops\n", "more columns than the header"),
    "bad sparse mode": ("cases.csv", "image,segmentation,annotated_slices\nct.nrrd,ct.seg.nrrd,diagonal\n", "annotated_slices must be one of"),
    "missing image": ("cases.csv", "image,segmentation\nnope.nrrd,ct.seg.nrrd\n", "nope.nrrd"),
}


@pytest.mark.parametrize("case", sorted(CASE_LISTS))
def test_a_bad_case_list_is_an_input_error_naming_the_entry(case, data, capsys, tmp_path):
    name, text, words = CASE_LISTS[case]
    path = data / name
    path.write_text(text, encoding="utf-8")
    refused(capsys, "train", "--cases", path, "--out", tmp_path / "m.pt", *TINY, words=[words])
    os.remove(path)


def test_bad_values_and_paths_are_input_errors(data, capsys, tmp_path, monkeypatch):
    ct, seg, out = data / "ct.nrrd", data / "ct.seg.nrrd", tmp_path / "m.pt"
    base = ["train", "--labeled", ct, seg, "--out", out, "--iterations", "2", "--patch-size", "32", "32", "16", "--width", "4", "--device", "cpu"]
    refused(capsys, *base, "--spacing", "0", "0", "0", words=["--spacing must be three finite numbers > 0"])
    refused(capsys, *base, "--spacing", "nan", "1", "1", words=["--spacing"])
    refused(capsys, *base, "--spacing", "1e-6", "1e-6", "1e-6", words=["more than this computer can hold"])
    refused(capsys, *base, "--spacing", "1e6", "1e6", "1e6", words=["would shrink to 1x1x1"])
    refused(capsys, *base, "--freeze-encoder", words=["--freeze-encoder", "--init"])
    refused(capsys, "train", "--labeled", ct, ct, "--out", out, *TINY, words=["given as the image and as the segmentation"])
    refused(capsys, "train", "--labeled", ct, data, "--out", out, *TINY, words=["is a folder"])
    refused(capsys, "train", "--dataset", ct, "--out", out, *TINY, words=["is a file, not a folder"])
    refused(capsys, "train", "--labeled", ct, seg, "--out", out, "--color-table", data, *TINY, words=["colour table", "is a folder"])
    refused(capsys, "demo", "--iterations", "0", words=["--iterations must be at least 1"])
    refused(capsys, "demo", "--data", tmp_path, "--labeled", "0", words=["--labeled must be at least 1"])
    # a preprocessing cache on a full disk is named, with what to do
    import tempfile

    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    refused(capsys, *base, "--spacing", *SPACING, "--cache-dir", tmp_path / "new-cache",
            words=["cannot write the preprocessed cases to the preprocessing cache", "no space left on", "--cache-dir"])
    assert not out.exists()


def _crafted(model, change):
    rec = load_model(model)
    change(rec)
    return rec


CRAFTED = {
    "classes are numbers": lambda r: r.__setitem__("classes", [1, 2, 3]),
    "network depth text": lambda r: r["network"].__setitem__("depth", "four"),
    "negative width": lambda r: r["network"].__setitem__("width", -8),
    "patch of two": lambda r: r.__setitem__("patch_size", [16, 32]),
    "zero spacing": lambda r: r.__setitem__("spacing", [0, 0, 0]),
    "weights not tensors": lambda r: r["weights"].__setitem__("teacher", {"a": 1}),
    "normalisation unknown": lambda r: r.__setitem__("normalization", {"scheme": "magic"}),
    "training a list": lambda r: r.__setitem__("training", [1]),
    "colour text": lambda r: r["classes"][1].__setitem__("color", "red"),
}


def test_crafted_model_files_are_model_file_errors_everywhere(trained, tmp_path, capsys, ct_path):
    model, _, _ = trained
    for name, change in CRAFTED.items():
        path = tmp_path / (name.replace(" ", "-") + ".pt")
        torch.save(_crafted(model, change), path)
        for args in (["info", path], ["predict", "--model", path, "--image", ct_path, "--out", tmp_path / "p.seg.nrrd"],
                     ["rank", "--model", path, "--images", ct_path]):
            err = refused(capsys, *args, words=[path.name])
            assert "not a valid CPCLSegment model file" in err, (name, err)
    assert not (tmp_path / "p.seg.nrrd").exists()


# -------------------------------------------------------------------------- memory, stop files, locks


def test_running_out_of_ram_exits_4_with_a_hint(monkeypatch, capsys, data, trained):
    from CPCLSegmentLib import prediction

    model, _, _ = trained
    for error in (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                               "allocate 83886080000 bytes. Error code 12 (Cannot allocate memory)"),
                  MemoryError("Unable to allocate 9.7 GiB for an array")):
        monkeypatch.setattr(prediction.Predictor, "segment", lambda *a, err=error, **k: (_ for _ in ()).throw(err))
        code, err, _ = run(capsys, "predict", "--model", model, "--image", data / "ct.nrrd", "--out", data / "p.seg.nrrd")
        assert code == 4 and "ran out of memory (RAM)" in err and "--patch-size" in err and "internal error" not in err
    assert not (data / "p.seg.nrrd").exists()


def test_a_stale_stop_file_or_a_folder_is_refused_and_nothing_is_replaced(data, capsys, tmp_path, trained):
    model, _, _ = trained
    out = tmp_path / "m.pt"
    shutil.copy(model, out)
    before = sha256(out)
    stop = tmp_path / "stop"
    stop.write_text("stop")
    args = ["train", "--labeled", data / "ct.nrrd", data / "ct.seg.nrrd", "--out", out, *TINY]
    refused(capsys, *args, "--stop-file", stop, words=["--stop-file", "already exists"])
    refused(capsys, *args, "--stop-file", data, words=["--stop-file", "is a folder"])
    # a stop that comes before the first iteration never replaces a trained model with random weights
    req = TrainRequest(labeled=[LabeledInput(str(data / "ct.nrrd"), str(data / "ct.seg.nrrd"))], out=str(out), segments=LUNGS,
                       config=small_config(iterations=4, width=4, patch_size=(16, 32, 32)), options=RunOptions(spacing=list(COARSE_SPACING)))
    with pytest.raises(Cancelled, match="stopped before the first training iteration: no model was written"):
        pipeline.train(req, None, lambda: True)
    assert sha256(out) == before and not os.path.exists(checkpoint_path(out))


def test_a_second_training_on_the_same_output_is_refused(data, capsys, tmp_path):
    out = tmp_path / "m.pt"
    lock = tmp_path / "m.pt.lock"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.1)
        lock.write_text(json.dumps({"pid": alive.pid, "host": __import__("socket").gethostname(), "started": time.time()}))
        refused(capsys, "train", "--labeled", data / "ct.nrrd", data / "ct.seg.nrrd", "--out", out, *TINY,
                words=["another training", f"pid {alive.pid}", "m.pt.lock"])
    finally:
        alive.kill()
        alive.wait()
    assert lock.exists() and not out.exists()  # the other run's lock is left alone
    # once that process is gone, its lock is taken over (tested through OutputLock: a full run is below)
    events = []
    with preflight.OutputLock(str(out)).acquire(events.append) as held:
        assert json.loads(lock.read_text())["pid"] == os.getpid() and held.held
    assert "taking over" in events[0]["message"] and not lock.exists()


def test_leftovers_of_dead_runs_are_swept_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.1)
        old = time.time() - 3600
        leftovers = [tmp_path / f".tmp-p{dead.pid}-model.pt-abcd.pt", tmp_path / f"cpcl-work-p{dead.pid}-x1y2"]
        leftovers[0].write_bytes(b"partial")
        leftovers[1].mkdir()
        (leftovers[1] / "ct-1-image.npy").write_bytes(b"x")
        for p in leftovers:
            os.utime(p, (old, old))
        kept = [tmp_path / f".tmp-p{alive.pid}-model.pt-efgh.pt",  # a live writer's
                tmp_path / ".tmp-model.pt-legacy.pt", tmp_path / "notes.txt"]  # not ours to judge
        for p in kept:
            p.write_bytes(b"x")
        os.utime(kept[1], (old, old))
        assert sorted(cleanup.sweep([str(tmp_path)], min_age_s=0)) == sorted(str(p) for p in leftovers)
        assert all(p.exists() for p in kept)
        # a pid reused by a younger process does not protect a dead run's file
        reused = tmp_path / f".tmp-p{alive.pid}-older.pt"
        reused.write_bytes(b"x")
        os.utime(reused, (old, old))
        fresh = tmp_path / f".tmp-p{dead.pid}-fresh.pt"  # too recent for the default: maybe another machine's live writer
        fresh.write_bytes(b"x")
        assert cleanup.sweep([str(tmp_path)]) == [str(reused)] and fresh.exists()
    finally:
        alive.kill()
        alive.wait()


# ------------------------------------------------------------------------------ geometry and data


def _write_like(image, array, path, **geometry):
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    for key, value in geometry.items():
        getattr(out, "Set" + key)(value)
    sitk.WriteImage(out, str(path))
    return str(path)


def test_geometry_mismatches_are_named_as_such(tmp_path, ct_path, seg_path):
    image = sitk.ReadImage(ct_path)
    labels, _ = build_label_array(cio.read_segmentation(seg_path), LUNGS, cio.read_image(ct_path), ct_path)
    # the CT's own labels with another origin (32 slices further): only its first two slices, which hold no lung,
    # overlap the image, so every lung voxel lies outside it
    shifted = _write_like(image, labels.astype(np.uint8), tmp_path / "shifted labels.nrrd",
                          Origin=image.TransformIndexToPhysicalPoint((0, 0, 32)))
    events = []
    req = TrainRequest(labeled=[LabeledInput(ct_path, shifted)], out=str(tmp_path / "m.pt"))
    with pytest.raises(InputError) as e:
        inspect_cases(req, resolve_classes(req), events.append)
    warnings = [ev["message"] for ev in events if ev["event"] == "warning"]
    assert any("has the voxel dimensions of image" in w and "shifted labels.nrrd" in w and "origin" in w for w in warnings), warnings
    assert any("lies outside its image" in w for w in warnings), warnings
    assert "does not lie on its image" in str(e.value) and "shifted labels.nrrd" in str(e.value)


def test_a_case_with_absurd_spacing_is_refused_before_it_collapses_the_others(tmp_path, ct_path, seg_path, capsys):
    image = sitk.ReadImage(ct_path)
    wide = sitk.Image(image)
    wide.SetSpacing([v * 150 for v in image.GetSpacing()])  # ~500 mm voxels: a wrong header
    wide_path = tmp_path / "wide.nrrd"
    sitk.WriteImage(wide, str(wide_path))
    wide_seg = tmp_path / "wide-labels.nrrd"
    labels, _ = build_label_array(cio.read_segmentation(seg_path), LUNGS, cio.read_image(ct_path), ct_path)
    _write_like(wide, labels.astype(np.uint8), wide_seg)
    err = refused(capsys, "train", "--labeled", ct_path, seg_path, "--labeled", wide_path, wide_seg, "--segments", *LUNGS,
                  "--segment-names", "1=right lung", "2=left lung",
                  "--out", tmp_path / "m.pt", "--iterations", "2", "--width", "4", "--device", "cpu",
                  words=["CTChest4", "would shrink", "median of the labeled cases"])
    assert "wide: [457" in err  # the outlier's spacing is shown as well
    assert not (tmp_path / "m.pt").exists()


def test_an_image_unlike_the_training_data_warns(trained, ct_path):
    model, _, _ = trained
    rec = load_model(model)
    ct = cio.read_image(ct_path)
    assert compatibility_warnings(rec, ct, "ct") == []
    mri = sitk.RescaleIntensity(ct, 0.0, 1000.0)  # no air values: not a CT in Hounsfield units
    assert any("does not look like a CT" in w for w in compatibility_warnings(rec, mri, "mri"))
    fine = sitk.Image(ct)
    fine.SetSpacing([v / 6 for v in ct.GetSpacing()])
    assert any("resampled to" in w and "M voxels" in w for w in compatibility_warnings(rec, fine, "fine"))


def test_a_long_silent_phase_emits_heartbeats(capsys):
    report = Reporter("json")
    report.start_heartbeat(every_s=0.3)
    try:
        report({"event": "phase", "phase": "segmenting", "index": 1, "of": 2, "detail": "big.nii.gz"})
        time.sleep(1.2)
    finally:
        report.stop_heartbeat()
    beats = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"heartbeat"' in line]
    assert beats and beats[0]["phase"] == "segmenting (1/2): big.nii.gz" and beats[-1]["seconds"] >= 0


# ---------------------------------------------------------------------------------------- cancels


def test_sigterm_during_a_multi_image_predict_names_what_was_written(trained, data, capsys, monkeypatch):
    from CPCLSegmentLib import prediction

    model, _, _ = trained
    real = prediction.write_prediction

    def write_then_signal(path, *a, **k):
        real(path, *a, **k)
        os.kill(os.getpid(), signal.SIGTERM)  # the CLI's handler: cancel; the loop notices before the next image

    monkeypatch.setattr(prediction, "write_prediction", write_then_signal)
    out = data.parent / "preds"
    code, err, events = run(capsys, "predict", "--model", model, "--image", data / "ct.nrrd", data / "ct.nii.gz", "--out", out,
                            "--progress", "json")
    assert code == 130, err
    assert os.listdir(out) == ["ct-1.seg.nrrd"]  # the second image was not segmented
    assert events[-1]["event"] == "error" and events[-1]["exit_code"] == 130
    message = events[-1]["message"]
    assert "kept what was finished before the cancel" in message and str(out / "ct-1.seg.nrrd") in message, message
    assert "no output was written" not in err


def test_sigterm_during_the_final_save_leaves_the_old_model(trained, data, capsys, monkeypatch, tmp_path):
    from CPCLSegmentLib import modelfile

    model, _, _ = trained
    out = tmp_path / "m.pt"
    shutil.copy(model, out)
    before = sha256(out)
    real = torch.save

    def save_with_signal(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("format") == "cpcl-segment-model":
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the model file is being written
        return real(obj, f, *a, **k)

    monkeypatch.setattr(modelfile.torch, "save", save_with_signal)
    code, err, events = run(capsys, "train", "--labeled", data / "ct.nrrd", data / "ct.seg.nrrd", "--segments", *LUNGS, "--out", out,
                            "--progress", "json", *TINY, "--config", _write(tmp_path / "c.json", '{"checkpoint_every": 1}'))
    assert code == 130, err
    message = events[-1]["message"]
    assert "no output was written" in message and f"the cancel stopped the writing of {out}" in message, message
    assert "m.pt: the previous file is unchanged" in message
    assert sha256(out) == before  # the atomic save did not complete: the previous model is intact
    assert sorted(os.listdir(tmp_path)) == ["c.json", "data", "m.pt"]  # no checkpoint, lock, run record or temporary file


def _write(path, text):
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------- resume


def test_resume_applies_what_may_change_and_refuses_what_may_not(data, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(data)
    out = tmp_path / "m.pt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "m.pt.lock").write_text(json.dumps({"pid": dead.pid, "host": __import__("socket").gethostname(), "started": 1.0}))
    stop = tmp_path / "stop"
    common = ["--segments", *LUNGS, "--out", out, "--progress", "json", "--width", "4", "--patch-size", "32", "32", "16",
              "--spacing", *SPACING, "--device", "cpu"]
    from CPCLSegmentLib import trainer as trainer_module

    real_step = trainer_module.Trainer.step

    def step_then_stop(self, inputs, it):  # the user creates the stop file during iteration 2
        values = real_step(self, inputs, it)
        if it == 1 and not timing_trainer(self):
            stop.write_text("stop")
        return values

    monkeypatch.setattr(trainer_module.Trainer, "step", step_then_stop)
    # relative paths (from the data folder) on the first run
    code, err, events = run(capsys, "train", "--labeled", "ct.nrrd", "ct.seg.nrrd", "--unlabeled", "ct.nii.gz", *common,
                            "--iterations", "6", "--stop-file", stop)
    assert code == 0, err
    assert any("taking over" in e.get("message", "") for e in events)  # the dead run's lock
    assert load_model(str(out))["training"]["iterations"] == 2 and os.path.exists(checkpoint_path(out))
    monkeypatch.setattr(trainer_module.Trainer, "step", real_step)
    os.remove(stop)
    absolute = ["--labeled", data / "ct.nrrd", data / "ct.seg.nrrd", "--unlabeled", data / "ct.nii.gz", *common]
    err = refused(capsys, "train", *absolute, "--iterations", "6", "--resume", "--patch-size", "64", "64", "16",
                  words=["--resume", "--patch-size", "interrupted run"])
    refused(capsys, "train", *absolute, "--iterations", "6", "--resume", "--method", "supervised", words=["--method supervised"])
    refused(capsys, "train", *absolute, "--iterations", "2", "--resume", words=["at iteration 2", "more than 2"])
    # a cancelled resumed run keeps the checkpoint it was resumed from (and says so); the cancel here comes
    # after iteration 3, whose checkpoint is then not written: the run resumes from iteration 2 again
    def step_then_cancel(self, inputs, it):
        values = real_step(self, inputs, it)
        os.kill(os.getpid(), signal.SIGTERM)
        return values

    monkeypatch.setattr(trainer_module.Trainer, "step", step_then_cancel)
    code, err, events = run(capsys, "train", *absolute, "--iterations", "6", "--resume")
    assert code == 130, err
    assert "kept what was finished before the cancel" in events[-1]["message"] and "--resume continues from it" in events[-1]["message"]
    assert os.path.exists(checkpoint_path(out))
    monkeypatch.setattr(trainer_module.Trainer, "step", real_step)
    # absolute paths now, with a longer run and another learning rate: applied and said
    code, err, events = run(capsys, "train", *absolute, "--iterations", "5", "--lr", "0.001", "--resume")
    assert code == 0, err
    info = [e["message"] for e in events if e["event"] == "info" and "resuming" in e.get("message", "")]
    assert info and "resuming from iteration 2" in info[0] and "iterations 6 -> 5" in info[0] and "lr 0.003 -> 0.001" in info[0], info
    assert [e["iteration"] for e in events if e["event"] == "progress"] == [3, 4, 5]
    assert [e for e in events if e["event"] == "summary"][0]["iterations"] == 5
    rec = load_model(str(out))
    assert rec["training"]["iterations"] == 5 and rec["training"]["config"]["lr"] == 0.001
    assert not os.path.exists(checkpoint_path(out)) and not os.path.exists(str(out) + ".lock")
