"""Hippocampus accuracy benchmark: CPCL vs mean teacher vs supervised-only.

Data: MSD Task04 hippocampus (``../shared/data/msd-hippocampus``), its ``splits.json``. From ``train`` (150):
a fixed validation set of 10 subjects, then per seed a draw of N labeled subjects; every other ``train``
subject (plus the unlabeled ``imagesTs`` subject) is the unlabeled stream. ``test`` (50) is only used for
the final numbers: never for training, tuning (``--tune`` never touches it) or checkpoint choice.

Runs (each one ``trainer.Trainer`` on cases preprocessed as ``pipeline.train`` does; see ``common.py``):

    python bench/accuracy.py                  # default: 4 labeled x seeds 0,1,2 x {supervised, mean teacher, CPCL}
    python bench/accuracy.py --full           # + budgets 8, 15, all-labeled, ablations, MONAI UNet
    python bench/accuracy.py --full --shard 0/2   # half of the grid (run 1/2 elsewhere, same results file)
    python bench/accuracy.py --full --seeds 0 --budgets 15 8 all --variants supervised mean_teacher cpcl
    python bench/accuracy.py --tune           # the validation-only tuning probes (ablation table)
    python bench/accuracy.py --report         # only rebuild the tables and the plot from the results file
    python bench/accuracy.py --smoke          # CI: 2 iterations, 2 subjects, own results file

Every finished run is one JSON line in the results file (``bench/results/accuracy.jsonl``); runs already
there are skipped, so an interrupted run resumes where it stopped. ``--shard i/n`` runs jobs i, i+n, ...
Tables (``accuracy_tables.md``) and the plot (``accuracy_dice_vs_labeled.png``) are rebuilt at the end.
Numbers are the teacher's (the weights a user gets from ``cpcl-segment train``), scored on the original
test images by the same path as ``Predictor.segment``: the LAST weights, and separately the weights the
validation set picked (``best``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common as C  # noqa: E402
from CPCLSegmentLib.trainer import TrainConfig, Trainer  # noqa: E402

# -------------------------------------------------------------------------------------- the recipe

# Shared by every method (network, patch, budget, batches, optimiser, augmentation): the benchmark's
# setting, chosen on the validation set by ``--tune`` (BENCHMARKS.md, tuning table). Width 8 and a 32x48x32 patch keep
# a run within minutes on two CPU cores; the hippocampus crops are about 36x50x35 voxels at 1 mm.
BASE: Dict[str, Any] = dict(
    iterations=600,
    patch_size=(32, 48, 32),
    labeled_batch=2,
    unlabeled_batch=2,
    width=8,
    depth=4,
    norm="instance",
    optimizer="adamw",
    lr=3e-3,
    weight_decay=1e-4,
    intensity_prob=0.5,  # tuning round 1: +2.2 val Dice points for supervised-only, also given to every method
    flip=False,
    rot90=False,
    device="cpu",
)
# Semi-supervised settings (CPCL and mean teacher), also validated by ``--tune``: the student sees an
# intensity-augmented view of the unlabeled patch, the teacher the clean one (round 1).
SEMI: Dict[str, Any] = dict(strong_unlabeled=True, teacher_noise=0.0, rampup=0.4, ema_decay=0.99)
# CPCL-only settings. consistency_weight 1.0: CPCL's prototype terms plus the mean-teacher MSE term that the
# reference code also carries (at 0.1); round 2's winner on validation (cpcl_r2_plus_mt1).
CPCL: Dict[str, Any] = dict(lambda_max=0.1, beta=10.0, per_sample_prototypes=False, confidence_weighting=True,
                            feature_level=1, forward_prediction="student", consistency_weight=1.0)
# Mean teacher: the SSL4MIS / UA-MT consistency weight 0.1 (with the same ramp-up).
MT: Dict[str, Any] = dict(consistency_weight=0.1)
# CPCL as the method claims it: the teacher's P_u in the forward loss, per-sample prototypes (labeled
# sample i with unlabeled sample i, as the reference pairs them), no mean-teacher term.
CPCL_CLAIMED: Dict[str, Any] = dict(lambda_max=0.1, beta=10.0, per_sample_prototypes=True, confidence_weighting=True,
                                    feature_level=1, forward_prediction="teacher", consistency_weight=0.0)
# What differs from BASE per data set. Left atrium: volumes are about 44 x 71 x 95 voxels (D, H, W) at 1.25 mm;
# the literature's 112 x 112 x 80 patch at full resolution is 40 x 56 x 56 here, rounded down to multiples of 16.
DATASET_BASE: Dict[str, Dict[str, Any]] = {"hippocampus": {}, "la": dict(patch_size=(32, 48, 48))}
# Labeled budgets of the default grid per data set (``--budgets`` picks others).
DEFAULT_BUDGETS: Dict[str, List[str]] = {"hippocampus": ["4"], "la": ["8"]}

VARIANTS: Dict[str, Dict[str, Any]] = {
    "supervised": dict(method="supervised"),
    "mean_teacher": dict(method="mean_teacher", **MT),
    "cpcl": dict(method="cpcl", **CPCL),
    "cpcl_claimed": dict(method="cpcl", **CPCL_CLAIMED),
    "cpcl_cp": dict(method="cpcl", **CPCL, copy_paste=True),
    "bcp": dict(method="mean_teacher", consistency_weight=0.0, copy_paste=True),
    "cpcl_no_backward": dict(method="cpcl", **{**CPCL, "use_backward": False}),
    "cpcl_no_forward": dict(method="cpcl", **{**CPCL, "use_forward": False}),
    "cpcl_detached": dict(method="cpcl", **{**CPCL, "detach_features": True}),
    "monai_unet": dict(method="monai_unet"),
}
LABELS = {
    "supervised": "supervised-only",
    "mean_teacher": "mean teacher",
    "cpcl": "CPCL without copy-paste (the earlier default)",
    "cpcl_claimed": "CPCL as claimed (teacher P_u, per-sample prototypes, no MT term)",
    "cpcl_cp": "CPCL + cross-image copy-paste (the default recipe)",
    "bcp": "bidirectional copy-paste only (BCP-style: EMA teacher pseudo-labels, no MSE term)",
    "cpcl_no_backward": "CPCL w/o backward (U2L)",
    "cpcl_no_forward": "CPCL w/o forward (L2U)",
    "cpcl_detached": "CPCL, detached features (reference code)",
    "monai_unet": "MONAI UNet 16-128, supervised, Adam 1e-3",
}
MAIN = ["supervised", "mean_teacher", "cpcl"]
ORDER = ["supervised", "mean_teacher", "cpcl_claimed", "cpcl", "bcp", "cpcl_cp"]  # table / plot order of the main methods
ABLATIONS = ["cpcl_no_backward", "cpcl_no_forward", "cpcl_detached"]
SEEDS = [0, 1, 2]


def config_for(variant: str, seed: int, overrides: Optional[Dict[str, Any]] = None, dataset: str = "hippocampus") -> Dict[str, Any]:
    v = VARIANTS[variant]
    cfg = dict(BASE)
    cfg.update(DATASET_BASE[dataset])
    if v["method"] in ("cpcl", "mean_teacher"):
        cfg.update(SEMI)
    cfg.update(v)
    cfg.update(overrides or {})
    cfg["seed"] = seed
    return cfg


# ---------------------------------------------------------------------------------------- the grid


@dataclass
class Job:
    experiment: str  # main | tune
    variant: str
    budget: Optional[int]  # labeled subjects; None = all of train minus validation
    seed: int
    config: Dict[str, Any]
    name: str = ""  # tuning probe name
    test: bool = True  # evaluate on test (never for tuning)
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        h = hashlib.sha1(json.dumps(self.config, sort_keys=True, default=str).encode()).hexdigest()[:10]
        b = "all" if self.budget is None else str(self.budget)
        return f"{self.experiment}|{self.name or self.variant}|L{b}|s{self.seed}|{h}"


def main_jobs(full: bool, seeds: Sequence[int], overrides: Optional[Dict[str, Any]] = None, dataset: str = "hippocampus",
              budgets: Optional[Sequence[str]] = None, variants: Optional[Sequence[str]] = None) -> List[Job]:
    """The grid: ``budgets`` (labeled subjects, or "all") x ``variants`` x ``seeds``. Without ``budgets`` /
    ``variants``: the data set's default budgets x the main methods (``--full``, hippocampus: also budgets 15,
    8 and all-labeled, the ablations and the MONAI UNet context row)."""
    jobs: List[Job] = []

    def add(variant, budget):
        for s in seeds:
            cfg = config_for(variant, s, overrides, dataset)
            if budget is None and cfg["method"] != "monai_unet":
                cfg["method"] = "supervised"  # no unlabeled cases left: the upper bound is supervised
            jobs.append(Job("main", variant, budget, s, cfg))

    if budgets or variants:
        for b in budgets or DEFAULT_BUDGETS[dataset]:
            for v in variants or MAIN:
                add(v, None if b == "all" else int(b))
        return jobs
    for v in MAIN:
        add(v, int(DEFAULT_BUDGETS[dataset][0]))
    if not full:
        return jobs
    for v in ABLATIONS:
        add(v, 4)
    add("monai_unet", 4)
    for b in (15, 8):
        for v in MAIN:
            add(v, b)
    add("supervised", None)
    for b in (15, 8):
        for v in ABLATIONS:
            add(v, b)
    for b in (15, 8, None):
        add("monai_unet", b)
    return jobs


# Validation-only tuning (``--tune``). Probes start from the frozen settings below (the state before tuning:
# engine defaults for the method weights, AdamW 3e-3 / 600 iterations picked by a first supervised probe), so a
# rerun reproduces the same configurations whatever BASE becomes. Each round's winners (by the validation
# set's last-checkpoint mean Dice, never test) are written explicitly into the next round's probes.
TUNE_BASE: Dict[str, Any] = dict(
    iterations=600, patch_size=(32, 48, 32), labeled_batch=2, unlabeled_batch=2, width=8, depth=4, norm="instance",
    optimizer="adamw", lr=3e-3, weight_decay=1e-4, intensity_prob=0.0, flip=False, rot90=False, device="cpu",
)
TUNE_SEMI: Dict[str, Any] = dict(strong_unlabeled=False, teacher_noise=0.0, rampup=0.4, ema_decay=0.99)
TUNE_CPCL: Dict[str, Any] = dict(lambda_max=0.1, beta=10.0, per_sample_prototypes=False, confidence_weighting=True,
                                 feature_level=1, forward_prediction="student", consistency_weight=0.0)
TUNE_MT: Dict[str, Any] = dict(consistency_weight=0.1)

R1: Dict[str, Any] = {"intensity_prob": 0.5, "strong_unlabeled": True}  # round 1's winner
TUNE: List[tuple] = [
    # round 1: the three methods at the starting point, then augmentation / perturbation and weights
    ("sup_base", "supervised", {}),
    ("mt_base", "mean_teacher", {}),
    ("cpcl_base", "cpcl", {}),
    ("sup_intensity0.5", "supervised", {"intensity_prob": 0.5}),
    ("cpcl_strong_u", "cpcl", {"intensity_prob": 0.5, "strong_unlabeled": True}),
    ("mt_strong_u", "mean_teacher", {"intensity_prob": 0.5, "strong_unlabeled": True}),
    ("cpcl_teacher_noise", "cpcl", {"teacher_noise": 0.1}),
    ("mt_teacher_noise", "mean_teacher", {"teacher_noise": 0.1}),
    ("sup_flip", "supervised", {"flip": True}),
    # round 2: on top of round 1's winner, intensity augmentation with a strong student view of the
    # unlabeled patch (teacher noise lost on validation for both CPCL and mean teacher)
    ("cpcl_r2_lambda1", "cpcl", {**R1, "lambda_max": 1.0}),
    ("mt_r2_w1", "mean_teacher", {**R1, "consistency_weight": 1.0}),
    ("cpcl_r2_plus_mt1", "cpcl", {**R1, "consistency_weight": 1.0}),
    ("cpcl_r2_per_sample", "cpcl", {**R1, "per_sample_prototypes": True}),
    ("cpcl_r2_feat0", "cpcl", {**R1, "feature_level": 0}),
    ("cpcl_r2_no_conf", "cpcl", {**R1, "confidence_weighting": False}),
    ("sup_r2_iter1200", "supervised", {**R1, "iterations": 1200}),
    ("cpcl_r2_iter1200", "cpcl", {**R1, "iterations": 1200}),
    ("cpcl_r2_beta1", "cpcl", {**R1, "beta": 1.0}),
    # stronger perturbation: every intensity transform on every student view (consistency MSE stayed ~1e-4)
    ("sup_r2_int1.0", "supervised", {**R1, "intensity_prob": 1.0}),
    ("cpcl_r2_int1.0", "cpcl", {**R1, "intensity_prob": 1.0}),
    ("mt_r2_int1.0", "mean_teacher", {**R1, "intensity_prob": 1.0}),
]
TUNE_SEEDS = [0]
TUNE_BUDGET = 4


def tune_config(variant: str, seed: int, overrides: Dict[str, Any]) -> Dict[str, Any]:
    cfg = dict(TUNE_BASE)
    method = VARIANTS[variant]["method"]
    if method in ("cpcl", "mean_teacher"):
        cfg.update(TUNE_SEMI)
    cfg["method"] = method
    cfg.update(TUNE_CPCL if method == "cpcl" else TUNE_MT if method == "mean_teacher" else {})
    cfg.update(overrides)
    cfg["seed"] = seed
    return cfg


def tune_jobs(names: Optional[Sequence[str]], seeds: Sequence[int], extra: Dict[str, Any]) -> List[Job]:
    jobs = []
    for name, variant, over in TUNE:
        if names and name not in names:
            continue
        for s in seeds:
            jobs.append(Job("tune", variant, TUNE_BUDGET, s, tune_config(variant, s, {**over, **extra}), name=name, test=False))
    return jobs


# ----------------------------------------------------------------------------------------- running


class Data:
    """Subjects of one benchmark data set, loaded once per process (preprocessed as the pipeline does)."""

    def __init__(self, d: Path, smoke: bool = False, dataset: C.Dataset = C.HIPPOCAMPUS) -> None:
        self.dir = d
        self.dataset = dataset
        self.splits = C.read_splits(d)
        if smoke:
            self.splits = {"train": self.splits["train"][:14], "test": self.splits["test"][:2]}
        self.plan = C.plan_for(d, self.splits["train"], dataset)
        self.subjects: Dict[str, C.Subject] = {}
        self.validation_size = 2 if smoke else C.VALIDATION_SIZE
        self.extra = [] if smoke else C.load_unlabeled_extra(d, self.plan, dataset)

    @property
    def class_names(self) -> List[str]:
        return list(self.dataset.class_names)

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def get(self, names: Sequence[str]) -> List[C.Subject]:
        missing = [n for n in names if n not in self.subjects]
        self.subjects.update(C.load_subjects(self.dir, missing, self.plan, self.dataset))
        return [self.subjects[n] for n in names]


class TupleOut(torch.nn.Module):
    """Wraps a plain MONAI network so it returns ``(logits, None)`` like the engine's VNet."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x), None


