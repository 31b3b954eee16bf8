"""The prepared GPU check: one command, at most 8 minutes on one H100, JSON results (BENCHMARKS "GPU").

What it measures, all with the product's own ``Trainer`` and the default recipe (CPCL with copy-paste ON, AdamW,
width 16, depth 4, batch 2 + 2):

1. **Step time fp32 vs the engine's mixed precision** (``precision.choose_precision``: bf16 at compute capability
   >= 8.0, fp16 + GradScaler at >= 7.0) at ``--patch`` (default the reference's 80×112×112), CUDA-event timed,
   median over ``--steps`` after warm-up, in one process.
2. **Peak memory against the planner's estimate** (``planning.estimate_memory`` for that step):
   ``torch.cuda.max_memory_allocated`` / estimate, for each precision.
3. **Model FLOP utilisation**: FLOPs of one step (``torch.utils.flop_counter``, as ``gpu_step.py``) ÷ step time ÷
   the datasheet peak of the precision.
4. **Sampling overlap**: seconds per iteration of ``Trainer.run`` with patch sampling in the training process
   (``sampling_workers=0``) and in DataLoader workers (``loader``), on synthetic cases, for ``--overlap-iterations``.
5. **A short default-recipe training** through the CLI (``cpcl-segment train``, all defaults, the planned patch)
   on slicerio's chest CT for ``--train-iterations`` (1500: the default length) within ``--train-timeout`` seconds:
   wall time, iterations reached, seconds per iteration, validation Dice on the case itself.

Usage::

    python bench/gpu_check.py                  # on the GPU machine: results/gpu_check.json (about 6-8 min on an H100)
    python bench/gpu_check.py --smoke          # anywhere (CPU without a GPU): tiny sizes, every part runs, ~1 min
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gpu_step import count_step_flops, datasheet_peak  # noqa: E402
from speed_common import (  # noqa: E402
    ROOT,
    RESULTS_DIR,
    StepRunner,
    config,
    machine_info,
    make_batches,
    median,
    slicerio_data_dir,
    timed_steps,
    write_json,
)

from CPCLSegmentLib.data import make_case  # noqa: E402
from CPCLSegmentLib.planning import estimate_memory  # noqa: E402
from CPCLSegmentLib.precision import choose_precision  # noqa: E402
from CPCLSegmentLib.trainer import Trainer  # noqa: E402


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def step_precisions(args, device: torch.device) -> Dict[str, Any]:
    """Parts 1-3: fp32 and the engine's mixed precision, peak memory against the estimate, FLOPs and MFU."""
    K, patch = args.K, tuple(args.patch)
    torch.manual_seed(0)
    batches_cpu = make_batches(2, 2, 2, patch, K, 0)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches_cpu]
    out: Dict[str, Any] = {}
    state = None
    for name, amp in (("fp32", False), ("mixed", True)):
        cfg = config("cpcl", patch, args.width, device=str(device), amp=amp, copy_paste=True, optimizer="adamw")
        runner = StepRunner(cfg, K, copy.deepcopy(state))
        state = state or {k: v.detach().cpu().clone() for k, v in runner.student.state_dict().items()}
        prec = runner.trainer.precision
        if name == "fp32":
            out["flops_per_step"] = count_step_flops(runner, batches[0])["total"]
        times = timed_steps(runner, batches, args.warmup, args.steps)
        row: Dict[str, Any] = {"precision": prec.name, "reason": prec.reason, "step_s": times, "median_step_s": median(times)}
        est = estimate_memory(patch, 2, 2, args.width, 4, K, "cpcl", "adamw", prec.dtype is not None, device.type, True)["total"]
        row["planner_estimate_bytes"] = est
        if device.type == "cuda":
            peak = int(torch.cuda.max_memory_allocated())
            row.update(max_memory_allocated_bytes=peak, peak_over_estimate=peak / est)
        row["achieved_tflops"] = out["flops_per_step"] / row["median_step_s"] / 1e12
        sheet = datasheet_peak(torch.cuda.get_device_name(0)) if device.type == "cuda" else None
        if sheet:
            key = prec.name if prec.name == "bf16" else ("tf32" if torch.backends.cudnn.allow_tf32 else "fp32")
            row["mfu"] = row["achieved_tflops"] / sheet.get(key, float("nan"))
        log(f"{name} ({prec.name}): median step {row['median_step_s'] * 1e3:.1f} ms" +
            (f", peak {row['max_memory_allocated_bytes'] / 2**30:.2f} GiB vs estimate {est / 2**30:.2f} GiB" if device.type == "cuda" else ""))
        out[name] = row
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["mixed_over_fp32"] = out["mixed"]["median_step_s"] / out["fp32"]["median_step_s"]
    return out


