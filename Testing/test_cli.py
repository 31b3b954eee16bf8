"""The ``cpcl-segment`` command as a user runs it (subprocesses on real data)."""

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
import slicerio

from CPCLSegmentLib import io as cio
from CPCLSegmentLib.labels import build_label_array
from CPCLSegmentLib.modelfile import load_model

from conftest import COARSE_SPACING, LUNGS, child_env, cli_command, sha256

SMALL = ["--iterations", "8", "--patch-size", "32", "32", "16", "--width", "4", "--spacing", *map(str, COARSE_SPACING), "--device", "cpu"]


def run_cli(*args, cwd=None, timeout=300, env=None):
    return subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=timeout, env=env or child_env(), cwd=cwd)


def json_lines(stdout):
    return [json.loads(line) for line in stdout.splitlines()]  # every stdout line must be JSON


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, ct_path, seg_path):
    """train through the CLI in a folder whose name has a space and non-ASCII letters."""
    folder = tmp_path_factory.mktemp("cli") / "Lékař data"
    folder.mkdir()
    ct_copy = folder / "chest CT.nrrd"
    ct_copy.write_bytes(open(ct_path, "rb").read())
    hashes = {p: sha256(p) for p in (ct_path, seg_path, str(ct_copy))}
    model = folder / "model ü.pt"
    proc = run_cli("train", "--labeled", ct_copy, seg_path, "--unlabeled", ct_copy, "--validation", ct_path, seg_path,
                   "--segments", *LUNGS, "--out", model, "--progress", "json", *SMALL, "--config", _config(folder))
    return folder, ct_copy, model, proc, hashes


def _config(folder):
    path = folder / "settings.yaml"
    path.write_text("optimizer: adamw\nlr: 0.003\nvalidation_every: 4\ndepth: 3\n", encoding="utf-8")
    return path


def test_train_writes_json_lines_model_and_run_record(cli_run):
    folder, _, model, proc, _ = cli_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = json_lines(proc.stdout)
    kinds = [e["event"] for e in events]
    assert kinds.index("summary") < kinds.index("start") < kinds.index("progress") and kinds[-1] == "done"
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["iteration"] for e in progress] == list(range(1, 9))
    assert {"supervised", "forward", "backward", "total"} <= set(progress[0]["loss"]) and "eta_s" in progress[0]
    vals = [e for e in events if e["event"] == "validation"]
    assert [v["iteration"] for v in vals] == [4, 8] and set(vals[0]["dice"]) == set(LUNGS)
    assert "CPCLSegment" in proc.stderr and "voxels per segment" in proc.stderr  # the summary, on stderr
    rec = load_model(str(model))
    assert rec["network"]["depth"] == 3 and rec["training"]["config"]["optimizer"] == "adamw"  # from the YAML
    assert rec["best"]["iteration"] in (4, 8)  # best weights kept when not the last teacher's
    assert (rec["weights"]["best"] is None) == (rec["best"]["iteration"] == 8)
    assert sorted(p.name for p in folder.iterdir()) == ["chest CT.nrrd", "model ü.pt", "model ü.run.json", "settings.yaml"]


def test_inputs_are_never_modified(cli_run):
    *_, hashes = cli_run
    assert all(sha256(p) == h for p, h in hashes.items())


def test_predict_seg_nrrd_on_the_original_grid_with_every_segment(cli_run, ct_path, tmp_path):
    _, _, model, _, _ = cli_run
    out = tmp_path / "pred.seg.nrrd"
    proc = run_cli("predict", "--model", model, "--image", ct_path, "--out", out, "--device", "cpu", "--progress", "json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = json_lines(proc.stdout)
    assert events[-1]["event"] == "done" and events[-1]["outputs"] == [str(out)]
    seg = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in seg["segments"]] == LUNGS  # listed even if predicted empty
    assert np.allclose(seg["segments"][0]["color"], [0.0862745, 0.772549, 0.278431], atol=1e-5)
    assert seg["voxels"].shape == (128, 128, 34)
    assert np.allclose(seg["ijkToLPS"], cio.ijk_to_lps_matrix(cio.read_image(ct_path)), atol=1e-4)


