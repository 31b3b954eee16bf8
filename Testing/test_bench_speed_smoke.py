"""Smoke runs of the speed / memory benchmark scripts (slow tier, ``pytest -m slow``).

Each script runs in a child process in its ``--smoke`` mode (tiny sizes, a step or two, one torch thread: on a
busy machine two OpenMP threads are several times slower) and must write a result JSON whose numbers are
consistent. They need only slicerio's bundled CT (no ``../shared/data``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, child_env
from CPCLSegmentLib.planning import CPU_PROCESS_BASE

pytestmark = pytest.mark.slow
BENCH = ROOT / "bench"


def run_script(script: str, tmp_path, *args: str):
    out = tmp_path / (script.replace(".py", "") + ".json")
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke", "--quiet", "--threads", "1", "--out", str(out), *args],
        env=child_env(), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text(encoding="utf-8")), proc.stdout


def test_step_time_smoke(tmp_path):
    res, table = run_script("step_time.py", tmp_path, "--variants", "all", "--profile")
    cfg = res["configs"]["smoke"]
    variants = cfg["variants"]
    expected = {"supervised", "mean_teacher", "cpcl", "cpcl_mt", "cpcl_paper", "cpcl_label_maps", "cpcl_cp", "mean_teacher_cp",
                "ref_teacher_passes", "ref_cpcl", "ref_cpcl_ops", "fullres_grad"}
    assert set(variants) == expected
    for name, v in variants.items():
        assert len(v["wall_s"]) == len(v["cpu_s"]) == cfg["rounds"] == 2
        assert all(t > 0 for t in v["wall_s"]), name
        assert f"| {name} |" in table
    assert variants["mean_teacher"]["paired_ratio_cpu"] == pytest.approx(1.0)
    assert variants["cpcl"]["ratio_median_wall"] == pytest.approx(
        variants["cpcl"]["median_wall_s"] / variants["mean_teacher"]["median_wall_s"])
    prof = cfg["profile"]
    for name in ("mean_teacher", "cpcl", "ref_cpcl", "ref_cpcl_ops"):
        st = prof[name]["stages"]
        # Trainer.step is timed whole: the forward passes are tagged, the rest (losses, backward, EMA) is "rest_s"
        assert st["student_forward_s"] > 0 and st["teacher_forward_s"] > 0 and st["rest_s"] > 0 and st["optimizer_s"] > 0, name
        parts = sum(v for k, v in st.items() if k != "step_s")
        assert parts <= st["step_s"] * 1.05, (name, st)  # the stages are disjoint parts of the step
    assert prof["cpcl_minus_mean_teacher_ops_s"]


def test_predict_speed_smoke(tmp_path):
    res, table = run_script("predict_speed.py", tmp_path)
    sc = res["scenarios"]["same-spacing"]
    assert res["image"]["size_xyz"] == [64, 64, 32]
    assert sc["grid_dhw"] == [32, 64, 64]
    for stage in ("load_model", "read", "preprocess", "sliding_window", "to_image_grid", "write"):
        assert sc["stages"][stage]["median_wall_s"] > 0, stage
    assert sum(s["share_of_stages"] for s in sc["stages"].values()) == pytest.approx(1.0)
    assert sc["windows"] >= 1 and sc["monai_alone"]["median_wall_s"] > 0
    assert sc["cli"]["max_rss_mib"] > 50  # a real child process ran (torch alone is more)
    assert "MONAI sliding_window_inference alone" in table


def test_memory_smoke(tmp_path):
    res, table = run_script("memory.py", tmp_path)
    rows = res["grid"]
    assert [r["method"] for r in rows] == ["cpcl", "supervised"]
    assert all(r["channels_last"] and not r["copy_paste"] for r in rows)  # the engine's default memory format
    for r in rows:
        assert r["peak_rss_bytes"] >= r["base_rss_bytes"] > 0
        assert r["estimate"]["total"] > 0
        assert r["ratio_peak_to_estimate"] == pytest.approx(r["peak_rss_bytes"] / r["estimate"]["total"])
        # the CPU estimate is the process base plus the tensor part (what the planner and the panel use)
        assert r["estimate"]["total"] == pytest.approx(CPU_PROCESS_BASE + r["raw_estimate_bytes"])
    assert rows[0]["estimate"]["total"] > rows[1]["estimate"]["total"]  # CPCL keeps 4 patches' activations, supervised 2
    assert len(res["proposal"]["peak_over_estimate"]) == 2
    assert "peak / estimate" in table


def test_gpu_step_smoke_falls_back_to_cpu(tmp_path):
    import torch

    res, table = run_script("gpu_step.py", tmp_path)
    assert res["flops_per_step"]["total"] > 0
    assert "aten.convolution" in res["flops_per_step"]["by_op"]
    step = res["variants"]["fp32" if not torch.cuda.is_available() else "bf16_cl"]
    assert step["median_step_s"] > 0 and step["achieved_tflops"] > 0
    if not torch.cuda.is_available():
        assert res["device"] == "cpu" and "CPU fallback" in res["notes"][0] and "CPU fallback" in table


def test_flop_count_covers_backward_and_teacher():
    """CPCL step (student forward + backward on 4 patches, teacher forward on 2) vs supervised step (student
    forward + backward on 2): about (4 · 3 + 2) / (2 · 3) = 2.3× the FLOPs (backward ≈ 2 × forward)."""
    sys.path.insert(0, str(BENCH))
    from gpu_step import count_step_flops
    from speed_common import StepRunner, config, make_batches

    import torch

    patch = (16, 32, 32)
    batch = make_batches(1, 2, 2, patch, 2)[0]
    flops = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in ("cpcl", "supervised"):
            runner = StepRunner(config(method, patch, 4), 2)
            flops[method] = count_step_flops(runner, batch)["total"]
    finally:
        torch.set_num_threads(threads)
    assert 2.0 < flops["cpcl"] / flops["supervised"] < 2.6


def test_gpu_check_smoke(tmp_path):
    """The prepared GPU check runs every part (step precisions, peak memory vs estimate, FLOPs, sampling overlap, a
    short CLI training) in its smoke mode on the CPU and writes consistent JSON."""
    res, _ = run_script("gpu_check.py", tmp_path)
    assert res["smoke"] and not any("error" in res[k] for k in ("step", "sampling_overlap", "training"))
    step = res["step"]
    assert step["flops_per_step"] > 0 and step["fp32"]["median_step_s"] > 0 and step["mixed"]["planner_estimate_bytes"] > 0
    assert res["sampling_overlap"]["workers_0_s_per_it"] > 0 and res["sampling_overlap"]["workers_1_s_per_it"] > 0
    assert res["training"]["exit"] == 0 and res["training"]["iterations_done"] == 4


def test_cpu_step_smoke(tmp_path):
    """fp32, bf16 autocast, torch.compile and channels-last steps side by side: every variant timed, ratios over
    fp32; only the channels-last variant trains in channels-last memory format."""
    res, _ = run_script("cpu_step.py", tmp_path, "--variants", "bf16", "compile", "channels_last")
    assert res["variants"] == ["fp32", "bf16", "compile", "channels_last"] and set(res["summary"]) == set(res["variants"])
    assert res["bf16_over_fp32_wall"] > 0 and res["over_fp32"]["compile"]["cpu"] > 0 and res["over_fp32"]["channels_last"]["wall"] > 0
    assert res["memory_format"] == {"fp32": "contiguous_format", "bf16": "contiguous_format", "compile": "contiguous_format",
                                    "channels_last": "channels_last_3d"}
    assert all(len(v["wall"]) == res["steps"] * res["repeats"] for v in res["raw"].values())


def test_predict_layout_smoke(tmp_path):
    """Sliding-window prediction in both layouts: each timed, the ratio their medians', the same probabilities."""
    res, _ = run_script("predict_layout.py", tmp_path)
    r = res["scenarios"]["smoke"]
    assert r["weight_layout"] == {"contiguous": "contiguous", "channels_last": "channels_last_3d"}
    assert all(len(v["wall"]) == res["repeats"] == 2 for v in r["raw"].values())
    s = r["summary"]
    assert r["channels_last_over_contiguous"]["wall"] == pytest.approx(s["channels_last"]["median_wall_s"] / s["contiguous"]["median_wall_s"])
    assert 0 <= r["max_abs_probability_difference"] < 1e-4


def test_sampling_overlap_smoke(tmp_path):
    res, _ = run_script("sampling_overlap.py", tmp_path)
    assert set(res["summary"]) == {"in_process", "worker"} and res["worker_over_in_process_wall"] > 0
    assert all(len(v["wall"]) == res["steps"] * res["repeats"] for v in res["raw"].values())
    assert res["median_sampling_alone_s"] > 0
