"""DDP on CPU (gloo, 2 processes): the first step equals one process with the doubled batch; torchrun
through the CLI writes one model file and the teachers agree across ranks."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import dist_worker
from conftest import child_env

# float64, one SGD step at λ = 1: weights after the step agree to this absolute tolerance
WEIGHT_ATOL = 1e-10


def _one_rank_with_doubled_batch():
    from CPCLSegmentLib.trainer import Trainer

    torch.set_default_dtype(torch.float64)
    try:
        labeled, unlabeled = dist_worker.small_real_cases()
        events = []
        one = Trainer(dist_worker.config(2, 2), labeled, unlabeled, 3, on_progress=events.append)
        init = {k: v.clone() for k, v in one.student.state_dict().items()}
        one.run()
    finally:
        torch.set_default_dtype(torch.float32)
    return one, init, events


def _two_ranks(tmp_path, differentiable):
    out = tmp_path / f"rank0-{differentiable}.pt"
    mp.spawn(dist_worker.run_rank, args=(2, str(tmp_path / f"init-{differentiable}"), str(out), differentiable), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


def test_two_ranks_first_step_equals_one_rank_with_doubled_batch(tmp_path):
    two = _two_ranks(tmp_path, True)
    assert two["check"]["teacher_max_abs_diff"] == 0.0 and two["check"]["student_max_abs_diff"] == 0.0
    one, init, events = _one_rank_with_doubled_batch()
    assert events[1]["loss"]["forward"] > 1e-3 and events[1]["loss"]["backward"] > 1e-3 and events[1]["lambda"] == 1.0
    moved = max((one.student.state_dict()[k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e6 * WEIGHT_ATOL  # the step changed the weights far beyond the tolerance
    worst = max((one.student.state_dict()[k] - two["student"][k]).abs().max().item() for k in init)
    assert worst < WEIGHT_ATOL, worst
    for k in ("supervised", "forward", "backward"):  # the same global loss on every rank
        assert two["loss"][k] == pytest.approx(events[1]["loss"][k], rel=1e-5, abs=1e-6)
    # the prototype terms matter to the step: without them the weights would end elsewhere
    # (and a non-differentiable all-reduce, whose backward keeps only the local part, fails the comparison)
    wrong = _two_ranks(tmp_path, False)
    off = max((one.student.state_dict()[k] - wrong["student"][k]).abs().max().item() for k in init)
    assert off > 1e3 * WEIGHT_ATOL, off


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_cli_trains_with_two_processes(tmp_path, ct_path, seg_path):
    cfg = tmp_path / "small.json"
    cfg.write_text(json.dumps({"width": 4, "depth": 3, "labeled_batch": 1, "unlabeled_batch": 1, "optimizer": "adamw", "lr": 0.003}))
    out = tmp_path / "model.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "CPCLSegmentLib.cli", "train", "--labeled", ct_path, seg_path,
           "--unlabeled", ct_path, "--segments", "right lung", "left lung", "--out", str(out), "--iterations", "6",
           "--patch-size", "32", "32", "16", "--spacing", "6.1", "6.1", "10", "--device", "cpu", "--progress", "json",
           "--config", str(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sum(e["event"] == "done" for e in events) == 1  # rank 0 only
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 1 and starts[0]["world_size"] == 2
    check = [e for e in events if e["event"] == "distributed_check"][0]
    assert check["teacher_max_abs_diff"] == 0.0
    assert sorted(os.listdir(tmp_path)) == ["model.pt", "model.run.json", "small.json"]


@pytest.mark.slow
def test_validation_is_sharded_so_no_rank_waits_past_the_timeout(tmp_path):
    """Scoring a validation case takes 20 s and collectives time out after 30 s: rank 0 scoring both cases alone (40 s)
    would leave rank 1 waiting past the timeout; sharded, each rank scores one and the Dice sums are all-reduced to
    the one-process value."""
    from CPCLSegmentLib.metrics import mean_dice_over_cases
    from CPCLSegmentLib.network import VNet

    out = tmp_path / "validation.pt"
    mp.spawn(dist_worker.run_rank_validation, args=(2, str(tmp_path / "init-val"), str(out), 20.0, 30.0), nprocs=2, join=True)
    saved = torch.load(out, weights_only=True)
    [event] = saved["validation"]
    cfg = dist_worker.config(1, 1)
    net = VNet(**cfg.network_config(3))
    net.load_state_dict(saved["teacher"])
    validation = dist_worker.small_validation_cases(dist_worker.small_real_cases()[0])
    mean, _ = mean_dice_over_cases(net, validation, cfg.patch_size, torch.device("cpu"), 3, cfg.validation_overlap)
    assert event["mean_dice"] == pytest.approx(round(mean, 4), abs=1e-4)


def test_the_process_group_waits_an_hour_by_default(monkeypatch):
    from datetime import timedelta

    from CPCLSegmentLib import distributed

    monkeypatch.delenv("CPCL_DDP_TIMEOUT_MINUTES", raising=False)
    assert distributed.process_group_timeout() == timedelta(minutes=60)
    monkeypatch.setenv("CPCL_DDP_TIMEOUT_MINUTES", "90")
    assert distributed.process_group_timeout() == timedelta(minutes=90)
    seen = {}
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.DistributedContext.from_environment("cpu")
    assert seen == {"backend": "gloo", "timeout": timedelta(minutes=90)}


def test_the_loop_s_flags_travel_on_the_host_beside_nccl(monkeypatch):
    """``any_rank`` (asked every iteration: stop? loss sane?) all-reduces a CPU tensor over a gloo group when the
    training tensors go over NCCL: a GPU flag would be queued behind the step and reading it would wait for it."""
    from CPCLSegmentLib import distributed

    seen, groups = [], []
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t, op=None, group=None: seen.append((t.device.type, group)))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: groups.append(kw["backend"]))
    monkeypatch.setattr(distributed.dist, "new_group", lambda **kw: groups.append(kw["backend"]) or "gloo-group")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    ctx = distributed.DistributedContext.from_environment("auto")
    assert groups == ["nccl", "gloo"] and ctx.device == torch.device("cuda", 0) and ctx.flags_group == "gloo-group"
    assert ctx.any_rank(True) and not ctx.any_rank(False)
    assert seen == [("cpu", "gloo-group")] * 2


@pytest.mark.slow  # two spawned processes, rank 0 slowed down: about a minute on a busy 2-core machine
def test_the_first_process_preprocesses_while_the_others_wait_then_all_read_the_cache(tmp_path, ct_path, seg_path):
    """Under torchrun local rank 0 preprocesses the cases (slowly here) and rank 1 waits, then finds them all in the
    cache: one preprocessing per machine, not one per process. When rank 0 fails, rank 1 stops at once."""
    mp.spawn(dist_worker.run_rank_preprocess, args=(2, str(tmp_path / "init-prep"), str(tmp_path), ct_path, seg_path),
             nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8")) for r in (0, 1)]
    assert ranks[0]["cache"]["built"] == ["ct"] and ranks[1]["cache"]["built"] == []
    assert ranks[0]["cache"]["shape"] == ranks[1]["cache"]["shape"] and ranks[1]["cache"]["labeled"] == 1
    assert "unreadable (test)" in ranks[0]["failing"]["error"]
    assert "local rank 0" in ranks[1]["failing"]["error"] and ranks[1]["failing"]["seconds"] < 30
