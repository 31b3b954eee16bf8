"""How closely ``--minutes`` planning matches the training's wall time, through the command line a user runs.

``cpcl-segment train --minutes M`` times real steps of the run's recipe(s) and plans the iterations that fit M
minutes (``pace.iterations_for_minutes``; below 1500 default-recipe iterations ``budget.recipe_for_minutes``
switches the recipe). This runs that command on hippocampus subjects (4 labeled + 20 unlabeled from the
benchmark's ``train`` pool by default) with ``--progress json``, stamps every event with the wall time, and
records the plan (recipe, iterations, ``estimated_time_s``), the training's wall time (first to last
iteration), the time before training (checking, timing, preprocessing) and the seconds per step of each phase
(the warm start's supervised steps, then the semi-supervised ones; per tenth of the run).

    python bench/minutes_plan.py --minutes 3 5 --threads 1          # -> bench/results/minutes_plan.jsonl
    python bench/minutes_plan.py --from-log run.log --minutes 5     # a log written by --keep-log, parsed again
    python bench/minutes_plan.py --minutes 5 --threads 2 --plan-only 6   # the plan's own spread: 6 plans, no training

The wall time depends on the machine's load while the run trains: run it on a quiet machine for the ±20 %
question, and read ``load_average_1min`` beside each record.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import torch  # noqa: E402

RESULTS = C.RESULTS_DIR / "minutes_plan.jsonl"


def command(data: Path, names: Sequence[str], labeled: int, minutes: float, out: Path) -> List[str]:
    """The ``cpcl-segment train`` command: the first ``labeled`` names labeled, the rest unlabeled."""
    cmd = [sys.executable, "-m", "CPCLSegmentLib.cli", "train"]
    for n in names[:labeled]:
        cmd += ["--labeled", str(data / "imagesTr" / f"{n}.nii.gz"), str(data / "labelsTr" / f"{n}.nii.gz")]
    cmd += ["--unlabeled", *[str(data / "imagesTr" / f"{n}.nii.gz") for n in names[labeled:]]]
    return cmd + ["--minutes", f"{minutes:g}", "--out", str(out / "model.pt"), "--work-dir", str(out / "work"),
                  "--progress", "json"]


def stamped_events(lines: Sequence[str]) -> List[Tuple[float, Dict[str, Any]]]:
    """``(seconds since start, event)`` for each ``"<seconds> <json>"`` line (other lines skipped)."""
    out = []
    for line in lines:
        stamp, _, rest = line.strip().partition(" ")
        try:
            out.append((float(stamp), json.loads(rest)))
        except ValueError:
            continue
    return out


def summarize(events: Sequence[Tuple[float, Dict[str, Any]]]) -> Dict[str, Any]:
    """The plan, the training's wall time against it, and the seconds per step of each phase."""
    summary = next(e for _, e in events if e.get("event") == "summary")
    start = next(t for t, e in events if e.get("event") == "start")
    steps = [(t, e) for t, e in events if e.get("event") == "progress"]
    warnings = [e["message"] for _, e in events if e.get("event") == "warning"]
    iters = len(steps)
    trained = steps[-1][0] - start
    phases: Dict[str, List[float]] = {}  # phase -> the wall time of each of its steps (its event's stamp)
    for t, e in steps:
        phase = "semi_supervised" if e.get("loss", {}).keys() - {"supervised", "total"} else "supervised"
        phases.setdefault(phase, []).append(t)
    per_step = {}  # mean seconds per step of a phase: from the step before it began to its last step
    previous = start
    for phase, stamps in phases.items():
        per_step[phase] = round((stamps[-1] - previous) / len(stamps), 3)
        previous = stamps[-1]
    tenths = [round((steps[min(iters - 1, (k + 1) * iters // 10)][0] - steps[k * iters // 10][0])
                    / max(1, min(iters - 1, (k + 1) * iters // 10) - k * iters // 10), 3) for k in range(10)]
    planned = float(summary["estimated_time_s"])
    return {
        "method": summary["method"], "iterations": summary["iterations"], "planned_s": planned,
        "trained_s": round(trained, 1), "trained_over_planned": round(trained / planned, 3),
        "before_training_s": round(start, 1), "whole_run_s": round(events[-1][0], 1),
        "seconds_per_step": per_step, "steps_per_phase": {k: len(v) for k, v in phases.items()},
        "seconds_per_step_by_tenth": tenths, "recipe_message": warnings[-1] if warnings else None,
    }


PLANNED = "iterations at the measured step time"  # the info event that ends planning


def plan_of(events: Sequence[Tuple[float, Dict[str, Any]]], minutes: float) -> Dict[str, Any]:
    """What the run planned for ``minutes`` (the ``plan`` fields of the info event that ends planning): its
    iterations, and those of the default recipe it was asked for (before a switch to a warm start), so the timed
    seconds per default-recipe step (``minutes · 60 / N``)."""
    plan = next(e["plan"] for _, e in events if e.get("event") == "info" and "plan" in e)
    planned, default = int(plan["iterations"]), int(plan["requested_iterations"])
    return {"planned_iterations": planned, "default_recipe_iterations": default, "switched": bool(plan["switched"]),
            "default_step_s": round(minutes * 60.0 / default, 4), "planning_s": round(events[-1][0], 1)}


def run(cmd: Sequence[str], threads: int, until: Optional[str] = None) -> List[str]:
    """Runs ``cmd`` with ``threads`` torch threads; returns its output lines, each stamped with the wall time. With
    ``until``, the run is stopped at the first line containing it (that line included)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(C.ROOT / "CPCLSegment"))
    t0 = time.time()
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as p:
        for line in p.stdout:
            lines.append(f"{time.time() - t0:.3f} {line}")
            if until is not None and until in line:
                p.kill()
                return lines
    if p.returncode:
        raise SystemExit("".join(lines[-20:]) + f"\nthe run failed (exit {p.returncode})")
    return lines


def append_record(args: argparse.Namespace, minutes: float, fields: Dict[str, Any], when: float, **first: Any
                  ) -> Dict[str, Any]:
    """One result line, appended to ``RESULTS`` and returned: ``first``, the run's setting, ``fields``, and where and
    when (``when``, seconds since the epoch) it ran."""
    record = {**first, "minutes": minutes, "labeled": args.labeled, "unlabeled": args.unlabeled, "threads": args.threads,
              **fields, "machine": C.machine(), "note": args.note,
              "finished": time.strftime("%Y-%m-%d %H:%M", time.localtime(when)), "versions": C.versions()}
    with open(RESULTS, "a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, nargs="+", default=[3, 5])
    p.add_argument("--labeled", type=int, default=4)
    p.add_argument("--unlabeled", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--from-log", help="parse a stamped log instead of running (one --minutes value)")
    p.add_argument("--keep-log", help="folder to keep each run's stamped log in")
    p.add_argument("--note", default="", help="recorded with each result (e.g. what else ran on the machine)")
    p.add_argument("--plan-only", type=int, metavar="N", help="make each plan N times, stopping each run once planned")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)  # recorded by C.machine(): the threads the runs use
    data = C.data_dir(None, C.HIPPOCAMPUS)
    names = C.read_splits(data)["train"][: args.labeled + args.unlabeled]
    if args.plan_only:
        return plans_only(args, data, names)
    for minutes in args.minutes:
        if args.from_log:
            lines = Path(args.from_log).read_text().splitlines()
        else:
            with tempfile.TemporaryDirectory() as tmp:
                lines = run(command(data, names, args.labeled, minutes, Path(tmp)), args.threads)
            if args.keep_log:
                Path(args.keep_log).mkdir(parents=True, exist_ok=True)
                Path(args.keep_log, f"minutes_{minutes:g}.log").write_text("".join(lines))
        when = os.path.getmtime(args.from_log) if args.from_log else time.time()  # a log: when it was written
        load = None if args.from_log else round(os.getloadavg()[0], 2)
        record = append_record(args, minutes, {**summarize(stamped_events(lines)), "load_average_1min": load}, when)
        print(f"--minutes {minutes:g}: {record['method']} {record['iterations']} iterations, trained "
              f"{record['trained_s']} s for {record['planned_s']} s planned ({record['trained_over_planned']:.2f}x)")
    return 0


def plans_only(args: argparse.Namespace, data: Path, names: Sequence[str]) -> int:
    """``--plan-only N``: the spread of the plan itself (the timed step), each ``--minutes`` value planned N times."""
    for minutes in args.minutes:
        for repeat in range(args.plan_only):
            with tempfile.TemporaryDirectory() as tmp:
                lines = run(command(data, names, args.labeled, minutes, Path(tmp)), args.threads, until=PLANNED)
            record = append_record(args, minutes, {"repeat": repeat, **plan_of(stamped_events(lines), minutes)},
                                   time.time(), mode="plan_only")
            print(f"--minutes {minutes:g} plan {repeat + 1}: {record['planned_iterations']} iterations; "
                  f"{record['default_recipe_iterations']} of the default recipe ({record['default_step_s']} s per step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
