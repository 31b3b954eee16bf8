"""GPU training-step benchmark: fp32 vs bf16 autocast, channels_last_3d, cuDNN benchmark, torch.compile.

Each variant builds its own student / EMA teacher / SGD optimizer from the same weights and times
``speed_common.StepRunner.step`` (the trainer's exact step: engine loss terms under autocast, backward,
optimizer step, ``update_teacher``) with CUDA events after warm-up; median over ``--steps``. Peak memory is
``torch.cuda.max_memory_allocated`` over the measured steps.

Model FLOP utilisation: the FLOPs of one step are counted with ``torch.utils.flop_counter.FlopCounterMode``
(convolutions, transposed convolutions, matmuls and einsums of the student's forward + backward, the
teacher's forward and the prototype maths; elementwise work is not counted, as usual for MFU). MFU =
FLOPs per step ÷ step time ÷ peak FLOP/s, against (a) the datasheet dense peak of the GPU for the compute
precision (table below; bf16 for the autocast variants, TF32 for fp32 because cuDNN convolutions use TF32 by
default, ``torch.backends.cudnn.allow_tf32``), or ``--peak-tflops``, and (b) a measured ceiling: a large
matmul in the same precision (``--no-measure-peak`` to skip).

Variants (``--variants``): ``fp32`` (plain: fp32, contiguous, cuDNN benchmark off), ``fp32_bench`` (+ cuDNN
benchmark), ``bf16`` (+ bf16 autocast), ``bf16_cl`` (+ channels_last_3d: the engine's CUDA default),
``bf16_cl_compile`` (+ ``torch.compile`` of the student; only with ``--compile`` or when named).

Without a GPU, ``--smoke`` runs the same code on the CPU in fp32 (tiny patch, a couple of steps) and says so;
``--count-flops`` on the CPU counts the FLOPs of one step at the requested size (no timing).

Usage::

    python bench/gpu_step.py                                   # GPU: patch (80, 112, 112), width 16, 2+2
    python bench/gpu_step.py --patch 48 64 64 --compile --steps 30
    python bench/gpu_step.py --count-flops --patch 80 112 112  # CPU: FLOPs per step only
    python bench/gpu_step.py --smoke                            # CPU fallback, CI
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from speed_common import (  # noqa: E402
    RESULTS_DIR,
    Clock,
    StepRunner,
    config,
    load_average,
    machine_info,
    make_batches,
    median,
    set_threads,
    timed_steps,
    write_json,
)

from CPCLSegmentLib.network import VNet  # noqa: E402

# Datasheet dense peaks in TFLOP/s (no sparsity): (bf16 tensor, tf32 tensor, fp32 non-tensor). Matched by substring
# of torch.cuda.get_device_name, first match wins (order matters: "H100 PCIe" before "H100").
GPU_PEAKS_TFLOPS = [
    ("A10G", None, None, None),  # not the A10: unknown here, pass --peak-tflops
    ("H100 PCIe", 756.0, 378.0, 51.2),
    ("H100 NVL", 835.0, 417.5, 60.0),
    ("H100", 989.4, 494.7, 66.9),  # SXM
    ("H200", 989.4, 494.7, 66.9),
    ("GH200", 989.4, 494.7, 66.9),
    ("A100", 312.0, 156.0, 19.5),
    ("L40S", 362.0, 183.0, 91.6),
    ("L40", 181.0, 90.5, 90.5),
    ("L4", 121.0, 60.0, 30.3),
    ("A10", 125.0, 62.5, 31.2),
    ("RTX 6000 Ada", 364.0, 182.0, 91.1),
    ("RTX A6000", 154.8, 77.4, 38.7),
    ("RTX 4090", 165.2, 82.6, 82.6),
    ("RTX 3090", 71.0, 35.6, 35.6),
    ("V100", 125.0, 15.7, 15.7),  # fp16 tensor peak in the first column (no bf16 on Volta)
    ("T4", 65.0, 8.1, 8.1),  # fp16 tensor peak
]

VARIANTS = {
    "fp32": {"amp": False, "channels_last": False, "cudnn_benchmark": False, "compile": False},
    "fp32_bench": {"amp": False, "channels_last": False, "cudnn_benchmark": True, "compile": False},
    "bf16": {"amp": True, "channels_last": False, "cudnn_benchmark": True, "compile": False},
    "bf16_cl": {"amp": True, "channels_last": True, "cudnn_benchmark": True, "compile": False},
    "bf16_cl_compile": {"amp": True, "channels_last": True, "cudnn_benchmark": True, "compile": True},
}


def datasheet_peak(name: str) -> Optional[Dict[str, float]]:
    for key, bf16, tf32, fp32 in GPU_PEAKS_TFLOPS:
        if key.lower() in name.lower():
            return {"match": key, "bf16": bf16, "tf32": tf32, "fp32": fp32} if bf16 else None
    return None


def measured_matmul_tflops(dtype: torch.dtype, n: int = 8192, reps: int = 20) -> float:
    """Achieved TFLOP/s of an n×n×n matmul on random data (cuBLAS), median of ``reps`` event-timed runs."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2.0 * n**3 / median(times) / 1e12


