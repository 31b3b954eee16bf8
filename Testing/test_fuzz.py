"""Issue 14's fuzz test (slow tier): random settings and random paths, inputs given as outputs among them, through
``cpcl-segment train | predict | rank | info`` (in-process ``cli.main``). Every run must end with exit 0 (done), 2 (a
clear error) or 4 (out of memory): never 1 (an internal error) or a traceback; and every input file must be
byte-identical afterwards (hashed before and after each run)."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import SimpleITK as sitk

from CPCLSegmentLib import cli, pipeline
from CPCLSegmentLib import io as cio
from CPCLSegmentLib.labels import build_label_array
from CPCLSegmentLib.preparation import LabeledInput, TrainRequest
from CPCLSegmentLib.settings import RunOptions

from conftest import COARSE_SPACING, LUNGS, sha256, small_config, user_folder

RUNS = 70
# Random values per setting: valid small ones (so a run that passes the checks trains in seconds) and invalid ones
# (wrong type, out of range, absurd). compile=true and large valid values are left out: valid, but slow.
VALUES = {
    "iterations": [1, 2, 0, -3, 2.5, "ten", None, True, 10**30],
    "minutes": [0.01, 0, -1, "soon", float("inf")],
    "lr": [1e-3, 0.01, -1.0, "3e-3", float("nan"), None],
    "width": [4, 2.5, 0, -8, "wide"],
    "depth": [1, 2, 3, 4, 7, 0, "deep"],
    "norm": ["instance", "batch", "group", "none", "layer", 3],
    "feature_level": [0, 1, 5, -1],
    "dropout": [0.0, 0.2, 1.0, -0.5],
    "labeled_batch": [1, 2, 0, -1],
    "unlabeled_batch": [0, 1, 2, -2],
    "method": ["cpcl", "mean_teacher", "supervised", "cpl", None],
    "optimizer": ["sgd", "adamw", "adam"],
    "consistency_weight": [None, 0.0, 1.0, -5, "heavy"],
    "lambda_max": [0.1, 1.0, -1.0],
    "beta": [10.0, 0.0, -2.0],
    "rampup": [0.4, 5, -1],
    "ema_decay": [0.99, 0.0, 1.0, 1.5],
    "validation_every": [0, 1, -3, "often"],
    "checkpoint_every": [0, 1, -1],
    "validation_overlap": [0.25, 0.9, 1.0, -0.1],
    "compile": [False, "yes", 1],
    "copy_paste": [True, False, "no"],
    "copy_paste_size": [0.5, 0.0, 1.0, 2.0],
    "foreground_oversample": [0.33, 1.0, 1.5],
    "seed": [0, 7, -1, 2**40, 2**64, "random"],
    "device": ["cpu", "gpu", "cuda", "cuda:x", 0],
    "patch_size": [[16, 32, 32], [16, 16, 15], [32, 32], "big", [0, 0, 0]],
    "flip": [True, False, "sometimes"],
    "per_sample_prototypes": [True, False],
    "forward_prediction": ["student", "teacher", "both"],
    "map_resolution": ["feature", "label", "voxel"],
    "intensity_prob": [0.0, 0.5, 2.0],
    "unknown_setting": [1],
}


@pytest.fixture()
def world(tmp_path, ct_path, seg_path):
    """A user's folder of inputs (valid, broken, and a small model) and an empty output folder."""
    inputs = user_folder(tmp_path / "inputs", ct_path, seg_path)
    labels, _ = build_label_array(cio.read_segmentation(seg_path), LUNGS, cio.read_image(ct_path), ct_path)
    lm = sitk.GetImageFromArray(labels.astype(np.uint8))
    lm.CopyInformation(sitk.ReadImage(ct_path))
    sitk.WriteImage(lm, str(inputs / "lungs.nii.gz"))
    empty = sitk.GetImageFromArray(np.zeros(labels.shape, np.uint8))
    empty.CopyInformation(sitk.ReadImage(ct_path))
    sitk.WriteImage(empty, str(inputs / "empty.nii.gz"))  # a validation case with empty labels
    nan = sitk.GetImageFromArray(np.full(labels.shape, np.nan, np.float32))
    nan.CopyInformation(sitk.ReadImage(ct_path))
    sitk.WriteImage(nan, str(inputs / "nan.nii.gz"))  # ITK's NIfTI reader would show these voxels as 0
    for folder, channels in (("decathlon", 1), ("decathlon-channels", 2)):  # nnU-Net / Decathlon layouts, one or two channels
        (inputs / folder / "imagesTr").mkdir(parents=True)
        (inputs / folder / "labelsTr").mkdir()
        for c in range(channels):
            os.link(inputs / "ct.nii.gz", inputs / folder / "imagesTr" / f"chest_{c:04d}.nii.gz")
        os.link(inputs / "lungs.nii.gz", inputs / folder / "labelsTr" / "chest.nii.gz")
    data = (inputs / "ct.nii.gz").read_bytes()
    (inputs / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    (inputs / "garbage.nrrd").write_bytes(b"GARBAGE" + random.Random(0).randbytes(2000))
    (inputs / "cases.csv").write_text("image,segmentation,role\nct.nrrd,ct.seg.nrrd,labeled\nct.nii.gz,,unlabeled\n")
    (inputs / "settings.json").write_text('{"iterations": 1, "width": 4}')
    model = inputs / "model.pt"
    pipeline.train(TrainRequest(labeled=[LabeledInput(ct_path, seg_path)], unlabeled=[ct_path], out=str(model), segments=LUNGS,
                                config=small_config(iterations=1, width=4, depth=3, patch_size=(16, 32, 32)), options=RunOptions(spacing=list(COARSE_SPACING))))
    os.symlink(inputs / "ct.nrrd", inputs / "link to ct.nrrd")
    (inputs / "sub").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    return inputs, out


def _paths(rng, inputs, out, exts, good):
    """An output path: new and valid (``good``), else a hostile one: an input, a link to one, a folder, empty,
    under a file, without its extension."""
    files = sorted(p for p in inputs.iterdir() if p.is_file())
    if good:
        return str(out / rng.choice(["Lékař data", "plain"]) / f"new {rng.randrange(1000)}{exts[0]}")
    return rng.choice([
        str(out / f"new {rng.randrange(1000)}{rng.choice(exts[1:] or exts)}"),
        str(rng.choice(files)),
        str(inputs / "link to ct.nrrd"),
        str(inputs),
        str(out),
        "",
        str(rng.choice(files) / f"x{rng.choice(exts)}"),
        str(out / "model"),
    ])


GOOD_IMAGES, BAD_IMAGES = ["ct.nrrd", "ct.nii.gz", "link to ct.nrrd"], ["truncated.nii.gz", "garbage.nrrd", "sub", "missing.nrrd",
                                                                        "ct.seg.nrrd", "model.pt", "nan.nii.gz"]
GOOD_SEGS, BAD_SEGS = ["ct.seg.nrrd", "lungs.nii.gz"], ["ct.nrrd", "garbage.nrrd", "sub", "truncated.nii.gz", "missing.seg.nrrd"]


def _pick(rng, inputs, good, bad, ok):
    return str(inputs / rng.choice(good if ok else bad))


def _train_args(rng, inputs, out, n, hostile):
    """A training command line with the ``hostile`` parts broken (the rest valid and small: it trains in seconds)."""
    settings = {"iterations": rng.choice([1, 2]), "width": 4, "patch_size": [16, 32, 32], "device": "cpu", "validation_every": 0}
    if "setting" in hostile:
        for name in rng.sample(sorted(VALUES), rng.randrange(1, 4)):
            settings[name] = rng.choice(VALUES[name])
        if isinstance(settings.get("minutes"), (int, float)) and settings["minutes"] > 0:
            settings["minutes"] = 0.01
    config = out / f"config-{n}.json"
    config.write_text(json.dumps(settings))
    seg = _pick(rng, inputs, GOOD_SEGS, BAD_SEGS, "segmentation" not in hostile)
    args = ["train", "--out", _paths(rng, inputs, out, [".pt", ".nii.gz", ""], "out" not in hostile), "--config", str(config),
            "--progress", rng.choice(["none", "json"]), "--labeled", _pick(rng, inputs, GOOD_IMAGES, BAD_IMAGES, "image" not in hostile), seg]
    if "dataset" in hostile or rng.random() < 0.15:  # Decathlon layouts: two channels per case are refused
        args += ["--dataset", str(inputs / ("decathlon-channels" if "dataset" in hostile else "decathlon"))]
    if "validation" in hostile:  # a validation case whose labels are empty, with or without the comparison
        args += ["--validation", str(inputs / "ct.nii.gz"), str(inputs / "empty.nii.gz")] + rng.choice([[], ["--compare-supervised"]])
    if "cases" in hostile:
        args += ["--cases", str(rng.choice([inputs / "settings.json", inputs / "ct.nrrd", inputs / "sub", inputs / "cases.csv"]))]
    if rng.random() < 0.5:
        args += ["--unlabeled", _pick(rng, inputs, GOOD_IMAGES, BAD_IMAGES, "unlabeled" not in hostile)]
    if seg.endswith("ct.seg.nrrd") or rng.random() < 0.3:
        args += ["--segments", *(rng.choice([["spleen"], ["0"], ["right lung", "right lung"]]) if "segments" in hostile
                                 else (LUNGS if seg.endswith("ct.seg.nrrd") else ["1"]))]
    spacing = rng.choice([[0, 0, 0], [1e-6] * 3, [1e6] * 3, [-1, 2, 3], [float("nan")] * 3]) if "spacing" in hostile else COARSE_SPACING
    args += ["--spacing", *map(str, spacing)]
    if "flag" in hostile:
        flag = rng.choice(["--init", "--resume", "--freeze-encoder", "--stop-file", "--work-dir", "--compare-supervised"])
        if flag in ("--resume", "--freeze-encoder", "--compare-supervised"):
            args.append(flag)
        elif flag == "--init":
            args += [flag, str(rng.choice([inputs / "model.pt", inputs / "garbage.nrrd", inputs / "ct.nrrd"]))]
        else:
            args += [flag, _paths(rng, inputs, out, ["", ".txt"], False)]
    return args


def _predict_args(rng, inputs, out, hostile):
    images = [_pick(rng, inputs, GOOD_IMAGES, BAD_IMAGES, "image" not in hostile) for _ in range(rng.choice([1, 1, 2, 3]))]
    good_out = "out" not in hostile
    target = _paths(rng, inputs, out, [".seg.nrrd", ".nii.gz", ".nrrd", ".mha", ".txt", ""], good_out)
    if good_out and len(images) > 1:
        target = os.path.dirname(target)
    return ["predict", "--model", str(inputs / "model.pt") if "model" not in hostile else str(rng.choice([inputs / "ct.nrrd", inputs / "sub"])),
            "--image", *images, "--out", target, "--format", rng.choice([".seg.nrrd", ".nii.gz", ".nrrd"]), "--device", "cpu",
            "--progress", rng.choice(["none", "json"])]


def _rank_args(rng, inputs, out, hostile):
    args = ["rank", "--model", str(inputs / "model.pt") if "model" not in hostile else str(inputs / "garbage.nrrd"), "--images",
            *[_pick(rng, inputs, GOOD_IMAGES, BAD_IMAGES, "image" not in hostile) for _ in range(rng.choice([1, 2]))],
            "--device", "cpu", "--progress", "none", "--score", rng.choice(["auto", "entropy", "prototype"] + (["magic"] if "score" in hostile else []))]
    if rng.random() < 0.7:
        args += ["--out", _paths(rng, inputs, out, [".csv", ".nii.gz", ""], "out" not in hostile)]
    if rng.random() < 0.4:
        args += ["--uncertainty-dir", str(out / "maps") if "out" not in hostile else rng.choice([str(inputs), str(inputs / "ct.nrrd"), ""])]
    return args


HOSTILE = {"train": ["setting", "setting", "out", "image", "segmentation", "cases", "unlabeled", "segments", "spacing", "flag", "dataset",
                    "validation"],
           "predict": ["image", "out", "out", "model"], "rank": ["image", "out", "model", "score"]}


@pytest.mark.slow
def test_random_settings_and_paths_end_in_a_clear_error_or_a_result_and_never_touch_an_input(world, capsys):
    inputs, out = world
    hashes = {p: sha256(p) for p in inputs.iterdir() if p.is_file() and not p.is_symlink()}
    rng = random.Random(14)
    outcomes = []
    for n in range(RUNS):
        kind = rng.choice(["train", "train", "train", "predict", "predict", "rank", "info"])
        # a third of the runs fully valid, the others with one to three hostile parts
        hostile = set() if rng.random() < 0.33 or kind == "info" else set(rng.sample(HOSTILE[kind], rng.randrange(1, 4)))
        if kind == "train":
            args = _train_args(rng, inputs, out, n, hostile)
        elif kind == "predict":
            args = _predict_args(rng, inputs, out, hostile)
        elif kind == "rank":
            args = _rank_args(rng, inputs, out, hostile)
        else:
            args = ["info", rng.choice([str(p) for p in inputs.iterdir()] + [""])]
        code = cli.main(args)
        captured = capsys.readouterr()
        err = captured.out + captured.err
        if "json" in args:  # every line of the stream is strict JSON (no NaN / Infinity)
            for line in captured.out.splitlines():
                json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {line[:200]} ({args})"))
        outcomes.append(code)
        assert code in (0, 2, 4), (args, err[-3000:])
        assert "internal error" not in err and "Traceback" not in err, (args, err[-3000:])
        for p, h in hashes.items():
            assert p.exists() and sha256(p) == h, (f"{p} changed", args)
        leftovers = [q for q in out.rglob("*") if q.name.startswith(".tmp-") or q.name.endswith(".lock")]
        assert not leftovers, (leftovers, args)
    assert outcomes.count(0) >= RUNS // 5 and outcomes.count(2) >= RUNS // 3, outcomes  # both results and refusals were exercised
