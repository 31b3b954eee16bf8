"""Does the "label this next" uncertainty predict the real error? (BENCHMARKS.md, "Label this next")

On MSD hippocampus (``../shared/data/msd-hippocampus``), from ``splits.json``'s ``train`` pool only (``test`` is
never read): a seeded draw of ``--labeled`` labeled cases and ``--unlabeled`` unlabeled cases trains a CPCL model
through ``pipeline.train`` (the ``cpcl-segment train`` code path); ``--eval`` further ``train`` cases are held
back: their labels are hidden from training and used only to measure the model's real error on them,
``1 - mean Dice`` (anterior, posterior; on the original grid, segmentation exactly as ``cpcl-segment predict``).
For the same cases every score of ``CPCLSegmentLib.uncertainty`` is computed (one pass per case, as
``cpcl-segment rank`` does) and compared with the error by Spearman's rank correlation (``scipy.stats.spearmanr``).
A useful ranking has a clearly positive rho. Also reported: other per-case aggregations of the same voxel maps
(whole-volume mean, predicted-foreground-only region), and how much worse the top-ranked third of the cases
really is than the rest (what a clinician gains by labeling the top of the list).

    .venv/bin/python bench/uncertainty.py                  # full run (about 10-20 min per seed on 2 shared CPU cores)
    .venv/bin/python bench/uncertainty.py --seeds 0 1 2    # several independent draws + trainings
    .venv/bin/python bench/uncertainty.py --smoke          # 2 iterations, few cases (CI smoke test)

Results: ``bench/results/uncertainty.json`` (every number) and ``bench/results/uncertainty.md`` (the text for
BENCHMARKS.md). ``--smoke`` writes into a temporary folder unless ``--results`` is given.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "CPCLSegment"))
sys.path.insert(0, str(HERE))

from common import data_dir, machine, read_splits, versions  # noqa: E402

from CPCLSegmentLib import io as cio  # noqa: E402
from CPCLSegmentLib.labels import build_label_array  # noqa: E402
from CPCLSegmentLib import uncertainty as U  # noqa: E402
from CPCLSegmentLib.metrics import dice_per_class, nanmean  # noqa: E402
from CPCLSegmentLib.pipeline import train  # noqa: E402
from CPCLSegmentLib.prediction import back_to_image_grid  # noqa: E402
from CPCLSegmentLib.preparation import LabeledInput, TrainRequest  # noqa: E402
from CPCLSegmentLib.trainer import TrainConfig  # noqa: E402

AGGREGATIONS = ("region", "whole_volume", "predicted_foreground", "per_foreground_voxel", "dice")


def draw(train_pool: Sequence[str], n_labeled: int, n_unlabeled: int, n_eval: int, seed: int) -> Dict[str, List[str]]:
    """Disjoint labeled / unlabeled / held-back-evaluation subsets of the ``train`` pool (seeded)."""
    need = n_labeled + n_unlabeled + n_eval
    if need > len(train_pool):
        raise SystemExit(f"asked for {need} cases but the train pool has {len(train_pool)}")
    order = np.random.RandomState(seed).permutation(len(train_pool))
    names = [train_pool[i] for i in order]
    return {"labeled": names[:n_labeled], "unlabeled": names[n_labeled:n_labeled + n_unlabeled],
            "eval": names[n_labeled + n_unlabeled:need]}


def files(d: Path, name: str):
    return str(d / "imagesTr" / f"{name}.nii.gz"), str(d / "labelsTr" / f"{name}.nii.gz")


def spearman(x: Sequence[float], y: Sequence[float]) -> Dict[str, float]:
    from scipy.stats import spearmanr

    r = spearmanr(x, y)
    return {"rho": float(r.statistic if hasattr(r, "statistic") else r[0]), "p": float(r.pvalue if hasattr(r, "pvalue") else r[1])}


def top_third_gain(score: Sequence[float], error: Sequence[float]) -> Dict[str, float]:
    """Mean real error of the top third ranked by ``score`` vs the remaining cases."""
    order = np.argsort(-np.asarray(score), kind="stable")
    k = max(1, len(order) // 3)
    err = np.asarray(error)
    return {"top": float(err[order[:k]].mean()), "rest": float(err[order[k:]].mean()) if len(order) > k else float("nan"),
            "oracle_top": float(np.sort(err)[::-1][:k].mean()), "k": int(k)}


def settings(args, split) -> Dict[str, Any]:
    return {"split": split, "iterations": args.iterations, "width": args.width, "patch": list(args.patch), "device": args.device}


def trained_model(d: Path, args, seed: int, split: Dict[str, List[str]], work: Path, log) -> Tuple[Path, Dict[str, Any], float]:
    """Trains through ``pipeline.train`` (or reuses a model kept in ``--models`` with the same settings)."""
    model = (Path(args.models) if args.models else work) / f"uncertainty-seed{seed}.pt"
    record = model.with_suffix(".bench.json")
    if args.models and model.exists() and record.exists():
        with open(record, encoding="utf-8") as f:
            kept = json.load(f)
        if kept["settings"] == settings(args, split):
            log(f"seed {seed}: reusing {model}")
            return model, kept["summary"], kept["train_seconds"]
        raise SystemExit(f"{model} was trained with other settings: remove it or use another --models folder")
    cfg = TrainConfig(iterations=args.iterations, width=args.width, optimizer="adamw", lr=2e-3, seed=seed, device=args.device,
                      patch_size=tuple(args.patch), copy_paste=False)  # the recorded runs predate copy-paste
    request = TrainRequest(
        labeled=[LabeledInput(*files(d, n)) for n in split["labeled"]],
        unlabeled=[files(d, n)[0] for n in split["unlabeled"]],
        out=str(model), config=cfg,
    )

    def on_event(e: Dict[str, Any]) -> None:
        if e.get("event") == "warning":
            log(f"  warning: {e['message']}")
        elif e.get("event") == "progress" and (e["iteration"] % 50 == 0 or e["iteration"] == e["of"]):
            log(f"  seed {seed}: iteration {e['iteration']}/{e['of']}, loss {e['loss']['total']:.3f}")

    t0 = time.time()
    summary = train(request, on_event)
    train_s = time.time() - t0
    if args.models:
        with open(record, "w", encoding="utf-8") as f:
            json.dump({"settings": settings(args, split), "summary": summary, "train_seconds": train_s}, f)
    log(f"seed {seed}: trained {summary['iterations']} iterations in {train_s:.0f} s")
    return model, summary, train_s


def aggregations(res: "U.CaseUncertainty") -> Dict[str, Dict[str, float]]:
    """The same voxel maps summarised per case in several ways (the engine uses ``U.AGGREGATION``)."""
    predicted = res.teacher.argmax(0) > 0
    n_fg = max(1, int(predicted.sum()))
    return {
        "region": U.case_scores(res.maps, U.foreground_region(res.teacher, res.probs.get("student")))[0],
        "whole_volume": U.case_scores(res.maps, None)[0],
        "predicted_foreground": U.case_scores(res.maps, predicted)[0],
        "per_foreground_voxel": {k: float(m.double().sum()) / n_fg for k, m in res.maps.items()},
        "dice": dice_forms(res),
    }


def dice_forms(res: "U.CaseUncertainty") -> Dict[str, float]:
    """Each score in Dice form, against the teacher's segmentation y_t = argmax P_t (normalised by structure
    size the way the error is): entropy -> expected Dice error 1 - softDice(P_t, y_t); student_teacher ->
    1 - softDice(P_s, y_t); label_disagreement -> 1 - Dice(y_s, y_t); prototype -> 1 - softDice(P_l2u, y_t)."""
    pt = res.probs["teacher"]
    yt = pt.argmax(0)
    out = {"entropy": U.soft_dice_error(pt, yt)}
    ps = res.probs.get("student")
    if ps is not None:
        out["student_teacher"] = U.soft_dice_error(ps, yt)
        out["label_disagreement"] = U.soft_dice_error(torch.nn.functional.one_hot(ps.argmax(0), ps.shape[0]).movedim(-1, 0), yt)
    if res.probs.get("prototype") is not None:
        out["prototype"] = U.soft_dice_error(res.probs["prototype"], yt)
    return out


def run_seed(d: Path, args, seed: int, work: Path, log) -> Dict[str, Any]:
    pool = read_splits(d)["train"]
    split = draw(pool, args.labeled, args.unlabeled, args.eval, seed)
    model, summary, train_s = trained_model(d, args, seed, split, work, log)
    um = U.UncertaintyModel(str(model), args.device)
    names = [c["name"] for c in um.record["classes"][1:]]
    cases = []
    t1 = time.time()
    for n in split["eval"]:
        img_path, lab_path = files(d, n)
        image = cio.read_image(img_path)
        res = um.analyze(image)
        labels = back_to_image_grid(res.teacher, res.grid, image)
        truth, _ = build_label_array(cio.read_segmentation(lab_path), names, image, lab_path)
        dice = dice_per_class(labels, truth, len(names) + 1)
        cases.append({"case": n, "dice": dice, "error": 1.0 - nanmean(dice), "region_voxels": res.region_voxels,
                      "foreground_voxels": int((res.teacher.argmax(0) > 0).sum()), "scores": aggregations(res)})
        log(f"  {n}: error {cases[-1]['error']:.3f}  " + "  ".join(f"{k} {v:.4f}" for k, v in res.scores.items()))
    err = [c["error"] for c in cases]
    corr = {a: {s: spearman([c["scores"][a][s] for c in cases], err) for s in um.available} for a in AGGREGATIONS}
    gain = {s: top_third_gain([c["scores"][U.AGGREGATION][s] for c in cases], err) for s in um.available}
    return {"seed": seed, "split": split, "train_seconds": round(train_s, 1), "score_seconds": round(time.time() - t1, 1),
            "train_summary": {k: summary[k] for k in ("iterations", "status", "method")},
            "mean_dice": float(1 - np.mean(err)), "cases": cases, "spearman": corr, "top_third": gain,
            "scores": list(um.available)}


def best_score(runs: Sequence[Dict[str, Any]]) -> str:
    scores = runs[0]["scores"]
    return max(scores, key=lambda s: np.mean([r["spearman"][U.AGGREGATION][s]["rho"] for r in runs]))


def markdown(result: Dict[str, Any]) -> str:
    runs = result["runs"]
    a = result["args"]
    scores = runs[0]["scores"]
    seeds = [r["seed"] for r in runs]
    lines = [
        "## Label this next: does the uncertainty score predict the real error?",
        "",
        f"`cpcl-segment rank` orders images by a per-case uncertainty score (docs/uncertainty.md). On MSD hippocampus, "
        f"from `splits.json`'s `train` pool only, each seed draws {a['labeled']} labeled + {a['unlabeled']} unlabeled "
        f"training cases and {a['eval']} **held-back** labeled cases (labels hidden from training, used only to measure "
        f"the error); a CPCL model (width {a['width']}, patch {'×'.join(map(str, a['patch']))}, {a['iterations']} iterations, "
        f"AdamW lr 2e-3, 1 mm spacing, z-score) is "
        f"trained through `pipeline.train`. For each held-back case: every score (one `rank` pass) and the real error "
        f"1 − mean Dice (anterior, posterior) of the model's segmentation. Spearman's rank correlation rho between score and "
        f"error (scipy.stats.spearmanr, {a['eval']} cases per seed; with n = {a['eval']}, |rho| ≳ 0.36 is p < 0.05):",
        "",
        "| score (mean over the region) | " + " | ".join(f"rho, seed {s}" for s in seeds) + (" | mean rho |" if len(runs) > 1 else ""),
        "|---|" + "---|" * (len(runs) + (1 if len(runs) > 1 else 0)),
    ]
    for s in scores:
        vals = [r["spearman"]["region"][s] for r in runs]
        cells = [f"{v['rho']:+.2f} (p {v['p']:.3g})" for v in vals]
        mean = f" {np.mean([v['rho'] for v in vals]):+.2f} |" if len(runs) > 1 else ""
        lines.append(f"| `{s}` | " + " | ".join(cells) + " |" + mean)
    lines += [
        "",
        "Per-case aggregation of the same voxel maps (mean rho over seeds): the engine's region "
        f"(voxels with ≥ {U.REGION_THRESHOLD:.0%} foreground probability under teacher or student) vs the whole volume vs "
        "only the voxels the teacher labels foreground:",
        "",
        "| score | " + " | ".join(AGGREGATIONS) + " |",
        "|---|" + "---|" * len(AGGREGATIONS),
    ]
    for s in scores:
        lines.append(f"| `{s}` | " + " | ".join(f"{np.mean([r['spearman'][ag][s]['rho'] for r in runs]):+.2f}" for ag in AGGREGATIONS) + " |")
    k = runs[0]["top_third"][scores[0]]["k"]
    lines += [
        "",
        f"What labeling the top of the list buys: mean real error (1 − Dice) of the {k} top-ranked held-back cases vs "
        "the other cases, and of the truly worst k (an oracle), averaged over seeds:",
        "",
        "| score | top-ranked error | rest error | oracle top error |",
        "|---|---|---|---|",
    ]
    for s in scores:
        g = [r["top_third"][s] for r in runs]
        lines.append(f"| `{s}` | {np.mean([x['top'] for x in g]):.3f} | {np.mean([x['rest'] for x in g]):.3f} | "
                     f"{np.mean([x['oracle_top'] for x in g]):.3f} |")
    lines += [
        "",
        "Model quality on the held-back cases (mean Dice): " + ", ".join(f"seed {r['seed']}: {r['mean_dice']:.3f}" for r in runs)
        + "; training " + ", ".join(f"{r['train_seconds']:.0f} s" for r in runs) + f", scoring {a['eval']} cases "
        + ", ".join(f"{r['score_seconds']:.0f} s" for r in runs) + ".",
        "",
        f"**`--score auto` = `{result['best']}`**, the highest mean rho here (hard-coded as `uncertainty.AUTO_SCORE`).",
        "",
        f"Command: `{result['command']}`. Machine: {result['machine']}. Seeds {seeds} (split draw and training seed are "
        f"the same number). Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
        "",
        "What this can and cannot say: one anatomy, one modality, small crops, 30 cases per seed; a rho measured on "
        "30 cases has a wide confidence interval (about ±0.3), so only clear differences between scores mean anything.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="MSD hippocampus folder (default ../shared/data/msd-hippocampus or $CPCL_HIPPO_DIR)")
    p.add_argument("--labeled", type=int, default=6)
    p.add_argument("--unlabeled", type=int, default=40)
    p.add_argument("--eval", type=int, default=30, help="held-back labeled cases whose error is measured")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--patch", type=int, nargs=3, default=[32, 32, 32], metavar=("D", "H", "W"),
                   help="training / sliding-window patch (voxels; multiples of 16). 32^3 keeps a CPU run to minutes")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", help="keep the trained models in this folder and reuse them on the next run (same settings)")
    p.add_argument("--results", help="folder for uncertainty.json / uncertainty.md (default bench/results; --smoke: a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="2 iterations, 2 labeled + 2 unlabeled + 4 held-back cases")
    args = p.parse_args(argv)
    if args.smoke:
        args.labeled, args.unlabeled, args.eval, args.iterations = 2, 2, 4, 2
    d = data_dir(args.data)
    results = Path(args.results) if args.results else (Path(tempfile.mkdtemp(prefix="cpcl-unc-smoke-")) if args.smoke else ROOT / "bench" / "results")
    results.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    runs = []
    with tempfile.TemporaryDirectory(prefix="cpcl-unc-") as work:
        for seed in args.seeds:
            runs.append(run_seed(d, args, seed, Path(work), log))
    result = {
        "command": "python bench/uncertainty.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "machine": machine(), "platform": platform.platform(), "versions": versions(),
        "args": {k: getattr(args, k) for k in ("labeled", "unlabeled", "eval", "iterations", "width", "patch", "seeds", "device", "smoke")},
        "runs": runs, "best": best_score(runs),
    }
    with open(results / "uncertainty.json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    with open(results / "uncertainty.md", "w", encoding="utf-8") as f:
        f.write(md)
    print(md)
    log(f"wrote {results / 'uncertainty.json'} and {results / 'uncertainty.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
