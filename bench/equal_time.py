"""Equal-time benchmark: every recipe gets the same minutes of one 2-thread CPU process.

A user compares recipes at equal wall-clock time, not at equal iterations: supervised-only runs several times
more iterations than a semi-supervised recipe in the same minutes. Wall time on shared cores is noisy, so the
benchmark separates the two:

1. ``--pace``: on a quiet machine, time real ``Trainer`` steps of every recipe (its network, patch, batches,
   copy-paste; sampling and augmentation included, validation excluded) in ONE process with 2 torch threads,
   recipes interleaved so drift hits all alike; median seconds per iteration -> ``equal_time_pace.json``. On a
   shared machine run it at the highest priority (``nice -n -20``, as root) so other processes barely take
   its cores; the load average and the process CPU time per step are recorded beside the wall time.
2. Runs: a budget of M minutes becomes ``floor(M * 60 / pace)`` iterations for that recipe (a recipe with a
   supervised warm start is charged the supervised pace for its warm-start iterations). Each run then trains
   exactly that many iterations, whatever the load while it runs, and is scored like ``bench/accuracy.py``
   (teacher, last weights, original test images; validation cases separately).

    python bench/equal_time.py --pace                                  # measure (quiet machine, ~5 min)
    python bench/equal_time.py --minutes 10 --seeds 0 1 2              # hippocampus 4 labeled, every recipe
    python bench/equal_time.py --dataset la --minutes 5 10 20 40 --recipes supervised default
    python bench/equal_time.py --report                                # tables + plot from the results

Results: ``bench/results/equal_time.jsonl`` (one line per finished run, resumable, shard-safe),
``equal_time_tables.md`` and ``equal_time_dice_vs_minutes.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import accuracy as A  # noqa: E402
import common as C  # noqa: E402
from CPCLSegmentLib.planning import plan_patch_size, plan_width, shape_at_spacing  # noqa: E402
from CPCLSegmentLib.settings import TrainConfig  # noqa: E402
from CPCLSegmentLib.trainer import Trainer  # noqa: E402

RESULTS = C.RESULTS_DIR / "equal_time.jsonl"
PACE = C.RESULTS_DIR / "equal_time_pace.json"
THREADS = 2  # the budget is minutes of one process with this many torch threads
BUDGETS = [5, 10, 20, 40]
LABELED = {"hippocampus": [4, 1], "la": [4]}
# The product's CPU plan before the equal-time study (width 16, the median shape rounded UP to multiples of 16, at
# most 64^3 voxels), pinned so its runs stay comparable; "small" recipes get the planner's CPU plan of this code
# (``planning.plan_width`` / ``plan_patch_size``: width 8, the median shape rounded DOWN).
WIDE = {"hippocampus": dict(width=16, patch_size=(48, 64, 48)), "la": dict(width=16, patch_size=(48, 64, 80))}

# Recipes: what differs from the product's defaults (``TrainConfig()``: the default CPCL + copy-paste recipe).
RECIPES: Dict[str, Dict[str, Any]] = {
    "supervised": dict(method="supervised"),
    "default": dict(method="cpcl", copy_paste=True),
    "supervised_small": dict(method="supervised", small=True),
    "default_small": dict(method="cpcl", copy_paste=True, small=True),
    "warm_small": dict(method="cpcl", copy_paste=True, small=True, warm_start=0.5),
    # the warm start's fraction as a lever (not in the default grid: --recipes names them)
    "warm25_small": dict(method="cpcl", copy_paste=True, small=True, warm_start=0.25),
    "warm75_small": dict(method="cpcl", copy_paste=True, small=True, warm_start=0.75),
    # a learning-rate warm-up as a lever: the warm start with the first tenth of the iterations' rate rising linearly
    "warmlr_small": dict(method="cpcl", copy_paste=True, small=True, warm_start=0.5, lr_warmup=0.1),
    # copy-paste ramped in as a lever: the default recipe with its ground-truth term at r(t) too
    "cpramp_small": dict(method="cpcl", copy_paste=True, small=True, copy_paste_ramp=True),
}
DEFAULT_RECIPES = ["supervised", "default", "supervised_small", "default_small", "warm_small"]
# A recipe with a supervised warm start: (its warm start's pace, the pace of its other iterations), as recipes
# timed by --pace (its own steps are not timed: they would all be warm-start steps).
PACED_AS = {r: ("supervised_small", "default_small") for r, spec in RECIPES.items() if spec.get("warm_start")}
# A recipe that only weighs the loss terms differently: the pace of the recipe whose steps it runs.
PACE_OF = {"cpramp_small": "default_small"}
LABELS = {
    "supervised": "supervised-only (width 16, patch rounded up)",
    "default": "default recipe (CPCL + copy-paste, width 16, patch rounded up)",
    "supervised_small": "supervised-only (CPU plan: width 8, patch rounded down)",
    "default_small": "default recipe (CPU plan: width 8, patch rounded down)",
    "warm_small": "supervised warm start (first half of the iterations), then the default recipe (CPU plan)",
    "warm25_small": "supervised warm start (first quarter of the iterations), then the default recipe (CPU plan)",
    "warm75_small": "supervised warm start (first three quarters of the iterations), then the default recipe (CPU plan)",
    "warmlr_small": "supervised warm start (first half), learning rate warmed up over the first tenth (CPU plan)",
    "cpramp_small": "default recipe, copy-paste ramped in with the unlabeled terms (CPU plan)",
}


def cpu_plan(data: A.Data, names: Sequence[str], num_classes: int, copy_paste: bool, method: str) -> Dict[str, Any]:
    """The width and patch ``planning.plan_run`` gives these labeled subjects on a CPU (no width given)."""
    import SimpleITK as sitk

    shapes = []
    for n in names:
        img = sitk.ReadImage(data.dataset.files(data.dir, n)[0])
        shapes.append(shape_at_spacing(img.GetSize(), img.GetSpacing(), data.plan["spacing"]))
    median = [int(np.median([s[a] for s in shapes])) for a in range(3)]
    width = plan_width(TrainConfig(), "cpu", [], False)
    patch, _ = plan_patch_size(median, data.plan["spacing"], 4, "cpu", width, num_classes, method=method, copy_paste=copy_paste)
    return dict(width=width, patch_size=tuple(patch))


def recipe_config(recipe: str, seed: int, data: A.Data, labeled_names: Sequence[str]) -> Dict[str, Any]:
    """The full trainer configuration of ``recipe`` (iterations still to be set)."""
    spec = dict(RECIPES[recipe])
    small = spec.pop("small", False)
    cfg = TrainConfig().to_dict()
    cfg.update(device="cpu", amp=False, channels_last=False, seed=seed, **spec)
    if small:
        cfg.update(cpu_plan(data, labeled_names, data.num_classes, bool(cfg.get("copy_paste")), cfg["method"]))
    else:
        cfg.update(WIDE[data.dataset.key])
    cfg["patch_size"] = list(cfg["patch_size"])
    return cfg


def _cases(data: A.Data, budget: int, seed: int, method: str):
    split = C.split_train(data.splits["train"], budget, seed, data.validation_size)
    lab = data.get(split["labeled"])
    labeled = [s.case(seed=i) for i, s in enumerate(lab)]
    unlabeled = []
    if method != "supervised":
        unlabeled = [s.case(labeled=False) for s in data.get(split["unlabeled"][:40])] + list(data.extra)
    return split, labeled, unlabeled


def measure_pace(data: A.Data, recipes: Sequence[str], budget: int, steps: int, warmup: int, rounds: int,
                 log=print) -> Dict[str, Any]:
    """Median seconds per training step of each recipe, ``THREADS`` torch threads, recipes interleaved."""
    torch.set_num_threads(THREADS)
    trainers = {}
    recipes = [r for r in recipes if r not in PACED_AS and r not in PACE_OF]
    for r in recipes:
        split = C.split_train(data.splits["train"], budget, 0, data.validation_size)
        cfg = recipe_config(r, 0, data, split["labeled"])
        _, labeled, unlabeled = _cases(data, budget, 0, cfg["method"])
        tr = Trainer(TrainConfig.from_dict({**cfg, "iterations": 10**6}), labeled, unlabeled, data.num_classes)
        for it in range(warmup):
            tr.step(tr.sample(it), it)
        trainers[r] = (tr, cfg)
    times: Dict[str, List[float]] = {r: [] for r in recipes}
    cpu: Dict[str, List[float]] = {r: [] for r in recipes}
    it = warmup
    for _ in range(rounds):
        for r in recipes:
            tr, _ = trainers[r]
            for k in range(steps):
                t, c = time.perf_counter(), time.process_time()
                tr.step(tr.sample(it + k), it + k)
                times[r].append(time.perf_counter() - t)
                cpu[r].append(time.process_time() - c)
        it += steps
    out = {}
    for r in recipes:
        med = statistics.median(times[r])
        out[r] = {"seconds_per_iteration": round(med, 4), "samples": len(times[r]),
                  "iqr": [round(float(np.percentile(times[r], 25)), 4), round(float(np.percentile(times[r], 75)), 4)],
                  "cpu_seconds_per_iteration": round(statistics.median(cpu[r]), 4),
                  "patch_size": trainers[r][1]["patch_size"], "width": trainers[r][1]["width"]}
        log(f"{r}: {med:.3f} s/it (patch {trainers[r][1]['patch_size']}, width {trainers[r][1]['width']})")
    return out


def iterations_for(minutes: float, pace: Dict[str, Any], recipe: str) -> int:
    """The iteration count of ``recipe`` that fits ``minutes`` at its measured pace; a warm start's fraction f of
    the iterations at the supervised pace: ``T = M · 60 / (f · t_sup + (1 - f) · t)``."""
    if recipe in PACED_AS:
        f = RECIPES[recipe]["warm_start"]
        t_sup, t = (pace[r]["seconds_per_iteration"] for r in PACED_AS[recipe])
        return max(1, int(math.floor(minutes * 60.0 / (f * t_sup + (1 - f) * t))))
    return max(1, int(math.floor(minutes * 60.0 / pace[PACE_OF.get(recipe, recipe)]["seconds_per_iteration"])))


def jobs_for(data: A.Data, pace: Dict[str, Any], recipes: Sequence[str], budgets: Sequence[int], minutes: Sequence[float],
             seeds: Sequence[int]) -> List[A.Job]:
    jobs = []
    for m in minutes:
        for s in seeds:
            for b in budgets:
                split = C.split_train(data.splits["train"], b, s, data.validation_size)
                for r in recipes:
                    cfg = recipe_config(r, s, data, split["labeled"])
                    cfg["iterations"] = iterations_for(m, pace, r)
                    cfg["validation_every"] = max(1, cfg["iterations"] // 5)
                    jobs.append(A.Job("equal_time", r, b, s, cfg, name=f"{r}@{m:g}min", extra={"minutes": m}))
    return jobs


def summarize(records: Sequence[Dict[str, Any]], experiment: str = "equal_time") -> Dict[tuple, Dict[str, Any]]:
    """(dataset, labeled, minutes, recipe) -> per-seed test / validation Dice and validation curves of
    ``experiment``'s records."""
    latest = {r["key"]: r for r in records if r.get("experiment") == experiment}
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in latest.values():
        groups.setdefault((r["dataset"], r["budget"], r["minutes"], r["variant"]), []).append(r)
    out = {}
    for k, rs in groups.items():
        rs.sort(key=lambda r: r["seed"])
        out[k] = {"seeds": [r["seed"] for r in rs], "iterations": rs[0]["config"]["iterations"],
                  "test": [r["test_last"]["mean_dice"] for r in rs], "val": [r["validation_last"]["mean_dice"] for r in rs],
                  "curves": [r.get("validation_curve") or [] for r in rs]}
    return out