def count_step_flops(runner: StepRunner, batch: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        runner.step(batch)
    by_op: Dict[str, int] = {}
    for _module, ops in fc.get_flop_counts().items():
        if _module != "Global":
            continue
        for op, n in ops.items():
            by_op[str(op)] = by_op.get(str(op), 0) + int(n)
    return {"total": int(fc.get_total_flops()), "by_op": by_op}


def run_variant(name: str, opts: Dict[str, Any], args, state, batches_cpu, device: torch.device, log) -> Dict[str, Any]:
    cuda = device.type == "cuda"
    cfg = config(args.method, args.patch, args.width, device=str(device), amp=bool(opts["amp"]) and cuda,
                 channels_last=bool(opts["channels_last"]), compile=bool(opts["compile"]))
    runner = StepRunner(cfg, args.K, copy.deepcopy(state))  # the product's Trainer with these settings
    if cuda:
        torch.backends.cudnn.benchmark = bool(opts["cudnn_benchmark"])  # after the Trainer, which turns it on
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches_cpu]
    times = timed_steps(runner, batches, args.warmup, args.steps)
    out = {"options": opts, "step_s": times, "median_step_s": median(times)}
    if cuda:
        out["max_memory_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        out["max_memory_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
    log(f"[{name}] median step {out['median_step_s'] * 1e3:.1f} ms" +
        (f", peak allocated {out['max_memory_allocated_bytes'] / 2**20:.0f} MiB" if cuda else ""))
    del runner
    if cuda:
        torch.cuda.empty_cache()
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patch", nargs=3, type=int, default=[80, 112, 112], metavar=("D", "H", "W"),
                   help="patch (D, H, W); default the reference's 112×112×80 (x, y, z)")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--K", type=int, default=2, help="classes incl. background")
    p.add_argument("--method", default="cpcl", choices=["cpcl", "mean_teacher", "supervised"])
    p.add_argument("--variants", nargs="+", default=None, help=f"subset of {list(VARIANTS)}")
    p.add_argument("--compile", action="store_true", help="add the torch.compile variant")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None, help="override the datasheet peak (TFLOP/s) for MFU")
    p.add_argument("--no-measure-peak", action="store_true", help="skip the matmul ceiling measurement")
    p.add_argument("--count-flops", action="store_true", help="only count FLOPs of one step (works on the CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny patch, 1 warm-up + 2 steps; CPU fp32 when no GPU")
    p.add_argument("--out", default=None)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    set_threads(args.threads)
    cuda_ok = torch.cuda.is_available()
    device = torch.device("cuda" if (args.device == "auto" and cuda_ok) else ("cpu" if args.device == "auto" else args.device))
    notes: List[str] = []
    if args.smoke:
        args.patch, args.width, args.steps, args.warmup = [16, 32, 32], 4, 2, 1
    args.patch = tuple(int(v) for v in args.patch)
    variants = args.variants or (["fp32", "fp32_bench", "bf16", "bf16_cl"] + (["bf16_cl_compile"] if args.compile else []))
    if device.type != "cuda":
        if not (args.smoke or args.count_flops):
            p.error("no CUDA GPU here: use --smoke (CPU fallback) or --count-flops, or run on a GPU")
        if not args.count_flops:
            notes.append("no CUDA GPU: CPU fallback in fp32 (autocast, channels_last and cuDNN options do not apply); "
                         "these are smoke numbers, not GPU results")
            log(notes[-1])
            variants = ["fp32"]
    torch.manual_seed(0)
    state = VNet(1, args.K, args.width, 4).state_dict()
    batches = make_batches(2, 2, 2 if args.method != "supervised" else 0, args.patch, args.K, 0)
    result: Dict[str, Any] = {
        "benchmark": "gpu_step", "command": " ".join(["python", "bench/gpu_step.py", *(argv or sys.argv[1:])]),
        "machine": machine_info(), "device": str(device), "notes": notes, "patch_dhw": list(args.patch), "width": args.width,
        "K": args.K, "method": args.method, "batch": "2+2" if args.method != "supervised" else "2",
    }
    # FLOPs of one step (fp32 on the target device; the count does not depend on precision or layout)
    flop_runner = StepRunner(config(args.method, args.patch, args.width, device=str(device), amp=False, channels_last=False),
                             args.K, copy.deepcopy(state))
    fb = {k: v.to(device) for k, v in batches[0].items()}
    with Clock(torch.cuda.synchronize if device.type == "cuda" else None) as c:
        flops = count_step_flops(flop_runner, fb)
    del flop_runner
    result["flops_per_step"] = flops
    log(f"FLOPs per step: {flops['total'] / 1e12:.3f} TFLOP ({', '.join(f'{k} {v / 1e9:.4g} G' for k, v in sorted(flops['by_op'].items(), key=lambda kv: -kv[1]))}); "
        f"counted in {c.wall:.1f} s")
    if args.count_flops:
        result["count_only"] = True
    else:
        res = {}
        for v in variants:
            if v not in VARIANTS:
                p.error(f"unknown variant {v!r}; choose from {list(VARIANTS)}")
            if VARIANTS[v]["amp"] and device.type == "cuda" and not torch.cuda.is_bf16_supported():
                notes.append(f"{v} skipped: this GPU has no bf16 (the trainer uses fp16 + GradScaler there)")
                log(notes[-1])
                continue
            res[v] = run_variant(v, VARIANTS[v], args, state, batches, device, log)
        result["variants"] = res
        base = res[next(iter(res))]["median_step_s"]
        peaks: Dict[str, Any] = {}
        if device.type == "cuda":
            name = torch.cuda.get_device_name(0)
            peaks["datasheet"] = datasheet_peak(name)
            if not args.no_measure_peak:
                peaks["measured_matmul_tflops"] = {"bf16": measured_matmul_tflops(torch.bfloat16),
                                                   "tf32": _tf32_matmul()}
        if args.peak_tflops:
            peaks["override_tflops"] = args.peak_tflops
        result["peaks"] = peaks
        for v, r in res.items():
            r["speedup_vs_first"] = base / r["median_step_s"]
            achieved = flops["total"] / r["median_step_s"] / 1e12
            r["achieved_tflops"] = achieved
            if device.type != "cuda":
                prec = "fp32"
            else:
                prec = "bf16" if r["options"]["amp"] else ("tf32" if torch.backends.cudnn.allow_tf32 else "fp32")
            r["mfu_precision"] = prec
            if args.peak_tflops:
                r["mfu"] = achieved / args.peak_tflops
            elif peaks.get("datasheet"):
                r["mfu"] = achieved / peaks["datasheet"][prec]
            if peaks.get("measured_matmul_tflops"):
                r["mfu_vs_measured_matmul"] = achieved / peaks["measured_matmul_tflops"]["bf16" if prec == "bf16" else "tf32"]
        print(table(result), flush=True)
    result["machine"]["load_average_at_end"] = load_average()
    out = Path(args.out) if args.out else RESULTS_DIR / ("gpu_step_smoke.json" if args.smoke else
                                                          ("gpu_step_flops.json" if args.count_flops else "gpu_step.json"))
    write_json(out, result)
    log(f"wrote {out}")
    return 0