def train_monai_unet(cfg: Dict[str, Any], labeled, validation, device, num_classes: int = C.NUM_CLASSES) -> Dict[str, Any]:
    """The figure a user gets from a plain supervised MONAI ``UNet`` (16-32-64-128, 2 residual units, Adam 1e-3,
    DiceCE loss), on the same labeled patches (the engine's sampler, no intensity augmentation) and budget."""
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    from CPCLSegmentLib.data import Augmenter, PatchSampler

    torch.manual_seed(cfg["seed"])
    net = TupleOut(UNet(3, 1, num_classes, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    patch = cfg["patch_size"]
    sampler = PatchSampler(labeled, patch, num_classes, Augmenter(patch, False, False, 0.0), cfg["seed"], 1)
    its = cfg["iterations"]
    every = max(1, its // 10)
    best, best_state, curve = None, None, []
    for it in range(its):
        b = sampler.sample(it, list(range(cfg["labeled_batch"])))
        x = torch.from_numpy(b.images).to(device)
        y = torch.from_numpy(b.labels).to(device)[:, None]
        net.train()
        loss = loss_fn(net(x)[0], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if validation and ((it + 1) % every == 0 or it + 1 == its):
            m = C.evaluate(net, validation, patch, device, hd95=False, class_names=[f"c{i}" for i in range(1, num_classes)])["mean_dice"]
            curve.append((it + 1, round(m, 4)))
            if best is None or m > best["mean_dice"]:
                best = {"iteration": it + 1, "mean_dice": m}
                best_state = copy.deepcopy(net.state_dict())
    best_net = None
    if best_state is not None:
        best_net = TupleOut(UNet(3, 1, num_classes, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)).to(device)
        best_net.load_state_dict(best_state)
    return {"last": net, "best_net": best_net, "best": best, "curve": curve}


def run_job(job: Job, data: Data, device: torch.device, log=lambda m: print(m, flush=True)) -> Dict[str, Any]:
    split = C.split_train(data.splits["train"], job.budget, job.seed, data.validation_size)
    t0 = time.perf_counter()
    lab_subjects = data.get(split["labeled"])
    labeled = [s.case(label=job.extra.get("labels", {}).get(s.name), seed=i) for i, s in enumerate(lab_subjects)]
    val_subjects = data.get(split["validation"])
    validation = [s.case() for s in val_subjects]
    cfg = dict(job.config)
    record: Dict[str, Any] = {
        "key": job.key, "experiment": job.experiment, "variant": job.variant, "probe": job.name,
        "budget": job.budget if job.budget is not None else len(split["labeled"]), "all_labeled": job.budget is None,
        "seed": job.seed, "config": cfg, "labeled": split["labeled"], "machine": C.machine(), "versions": C.versions(),
    }
    if cfg["method"] == "monai_unet":
        out = train_monai_unet(cfg, labeled, val_subjects, device, data.num_classes)
        last, best_net, best, curve = out["last"], out["best_net"], out["best"], out["curve"]
        n_unl = 0
        spi = None
    else:
        unlabeled = []
        if cfg["method"] != "supervised":
            unlabeled = [s.case(labeled=False) for s in data.get(split["unlabeled"])] + list(data.extra)
            unlabeled += [s.case(labeled=False) for s in lab_subjects if s.name in job.extra.get("labels", {})]
        n_unl = len(unlabeled)
        # copy_paste pinned off unless the variant turns it on: the recorded configurations (and their keys) date
        # from before it became cpcl's default, and "cpcl" here is CPCL without it
        tcfg = TrainConfig.from_dict({"copy_paste": False, **cfg})
        events: List[Dict[str, Any]] = []
        def on_progress(e: Dict[str, Any]) -> None:
            if e.get("event") in ("validation", "warning"):
                events.append(e)
            if e.get("event") == "validation":
                log(f"  {job.key}: iteration {e['iteration']}, validation mean Dice {e['mean_dice']}")

        trainer = Trainer(tcfg, labeled, unlabeled, data.num_classes, class_names=data.class_names, validation=validation,
                          on_progress=on_progress)
        result = trainer.run()
        last = result.teacher
        best, curve = result.best, [(v["iteration"], v["mean_dice"]) for v in result.validation]
        best_net = None
        if result.best_state is not None:
            best_net = copy.deepcopy(result.teacher)
            best_net.load_state_dict(result.best_state)
        spi = trainer._time_per_it
        record["warnings"] = [e["message"] for e in events if e.get("event") == "warning"]
        record["final_loss"] = result.history[-1] if result.history else None
    train_s = time.perf_counter() - t0
    record.update(unlabeled=n_unl, validation_curve=curve, best=C.plain(best, nan_as_none=True), train_seconds=round(train_s, 1),
                  seconds_per_iteration=None if spi is None else round(spi, 4))
    names = data.class_names
    record["dataset"] = data.dataset.key
    record["validation_last"] = C.evaluate(last, val_subjects, cfg["patch_size"], device, hd95=False, class_names=names)
    if job.test:
        test_subjects = data.get(data.splits["test"])
        record["test_last"] = C.evaluate(last, test_subjects, cfg["patch_size"], device, class_names=names)
        if best_net is not None:
            record["test_best"] = C.evaluate(best_net, test_subjects, cfg["patch_size"], device, class_names=names)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return record


def _claim(results_path: Path, key: str) -> bool:
    """Claims a job for this process, so processes sharing a results file (shards, extra runs) never run the
    same job at once. A claim whose process has died is taken over (an interrupted run resumes)."""
    d = results_path.parent / "logs" / "claims"
    d.mkdir(parents=True, exist_ok=True)
    f = d / hashlib.sha1(f"{results_path.name}|{key}".encode()).hexdigest()
    for _ in range(2):
        try:
            fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(f.read_text() or 0)
                os.kill(pid, 0)
                return pid == os.getpid()
            except (ValueError, ProcessLookupError, FileNotFoundError):
                f.unlink(missing_ok=True)  # the claiming process is gone
                continue
            except PermissionError:
                return False
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return True
    return False


def run_jobs(jobs: Sequence[Job], results: C.Results, data: Data, device: torch.device, shard=(0, 1),
             log=lambda m: print(m, flush=True)) -> None:
    done = results.done()
    mine = [j for i, j in enumerate(jobs) if i % shard[1] == shard[0]]
    todo = [j for j in mine if j.key not in done]
    log(f"{len(jobs)} jobs in the grid, {len(mine)} in this shard, {len(mine) - len(todo)} already done, {len(todo)} to run")
    for n, job in enumerate(todo, 1):
        if job.key in results.done() or not _claim(results.path, job.key):
            log(f"[{n}/{len(todo)}] {job.key}: done or running in another process, skipped")
            continue
        t = time.perf_counter()
        rec = run_job(job, data, device, log)
        results.append(rec)
        tl = rec.get("test_last", {}).get("mean_dice")
        log(f"[{n}/{len(todo)}] {job.key}: val(last) {rec['validation_last']['mean_dice']:.4f}"
            + (f", test(last) {tl:.4f}" if tl is not None else "") + f"  ({time.perf_counter() - t:.0f} s)")


# ------------------------------------------------------------------------------------------ report


def _fmt(m: float, s: float, scale: float = 1.0, digits: int = 1) -> str:
    if m != m:
        return "–"
    if s != s:  # one seed (C.mean_std): no spread to report
        return f"{m * scale:.{digits}f}"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def summarize(records: Sequence[Dict[str, Any]]) -> Dict[tuple, Dict[str, Any]]:
    """(variant, budget label) -> aggregated metrics over seeds (latest record per key)."""
    latest: Dict[str, Dict[str, Any]] = {}
    for r in records:
        latest[r["key"]] = r
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in latest.values():
        if r["experiment"] != "main" or "test_last" not in r:
            continue
        b = "all" if r.get("all_labeled") else r["budget"]
        groups.setdefault((r["variant"], b, r["config"]["iterations"], _overrides(r)), []).append(r)
    out = {}
    for k, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        agg: Dict[str, Any] = {"n": len(rs), "seeds": [r["seed"] for r in rs], "machines": sorted({r["machine"] for r in rs}),
                               "budget_n": rs[0]["budget"]}
        for which in ("test_last", "test_best"):
            have = [r for r in rs if which in r]
            if not have:
                continue
            agg[which] = {
                "mean_dice": C.mean_std([r[which]["mean_dice"] for r in have]),
                "dice": {c: C.mean_std([r[which]["dice"][c] for r in have]) for c in have[0][which]["dice"]},
                "hd95": {c: C.mean_std([r[which]["hd95"][c] for r in have]) for c in have[0][which]["hd95"]},
                "mean_hd95": C.mean_std([r[which]["mean_hd95"] for r in have]),
                "per_seed": [r[which]["mean_dice"] for r in have],
            }
        agg["val_last"] = C.mean_std([r["validation_last"]["mean_dice"] for r in rs])
        agg["val_per_seed"] = [r["validation_last"]["mean_dice"] for r in rs]
        agg["minutes"] = float(np.mean([r["seconds"] for r in rs])) / 60
        out[k] = agg
    return out


def _overrides(r: Dict[str, Any]) -> Tuple[Tuple[str, str], ...]:
    """What a record's configuration sets beyond its variant's (``--set``), as sorted (key, JSON) pairs; the
    iteration count and validation frequency are not counted (the tables show the first, the second only
    draws the learning curve)."""
    try:
        base = json.loads(json.dumps(config_for(r["variant"], r["seed"], dataset=r.get("dataset") or "hippocampus"), default=str))
    except KeyError:
        return ()
    skip = {"iterations", "validation_every", "seed"}
    return tuple(sorted((k, json.dumps(v)) for k, v in r["config"].items() if k not in skip and k in base and base[k] != v
                        or k not in skip and k not in base))


def _label(v: str, extra: Tuple[Tuple[str, str], ...]) -> str:
    return LABELS[v] + (" [" + ", ".join(f"{k}={json.loads(x)}" for k, x in extra) + "]" if extra else "")


def tables(records: Sequence[Dict[str, Any]], source: str = "accuracy.jsonl") -> str:
    summ = summarize(records)
    lines = [f"<!-- generated by bench/accuracy.py from {source}; do not edit by hand -->", ""]
    budgets = sorted({k[1] for k in summ}, key=lambda b: 10**6 if b == "all" else b)
    order = ORDER + [v for v in VARIANTS if v not in ORDER]
    n_test = max((len(r.get("test_last", {}).get("per_case_dice", [])) for r in records), default=0)
    classes = next((list(r["test_last"]["dice"]) for r in records if "test_last" in r), [])
    for which, title in (("test_last", "LAST checkpoint"), ("test_best", "validation-selected checkpoint (separately marked)")):
        lines += [f"### Test set ({n_test} subjects), {title}: Dice (%) and HD95 (mm), mean ± std over seeds", "",
                  "| labeled | method | iterations | seeds | " + " | ".join(f"Dice {c}" for c in classes) + " | mean Dice | "
                  + " | ".join(f"HD95 {c}" for c in classes) + " | per-seed mean Dice | Δ vs supervised, per seed | min / run | machine |",
                  "|" + "---|" * (9 + 2 * len(classes))]
        for b in budgets:
            for v in order:
                for (vv, bb, its, extra), agg in sorted(summ.items(), key=lambda kv: (kv[0][2], kv[0][3])):
                    if vv != v or bb != b or which not in agg:
                        continue
                    a = agg[which]
                    lab = f"all ({agg['budget_n']})" if b == "all" else str(b)
                    sup = summ.get(("supervised", b, its, ()), {}).get(which)
                    delta = "–"
                    if sup is not None and (v != "supervised" or extra):
                        ref = dict(zip(summ[("supervised", b, its, ())]["seeds"], sup["per_seed"]))
                        pairs = [(s_, x) for s_, x in zip(agg["seeds"], a["per_seed"]) if s_ in ref]
                        if pairs:
                            delta = ", ".join(f"{(x - ref[s_]) * 100:+.1f}" for s_, x in pairs)
                    lines.append(
                        f"| {lab} | {_label(v, extra)} | {its} | {','.join(map(str, agg['seeds']))} | "
                        + " | ".join(_fmt(*a["dice"][c], 100) for c in classes) + f" | **{_fmt(*a['mean_dice'], 100)}** | "
                        + " | ".join(_fmt(*a["hd95"][c], digits=2) for c in classes)
                        + f" | {', '.join(f'{x * 100:.1f}' for x in a['per_seed'])} | {delta} | {agg['minutes']:.0f} | "
                        f"{'; '.join(agg['machines'])} |")
        lines.append("")
    lines += validation_table(summ, budgets, order)
    lines += tune_table(records)
    return "\n".join(lines) + "\n"


def validation_table(summ: Dict[tuple, Dict[str, Any]], budgets: Sequence[Any], order: Sequence[str]) -> List[str]:
    """The numbers that choose: validation mean Dice (last checkpoint) per seed and its difference to
    supervised-only on the same seed (the test set never chooses anything)."""
    lines = ["### VALIDATION set, LAST checkpoint: mean Dice (%) per seed, and Δ vs supervised-only on the same seed", "",
             "| labeled | method | iterations | seeds | mean | per seed | Δ vs supervised, per seed | mean Δ |", "|---|---|---|---|---|---|---|---|"]
    for b in budgets:
        for v in order:
            for (vv, bb, its, extra), agg in sorted(summ.items(), key=lambda kv: (kv[0][2], kv[0][3])):
                if vv != v or bb != b:
                    continue
                per = agg["val_per_seed"]
                sup = summ.get(("supervised", b, its, ()))
                delta, mean_delta = "–", "–"
                if sup is not None and (v != "supervised" or extra):
                    ref = dict(zip(sup["seeds"], sup["val_per_seed"]))
                    ds = [(x - ref[s_]) * 100 for s_, x in zip(agg["seeds"], per) if s_ in ref]
                    if ds:
                        delta, mean_delta = ", ".join(f"{d:+.1f}" for d in ds), f"{np.mean(ds):+.1f}"
                lab = f"all ({agg['budget_n']})" if b == "all" else str(b)
                lines.append(f"| {lab} | {_label(v, extra)} | {its} | {','.join(map(str, agg['seeds']))} | "
                             f"{_fmt(*agg['val_last'], 100)} | {', '.join(f'{x * 100:.1f}' for x in per)} | {delta} | {mean_delta} |")
    return lines + [""]


def tune_table(records: Sequence[Dict[str, Any]]) -> List[str]:
    latest: Dict[str, Dict[str, Any]] = {}
    for r in records:
        if r["experiment"] == "tune":
            latest[r["key"]] = r
    if not latest:
        return []
    by: Dict[str, List[Dict[str, Any]]] = {}
    for r in latest.values():
        by.setdefault(r["probe"], []).append(r)
    lines = ["### Tuning probes (VALIDATION set only, 10 subjects; 4 labeled; test never evaluated)", "",
             "| probe | method | change vs. benchmark base | seeds | val Dice, last (%) | val Dice, best during run (%) | s/iteration |",
             "|---|---|---|---|---|---|---|"]
    order = [t[0] for t in TUNE]
    for probe in sorted(by, key=lambda p: order.index(p) if p in order else 999):
        rs = by[probe]
        change = next((json.dumps(t[2]) for t in TUNE if t[0] == probe), "")
        last = C.mean_std([r["validation_last"]["mean_dice"] for r in rs])
        best = C.mean_std([(r["best"] or {}).get("mean_dice", float("nan")) for r in rs])
        spi = np.mean([r["seconds_per_iteration"] or 0 for r in rs])
        lines.append(f"| {probe} | {rs[0]['config']['method']} | `{change}` | {','.join(str(r['seed']) for r in sorted(rs, key=lambda r: r['seed']))} | "
                     f"{_fmt(*last, 100)} | {_fmt(*best, 100)} | {spi:.2f} |")
    lines.append("")
    return lines


def plot(records: Sequence[Dict[str, Any]], path: Path, title: str = "MSD hippocampus, 50 test subjects") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = summarize(records)
    if not summ:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    upper = [(agg, b) for (v, b, _, ex), agg in summ.items() if b == "all" and v == "supervised" and not ex and "test_last" in agg]
    ticks = set()
    for v, marker in (("supervised", "o"), ("mean_teacher", "s"), ("cpcl_claimed", "v"), ("cpcl", "^"), ("cpcl_cp", "D"),
                      ("monai_unet", "x")):
        its_seen = sorted({its for (vv, b, its, ex) in summ if vv == v and b != "all" and not ex})
        for its in its_seen:
            pts = sorted((b, agg["test_last"]["mean_dice"]) for (vv, b, ii, ex), agg in summ.items()
                         if vv == v and ii == its and b != "all" and not ex and "test_last" in agg)
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ticks.update(xs)
            ax.errorbar(xs, [p[1][0] * 100 for p in pts], yerr=[0 if p[1][1] != p[1][1] else p[1][1] * 100 for p in pts],
                        marker=marker, capsize=3, label=LABELS[v] + (f", {its} it." if len(its_seen) > 1 else ""))
    if upper:
        m = upper[0][0]["test_last"]["mean_dice"][0] * 100
        ax.axhline(m, color="gray", ls="--", label=f"all {upper[0][0]['budget_n']} labeled (supervised)")
    ax.set_xscale("log")
    ax.set_xticks(sorted(ticks))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("labeled training subjects")
    ax.set_ylabel("test mean Dice (%), last checkpoint")
    ax.set_title(f"{title}\n(mean ± std over seeds; seeds per point: see the table)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curve_runs(records: Sequence[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], Dict[Any, int]]:
    """The runs the learning-curve plot draws and each budget's run length: grid runs (no ``--set`` overrides)
    that validated at least 5 times, of their budget's most common length only (curves of other lengths or
    settings would share a colour and mislead; the tables keep them apart)."""
    runs = [r for r in records if r.get("experiment") == "main" and len(r.get("validation_curve") or []) >= 5
            and not _overrides(r)]
    lengths = {b: Counter(r["config"]["iterations"] for r in runs if r["budget"] == b).most_common(1)[0][0]
               for b in {r["budget"] for r in runs}}
    return [r for r in runs if r["config"]["iterations"] == lengths[r["budget"]]], lengths


def plot_curves(records: Sequence[Dict[str, Any]], path: Path, title: str) -> bool:
    """Validation mean Dice against iteration (the trainer's own validation events, model grid), one panel per
    budget (``curve_runs``), one line per run; colour = method, line style = seed. Returns whether it drew."""
    runs, lengths = curve_runs(records)
    if not runs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(lengths)  # the budgets curve_runs kept
    fig, axes = plt.subplots(1, len(budgets), figsize=(6.4 * len(budgets), 4.2), squeeze=False)
    colours = {v: f"C{i}" for i, v in enumerate(ORDER + [v for v in VARIANTS if v not in ORDER])}
    styles = ["-", "--", ":", "-."]
    for ax, b in zip(axes[0], budgets):
        seen = set()
        for r in sorted(runs, key=lambda r: (r["variant"], r["seed"])):
            if r["budget"] != b:
                continue
            xs, ys = zip(*r["validation_curve"])
            label = LABELS[r["variant"]] if r["variant"] not in seen else None
            seen.add(r["variant"])
            ax.plot(xs, [y * 100 for y in ys], color=colours[r["variant"]], ls=styles[r["seed"] % 4], label=label)
        ax.set_xlabel("iteration")
        ax.set_ylabel("validation mean Dice (%)")
        ax.set_title(f"{title}:\n{b} labeled, {lengths[b]} iterations (line style = seed)", fontsize=10)
    C.finish_figure(fig, axes[0], path)
    return True


def write_report(results: C.Results, out_dir: Path, prefix: str = "accuracy", title: str = "MSD hippocampus, 50 test subjects") -> None:
    recs = results.records()
    (out_dir / f"{prefix}_tables.md").write_text(tables(recs, results.path.name), encoding="utf-8")
    plot(recs, out_dir / f"{prefix}_dice_vs_labeled.png", title)
    plot_curves(recs, out_dir / f"{prefix}_validation_curves.png", title.replace(", test set", "") + ", validation set")


# --------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="hippocampus", choices=sorted(C.DATASETS), help="benchmark data set (default hippocampus)")
    p.add_argument("--data", help="data folder (default ../shared/data/<the data set's folder>)")
    p.add_argument("--results", help="results JSON-lines file (default bench/results/accuracy.jsonl; accuracy_la.jsonl for la)")
    p.add_argument("--full", action="store_true", help="all budgets, ablations, all-labeled bound, MONAI UNet")
    p.add_argument("--tune", nargs="*", metavar="PROBE", help="run the validation-only tuning probes (all, or those named)")
    p.add_argument("--tune-seeds", type=int, nargs="+", default=TUNE_SEEDS)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="config overrides for every job (grid or --tune)")
    p.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    p.add_argument("--iterations", type=int, help=f"override the iteration budget (default {BASE['iterations']})")
    p.add_argument("--validation-every", type=int, help="validate every N iterations (learning curves; default about 10 times per run)")
    p.add_argument("--shard", help="i/n: run every n-th job starting at i")
    p.add_argument("--budgets", nargs="+", metavar="N|all", help="labeled budgets of the grid (e.g. 1 2 4 8 all)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="methods / ablations of the grid")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--report", action="store_true", help="only rebuild tables and plot")
    p.add_argument("--smoke", action="store_true", help="CI smoke run: 2 iterations, 2 labeled subjects, 2 test subjects")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = C.DATASETS[args.dataset]
    stem = "accuracy" if args.dataset == "hippocampus" else f"accuracy_{args.dataset}"
    results_path = Path(args.results) if args.results else C.RESULTS_DIR / (f"{stem}-smoke.jsonl" if args.smoke else f"{stem}.jsonl")
    results = C.Results(results_path)
    out_dir = results_path.parent
    title = f"{dataset.title}, test set"
    if args.report:
        write_report(results, out_dir, stem, title)
        return 0
    from CPCLSegmentLib.trainer import resolve_device

    device = resolve_device(args.device)
    data = Data(C.data_dir(args.data, dataset), smoke=args.smoke, dataset=dataset)
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.iterations:
        extra["iterations"] = args.iterations
    if args.validation_every:
        extra["validation_every"] = args.validation_every
    if args.smoke:
        jobs = []
        for v in MAIN + ["monai_unet"]:
            cfg = config_for(v, 0, {"iterations": 2, "validation_every": 1, **extra}, args.dataset)
            jobs.append(Job("main", v, 2, 0, cfg))
        run_jobs(jobs, results, data, device)
        write_report(results, out_dir, prefix=f"{stem}-smoke", title=title)
        return 0
    if args.tune is not None:
        jobs = tune_jobs(args.tune, args.tune_seeds, extra)
    else:
        jobs = main_jobs(args.full, args.seeds, extra, args.dataset, args.budgets, args.variants)
    run_jobs(jobs, results, data, device, C.parse_shard(args.shard))
    write_report(results, out_dir, stem, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