def test_predict_several_images_into_a_folder_as_label_maps(cli_run, ct_path, tmp_path):
    _, ct_copy, model, _, _ = cli_run
    out = tmp_path / "preds"
    proc = run_cli("predict", "--model", model, "--image", ct_path, ct_copy, "--out", out, "--format", ".nii.gz", "--device", "cpu", "--progress", "none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["CTChest4.nii.gz", "chest CT.nii.gz"]
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "CTChest4.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "chest CT.nii.gz")))
    assert np.array_equal(a, b) and set(np.unique(a)) <= {0, 5, 6}  # the .seg.nrrd label values of the lungs


def test_label_map_model_writes_the_values_it_was_trained_on(tmp_path, ct_path, seg_path):
    image = cio.read_image(ct_path)
    labels, _ = build_label_array(cio.read_segmentation(seg_path), LUNGS, image, ct_path)
    lm = sitk.GetImageFromArray(np.where(labels == 1, 3, np.where(labels == 2, 7, 0)).astype(np.uint8))
    lm.CopyInformation(image)
    lm_path = tmp_path / "lungs.nii.gz"
    sitk.WriteImage(lm, str(lm_path))
    model = tmp_path / "lm.pt"
    proc = run_cli("train", "--labeled", ct_path, lm_path, "--segment-names", "3=right", "7=left", "--out", model,
                   "--progress", "none", *SMALL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "supervised-only" in proc.stderr  # no --unlabeled: says so
    rec = load_model(str(model))
    assert [(c["name"], c["label_value"]) for c in rec["classes"]] == [("background", 0), ("right", 3), ("left", 7)]
    out = tmp_path / "pred.nrrd"
    assert run_cli("predict", "--model", model, "--image", ct_path, "--out", out, "--progress", "none").returncode == 0
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out))))) <= {0, 3, 7}


@pytest.mark.parametrize(
    "case",
    ["missing image", "missing segmentation", "unknown segment", "unreadable image", "no overlap", "bad model"],
)
def test_bad_inputs_exit_non_zero_naming_the_file(case, tmp_path, ct_path, seg_path):
    bad = tmp_path / "broken file.nrrd"
    bad.write_bytes(b"garbage")
    far = tmp_path / "elsewhere.nrrd"
    img = sitk.ReadImage(ct_path)
    img.SetOrigin([5000, 5000, 5000])
    sitk.WriteImage(img, str(far))
    args = {
        "missing image": (["--labeled", tmp_path / "nope.nrrd", seg_path], "nope.nrrd"),
        "missing segmentation": (["--labeled", ct_path, tmp_path / "nope.seg.nrrd"], "nope.seg.nrrd"),
        "unknown segment": (["--labeled", ct_path, seg_path, "--segments", "spleen"], "spleen"),
        "unreadable image": (["--labeled", bad, seg_path], "broken file.nrrd"),
        "no overlap": (["--labeled", far, seg_path], "elsewhere.nrrd"),
        "bad model": (["--labeled", ct_path, seg_path, "--init", bad], "broken file.nrrd"),
    }[case]
    proc = run_cli("train", *args[0], "--out", tmp_path / "m.pt", "--progress", "json", *SMALL)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert args[1] in proc.stderr and "Traceback" not in proc.stderr
    err = json_lines(proc.stdout)[-1]
    assert err["event"] == "error" and args[1] in err["message"]
    assert not (tmp_path / "m.pt").exists()


def _wait_for_progress(proc, timeout=120):
    t = time.time()
    while time.time() - t < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        if '"progress"' in line:
            return True
    return False


def _wait_for_checkpoint(proc, timeout=120):
    t = time.time()
    while time.time() - t < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        if '"checkpoint"' in line:
            return True
    return False


