"""Hostile inputs of the third reliability round, each through the CLI (``cli.main``, in-process unless a fresh
process is the point) on tiny synthetic volumes: Decathlon channel layouts, sparse labels without a painted
slice, ``--compare-supervised`` without unlabeled cases or with empty validation labels, strict JSON everywhere,
NaN in NIfTI, divergence and ``--resume``, duplicated cases, one-slice images, patch sizes in the typed order,
``--out`` names, warnings said once, ``--init`` from other segments, the temporary folder left clean."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CPCLSegmentLib import cli, planning
from CPCLSegmentLib.companions import checkpoint_path, run_record_path
from CPCLSegmentLib.modelfile import load_checkpoint, load_model
from CPCLSegmentLib.trainer import Trainer

from conftest import child_env

SHAPE = (20, 24, 24)  # (z, y, x) voxels: a sphere of label 1 in noise


def volume(folder, name, seed=0, label=True, shape=SHAPE, fill=None):
    """Writes ``name`` (the image) and, with ``label``, ``lab-<name>`` (its label map); returns their paths."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    c = np.array(shape) / 2.0
    lab = (((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) < (min(shape) / 4.0) ** 2).astype(np.uint8)
    img = (lab * 100.0 + rng.normal(0, 10, shape)).astype(np.float32) if fill is None else np.full(shape, fill, np.float32)
    paths = []
    for arr, path in ((img, folder / name), (lab if label is True else np.zeros(shape, np.uint8), folder / f"lab-{name}")):
        im = sitk.GetImageFromArray(arr)
        sitk.WriteImage(im, str(path))
        paths.append(str(path))
    return paths if label is not None else paths[:1]


@pytest.fixture()
def cases(tmp_path):
    """Three labeled tiny cases a, b, c, one with an empty label map (e), and the settings of a 2-iteration run."""
    folder = tmp_path / "in"
    folder.mkdir()
    out = {k: volume(folder, f"{k}.nii.gz", seed=i) for i, k in enumerate("abc")}
    out["e"] = volume(folder, "e.nii.gz", seed=9, label=False)
    (folder / "tiny.json").write_text(json.dumps({"depth": 3, "optimizer": "sgd", "copy_paste": False}))
    out["args"] = ["--iterations", "2", "--width", "4", "--config", str(folder / "tiny.json"), "--patch-size", "16", "16", "16",
                   "--device", "cpu"]
    out["folder"] = folder
    return out


def train(capsys, *args, progress="none"):
    code = cli.main(["train", *map(str, args), "--progress", progress])
    io = capsys.readouterr()
    return code, io.out, io.err


def strict_lines(stdout):
    """Every stdout line parsed as strict JSON (NaN / Infinity rejected)."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return [json.loads(line, parse_constant=refuse) for line in stdout.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------- bugs


def test_decathlon_folder_with_several_channels_is_refused_naming_them(tmp_path, cases, capsys):
    ds = tmp_path / "Dataset"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    for i, k in enumerate("ab"):
        img, lab = cases[k]
        os.link(img, ds / "imagesTr" / f"case{i}_0000.nii.gz")
        os.link(img, ds / "imagesTr" / f"case{i}_0001.nii.gz")
        os.link(lab, ds / "labelsTr" / f"case{i}.nii.gz")
    code, _, err = train(capsys, "--dataset", ds, "--out", tmp_path / "m.pt", *cases["args"])
    assert code == 2 and "several image channels per case (case0: case0_0000.nii.gz, case0_0001.nii.gz" in err, err
    assert not (tmp_path / "m.pt").exists()
    # one channel per case (nnU-Net's _0000 names) trains; dataset.json naming two channels is refused
    for i in range(2):
        os.remove(ds / "imagesTr" / f"case{i}_0001.nii.gz")
    code, _, err = train(capsys, "--dataset", ds, "--out", tmp_path / "m.pt", *cases["args"])
    assert code == 0 and "2 labeled + 0 unlabeled" in err, err
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "x": 1}}))
    code, _, err = train(capsys, "--dataset", ds, "--out", tmp_path / "m2.pt", *cases["args"])
    assert code == 2 and "2 image channels (0: T2, 1: ADC" in err and "--cases" in err, err


def test_annotated_slices_on_a_label_without_a_painted_slice_is_refused_naming_it(tmp_path, cases, capsys):
    code, _, err = train(capsys, "--labeled", *cases["a"], "--labeled", *cases["e"], "--annotated-slices", "axial",
                         "--out", tmp_path / "m.pt", *cases["args"])
    assert code == 2 and "e.nii.gz (segmentation" in err and "no painted axial slice" in err, err


def test_compare_supervised_without_unlabeled_cases_trains_once_and_says_so(tmp_path, cases, capsys):
    out = tmp_path / "m.pt"
    code, stdout, err = train(capsys, "--labeled", *cases["a"], "--validation", *cases["b"], "--compare-supervised",
                              "--out", out, *cases["args"], progress="json")
    events = strict_lines(stdout)
    assert code == 0, err
    assert [e["method"] for e in events if e["event"] == "start"] == ["supervised"]  # trained once, not twice
    said = [e["message"] for e in events if e["event"] in ("warning", "info")]
    assert not any("keeping the cpcl model" in m for m in said), said
    unlabeled = [m for m in said if "no unlabeled cases" in m]
    assert len(unlabeled) == 1 and "nothing to compare" in unlabeled[0], said  # one warning for one cause
    assert load_model(str(out))["training"]["method"] == "supervised"


def test_empty_validation_labels_are_said_and_compare_supervised_refuses_them(tmp_path, cases, capsys):
    code, _, err = train(capsys, "--labeled", *cases["a"], "--unlabeled", cases["c"][0], "--validation", *cases["e"],
                         "--compare-supervised", "--out", tmp_path / "m.pt", *cases["args"])
    assert code == 2 and "lab-e.nii.gz" in err and "empty" in err and "--compare-supervised" in err, err
    assert not os.path.exists(run_record_path(str(tmp_path / "m.pt")))
    # without the comparison it trains, says so up front, and predict --weights best tells why there are none
    out = tmp_path / "m2.pt"
    code, stdout, err = train(capsys, "--labeled", *cases["a"], "--validation", *cases["e"], "--out", out, *cases["args"], progress="json")
    events = strict_lines(stdout)
    assert code == 0, err
    warned = [e["message"] for e in events if e["event"] == "warning" and "lab-e.nii.gz" in e.get("message", "")]
    assert warned and "Dice is undefined" in warned[0], warned
    assert [e for e in events if e["event"] == "done"][0]["validation_mean_dice"] is None
    code = cli.main(["predict", "--model", str(out), "--image", cases["b"][0], "--out", str(tmp_path / "p.nii.gz"), "--weights", "best",
                     "--device", "cpu", "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "without --validation" not in err and "empty" in err, err


def test_every_json_line_and_the_run_record_are_strict_and_no_empty_inductor_folder_is_left(tmp_path, cases):
    """A fresh process (``torchinductor_<user>`` is made when torch's compiler is first imported) with a validation
    case whose labels are empty (its Dice is NaN inside) and --compare-supervised off: every event parses as
    strict JSON, and so does the run record."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "m.pt"
    env = dict(child_env(), TMPDIR=str(tmp))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    proc = subprocess.run([sys.executable, "-m", "CPCLSegmentLib.cli", "train", "--labeled", *cases["a"], "--unlabeled", cases["c"][0],
                           "--validation", *cases["e"], "--validation", *cases["b"], "--out", str(out), *cases["args"],
                           "--progress", "json"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = strict_lines(proc.stdout)
    kinds = {e["event"] for e in events}
    assert {"summary", "start", "progress", "validation", "done"} <= kinds, kinds
    with open(run_record_path(str(out)), encoding="utf-8") as f:
        json.loads(f.read(), parse_constant=lambda name: pytest.fail(f"run record holds {name}"))
    assert not [n for n in os.listdir(tmp) if n.startswith("torchinductor")], os.listdir(tmp)


def test_nan_or_inf_in_a_nifti_image_is_refused(tmp_path, cases, capsys):
    model = tmp_path / "m.pt"
    assert train(capsys, "--labeled", *cases["a"], "--out", model, *cases["args"])[0] == 0
    for value in (np.nan, np.inf):
        bad = volume(cases["folder"], f"bad{value}.nii.gz", label=None, fill=value)[0]
        code = cli.main(["predict", "--model", str(model), "--image", bad, "--out", str(tmp_path / "p.nii.gz"), "--device", "cpu",
                         "--progress", "none"])
        err = capsys.readouterr().err
        assert code == 2 and bad in err and "NaN or infinite" in err, err
        assert not (tmp_path / "p.nii.gz").exists()
    code, _, err = train(capsys, "--labeled", bad, cases["a"][1], "--out", tmp_path / "m2.pt", *cases["args"])
    assert code == 2 and "NaN or infinite" in err, err


def test_a_diverged_run_keeps_a_sane_checkpoint_and_its_advice_resumes(tmp_path, cases, capsys, monkeypatch):
    """The learning rate becomes far too high after iteration 3: the loss explodes. The checkpoint kept must hold
    sane weights (the last one before the loss grew), and the advice (a lower --lr with --resume) must train on."""
    original = Trainer.step

    def step(self, inputs, it):
        if it >= 3:
            self.cfg.lr = 1e4
        return original(self, inputs, it)

    monkeypatch.setattr(Trainer, "step", step)
    folder = cases["folder"]
    (folder / "ck.json").write_text(json.dumps({"depth": 3, "optimizer": "sgd", "checkpoint_every": 1, "copy_paste": False}))
    out = tmp_path / "m.pt"
    args = ["--labeled", *cases["a"], "--unlabeled", cases["c"][0], "--out", out, "--iterations", "8", "--width", "4",
            "--config", folder / "ck.json", "--patch-size", "16", "16", "16", "--device", "cpu", "--lr", "0.01"]
    code, _, err = train(capsys, *args)
    assert code == 3 and "--resume" in err and "before the loss grew (iteration 3)" in err, err
    state = load_checkpoint(checkpoint_path(str(out)))["trainer"]
    assert state["iteration"] == 3
    for net in ("student", "teacher"):
        assert max(float(v.abs().max()) for v in state[net].values() if v.is_floating_point()) < 100.0
    monkeypatch.setattr(Trainer, "step", original)
    code, _, err = train(capsys, *args[:-2], "--lr", "0.0001", "--resume")
    assert code == 0 and "resuming from iteration 3" in err, err
    assert load_model(str(out))["training"]["iterations"] == 8


# -------------------------------------------------------------------------------------------- weak answers


def test_the_same_case_twice_or_a_validation_case_also_trained_on_is_refused_naming_it(tmp_path, cases, capsys):
    code, _, err = train(capsys, "--labeled", *cases["a"], "--labeled", *cases["a"], "--out", tmp_path / "m.pt", *cases["args"])
    assert code == 2 and f"{cases['a'][0]} is given twice as a labeled case" in err, err
    code, _, err = train(capsys, "--labeled", *cases["a"], "--validation", cases["a"][0], cases["b"][1], "--out", tmp_path / "m.pt",
                         *cases["args"])
    assert code == 2 and f"{cases['a'][0]} is both a labeled and a validation case" in err, err
    code, _, err = train(capsys, "--labeled", *cases["a"], "--unlabeled", cases["c"][0], cases["c"][0], "--out", tmp_path / "m.pt",
                         *cases["args"])
    assert code == 2 and f"{cases['c'][0]} is given twice as an unlabeled case" in err, err
    assert not (tmp_path / "m.pt").exists()
    # a validation image also given as unlabeled (Slicer: the held-out case's volume among the unlabeled ones) is held out
    from CPCLSegmentLib.preparation import LabeledInput, TrainRequest
    from CPCLSegmentLib.trainchecks import check_each_case_once

    said = []
    req = TrainRequest(labeled=[LabeledInput(*cases["a"])], validation=[LabeledInput(*cases["b"])], out=str(tmp_path / "m.pt"),
                       unlabeled=[cases["b"][0], cases["c"][0]])
    check_each_case_once(req, said.append)
    assert req.unlabeled == [cases["c"][0]] and "held out of the unlabeled cases too" in said[0]["message"]


def test_a_one_slice_image_is_refused_up_front(tmp_path, cases, capsys):
    flat = volume(cases["folder"], "flat.nii.gz", shape=(1, 200, 200))
    code, _, err = train(capsys, "--labeled", *cases["a"], "--unlabeled", flat[0], "--out", tmp_path / "m.pt", *cases["args"])
    assert code == 2 and "flat.nii.gz" in err and "one slice" in err, err
    assert "training" not in err.split("one slice")[0]  # refused before anything was trained
    model = tmp_path / "ok.pt"
    assert train(capsys, "--labeled", *cases["a"], "--out", model, *cases["args"])[0] == 0
    code = cli.main(["predict", "--model", str(model), "--image", flat[0], "--out", str(tmp_path / "p.nii.gz"), "--progress", "none"])
    assert code == 2 and "one slice" in capsys.readouterr().err


def test_patch_sizes_are_echoed_in_the_order_typed(tmp_path, cases, capsys):
    args = list(cases["args"])
    i = args.index("--patch-size")
    args[i + 1:i + 4] = ["16", "24", "8"]  # X Y Z
    code, _, err = train(capsys, "--labeled", *cases["a"], "--out", tmp_path / "m.pt", *args)
    assert code == 0 and "patch 16 24 8 (X Y Z)" in err, err


def test_the_smaller_patch_suggested_after_running_out_of_memory_fits():
    cfg = dict(labeled_batch=2, unlabeled_batch=2, width=16, depth=4, num_classes=3, method="cpcl", optimizer="sgd", amp=False,
               copy_paste=True)
    for device, patch in (("cuda", (16, 16, 16)), ("cuda", (64, 128, 128)), ("cpu", (96, 160, 160))):
        need = planning.estimate_memory(patch, device_type=device, **cfg)["total"]
        free = need * 0.6
        smaller = planning.smaller_patch(patch, free, device_type=device, **cfg)
        if smaller is None:  # even the smallest patch does not fit: said as such
            assert patch == (16, 16, 16)
            continue
        assert np.prod(smaller) < np.prod(patch)
        assert planning.estimate_memory(smaller, device_type=device, **cfg)["total"] <= free
    # the message after an out-of-memory names that patch in --patch-size order (X Y Z)
    from CPCLSegmentLib.settings import TrainConfig
    from CPCLSegmentLib.planning import oom_error

    msg = str(oom_error(TrainConfig(patch_size=(32, 64, 96), width=16, depth=4), "cpu", 3, free=2e9))
    sm = re.search(r"--patch-size (\d+) (\d+) (\d+)", msg)
    assert sm, msg
    x, y, z = map(int, sm.groups())
    assert planning.estimate_memory((z, y, x), 2, 2, 16, 4, 3, "cpcl", "sgd", False, "cpu", True)["total"] <= 2e9


def test_predict_out_with_another_extension_is_refused_not_made_a_folder(tmp_path, cases, capsys):
    model = tmp_path / "m.pt"
    assert train(capsys, "--labeled", *cases["a"], "--out", model, *cases["args"])[0] == 0
    code = cli.main(["predict", "--model", str(model), "--image", cases["b"][0], "--out", str(tmp_path / "o.png"), "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "o.png" in err and ".seg.nrrd" in err, err
    assert not (tmp_path / "o.png").exists()


def test_init_from_a_model_of_other_segments_says_so_in_the_summary(tmp_path, cases, capsys):
    model = tmp_path / "m.pt"
    assert train(capsys, "--labeled", *cases["a"], "--out", model, "--segment-names", "1=spleen", *cases["args"])[0] == 0
    code, stdout, err = train(capsys, "--labeled", *cases["b"], "--init", model, "--segment-names", "1=liver", "--out",
                              tmp_path / "m2.pt", *cases["args"], progress="json")
    assert code == 0, err
    summary = [e for e in strict_lines(stdout) if e["event"] == "summary"][0]
    assert "new segments (new output channels): ['liver']" in summary["starting_model"], summary
    assert "not kept: ['spleen']" in summary["starting_model"], summary
    assert "starting from" in err.split("iterations on")[0] and "['liver']" in err.split("iterations on")[0], err