def _cell(xs: Sequence[float]) -> str:
    if not xs:
        return "–"
    m = 100 * float(np.mean(xs))
    return f"{m:.1f}" if len(xs) == 1 else f"{m:.1f} ± {100 * float(np.std(xs, ddof=1)):.1f}"


def _deltas(a: Dict[str, Any], ref: Optional[Dict[str, Any]], which: str) -> str:
    """Per-seed differences to ``ref`` on the seeds both have, in Dice points."""
    if not ref:
        return "–"
    r = dict(zip(ref["seeds"], ref[which]))
    return ", ".join(f"{100 * (x - r[s]):+.1f}" for s, x in zip(a["seeds"], a[which]) if s in r) or "–"


def tables(records: Sequence[Dict[str, Any]], pace: Optional[Dict[str, Any]]) -> str:
    summ = summarize(records)
    lines = ["<!-- generated by bench/equal_time.py from equal_time.jsonl; do not edit by hand -->", ""]
    for ds in sorted({k[0] for k in summ}):
        p = (pace or {}).get("datasets", {}).get(ds)
        if p:
            lines += [f"Pace on {ds} ({p['machine']}, {p['when']}): "
                      + "; ".join(f"{r} {v['seconds_per_iteration']:.2f} s/it" for r, v in p["recipes"].items()), ""]
        for lab in sorted({k[1] for k in summ if k[0] == ds}):
            lines += [f"### {ds}, {lab} labeled: mean Dice (%) at equal minutes, mean ± std over seeds", "",
                      "| minutes | recipe | iterations | seeds | test | validation | Δ test vs supervised-only of the same plan, per seed "
                      "| Δ validation, per seed | Δ test vs supervised-only (width 16), per seed |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for m in sorted({k[2] for k in summ if k[:2] == (ds, lab)}):
                for r in [x for x in RECIPES if (ds, lab, m, x) in summ]:
                    a = summ[(ds, lab, m, r)]
                    same = "supervised_small" if r.endswith("_small") else "supervised"
                    dt, dv = _deltas(a, summ.get((ds, lab, m, same)), "test"), _deltas(a, summ.get((ds, lab, m, same)), "val")
                    wide = _deltas(a, summ.get((ds, lab, m, "supervised")), "test") if r != "supervised" else "–"
                    lines.append(f"| {m:g} | {LABELS.get(r, r)} | {a['iterations']} | {','.join(map(str, a['seeds']))} | "
                                 f"{_cell(a['test'])} | {_cell(a['val'])} | {dt if r != same else '–'} | {dv if r != same else '–'} | {wide} |")
            lines.append("")
    return "\n".join(lines) + "\n"


# The all-labeled bound per data set (supervised-only on every training case): a line in the plot, not a panel.
BOUND_LABELED = {"la": 70}
BOUND_LABEL = "supervised-only on all labeled training cases (the bound), {minutes:g} minutes"

# One colour per recipe in every panel; the width-16 plan (the product before the study) dashed.
STYLE = {"supervised": dict(color="tab:blue", linestyle="--", marker="s"), "default": dict(color="tab:orange", linestyle="--", marker="s"),
         "supervised_small": dict(color="tab:blue", marker="o"), "default_small": dict(color="tab:orange", marker="o"),
         "warm_small": dict(color="tab:green", marker="D"), "warm25_small": dict(color="tab:olive", marker="v"),
         "warm75_small": dict(color="tab:purple", marker="^"), "warmlr_small": dict(color="tab:brown", marker="P"),
         "cpramp_small": dict(color="tab:pink", marker="X")}


def plot(records: Sequence[Dict[str, Any]], path: Path) -> bool:
    """Test Dice (mean ± std over seeds) against minutes, one panel per setting, one colour per recipe; the x axis
    spans every budget of the grid (``BUDGETS``), so a budget not run yet shows as a gap; one legend below."""
    summ = summarize(records)
    panels = sorted({k[:2] for k in summ if k[1] != BOUND_LABELED.get(k[0])})
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.9), squeeze=False)
    handles: Dict[str, Any] = {}
    for ax, (ds, lab) in zip(axes[0], panels):
        for r in RECIPES:
            pts = sorted((k[2], 100 * np.mean(v["test"]), 100 * np.std(v["test"])) for k, v in summ.items()
                         if k[:2] == (ds, lab) and k[3] == r)
            if pts:
                xs, ys, es = zip(*pts)
                handles[r] = ax.errorbar(xs, ys, yerr=es, capsize=3, label=LABELS.get(r, r), **STYLE.get(r, {}))
        for k, v in summ.items():  # the all-labeled bound of this data set: a dotted line at its score
            if k[:2] == (ds, BOUND_LABELED.get(ds)) and k[3] == "supervised_small":
                handles["bound"] = ax.axhline(100 * np.mean(v["test"]), color="grey", linestyle=":",
                                              label=BOUND_LABEL.format(minutes=k[2]))
        budgets = sorted(set(BUDGETS) | {k[2] for k in summ})
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets)
        ax.set_xticklabels([f"{b:g}" for b in budgets])
        ax.minorticks_off()
        ax.set_xlim(budgets[0] / 1.25, budgets[-1] * 1.25)
        ax.set_xlabel(f"minutes of one {THREADS}-thread CPU process")
        ax.set_ylabel("test mean Dice (%)")
        ax.set_title(f"{C.DATASETS[ds].title if ds in C.DATASETS else ds}, {lab} labeled", fontsize=10)
        ax.grid(alpha=0.3)
    order = [r for r in [*RECIPES, "bound"] if r in handles]
    fig.legend([handles[r] for r in order], [handles[r].get_label() for r in order], loc="lower center", ncol=2, fontsize=7.5,
               frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.045 * ((len(order) + 1) // 2), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(results: C.Results) -> None:
    pace = json.loads(PACE.read_text()) if PACE.exists() else None
    (C.RESULTS_DIR / "equal_time_tables.md").write_text(tables(results.records(), pace), encoding="utf-8")
    plot(results.records(), C.RESULTS_DIR / "equal_time_dice_vs_minutes.png")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="hippocampus", choices=sorted(C.DATASETS))
    p.add_argument("--pace", action="store_true", help="measure every recipe's seconds per iteration (quiet machine)")
    p.add_argument("--pace-steps", type=int, default=4, help="steps per recipe per round")
    p.add_argument("--pace-rounds", type=int, default=4)
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=DEFAULT_RECIPES,
                   help=f"default: {' '.join(DEFAULT_RECIPES)}")
    p.add_argument("--labeled", type=int, nargs="+", help="labeled subjects (default: 4 and 1 hippocampus, 4 la)")
    p.add_argument("--minutes", type=float, nargs="+", default=BUDGETS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1, help="torch threads of the runs (the pace is always 2-thread)")
    p.add_argument("--shard", help="i/n: run every n-th job starting at i")
    p.add_argument("--report", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = C.Results(RESULTS)
    if args.report:
        report(results)
        return 0
    dataset = C.DATASETS[args.dataset]
    data = A.Data(C.data_dir(None, dataset), dataset=dataset)
    if args.pace:
        measured = measure_pace(data, args.recipes, (args.labeled or LABELED[args.dataset])[0], args.pace_steps, 2,
                                args.pace_rounds)
        old = json.loads(PACE.read_text()) if PACE.exists() else {}
        per_ds = old.get("datasets", {})
        per_ds[args.dataset] = {"machine": C.machine(), "when": time.strftime("%Y-%m-%d %H:%M"), "recipes": measured,
                                "load_average_1min": round(os.getloadavg()[0], 2), "nice": os.nice(0)}
        PACE.write_text(json.dumps({"threads": THREADS, "datasets": per_ds}, indent=1, allow_nan=False) + "\n")
        return 0
    pace = json.loads(PACE.read_text())["datasets"][args.dataset]["recipes"]
    torch.set_num_threads(args.threads)
    jobs = jobs_for(data, pace, args.recipes, args.labeled or LABELED[args.dataset], args.minutes, args.seeds)
    orig = A.run_job

    def run_job(job, data_, device, log=print):
        rec = orig(job, data_, device, log)
        rec["minutes"] = job.extra["minutes"]
        return rec

    A.run_job = run_job
    A.run_jobs(jobs, results, data, torch.device("cpu"), C.parse_shard(args.shard))
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
