"""Does a pretrained start pay off? A trunk trained on one MR task as the ``--init`` of another, at equal minutes.

The start is a real CPCLSegment model file: supervised-only on every training case of the source data set
(``--trunk``; the CPU plan of the equal-time study: width 8, the median shape rounded down), written with the
engine's ``save_model`` and read back through ``pretrained.read_starting_point`` / ``starting_state`` exactly as
``--init`` does. Its segments do not match the target's, so its output head is new and the rest of the network
(encoder, decoder, the level-1 features the prototypes use) starts from the trunk. The target runs are the
equal-time study's jobs (same recipes, same iterations per minute, same seeds and splits) with only the start
changed, so the from-scratch rows are that study's results (``bench/results/equal_time.jsonl``).

    python bench/pretrained_start.py --trunk --source la --iterations 1500          # the trunk (model file)
    python bench/pretrained_start.py --source la --target hippocampus --minutes 5 10 --seeds 0 1 2 \\
        --recipes supervised_small default_small --threads 1
    python bench/pretrained_start.py --report

The target's own preprocessing (spacing, normalisation) is kept: the trunk's weights are the only thing carried
over (a model file given to ``--init`` on the command line would also bring its spacing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import accuracy as A  # noqa: E402
import common as C  # noqa: E402
import equal_time as E  # noqa: E402
from CPCLSegmentLib.modelfile import make_record, save_model  # noqa: E402
from CPCLSegmentLib.pretrained import read_starting_point, starting_state  # noqa: E402
from CPCLSegmentLib.settings import TrainConfig  # noqa: E402
from CPCLSegmentLib.trainer import Trainer  # noqa: E402

RESULTS = C.RESULTS_DIR / "pretrained_start.jsonl"
TRUNKS = Path.home() / ".cache" / "cpcl-segment-bench" / "trunks"


def trunk_path(source: str, iterations: int) -> Path:
    return TRUNKS / f"{source}_supervised_small_{iterations}.pt"


def _classes(names: Sequence[str]) -> List[Dict[str, Any]]:
    """The model-file classes of a data set's segment names (background first, label value = index)."""
    return [{"name": n, "label_value": i, "color": [0.5, 0.5, 0.5]} for i, n in enumerate(["background", *names])]