def sampling_overlap(args, device: torch.device) -> Dict[str, Any]:
    """Part 4: seconds per iteration of ``Trainer.run`` with sampling in the loop vs in DataLoader workers."""
    rng = np.random.RandomState(0)
    shape = tuple(int(p * 1.5) for p in args.patch)
    img = rng.randn(*shape).astype(np.float32)
    lab = (img > 1.0).astype(np.int16)
    labeled = [make_case(f"l{i}", np.roll(img, i, 0), np.roll(lab, i, 0)) for i in range(2)]
    unlabeled = [make_case(f"u{i}", rng.randn(*shape).astype(np.float32)) for i in range(4)]
    out: Dict[str, Any] = {}
    for workers in (0, args.workers):
        cfg = config("cpcl", tuple(args.patch), args.width, device=str(device), copy_paste=True, optimizer="adamw",
                     iterations=args.overlap_iterations, sampling_workers=workers)
        trainer = Trainer(cfg, labeled, unlabeled, args.K)
        t = time.perf_counter()
        trainer.run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[f"workers_{workers}_s_per_it"] = (time.perf_counter() - t) / args.overlap_iterations
        log(f"sampling workers {workers}: {out[f'workers_{workers}_s_per_it'] * 1e3:.1f} ms per iteration")
        del trainer
    out["speedup"] = out["workers_0_s_per_it"] / out[f"workers_{args.workers}_s_per_it"]
    return out


def short_training(args, device: torch.device) -> Dict[str, Any]:
    """Part 5: the CLI's default recipe on slicerio's chest CT (labeled and unlabeled; a copy of it is the validation
    case, since a training case cannot also be one)."""
    data = slicerio_data_dir()
    ct, seg = str(data / "CTChest4.nrrd"), str(data / "Segmentation.seg.nrrd")
    with tempfile.TemporaryDirectory() as tmp:
        held_out = os.path.join(tmp, "held-out CT.nrrd")
        shutil.copy(ct, held_out)
        cmd = [sys.executable, "-m", "CPCLSegmentLib.cli", "train", "--labeled", ct, seg, "--unlabeled", ct, "--validation", held_out, seg,
               "--segments", "right lung", "left lung", "--out", os.path.join(tmp, "m.pt"), "--iterations",
               str(args.train_iterations), "--device", "cuda" if device.type == "cuda" else "cpu", "--progress", "json"]
        cmd += ["--patch-size", "32", "32", "16", "--width", "4"] if args.smoke else []
        env = dict(os.environ, PYTHONPATH=str(ROOT / "CPCLSegment") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.train_timeout, env=env)
            stdout, code = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as e:
            stdout, code = (e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout) or "", "timeout"
        wall = time.perf_counter() - t
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    progress = [e for e in events if e.get("event") == "progress"]
    start = next((e for e in events if e.get("event") == "start"), {})
    vals = [e for e in events if e.get("event") == "validation"]
    out = {"exit": code, "wall_s": wall, "iterations_done": progress[-1]["iteration"] if progress else 0,
           "of": args.train_iterations, "seconds_per_iteration_last": progress[-1]["seconds_per_iteration"] if progress else None,
           "precision": start.get("precision"), "patch_size": start.get("patch_size"), "device": start.get("device"),
           "validation_mean_dice": vals[-1]["mean_dice"] if vals else None}
    log(f"training: {out['iterations_done']}/{args.train_iterations} iterations in {wall:.0f} s (exit {code}), "
        f"validation Dice {out['validation_mean_dice']}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patch", nargs=3, type=int, default=[80, 112, 112], metavar=("D", "H", "W"))
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--K", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--overlap-iterations", type=int, default=60)
    p.add_argument("--train-iterations", type=int, default=1500)
    p.add_argument("--train-timeout", type=float, default=270.0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, every part runs (the CPU when there is no GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (the smoke run on a CPU)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quiet:
        globals()["log"] = lambda msg: None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        p.error("no CUDA GPU here: this check is for a GPU (use --smoke to try every part on the CPU)")
    if args.smoke:
        args.patch, args.width, args.steps, args.warmup = [16, 32, 32], 4, 2, 1
        args.workers, args.overlap_iterations, args.train_iterations, args.train_timeout = 1, 3, 4, 540.0
    t0 = time.perf_counter()
    result: Dict[str, Any] = {"benchmark": "gpu_check", "smoke": args.smoke, "device": str(device), "machine": machine_info(),
                              "patch_dhw": list(args.patch), "width": args.width, "K": args.K, "recipe": "cpcl + copy-paste, adamw, 2+2",
                              "precision_here": choose_precision(device, True).reason}
    out = Path(args.out) if args.out else RESULTS_DIR / ("gpu_check_smoke.json" if args.smoke else "gpu_check.json")
    parts: List[tuple] = [("step", step_precisions), ("sampling_overlap", sampling_overlap), ("training", short_training)]
    for name, fn in parts:  # each part's result is written as soon as it exists; a failing part is recorded, not fatal
        try:
            result[name] = fn(args, device)
        except Exception as e:  # noqa: BLE001
            result[name] = {"error": f"{type(e).__name__}: {e}"}
            log(f"{name} failed: {result[name]['error']}")
        result["seconds"] = time.perf_counter() - t0
        write_json(out, result)
    log(f"wrote {out} ({result['seconds']:.0f} s)")
    return 0 if all("error" not in result[n] for n, _ in parts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