def _tf32_matmul() -> float:
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return measured_matmul_tflops(torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def table(result: Dict[str, Any]) -> str:
    rows = [f"\n{result['device']}: patch (D, H, W) {result['patch_dhw']}, width {result['width']}, {result['method']}, batch "
            f"{result['batch']}, {result['flops_per_step']['total'] / 1e12:.3f} TFLOP per step",
            "| variant | step | speed-up | peak allocated | achieved TFLOP/s | MFU (datasheet) | MFU (measured matmul) |",
            "|---|---|---|---|---|---|---|"]
    for v, r in result["variants"].items():
        mem = f"{r['max_memory_allocated_bytes'] / 2**20:.0f} MiB" if "max_memory_allocated_bytes" in r else "n/a (CPU)"
        mfu = f"{r['mfu']:.1%} ({r['mfu_precision']})" if "mfu" in r else "n/a"
        mfu2 = f"{r['mfu_vs_measured_matmul']:.1%}" if "mfu_vs_measured_matmul" in r else "n/a"
        rows.append(f"| {v} | {r['median_step_s'] * 1e3:.1f} ms | {r['speedup_vs_first']:.2f}× | {mem} | {r['achieved_tflops']:.3f} | {mfu} | {mfu2} |")
    for n in result["notes"]:
        rows.append(f"\nNote: {n}")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
