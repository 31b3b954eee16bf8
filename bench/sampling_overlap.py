"""Patch sampling in the training process vs in a DataLoader worker process, on the CPU, side by side in ONE run.

The default recipe (CPCL with copy-paste, width 16, depth 4, batch 2 + 2, K = 3, the patch the planner chooses on
the CPU for the hippocampus set's median case) trains on two synthetic volumes. One ``Trainer`` runs the loop's
own pieces: ``loader.host_batches`` (``workers`` 0: ``BatchMaker`` in this process; 1: one DataLoader worker a
couple of iterations ahead) → ``Trainer.to_device`` → ``Trainer.step(...).read()``. Blocks of ``--steps``
iterations alternate between the two modes (``--repeats`` blocks each, the order swapped every repeat), so the
shared machine's load falls on both alike; the worker's start-up is left out of the block (it is paid once per
run). Also timed alone: sampling one iteration's host batch, in this process.

Recorded per iteration: wall seconds and this process's CPU seconds (the worker's CPU time is not in it). The
CPU time of sampling alone against that of a whole iteration bounds what a worker can save on a CPU, whatever
the machine's load; the interleaved wall times show what it saved on this machine.
Usage::

    nice python bench/sampling_overlap.py --threads 2 --steps 3 --repeats 3 --patch 32 48 32  # results/sampling_overlap.json
    python bench/sampling_overlap.py --smoke                                  # CI: tiny sizes
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed_common import RESULTS_DIR, Clock, config, machine_info, median, set_threads, write_json  # noqa: E402

from CPCLSegmentLib.data import make_case  # noqa: E402
from CPCLSegmentLib.loader import host_batches  # noqa: E402
from CPCLSegmentLib.planning import plan_patch_size  # noqa: E402
from CPCLSegmentLib.trainer import Trainer  # noqa: E402

HIPPOCAMPUS_MEDIAN_SHAPE = (36, 51, 36)  # (D, H, W) at 1 mm (bench/step_time.py)
MODES = {"in_process": 0, "worker": 1}


def _volume(shape, seed):
    rng = np.random.RandomState(seed)
    img = rng.randn(*shape).astype(np.float32)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    lab = ((zz**2 + yy**2 + xx**2) < 0.3).astype(np.int16) + ((zz**2 + yy**2 + xx**2) < 0.1)
    return img + lab, lab


def build(patch, width, volume):
    cfg = config("cpcl", patch, width, copy_paste=True, iterations=100000)
    labeled = [make_case(f"l{i}", *_volume(volume, i)) for i in range(2)]
    unlabeled = [make_case(f"u{i}", _volume(volume, 10 + i)[0]) for i in range(2)]
    return Trainer(cfg, labeled, unlabeled, 3)


def block(trainer, workers, start, steps):
    """Wall and CPU seconds of ``steps`` loop iterations from ``start`` (after one untimed iteration)."""
    batches = host_batches(trainer.maker, start, start + steps + 1, workers)
    try:
        trainer.step(trainer.to_device(next(batches)), start).read()  # the worker's start-up, untimed
        wall, cpu = [], []
        for it in range(start + 1, start + steps + 1):
            with Clock() as c:
                trainer.step(trainer.to_device(next(batches)), it).read()
            wall.append(c.wall)
            cpu.append(c.cpu)
    finally:
        batches.close()
    return wall, cpu


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="timed iterations per block")
    p.add_argument("--repeats", type=int, default=4, help="blocks per mode")
    p.add_argument("--patch", type=int, nargs=3, help="D H W instead of the planner's patch (both sampling and step scale with it)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default=str(RESULTS_DIR / "sampling_overlap.json"))
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    if args.smoke:
        patch, width, volume = (16, 32, 32), 4, (24, 40, 40)
        args.steps, args.repeats = 2, 1
    else:
        patch, width = plan_patch_size(HIPPOCAMPUS_MEDIAN_SHAPE, (1.0, 1.0, 1.0), 4, "cpu", 16, 3)[0], 16
        patch = tuple(args.patch) if args.patch else patch
        volume = tuple(2 * int(s) for s in HIPPOCAMPUS_MEDIAN_SHAPE)
    trainer = build(patch, width, volume)
    sampling, sampling_cpu = [], []
    for it in range(max(3, args.steps)):
        t, c = time.perf_counter(), time.process_time()
        trainer.maker(it)
        sampling.append(time.perf_counter() - t)
        sampling_cpu.append(time.process_time() - c)
    rows = {m: {"wall": [], "cpu": []} for m in MODES}
    it = 0
    for rep in range(args.repeats):
        for mode in (list(MODES) if rep % 2 == 0 else list(MODES)[::-1]):
            wall, cpu = block(trainer, MODES[mode], it, args.steps)
            it += args.steps + 1
            rows[mode]["wall"] += wall
            rows[mode]["cpu"] += cpu
            if not args.quiet:
                print(f"repeat {rep + 1} {mode}: wall {[round(v, 3) for v in wall]} cpu {[round(v, 3) for v in cpu]}", flush=True)
    summary = {m: {"median_wall_s": median(v["wall"]), "median_cpu_s": median(v["cpu"])} for m, v in rows.items()}
    ratio = summary["worker"]["median_wall_s"] / summary["in_process"]["median_wall_s"]
    print(f"patch {patch}, {threads} threads: sampling alone {median(sampling):.3f} s per iteration "
          f"({median(sampling_cpu):.3f} s CPU); seconds per iteration "
          f"in process {summary['in_process']['median_wall_s']:.3f}, with one worker {summary['worker']['median_wall_s']:.3f} "
          f"({ratio:.2f}x)", flush=True)
    write_json(Path(args.out), {
        "machine": machine_info(), "patch": list(patch), "width": width, "volume": list(volume), "threads": threads,
        "steps": args.steps, "repeats": args.repeats, "smoke": args.smoke, "sampling_alone_s": sampling,
        "median_sampling_alone_s": median(sampling), "sampling_alone_cpu_s": sampling_cpu,
        "median_sampling_alone_cpu_s": median(sampling_cpu), "raw": rows, "summary": summary, "worker_over_in_process_wall": ratio,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
