"""What happens when… (docs/what-happens-when.md): each failure mode behaves as the documentation says."""

import dataclasses
import os
import re

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CPCLSegmentLib import cli, pipeline, planning
from CPCLSegmentLib import io as cio
from CPCLSegmentLib.errors import InputError, OutOfMemory, OutputError, TrainingDiverged
from CPCLSegmentLib.companions import checkpoint_path
from CPCLSegmentLib.modelfile import load_checkpoint, load_model
from CPCLSegmentLib.prediction import Predictor
from CPCLSegmentLib.preparation import LabeledInput, TrainRequest
from CPCLSegmentLib.settings import RunOptions
from CPCLSegmentLib.trainer import Trainer

from conftest import COARSE_SPACING, LUNGS, small_config, timing_trainer


def tiny(**over):
    cfg = dict(iterations=6, width=4, depth=3, patch_size=(16, 32, 32), checkpoint_every=2, validation_every=3)
    cfg.update(over)
    return small_config(**cfg)


def request(tmp_path, ct_path, seg_path, name="m.pt", **over):
    kw = dict(labeled=[LabeledInput(ct_path, seg_path)], unlabeled=[ct_path], out=str(tmp_path / name),
              segments=list(LUNGS), spacing=list(COARSE_SPACING), config=tiny())
    kw.update(over)
    options = {k: kw.pop(k) for k in list(kw) if k in {f.name for f in dataclasses.fields(RunOptions)}}
    return TrainRequest(options=RunOptions(**options), **kw)


def write_slab(tmp_path, ct_path, k0, k1, name):
    path = tmp_path / name
    sitk.WriteImage(sitk.ReadImage(ct_path)[:, :, k0:k1], str(path))
    return str(path)


def test_segment_missing_in_one_case_is_background_with_a_warning(tmp_path, ct_path, seg_path):
    top = write_slab(tmp_path, ct_path, 0, 5, "lower chest.nrrd")  # slices without lungs
    events = []
    req = request(tmp_path, ct_path, seg_path, labeled=[LabeledInput(ct_path, seg_path), LabeledInput(top, seg_path)])
    pipeline.train(req, events.append)
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert any("'right lung' is missing or empty" in w and "background" in w for w in warnings), warnings


def test_segment_empty_in_every_case_is_an_error(tmp_path, ct_path, seg_path):
    top = write_slab(tmp_path, ct_path, 0, 5, "lower.nrrd")
    req = request(tmp_path, ct_path, seg_path, labeled=[LabeledInput(top, seg_path)])
    with pytest.raises(InputError, match="empty in every labeled case"):
        pipeline.train(req)


def test_no_unlabeled_cases_trains_supervised_only_and_one_case_is_enough(tmp_path, ct_path, seg_path):
    events = []
    result = pipeline.train(request(tmp_path, ct_path, seg_path, unlabeled=[]), events.append)
    assert result["method"] == "supervised" and result["status"] == "completed"
    assert any("supervised-only" in e.get("message", "") for e in events)


def test_volume_smaller_than_the_patch_is_padded(tmp_path, ct_path, seg_path):
    slab = write_slab(tmp_path, ct_path, 12, 22, "thin.nrrd")  # 10 slices, 64x64 at 6 mm
    req = request(tmp_path, ct_path, seg_path, labeled=[LabeledInput(slab, seg_path)], unlabeled=[slab],
                  config=tiny(patch_size=(16, 96, 96)))
    pipeline.train(req)
    labels = Predictor(req.out).segment(cio.read_image(slab))
    assert labels.shape == (10, 128, 128)


def test_memory_planning_shrinks_the_patch_or_stops_before_training(tmp_path, ct_path, seg_path, monkeypatch):
    big, _ = planning.plan_patch_size((128, 256, 256), (1, 1, 1), 4, "cuda", 16, 3, memory_budget=64e9)
    small, est = planning.plan_patch_size((128, 256, 256), (1, 1, 1), 4, "cuda", 16, 3, memory_budget=2e9)
    assert np.prod(small) < np.prod(big) and est["total"] <= 2e9
    # 10 MB free: room for the case's grid (the grid check, first, passes), not for training
    monkeypatch.setattr(planning, "available_memory", lambda *a, **k: 1e7)
    with pytest.raises(InputError, match=r"needs about .* but only .* is free; use smaller batches or a narrower network \(even the "
                                         r"smallest patch, --patch-size 8 8 8, needs more\)"):
        pipeline.train(request(tmp_path, ct_path, seg_path))
    assert not os.path.exists(tmp_path / "m.pt")


