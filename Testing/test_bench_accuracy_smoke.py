"""Smoke runs of the accuracy benchmarks (bench/accuracy.py, bench/sparse_labels.py) on the real hippocampus
data: a couple of iterations each, so CI notices when a benchmark script breaks. Also checks that the
benchmark scores exactly what a user gets: its in-memory preprocessing + prediction path equals
``pipeline.train`` → model file → ``Predictor.segment`` on the same weights.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import HIPPO, ROOT, child_env, needs_shared

pytestmark = [pytest.mark.slow, needs_shared(HIPPO)]

BENCH = ROOT / "bench"


def _run(script: str, *args) -> subprocess.CompletedProcess:
    env = child_env()
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, str(BENCH / script), "--smoke", "--threads", "1", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_accuracy_smoke_runs_every_method_and_resumes(tmp_path):
    results = tmp_path / "acc.jsonl"
    _run("accuracy.py", "--results", results)
    recs = _records(results)
    assert sorted(r["variant"] for r in recs) == ["cpcl", "mean_teacher", "monai_unet", "supervised"]
    for r in recs:
        assert r["config"]["iterations"] == 2
        assert len(r["labeled"]) == 2 and not set(r["labeled"]) & set(json.loads((HIPPO / "splits.json").read_text())["test"])
        for c in ("anterior", "posterior"):
            assert 0.0 <= r["test_last"]["dice"][c] <= 1.0
            assert math.isfinite(r["test_last"]["hd95"][c]) and r["test_last"]["hd95"][c] > 0
        assert len(r["test_last"]["per_case_dice"]) == 2
    semi = {r["variant"]: r["unlabeled"] for r in recs}
    assert semi["supervised"] == 0 and semi["cpcl"] > 0 and semi["mean_teacher"] == semi["cpcl"]
    tables = (tmp_path / "accuracy-smoke_tables.md").read_text()
    assert "CPCL" in tables and "mean teacher" in tables and "supervised-only" in tables
    assert (tmp_path / "accuracy-smoke_dice_vs_labeled.png").stat().st_size > 1000
    # resumable: a second invocation finds every run done and trains nothing
    again = _run("accuracy.py", "--results", results)
    assert "0 to run" in again.stdout
    assert len(_records(results)) == 4


def test_sparse_labels_smoke_marks_unknown_voxels(tmp_path):
    results = tmp_path / "sparse.jsonl"
    _run("sparse_labels.py", "--results", results)
    recs = _records(results)
    assert sorted((r["variant"], r["every"]) for r in recs) == [("cpcl_cp", 1), ("cpcl_cp", 5), ("supervised", 1), ("supervised", 5)]
    by = {(r["variant"], r["every"]): r for r in recs}
    assert by[("supervised", 5)]["foreground_fraction_kept"] < 0.5 < by[("supervised", 1)]["foreground_fraction_kept"]
    # the sparsely labeled images join the unlabeled stream (as pipeline.train does)
    assert by[("cpcl_cp", 5)]["unlabeled"] == by[("cpcl_cp", 1)]["unlabeled"] + 2
    assert by[("cpcl_cp", 5)]["config"]["copy_paste"] is True  # the default recipe, on sparse labels too
    assert "every N-th axial slice" in (tmp_path / "sparse_tables.md").read_text()


def test_sparse_label_keeps_every_nth_slice():
    sys.path.insert(0, str(BENCH))
    import common as C

    lab = np.zeros((20, 4, 4), dtype=np.int16)
    lab[5:15, 1:3, 1:3] = 1
    out = C.sparse_label(lab, 5, axis=0)
    kept = [k for k in range(20) if (out[k] >= 0).all()]
    assert kept == [2, 7, 12, 17]  # starts every // 2 = 2 slices into the labeled extent (5 + 2 = 7, 7 % 5 = 2)
    assert ((out == -1).all(axis=(1, 2))).sum() == 16
    assert (out[7] == lab[7]).all()


def test_benchmark_scores_what_the_user_gets(tmp_path):
    """bench/common.py's preprocessing + segmentation == pipeline.train's model file through Predictor."""
    sys.path.insert(0, str(BENCH))
    import common as C
    from CPCLSegmentLib import io as cio
    from CPCLSegmentLib import pipeline
    from CPCLSegmentLib.prediction import Predictor
    from CPCLSegmentLib.preparation import LabeledInput, TrainRequest
    from CPCLSegmentLib.trainer import TrainConfig

    names = json.loads((HIPPO / "splits.json").read_text())["train"][:2]
    test_name = json.loads((HIPPO / "splits.json").read_text())["test"][0]
    items = [LabeledInput(str(HIPPO / "imagesTr" / f"{n}.nii.gz"), str(HIPPO / "labelsTr" / f"{n}.nii.gz")) for n in names]
    out = tmp_path / "m.pt"
    cfg = TrainConfig(method="supervised", iterations=2, patch_size=(32, 48, 32), width=4, device="cpu", seed=0)
    pipeline.train(TrainRequest(labeled=items, out=str(out), config=cfg))
    predictor = Predictor(str(out), device="cpu")
    plan = C.plan_for(HIPPO, names)
    assert plan["spacing"] == predictor.record["spacing"] and plan["normalization"]["scheme"] == predictor.record["normalization"]["scheme"]
    subject = C.load_subject(HIPPO, test_name, plan)
    user = predictor.segment(cio.read_image(str(HIPPO / "imagesTr" / f"{test_name}.nii.gz")))
    bench = C.segment(predictor.net, subject, predictor.patch, predictor.device)
    assert user.shape == subject.label.shape
    np.testing.assert_array_equal(user, bench)
    # labels read by the benchmark are the pipeline's (label map values 1, 2 on the image grid)
    assert set(np.unique(subject.label)) <= {0, 1, 2} and (subject.label == 2).any()


def test_learning_curves_keep_one_run_length_per_budget():
    """The curve plot draws, per budget, only grid runs of that budget's most common length and without --set
    overrides: a 300-iteration run in a 600-iteration panel would share its method's colour and mislead."""
    sys.path.insert(0, str(BENCH))
    import accuracy as A

    def rec(variant, budget, seed, iterations, **extra):
        cfg = json.loads(json.dumps({**A.config_for(variant, seed), "iterations": iterations, **extra}, default=str))
        return {"experiment": "main", "variant": variant, "budget": budget, "seed": seed, "config": cfg,
                "validation_curve": [[i, 0.5] for i in range(60, iterations + 1, 60)]}

    records = [rec("supervised", 4, s, 600) for s in range(3)] + [rec("cpcl_cp", 4, s, 600) for s in range(3)]
    records += [rec("cpcl_cp", 4, 2, 300), rec("cpcl_cp", 4, 0, 600, rampup=240.0), rec("supervised", 8, 0, 500),
                {**rec("supervised", 1, 0, 600), "experiment": "tune"}]
    runs, lengths = A.curve_runs(records)
    assert lengths == {4: 600, 8: 500}
    assert sorted((r["variant"], r["budget"], r["seed"]) for r in runs) == sorted(
        [("supervised", 4, s) for s in range(3)] + [("cpcl_cp", 4, s) for s in range(3)] + [("supervised", 8, 0)])
