"""CPU training-step time, fp32 vs bf16 autocast, side by side in ONE process (the ``cpu_bf16`` setting).

Two ``speed_common.StepRunner``s (real ``Trainer`` objects, the product's step: loss terms under the trainer's
autocast, backward, optimizer, EMA) start from the same weights: one with ``cpu_bf16="off"`` (fp32), one with
``cpu_bf16="on"`` (bf16 autocast where the CPU computes bf16 natively; ``precision.cpu_native_bf16``). The
default recipe: CPCL with copy-paste, width 16, depth 4, batch 2 + 2, K = 3, the patch the planner chooses on
the CPU for the hippocampus set's median case. Each repeat times ``--steps`` steps of fp32 then of bf16 (the
order alternating between repeats), after one warm-up step each; wall and process CPU time per step are
recorded (the machine is shared: CPU time is the steadier figure).

Usage::

    python bench/cpu_bf16.py --threads 2 --repeats 3 --steps 3     # results/cpu_bf16.json
    python bench/cpu_bf16.py --width 8 --patch 32 48 32 --out results/cpu_bf16_quiet_w8.json   # the CPU plan
    python bench/cpu_bf16.py --smoke                                # CI: tiny sizes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed_common import RESULTS_DIR, Clock, StepRunner, config, machine_info, make_batches, median, set_threads, write_json  # noqa: E402

from CPCLSegmentLib.errors import TrainingDiverged  # noqa: E402
from CPCLSegmentLib.planning import plan_patch_size  # noqa: E402
from CPCLSegmentLib.precision import cpu_native_bf16  # noqa: E402

HIPPOCAMPUS_MEDIAN_SHAPE = (36, 51, 36)  # (D, H, W) at 1 mm (bench/step_time.py)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per precision and repeat")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--quiet", action="store_true", help="accepted for the smoke tests (the per-repeat lines are short)")
    p.add_argument("--width", type=int, default=16, help="network width (the CPU plan trains 8)")
    p.add_argument("--patch", type=int, nargs=3, help="patch (D H W); default: the planner's CPU patch rounded up")
    p.add_argument("--out", default=str(RESULTS_DIR / "cpu_bf16.json"))
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    if args.smoke:
        patch, width, K = (16, 32, 32), 4, 3
        args.repeats, args.steps = 1, 1
    else:
        patch = tuple(args.patch) if args.patch else plan_patch_size(HIPPOCAMPUS_MEDIAN_SHAPE, (1.0, 1.0, 1.0), 4, "cpu", 16, 3)[0]
        width, K = args.width, 3
    runners = {"fp32": StepRunner(config("cpcl", patch, width, copy_paste=True, cpu_bf16="off"), K)}
    runners["bf16"] = StepRunner(config("cpcl", patch, width, copy_paste=True, cpu_bf16="on"), K,
                                 init_state=runners["fp32"].student.state_dict())
    batches = make_batches(2, 2, 2, patch, K)
    native, what = cpu_native_bf16()
    print(f"patch {patch}, width {width}, {threads} threads; bf16 runner precision: {runners['bf16'].trainer.precision.reason}",
          flush=True)
    nonfinite = {name: 0 for name in runners}  # steps whose loss was not finite: timed all the same, and reported

    def step(name, batch):
        try:
            runners[name].step(batch)
        except TrainingDiverged:
            nonfinite[name] += 1

    for name in runners:
        step(name, batches[0])  # warm-up (oneDNN primitive creation)
    rows = {name: {"wall": [], "cpu": []} for name in runners}
    for rep in range(args.repeats):
        order = ["fp32", "bf16"] if rep % 2 == 0 else ["bf16", "fp32"]
        for name in order:
            for i in range(args.steps):
                with Clock() as c:
                    step(name, batches[i % len(batches)])
                rows[name]["wall"].append(c.wall)
                rows[name]["cpu"].append(c.cpu)
            print(f"repeat {rep + 1} {name}: wall {[round(v, 3) for v in rows[name]['wall'][-args.steps:]]} "
                  f"cpu {[round(v, 3) for v in rows[name]['cpu'][-args.steps:]]}", flush=True)
    summary = {name: {"median_wall_s": median(v["wall"]), "median_cpu_s": median(v["cpu"])} for name, v in rows.items()}
    ratio_wall = summary["bf16"]["median_wall_s"] / summary["fp32"]["median_wall_s"]
    ratio_cpu = summary["bf16"]["median_cpu_s"] / summary["fp32"]["median_cpu_s"]
    print(f"bf16 / fp32 step time: wall {ratio_wall:.2f}x, CPU {ratio_cpu:.2f}x; steps with a non-finite loss: {nonfinite}", flush=True)
    write_json(Path(args.out), {
        "machine": machine_info(), "native_bf16": native, "native_bf16_detail": what, "patch": list(patch), "width": width,
        "K": K, "threads": threads, "repeats": args.repeats, "steps": args.steps, "smoke": args.smoke, "raw": rows,
        "summary": summary, "bf16_over_fp32_wall": ratio_wall, "bf16_over_fp32_cpu": ratio_cpu, "nonfinite_steps": nonfinite,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
