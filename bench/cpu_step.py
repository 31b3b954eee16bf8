"""CPU training-step time of the engine's CPU speed settings, side by side in ONE process.

One ``speed_common.StepRunner`` per variant (real ``Trainer`` objects, the product's step: loss terms under the
trainer's autocast, backward, optimizer, EMA), all starting from the same weights:

- ``fp32``: the baseline every ratio is over (``cpu_bf16="off"``, eager, contiguous);
- ``bf16``: ``cpu_bf16="on"``, bf16 autocast where the CPU computes bf16 natively (``precision.cpu_native_bf16``);
- ``compile``: ``compile: true``, the student under ``torch.compile`` (inductor's C++ code on the CPU), fp32;
- ``channels_last``: ``channels_last: true`` (the engine's default), networks and 5-D inputs in channels-last 3D
  (NDHWC) memory format, fp32. The other variants are contiguous (NCDHW), so each changes one thing.

The default recipe (``--method cpcl``: CPCL with copy-paste) or supervised-only (``--method supervised``), width 16,
depth 4, batch 2 + 2, K = 3 (``--classes``), the patch the planner chooses on the CPU for the hippocampus set's
median case. Each repeat times ``--steps`` steps of every variant (the order
rotating between repeats), after warm-up steps (``--warmup``; a compiled student compiles in its first steps:
that time is recorded apart, ``warmup_wall_s``); wall and process CPU time per step are recorded (the machine
is shared: CPU time is the steadier figure). Ratios are each variant's median over fp32's.

Usage::

    python bench/cpu_step.py --threads 2 --repeats 3 --steps 3                      # results/cpu_bf16.json
    python bench/cpu_step.py --width 8 --patch 32 48 32 --out results/cpu_bf16_quiet_w8.json   # the CPU plan
    python bench/cpu_step.py --variants fp32 compile --width 8 --patch 32 48 32 --out results/cpu_compile_w8.json
    python bench/cpu_step.py --variants fp32 channels_last --width 8 --patch 32 48 32 --method supervised
    python bench/cpu_step.py --smoke                                                # CI: tiny sizes
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed_common import RESULTS_DIR, Clock, StepRunner, config, machine_info, make_batches, median, set_threads, write_json  # noqa: E402

from CPCLSegmentLib.errors import TrainingDiverged  # noqa: E402
from CPCLSegmentLib.planning import plan_patch_size  # noqa: E402
from CPCLSegmentLib.precision import cpu_native_bf16  # noqa: E402

HIPPOCAMPUS_MEDIAN_SHAPE = (36, 51, 36)  # (D, H, W) at 1 mm (bench/step_time.py)
VARIANTS = {  # name -> the TrainConfig settings it changes (the engine's own settings, nothing benchmark-only)
    "fp32": {"cpu_bf16": "off", "channels_last": False},
    "bf16": {"cpu_bf16": "on", "channels_last": False},
    "compile": {"cpu_bf16": "off", "compile": True, "channels_last": False},
    "channels_last": {"cpu_bf16": "off", "channels_last": True},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant and repeat")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first (compilation happens here)")
    p.add_argument("--variants", nargs="+", default=["fp32", "bf16"], choices=sorted(VARIANTS),
                   help="fp32 is always timed: the ratios are over it")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--quiet", action="store_true", help="accepted for the smoke tests (the per-repeat lines are short)")
    p.add_argument("--width", type=int, default=16, help="network width (the CPU plan trains 8)")
    p.add_argument("--patch", type=int, nargs=3, help="patch (D H W); default: the planner's CPU patch rounded up")
    p.add_argument("--method", choices=["cpcl", "supervised"], default="cpcl",
                   help="cpcl: the default recipe (with copy-paste); supervised: supervised-only")
    p.add_argument("--classes", type=int, default=3, help="K, classes with the background (hippocampus 3, left atrium 2)")
    p.add_argument("--out", default=str(RESULTS_DIR / "cpu_bf16.json"))
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    if args.smoke:
        patch, width, K = (16, 32, 32), 4, 3
        args.repeats, args.steps, args.warmup = 1, 1, 1
    else:
        patch = tuple(args.patch) if args.patch else plan_patch_size(HIPPOCAMPUS_MEDIAN_SHAPE, (1.0, 1.0, 1.0), 4, "cpu", 16, 3)[0]
        width, K = args.width, args.classes
    names = ["fp32"] + [v for v in dict.fromkeys(args.variants) if v != "fp32"]
    recipe = dict(copy_paste=args.method == "cpcl")
    runners = {"fp32": StepRunner(config(args.method, patch, width, **recipe, **VARIANTS["fp32"]), K)}
    start = runners["fp32"].student.state_dict()
    for name in names[1:]:
        runners[name] = StepRunner(config(args.method, patch, width, **recipe, **VARIANTS[name]), K, init_state=start)
    batches = make_batches(2, 2, 2, patch, K)
    native, what = cpu_native_bf16()
    print(f"{args.method}, patch {patch}, width {width}, K {K}, {threads} threads; variants {names}; bf16 where asked: "
          f"{runners['bf16'].trainer.precision.reason if 'bf16' in runners else 'not asked'}", flush=True)
    nonfinite = {name: 0 for name in runners}  # steps whose loss was not finite: timed all the same, and reported

    def step(name, batch):
        try:
            runners[name].step(batch)
        except TrainingDiverged:
            nonfinite[name] += 1

    warmup = {}
    for name in names:  # oneDNN primitive creation; torch.compile's compilation
        with Clock() as c:
            for i in range(args.warmup):
                step(name, batches[i % len(batches)])
        warmup[name] = c.wall
    rows = {name: {"wall": [], "cpu": []} for name in names}
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            for i in range(args.steps):
                with Clock() as c:
                    step(name, batches[i % len(batches)])
                rows[name]["wall"].append(c.wall)
                rows[name]["cpu"].append(c.cpu)
            print(f"repeat {rep + 1} {name}: wall {[round(v, 3) for v in rows[name]['wall'][-args.steps:]]} "
                  f"cpu {[round(v, 3) for v in rows[name]['cpu'][-args.steps:]]}", flush=True)
    summary = {name: {"median_wall_s": median(v["wall"]), "median_cpu_s": median(v["cpu"])} for name, v in rows.items()}
    over = {name: {kind: summary[name][f"median_{kind}_s"] / summary["fp32"][f"median_{kind}_s"] for kind in ("wall", "cpu")}
            for name in names[1:]}
    for name, r in over.items():
        print(f"{name} / fp32 step time: wall {r['wall']:.2f}x, CPU {r['cpu']:.2f}x; warm-up {warmup[name]:.1f} s "
              f"(fp32 {warmup['fp32']:.1f} s)", flush=True)
    print(f"steps with a non-finite loss: {nonfinite}", flush=True)
    result = {
        "machine": machine_info(), "method": args.method, "native_bf16": native, "native_bf16_detail": what,
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), "patch": list(patch), "width": width,
        "K": K, "threads": threads, "repeats": args.repeats, "steps": args.steps, "warmup_steps": args.warmup,
        "smoke": args.smoke, "variants": names, "raw": rows, "summary": summary, "over_fp32": over,
        "warmup_wall_s": warmup, "nonfinite_steps": nonfinite,
        "memory_format": {name: str(r.trainer.memory_format).replace("torch.", "") for name, r in runners.items()},
    }
    if "bf16" in over:  # the field names of the results written before there were other variants
        result.update(bf16_over_fp32_wall=over["bf16"]["wall"], bf16_over_fp32_cpu=over["bf16"]["cpu"])
    write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
