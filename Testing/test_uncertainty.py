""""Label this next" (issue 9): uncertainty scores on hand-made tensors, ``cpcl-segment rank`` on real data,
and a smoke run of ``bench/uncertainty.py`` (slow tier)."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CPCLSegmentLib import io as cio
from CPCLSegmentLib import uncertainty as U
from CPCLSegmentLib.errors import InputError
from CPCLSegmentLib.writers import write_image

from conftest import HIPPO, ROOT, child_env, cli_command, needs_shared

# ------------------------------------------------------------------------------ hand-made tensors


def test_entropy_known_values():
    uniform = torch.full((4, 2, 3, 5), 0.25)
    assert torch.allclose(U.predictive_entropy(uniform), torch.full((2, 3, 5), math.log(4)))
    assert torch.allclose(U.predictive_entropy(uniform, normalize=True), torch.ones(2, 3, 5))
    onehot = torch.zeros(3, 4, 4, 4)
    onehot[1] = 1.0
    h = U.predictive_entropy(onehot)
    assert torch.equal(h, torch.zeros(4, 4, 4))  # 0 log 0 = 0, no NaN
    p = torch.tensor([0.25, 0.75]).view(2, 1, 1, 1)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert U.predictive_entropy(p).item() == pytest.approx(expected, rel=1e-6)
    assert U.predictive_entropy(p, normalize=True).item() == pytest.approx(expected / math.log(2), rel=1e-6)


def test_student_teacher_disagreement_known_values():
    p = torch.softmax(torch.randn(3, 4, 5, 6), dim=0)
    assert torch.equal(U.total_variation(p, p), torch.zeros(4, 5, 6))
    assert torch.equal(U.label_disagreement(p, p), torch.zeros(4, 5, 6))
    a = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1, 1)
    b = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1, 1)
    assert U.total_variation(a, b).item() == pytest.approx(1.0)  # disjoint
    s = torch.tensor([0.2, 0.8]).view(2, 1)
    t = torch.tensor([0.5, 0.5]).view(2, 1)
    assert U.total_variation(s, t).item() == pytest.approx(0.3)
    # argmax flips in exactly the voxels where the student's class-1 probability crosses 0.5
    fg_s = torch.tensor([0.1, 0.6, 0.9, 0.4])
    fg_t = torch.tensor([0.2, 0.4, 0.8, 0.7])
    ps, pt = torch.stack([1 - fg_s, fg_s]), torch.stack([1 - fg_t, fg_t])
    assert U.label_disagreement(ps, pt).tolist() == [0.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        U.total_variation(torch.zeros(2, 3), torch.zeros(3, 3))


def test_forward_prototype_map_and_disagreement_known_values():
    protos = torch.eye(3) * 2.0  # (K=3, C=3): orthogonal prototypes (their length does not matter: cosine)
    valid = torch.ones(3, dtype=torch.bool)
    feats = torch.zeros(1, 3, 2, 2, 2)
    feats[0, 1] = 5.0  # every voxel's feature points exactly at prototype 1
    p = U.forward_prototype_probabilities(feats, protos, valid, (4, 4, 4), scale=20.0)
    assert p.shape == (1, 3, 4, 4, 4)  # features at half resolution, map at full resolution
    e = math.exp(20.0)
    assert torch.allclose(p[0, 1], torch.full((4, 4, 4), e / (e + 2)))
    agree = torch.zeros(3, 4, 4, 4)
    agree[1] = 1.0
    disagree = torch.zeros(3, 4, 4, 4)
    disagree[2] = 1.0
    assert U.prototype_disagreement(p[0], agree, valid).max().item() == pytest.approx(2 / (e + 2), abs=1e-6)
    assert U.prototype_disagreement(p[0], disagree, valid).min().item() == pytest.approx(e / (e + 2), abs=1e-6)
    # a class without a prototype gets P_l2u = 0 and is left out of the teacher's side too
    valid = torch.tensor([True, True, False])
    feats = torch.zeros(1, 3, 1, 1, 1)
    feats[0, 2] = 1.0  # orthogonal to both valid prototypes: cos 0, 0 -> P_l2u = (0.5, 0.5, 0)
    p = U.forward_prototype_probabilities(feats, protos, valid, (1, 1, 1))
    assert p[0, :, 0, 0, 0].tolist() == pytest.approx([0.5, 0.5, 0.0])
    teacher = torch.tensor([0.2, 0.3, 0.5]).view(3, 1, 1, 1)  # renormalised over valid classes: (0.4, 0.6)
    assert U.prototype_disagreement(p[0], teacher, valid).item() == pytest.approx(0.1, abs=1e-6)


def test_case_score_averages_the_region_not_the_empty_background():
    shape = (10, 10, 10)
    teacher = torch.zeros((2,) + shape)
    teacher[0] = 1.0  # certain background everywhere ...
    teacher[:, 4:6, 4:6, 4:6] = torch.tensor([0.5, 0.5]).view(2, 1, 1, 1)  # ... but an uncertain 2x2x2 structure
    student = teacher.clone()
    student[:, 0, 0, 0] = torch.tensor([0.85, 0.15])  # the student alone sees 15 % foreground in one corner voxel
    region = U.foreground_region(teacher, student)
    assert int(region.sum()) == 9 and bool(region[0, 0, 0])
    assert int(U.foreground_region(teacher).sum()) == 8
    maps = U.uncertainty_maps(teacher, student)
    assert set(maps) == {"entropy", "student_teacher", "label_disagreement"}
    scores, n = U.case_scores(maps, U.foreground_region(teacher))
    assert n == 8 and scores["entropy"] == pytest.approx(1.0)  # 0.5 / 0.5 over two classes: maximal
    whole, n0 = U.case_scores(maps, None)
    assert n0 == 0 and whole["entropy"] == pytest.approx(8 / 1000)  # what a whole-volume mean would report
    empty, n_empty = U.case_scores(maps, torch.zeros(shape, dtype=torch.bool))
    assert n_empty == 0 and empty == whole  # nothing found: fall back to the whole volume


def test_score_names_and_table():
    assert U.resolve_score("auto") == U.AUTO_SCORE and U.AUTO_SCORE in U.SCORES
    assert U.resolve_score("AUTO", ["entropy"]) == "entropy"  # a model without what AUTO_SCORE needs
    assert U.resolve_score("prototype") == "prototype"
    with pytest.raises(InputError, match="unknown uncertainty score 'bogus'"):
        U.resolve_score("bogus")
    rows = [{"rank": 1, "image": "b.nrrd", "score": 0.5, "entropy": 0.5, "region_voxels": 10},
            {"rank": 2, "image": "a.nrrd", "score": 0.25, "entropy": 0.25, "region_voxels": 0}]
    table = U.format_ranking(rows, "entropy").splitlines()
    assert "entropy" in table[0] and table[2].split()[:2] == ["1", "0.5000"] and table[3].endswith("(no structure found)")
    assert U.map_paths(["x/a.nii.gz", "y/a.nrrd"], "d") == [os.path.join("d", "a-1-uncertainty.nrrd"), os.path.join("d", "a-2-uncertainty.nrrd")]


# ---------------------------------------------------------------------------------- real data, CLI


@pytest.fixture(scope="module")
def rank_images(tmp_path_factory, ct_path):
    """CTChest4, the same CT with its x axis flipped (same anatomy, other direction matrix), and a crop (16
    slices: one sliding window, so the tests stay quick)."""
    d = tmp_path_factory.mktemp("rank-images")
    image = cio.read_image(ct_path)
    flipped, cropped = str(d / "flipped.nrrd"), str(d / "cropped.nii.gz")
    write_image(flipped, sitk.Flip(image, [True, False, False]))
    write_image(cropped, image[10:110, 20:120, 8:24])
    return [ct_path, flipped, cropped]


def _same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4) and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6))


@pytest.fixture(scope="module")
def model_with_student(trained, tmp_path_factory):
    """The shared model with a student network added, as model files of older versions kept it (new model files
    keep only the teacher; the student scores need one)."""
    from CPCLSegmentLib.modelfile import load_model, save_model

    rec = load_model(trained[0])
    gen = torch.Generator().manual_seed(0)
    rec["weights"]["student"] = {k: (v + 0.05 * v.std() * torch.randn(v.shape, generator=gen) if v.is_floating_point() and v.numel() > 1 else v)
                                 for k, v in rec["weights"]["teacher"].items()}
    out = tmp_path_factory.mktemp("student-model") / "with student.pt"
    save_model(str(out), rec)
    return str(out)


def test_teacher_only_model_ranks_by_entropy(trained):
    um = U.UncertaintyModel(trained[0], "cpu")
    assert um.student is None and "label_disagreement" not in um.available
    assert U.resolve_score("auto", um.available) == "entropy"


def test_rank_cli_on_real_images(model_with_student, rank_images, tmp_path):
    model = model_with_student
    out_csv, maps = tmp_path / "ranking.csv", tmp_path / "maps"
    proc = subprocess.run(cli_command("rank", "--model", model, "--images", *rank_images, "--out", out_csv,
                                      "--uncertainty-dir", maps, "--progress", "json", "--device", "cpu"),
                          capture_output=True, text=True, env=child_env(), cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]  # stdout is only JSON lines
    ranks = [e for e in events if e["event"] == "rank"]
    assert [(e["index"], e["of"]) for e in ranks] == [(1, 3), (2, 3), (3, 3)]
    assert [e["image"] for e in ranks] == rank_images
    done = events[-1]
    assert done["event"] == "done" and done["csv"] == str(out_csv) and done["score_name"] == U.AUTO_SCORE
    ranking = done["ranking"]
    assert [r["rank"] for r in ranking] == [1, 2, 3]
    assert [r["score"] for r in ranking] == sorted((r["score"] for r in ranking), reverse=True)
    assert all(0.0 <= r[s] <= 1.0 for r in ranking for s in U.SCORES)
    assert all(r["score"] == r[U.AUTO_SCORE] for r in ranking)
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:3] == ["rank", "image", "score"] and set(U.SCORES) <= set(rows[0])
    assert [r["image"] for r in rows] == [r["image"] for r in ranking]
    assert [float(r["score"]) for r in rows] == pytest.approx([r["score"] for r in ranking], rel=1e-5)
    by_image = {r["image"]: r for r in ranking}
    original, flipped, cropped = rank_images
    # a flipped direction matrix shows the model the same anatomy: the same scores
    for s in U.SCORES:
        assert by_image[flipped][s] == pytest.approx(by_image[original][s], abs=1e-6)
    # each map lies exactly on its own image's grid, float32, values in [0, 1]
    written = {}
    for path in rank_images:
        target = by_image[path]["uncertainty_map"]
        assert os.path.basename(target) == cio.strip_extension(path) + "-uncertainty.nrrd" and os.path.dirname(target) == str(maps)
        m, img = sitk.ReadImage(target), cio.read_image(path)
        assert m.GetPixelID() == sitk.sitkFloat32 and _same_geometry(m, img)
        arr = sitk.GetArrayFromImage(m)
        assert arr.min() >= 0.0 and arr.max() <= 1.0 and arr.max() > 0.1
        written[path] = m
    # ... and the flipped image's map is the original's map, voxel for voxel in physical space
    back = sitk.Resample(written[flipped], written[original], sitk.Transform(), sitk.sitkNearestNeighbor)
    assert np.abs(sitk.GetArrayFromImage(back) - sitk.GetArrayFromImage(written[original])).max() < 1e-5


def test_rank_cli_bad_image_path_exits_2_naming_the_file(trained, ct_path, tmp_path):
    model, _, _ = trained
    missing = tmp_path / "no-such-scan.nrrd"
    proc = subprocess.run(cli_command("rank", "--model", model, "--images", ct_path, missing, "--out", tmp_path / "r.csv",
                                      "--progress", "json"),
                          capture_output=True, text=True, env=child_env(), timeout=300)
    assert proc.returncode == 2
    assert str(missing) in proc.stderr
    err = json.loads(proc.stdout.splitlines()[-1])
    assert err["event"] == "error" and err["exit_code"] == 2 and str(missing) in err["message"]
    assert not (tmp_path / "r.csv").exists()


def test_rank_stop_keeps_the_images_scored_so_far(trained, rank_images, tmp_path):
    model, _, _ = trained
    cropped = rank_images[2]
    calls = []

    def stop_after_first() -> bool:
        calls.append(1)
        return len(calls) > 1

    events = []
    out = tmp_path / "r.csv"
    rows = U.rank_files(model, [cropped, cropped], str(out), "entropy", "cpu", None, events.append, stop_after_first)
    assert len(rows) == 1 and rows[0]["rank"] == 1 and rows[0]["score"] == rows[0]["entropy"]
    assert any(e["event"] == "warning" and "stopped" in e["message"] for e in events)
    with open(out, newline="") as f:
        assert len(list(csv.DictReader(f))) == 1
    with pytest.raises(InputError, match="unknown uncertainty score"):
        U.rank_files(model, [cropped], None, "bogus")


# ------------------------------------------------------------------------------------ benchmark smoke


@pytest.mark.slow
@needs_shared(HIPPO)
def test_uncertainty_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "uncertainty.py"), "--smoke", "--results", str(tmp_path)],
                          capture_output=True, text=True, env=child_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "uncertainty.json") as f:
        result = json.load(f)
    run = result["runs"][0]
    # model files keep only the teacher: the two student scores need a model file that still holds a student
    teacher_scores = set(U.SCORES) - {"student_teacher", "label_disagreement"}
    assert len(run["cases"]) == 4 and set(run["spearman"]["region"]) == teacher_scores
    assert all(0.0 <= c["error"] <= 1.0 for c in run["cases"])
    assert result["best"] in U.SCORES and "Spearman" in (tmp_path / "uncertainty.md").read_text()