def test_sigterm_cancels_within_seconds_and_leaves_nothing(tmp_path, ct_path, seg_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = child_env()
    env["TMPDIR"] = str(tmpdir)
    env["CPCL_SEGMENT_CACHE_DIR"] = str(tmp_path / "cache")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    config = tmp_path / "every iteration.json"
    config.write_text('{"checkpoint_every": 1}')  # so a resume checkpoint exists when the signal comes
    args = cli_command("train", "--labeled", ct_path, seg_path, "--unlabeled", ct_path, "--segments", *LUNGS,
                       "--out", out_dir / "m.pt", "--progress", "json", *SMALL[:1], "100000", *SMALL[2:], "--config", config)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert _wait_for_checkpoint(proc), proc.stderr.read()[-2000:]
        t = time.time()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        elapsed = time.time() - t
        rest = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 130 and elapsed < 5, (code, elapsed)
    assert os.listdir(out_dir) == []  # no model, no checkpoint, no lock, no partial or temporary file
    error = json_lines(rest)[-1]
    assert error["event"] == "error" and error["message"].startswith("cancelled: no output was written"), error
    assert "checkpoint" not in error["message"] or "not written" in error["message"], error
    # nothing preprocessed outside the cache (torch keeps its own compiler cache in the temporary folder: not ours);
    # the cache holds complete entries only (no temporary folder, no in-use marker)
    assert [n for n in os.listdir(tmpdir) if not n.startswith("torchinductor")] == []
    entries = [n for n in os.listdir(tmp_path / "cache") if n not in ("CACHEDIR.TAG", "identities")]
    assert entries and all(os.path.isfile(tmp_path / "cache" / n / "manifest.json") for n in entries), entries


def test_child_exits_when_its_parent_dies(tmp_path, ct_path, seg_path):
    """Stands in for Slicer closing (or crashing) while training runs."""
    out = tmp_path / "m.pt"
    child = cli_command("train", "--labeled", ct_path, seg_path, "--segments", *LUNGS, "--out", out, "--progress", "json",
                        "--exit-with-parent", *SMALL[:1], "100000", *SMALL[2:])
    parent_code = (
        "import subprocess, sys, json, time\n"
        f"p = subprocess.Popen({child!r}, stdout=subprocess.PIPE, text=True)\n"
        "print(p.pid, flush=True)\n"
        "for line in p.stdout:\n"
        "    if '\"progress\"' in line:\n"
        "        print('training', flush=True)\n"
        "        break\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True, env=child_env())
    child_pid = int(parent.stdout.readline())
    try:
        assert parent.stdout.readline().strip() == "training"
        parent.kill()
        parent.wait()
        t = time.time()
        while time.time() - t < 10 and _alive(child_pid):
            time.sleep(0.2)
        assert not _alive(child_pid) and time.time() - t < 5
        assert not out.exists()
    finally:
        if _alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def _alive(pid):
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_case_list_dataset_folder_and_info(tmp_path, ct_path, seg_path):
    cases = tmp_path / "cases.csv"
    cases.write_text(f"image,segmentation,role\n{ct_path},{seg_path},labeled\n{ct_path},,unlabeled\n", encoding="utf-8")
    model = tmp_path / "m.pt"
    proc = run_cli("train", "--cases", cases, "--segments", *LUNGS, "--out", model, "--progress", "none", *SMALL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "given both as labeled and unlabeled" in proc.stderr  # a warning, not an error
    # a copy-paste run this short was measured below supervised-only (BENCHMARKS.md, short runs): the user is told
    assert "8 iterations is short for semi-supervised training with copy-paste" in proc.stderr
    info = run_cli("info", model)
    assert info.returncode == 0 and "right lung" in info.stdout and "cpcl" in info.stdout


def test_minutes_too_short_for_the_default_recipe_train_supervised_only_and_say_so(tmp_path, ct_path, seg_path, capsys,
                                                                                  monkeypatch):
    """``--minutes`` that cannot pay for the semi-supervised recipe's measured pay-off length, nor for the iterations
    its warm-start form was measured at (raised here, so no machine's pace reaches it), train supervised-only for
    the same minutes (budget.recipe_for_minutes), say so up front, and the model file records it."""
    from CPCLSegmentLib import budget, cli

    monkeypatch.setattr(budget, "WARM_START_MEASURED_FROM", 10**9)

    small = [a for a in SMALL if a not in ("--iterations", "8")]
    out = tmp_path / "m.pt"
    code = cli.main(["train", "--labeled", ct_path, seg_path, "--unlabeled", ct_path, "--segments", *LUNGS, "--out", str(out),
                     "--progress", "json", "--minutes", "0.05", *small])
    assert code == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    events = json_lines(captured.out)
    warning = " ".join(e["message"] for e in events if e.get("event") == "warning")
    assert "training supervised-only for these minutes instead" in warning and "the unlabeled volumes are not used" in warning
    start = next(e for e in events if e.get("event") == "start")
    assert start["method"] == "supervised" and start["unlabeled"] == 0
    plan = next(e["plan"] for e in events if "plan" in e)
    assert plan["method"] == "supervised" and plan["switched"] and plan["iterations"] == start["iterations"]
    info = run_cli("info", out)
    assert info.returncode == 0 and "supervised" in info.stdout


def test_minutes_below_the_line_train_a_supervised_warm_start_then_the_unlabeled_terms(tmp_path, ct_path, seg_path, capsys,
                                                                                     monkeypatch):
    """Where the warm-start recipe plans at least the iterations it was measured at (lowered here, and the steps'
    timing fixed, so the plan does not depend on the machine: 3 s at 1/16 s per supervised and 1/8 s per
    semi-supervised step are 32 iterations, 16 + 16), a budget below the default recipe's line (24 iterations)
    trains supervised-only first, then with the unlabeled volume."""
    from CPCLSegmentLib import budget, cli, pace

    monkeypatch.setattr(budget, "WARM_START_MEASURED_FROM", 2)
    monkeypatch.setattr(pace, "step_seconds", lambda cfg, k, device: 0.0625 if cfg.method == "supervised" else 0.125)
    small = [a for a in SMALL if a not in ("--iterations", "8")]
    out = tmp_path / "w.pt"
    code = cli.main(["train", "--labeled", ct_path, seg_path, "--unlabeled", ct_path, "--segments", *LUNGS, "--out", str(out),
                     "--progress", "json", "--minutes", "0.05", *small])
    assert code == 0, capsys.readouterr().err
    events = json_lines(capsys.readouterr().out)
    warning = " ".join(e["message"] for e in events if e.get("event") == "warning")
    assert "supervised-only for the first" in warning and "then with the unlabeled volumes for" in warning
    assert "24 iterations of semi-supervised training" in warning and "the first 16 iterations" in warning
    start = next(e for e in events if e.get("event") == "start")
    assert start["method"] == "cpcl" and start["unlabeled"] == 1 and start["iterations"] == 32
    plan = next(e["plan"] for e in events if "plan" in e)  # the same plan as fields, for scripts reading the JSON lines
    assert plan == {"minutes": 0.05, "method": "cpcl", "iterations": 32, "warm_start_iterations": 16, "requested_iterations": 24,
                    "switched": True}
    steps = [e for e in events if e.get("event") == "progress"]
    warm = 16
    assert all("forward" not in e["loss"] for e in steps if e["iteration"] <= warm)
    assert any("forward" in e["loss"] for e in steps if e["iteration"] > warm)


def _labelmap(tmp_path, ct_path, seg_path, values=(3, 7)):
    image = cio.read_image(ct_path)
    labels, _ = build_label_array(cio.read_segmentation(seg_path), LUNGS, image, ct_path)
    lm = sitk.GetImageFromArray(np.where(labels == 1, values[0], np.where(labels == 2, values[1], 0)).astype(np.uint8))
    lm.CopyInformation(image)
    path = tmp_path / "lungs.nrrd"
    sitk.WriteImage(lm, str(path))
    return str(path)


def test_compare_supervised_segments_by_value_colour_table_and_starting_model_score(tmp_path, ct_path, seg_path, trained, capsys):
    from CPCLSegmentLib import cli

    lm = _labelmap(tmp_path, ct_path, seg_path)
    table = tmp_path / "colors.ctbl"
    table.write_text("# Slicer colour table\n0 background 0 0 0 0\n3 right_lung 200 80 80 255\n7 left_lung 80 80 200 255\n")
    out = tmp_path / "m.pt"
    held_out = tmp_path / "held-out CT.nrrd"  # a validation case must not be a training case: a copy stands in for another one
    shutil.copy(ct_path, held_out)
    code = cli.main(["train", "--labeled", ct_path, lm, "--unlabeled", ct_path, "--validation", str(held_out), lm, "--segments", "7",
                     "--color-table", str(table), "--compare-supervised", "--out", str(out), "--progress", "none", *SMALL])
    assert code == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "--compare-supervised: training the supervised model" in err and "mean Dice on the validation cases" in err
    assert "is short for semi-supervised training" not in err  # the comparison is the safety net already
    rec = load_model(str(out))
    assert [c["name"] for c in rec["classes"]] == ["background", "left_lung"] and rec["classes"][1]["label_value"] == 7
    assert set(rec["training"]["comparison"]) == {"cpcl", "supervised"}
    # fine-tuning with validation cases scores the starting model first
    model, _, _ = trained
    code = cli.main(["train", "--labeled", ct_path, seg_path, "--unlabeled", ct_path, "--validation", str(held_out), seg_path,
                     "--segments", *LUNGS, "--init", model, "--out", str(tmp_path / "ft.pt"), "--progress", "none", "--iterations", "2",
                     "--spacing", *map(str, COARSE_SPACING)])
    assert code == 0
    err = capsys.readouterr().err
    assert "validation Dice (starting model)" in err
    assert "add --compare-supervised" in err  # validation cases but no comparison: the user is told how to check
    assert load_model(str(tmp_path / "ft.pt"))["training"]["starting_model_validation"]["mean_dice"] > 0.5


def test_preprocessed_cases_are_memory_mapped_not_held_in_memory(tmp_path, ct_path, seg_path):
    import torch

    from CPCLSegmentLib import planning, preparation

    req = preparation.TrainRequest(labeled=[preparation.LabeledInput(ct_path, seg_path)], out=str(tmp_path / "m.pt"), segments=LUNGS)
    classes = preparation.resolve_classes(req)
    infos, fg, is_ct = preparation.inspect_cases(req, classes, lambda e: None)
    plan = planning.plan_run(req, classes, infos, fg, is_ct, None, torch.device("cpu"), lambda e: None)
    from CPCLSegmentLib.prepcache import PreprocessCache
    from CPCLSegmentLib.preprocessing import preprocess_cases

    cache = PreprocessCache(str(tmp_path / "cache")).prepare()
    cases, _, _ = preprocess_cases(req, classes, plan, [], cache, lambda e: None)
    cache.release()
    assert isinstance(cases[0].image, np.memmap) and isinstance(cases[0].label, np.memmap)
    assert isinstance(cases[0].image_source, str)  # only the path is held


@pytest.mark.slow
def test_demo_on_the_hippocampus_folder(tmp_path):
    from conftest import HIPPO

    if not HIPPO.exists():
        pytest.skip(f"{HIPPO} is not present (it lives beside the project, in ../shared/data)")
    proc = run_cli("demo", "--data", HIPPO, "--out", tmp_path, "--labeled", "2", "--unlabeled", "4", "--iterations", "20",
                   "--progress", "json", "--device", "cpu", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = json_lines(proc.stdout)
    done = events[-1]
    assert set(done["dice"]) == {"cpcl", "supervised"} and "Label 1" in done["dice"]["cpcl"]
    assert any("held-out Dice" in e.get("message", "") for e in events if e["event"] == "info")  # JSON mode: on stdout


def test_one_duration_format_for_the_command_line_summary_and_the_panel(capsys):
    """The CLI's summary and the panel's ETA both format durations with ``durations.format_seconds``."""
    from CPCLSegmentLib.console import print_summary
    from CPCLSegmentLib.durations import format_seconds

    assert [format_seconds(s) for s in (5, 59.6, 125, 3725, -3, None, float("nan"))] == [
        "5 s", "1 min 00 s", "2 min 05 s", "1 h 02 min", "0 s", "unknown", "unknown"]
    summary = {"method": "cpcl", "labeled": ["a"], "unlabeled": 0, "validation": 0, "voxels_per_segment": {"a": 9},
               "patch_size": [16, 16, 16], "spacing": [1.0, 1.0, 1.0], "normalization": "ct", "iterations": 10, "device": "cpu",
               "estimated_time_s": 125, "estimated_memory": "1 GiB"}
    print_summary(summary)
    assert "about 2 min 05 s" in capsys.readouterr().err