def train_trunk(source: str, iterations: int, threads: int, log=print) -> Path:
    """Supervised-only on every training case of ``source``, written as a CPCLSegment model file."""
    torch.set_num_threads(threads)
    data = A.Data(C.data_dir(None, C.DATASETS[source]), dataset=C.DATASETS[source])
    names = list(data.splits["train"])
    cfg = E.recipe_config("supervised_small", 0, data, names)
    cfg.update(iterations=iterations, validation_every=0)
    tcfg = TrainConfig.from_dict(cfg)
    labeled = [s.case(seed=i) for i, s in enumerate(data.get(names))]
    t0 = time.perf_counter()
    result = Trainer(tcfg, labeled, [], data.num_classes, class_names=data.class_names).run()
    seconds = time.perf_counter() - t0
    plan = dict(data.plan, orientation=None)
    request = SimpleNamespace(validation=[], init=None)
    record = make_record(tcfg, result, _classes(data.class_names), plan, request, [SimpleNamespace(name=n) for n in names], 0)
    out = trunk_path(source, iterations)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(str(out), record)
    C.Results(RESULTS).append({"key": f"trunk|{source}|{iterations}", "experiment": "trunk", "dataset": source,
                               "cases": len(names), "iterations": iterations, "config": cfg, "train_seconds": round(seconds, 1),
                               "threads": threads, "final_loss": result.history[-1] if result.history else None,
                               "machine": C.machine(), "versions": C.versions(), "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    log(f"trunk {out}: {len(names)} cases, {iterations} iterations, {seconds:.0f} s")
    return out


def with_start(path: Path, class_names: Sequence[str], log=print):
    """A ``Trainer`` factory that starts every run from the model file at ``path`` (as ``--init`` does)."""
    record = read_starting_point(str(path))

    def make(cfg, labeled, unlabeled, num_classes, **kw):
        state = starting_state(record, str(path), _classes(class_names), cfg, None, lambda e: log(f"  {e.get('message')}"))
        return Trainer(cfg, labeled, unlabeled, num_classes, init_state=state, **kw)

    return make


def jobs(data: A.Data, source: str, trunk_iterations: int, recipes, minutes, seeds, labeled) -> List[A.Job]:
    pace = json.loads(E.PACE.read_text())["datasets"][data.dataset.key]["recipes"]
    out = []
    for j in E.jobs_for(data, pace, recipes, labeled, minutes, seeds):
        start = f"{source}_trunk{trunk_iterations}"
        out.append(A.Job("pretrained_start", j.variant, j.budget, j.seed, dict(j.config), name=f"{j.name}+{start}",
                         extra=dict(j.extra, start=start)))
    return out


def tables(pre: Sequence[Dict[str, Any]], scratch: Sequence[Dict[str, Any]]) -> str:
    """Pretrained start vs from scratch (the equal-time study's runs of the same recipe, minutes and seeds): test
    and validation Dice of the last weights, per-seed deltas, and the validation Dice along the run (Dice against
    minutes: validation every fifth of the iterations, mean over the seeds both have)."""
    mine, ref = E.summarize(pre, "pretrained_start"), E.summarize(scratch)
    rows = ["| target | labeled | recipe | minutes | seeds | test, scratch | test, pretrained start | Δ test per seed | "
            "Δ validation per seed |", "|---|---|---|---|---|---|---|---|---|"]
    curves = ["| target | recipe | minutes of the budget | validation, scratch | validation, pretrained start |", "|---|---|---|---|---|"]
    for cell, a in sorted(mine.items(), key=str):
        base = ref.get(cell)
        both = [s for s in a["seeds"] if base and s in base["seeds"]]
        rows.append(f"| {cell[0]} | {cell[1]} | {cell[3]} | {cell[2]:g} | {', '.join(map(str, a['seeds']))} | "
                    f"{E._cell([t for s, t in zip(base['seeds'], base['test']) if s in both] if base else [])} | "
                    f"{E._cell(a['test'])} | {E._deltas(a, base, 'test')} | {E._deltas(a, base, 'val')} |")
        if not both:
            continue
        own = dict(zip(a["seeds"], a["curves"]))
        other = dict(zip(base["seeds"], base["curves"]))
        for k, (it, _) in enumerate(own[both[0]]):
            x = [other[s][k][1] for s in both if len(other[s]) > k]
            y = [own[s][k][1] for s in both if len(own[s]) > k]
            curves.append(f"| {cell[0]} | {cell[3]} | {cell[2] * it / a['iterations']:.1f} | {E._cell(x)} | {E._cell(y)} |")
    return ("# Pretrained start vs from scratch at equal minutes\n\n" + "\n".join(rows)
            + "\n\n## Validation Dice along the runs (mean over seeds)\n\n" + "\n".join(curves) + "\n")


def report(log=print) -> None:
    text = tables(C.Results(RESULTS).records(), C.Results(E.RESULTS).records())
    (C.RESULTS_DIR / "pretrained_start_tables.md").write_text(text)
    log(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trunk", action="store_true", help="train the source trunk and write its model file")
    p.add_argument("--source", default="la", choices=sorted(C.DATASETS))
    p.add_argument("--target", default="hippocampus", choices=sorted(C.DATASETS))
    p.add_argument("--iterations", type=int, default=1500, help="the trunk's iterations")
    p.add_argument("--recipes", nargs="+", choices=list(E.RECIPES), default=["supervised_small", "default_small"])
    p.add_argument("--labeled", type=int, nargs="+", default=[4])
    p.add_argument("--minutes", type=float, nargs="+", default=[5, 10])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report", action="store_true")
    args = p.parse_args(argv)
    if args.report:
        report()
        return 0
    if args.trunk:
        train_trunk(args.source, args.iterations, args.threads)
        return 0
    path = trunk_path(args.source, args.iterations)
    if not path.is_file():
        raise SystemExit(f"no trunk at {path}: run with --trunk --source {args.source} --iterations {args.iterations} first")
    torch.set_num_threads(args.threads)
    data = A.Data(C.data_dir(None, C.DATASETS[args.target]), dataset=C.DATASETS[args.target])
    todo = jobs(data, args.source, args.iterations, args.recipes, args.minutes, args.seeds, args.labeled)
    A.Trainer = with_start(path, data.class_names)
    orig = A.run_job

    def run_job(job, data_, device, log=print):
        rec = orig(job, data_, device, log)
        rec.update(minutes=job.extra["minutes"], start=job.extra["start"])
        return rec

    A.run_job = run_job
    A.run_jobs(todo, C.Results(RESULTS), data, torch.device("cpu"))
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