def _fail_at(monkeypatch, iteration, exc):
    original = Trainer.step

    def step(self, inputs, it):
        if it == iteration:
            raise exc
        return original(self, inputs, it)

    monkeypatch.setattr(Trainer, "step", step)


def test_out_of_memory_mid_run_keeps_the_last_checkpoint(tmp_path, ct_path, seg_path, monkeypatch):
    _fail_at(monkeypatch, 4, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    req = request(tmp_path, ct_path, seg_path)
    with pytest.raises(OutOfMemory, match=r"patch 32 32 16 \(X Y Z\), .*Reduce the patch size \(e.g. --patch-size \d+ \d+ \d+\)") as e:
        pipeline.train(req)
    assert np.prod(e.value.smaller_patch) < 16 * 32 * 32  # estimated to need at most half the patch-dependent memory
    ckpt = load_checkpoint(checkpoint_path(req.out))
    assert ckpt["trainer"]["iteration"] == 4 and not os.path.exists(req.out)


def _train_with_oom_retry(ct_path, seg_path, out, iterations):
    return cli.main(["train", "--labeled", ct_path, seg_path, "--segments", *LUNGS, "--out", str(out), "--iterations",
                     str(iterations), "--patch-size", "64", "64", "32", "--width", "4", "--spacing", *map(str, COARSE_SPACING),
                     "--device", "cpu", "--progress", "none", "--retry-smaller-on-oom"])


def test_cli_retries_once_with_a_smaller_patch_after_out_of_memory(tmp_path, ct_path, seg_path, monkeypatch, capsys):
    calls = {"n": 0}
    original = Trainer.step

    def step(self, inputs, it):
        if calls["n"] == 0 and it == 2 and not timing_trainer(self):
            calls["n"] += 1
            raise RuntimeError("CUDA out of memory")
        return original(self, inputs, it)

    monkeypatch.setattr(Trainer, "step", step)
    out = tmp_path / "m.pt"
    code = _train_with_oom_retry(ct_path, seg_path, out, 4)
    assert code == 0 and calls["n"] == 1
    err = capsys.readouterr().err
    retried = re.search(r"retrying once with --patch-size (\d+) (\d+) (\d+) \(was 64 64 32\)", err)
    assert retried, err
    assert load_model(str(out))["patch_size"] == [int(v) for v in reversed(retried.groups())]
    assert np.prod(load_model(str(out))["patch_size"]) < 32 * 64 * 64


def test_nan_loss_stops_naming_the_iteration_and_keeps_the_last_finite_checkpoint(tmp_path, ct_path, seg_path, monkeypatch):
    original = Trainer.sample

    def sample(self, it):  # a NaN in the 5th labeled batch makes every loss term of that step non-finite
        inputs = original(self, it)
        if it == 4:
            inputs.labeled = inputs.labeled * float("nan")
        return inputs

    monkeypatch.setattr(Trainer, "sample", sample)
    req = request(tmp_path, ct_path, seg_path)
    with pytest.raises(TrainingDiverged, match="non-finite at iteration 5"):
        pipeline.train(req)
    ckpt = load_checkpoint(checkpoint_path(req.out))
    assert ckpt["trainer"]["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["trainer"]["student"].values() if v.is_floating_point())


def test_disk_full_while_saving_keeps_the_previous_model(tmp_path, ct_path, seg_path, monkeypatch):
    req = request(tmp_path, ct_path, seg_path)
    pipeline.train(req)
    before = open(req.out, "rb").read()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("format") == "cpcl-segment-model":
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OutputError, match="No space left on device"):
        pipeline.train(req)
    assert open(req.out, "rb").read() == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_stop_then_resume_continues_from_the_checkpoint(tmp_path, ct_path, seg_path):
    req = request(tmp_path, ct_path, seg_path, config=tiny(iterations=8))
    seen = []

    def stop_after_three():
        return len([e for e in seen if e["event"] == "progress"]) >= 3

    first = pipeline.train(req, seen.append, stop_after_three)
    # a step's values are read after the next step is dispatched, so the stop seen after 3 reports lands after step
    # 3 or 4; every step done is reported, and the checkpoint holds exactly those steps
    done = first["iterations"]
    assert first["status"] == "stopped" and done in (3, 4)
    assert [e["iteration"] for e in seen if e["event"] == "progress"] == list(range(1, done + 1))
    assert load_model(req.out)["training"]["status"] == "stopped"  # Stop keeps the model trained so far
    assert load_checkpoint(checkpoint_path(req.out))["trainer"]["iteration"] == done
    events = []
    req.options.resume = True
    second = pipeline.train(req, events.append)
    progress = [e["iteration"] for e in events if e["event"] == "progress"]
    assert progress == list(range(done + 1, 9)) and second["status"] == "completed"
    assert load_model(req.out)["training"]["iterations"] == 8
    assert not os.path.exists(checkpoint_path(req.out))  # removed once complete
    # a checkpoint of other cases is refused, naming what differs
    req2 = request(tmp_path, ct_path, seg_path, config=tiny(iterations=8), unlabeled=[])
    steps = []
    pipeline.train(req2, lambda e: steps.append(e["event"]), lambda: steps.count("progress") >= 1)
    req2.unlabeled = [ct_path]
    req2.options.resume = True
    with pytest.raises(InputError, match=r"belongs to a run with other cases or segments \(unlabeled cases: 0 not given now, 1 new"):
        pipeline.train(req2)


def test_init_same_segments_continue_other_segments_new_head_incompatible_refused(tmp_path, ct_path, seg_path, trained):
    model, _, _ = trained
    events = []
    pipeline.train(request(tmp_path, ct_path, seg_path, name="a.pt", init=model, config=tiny(patch_size=(16, 64, 64))), events.append)
    assert "same segments, continuing" in next(e for e in events if e["event"] == "summary")["starting_model"]
    events = []
    req = request(tmp_path, ct_path, seg_path, name="b.pt", init=model, segments=["right lung", "left lung", "ribs"],
                  config=tiny(patch_size=(16, 64, 64)))
    pipeline.train(req, events.append)
    assert any("new segments (new output channels): ['ribs']" in e.get("message", "") for e in events)
    summary = next(e for e in events if e["event"] == "summary")
    assert "new segments (new output channels): ['ribs']" in summary["starting_model"]  # said where the plan is read
    assert load_model(req.out)["network"]["num_classes"] == 4
    with pytest.raises(InputError, match="does not match the requested network: width: model 8 vs requested 32"):
        pipeline.train(request(tmp_path, ct_path, seg_path, name="c.pt", init=model, network_overrides={"width": 32}))


def test_reoriented_and_oblique_copies_predict_the_same_voxels(trained, ct_path):
    """LPS vs RAS and axis permutations: predicting a reoriented copy of a real volume and mapping it back
    gives the same voxels as predicting the original. An oblique header on the same voxels gives the same
    voxel labels on its own grid."""
    model, _, _ = trained
    predictor = Predictor(model)
    image = cio.read_image(ct_path)
    reference = predictor.segment(image)
    copy = sitk.Flip(sitk.PermuteAxes(image, [1, 0, 2]), [True, False, True])  # same physical space, other voxel order
    assert copy.GetDirection() != image.GetDirection()
    labels = predictor.segment(copy)
    back = sitk.GetImageFromArray(labels)
    back.CopyInformation(copy)
    mapped = sitk.GetArrayFromImage(sitk.Resample(back, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    assert np.array_equal(mapped, reference)
    oblique = sitk.Image(image)
    angle = np.deg2rad(8)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    oblique.SetDirection((rot @ np.array(image.GetDirection()).reshape(3, 3)).flatten().tolist())
    assert np.array_equal(predictor.segment(oblique), reference)


def test_oom_retry_starts_after_the_failed_trainer_is_released(tmp_path, ct_path, seg_path, monkeypatch):
    """The retry runs outside the ``except``: the first Trainer (optimizer state, activations held by the traceback)
    is gone when the second one starts."""
    import weakref

    first = []
    original = Trainer.step

    def step(self, inputs, it):
        if not first:
            first.append(weakref.ref(self))
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        assert first[0]() is None, "the first Trainer is still alive while the retry trains"
        return original(self, inputs, it)

    monkeypatch.setattr(Trainer, "step", step)
    code = _train_with_oom_retry(ct_path, seg_path, tmp_path / "m.pt", 2)
    assert code == 0 and len(first) == 1


def test_oom_retry_is_refused_under_torchrun(tmp_path, ct_path, seg_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = cli.main(["train", "--labeled", ct_path, seg_path, "--segments", *LUNGS, "--out", str(tmp_path / "m.pt"),
                     "--device", "cpu", "--progress", "none", "--retry-smaller-on-oom"])
    assert code == 2 and "--retry-smaller-on-oom cannot be used with torchrun" in capsys.readouterr().err
