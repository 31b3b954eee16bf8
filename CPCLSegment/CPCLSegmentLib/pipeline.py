"""Training orchestration: files in, model file out. This is what ``cpcl-segment train``, the Slicer module's
child process and the benchmarks call.

Steps of ``train`` (each step's code lives in its own module):

0. **Check** before any work (``trainchecks``, ``preflight``): the model path (``.pt``), every output against
   every input (no output may replace an input), writable folders, values (``--spacing``, ``--freeze-encoder``
   needs ``--init``), the lock ``<model>.lock`` (a second training writing the same file is refused), and with
   ``--resume`` the checkpoint (``resume``): what may change (iterations, lr, ...) is applied, what may not is
   refused.
1. **Inspect** every labeled case once (``preparation``: classes, sparse labels, voxels per segment,
   foreground intensities). Problems are found here, before any training.
2. **Plan**: target spacing, patch size, normalisation, memory and time (``planning``), unless the config or
   the starting model fixes them.
3. **Preprocess** each case onto the model grid, after checking every grid and the disk space the run needs
   (``trainchecks``), through the per-user preprocessing cache: cases found there are reused, the others
   preprocessed into it in parallel (``preprocessing``, ``prepcache``).
4. **Train** (``trainer.Trainer``), with checkpoints for ``--resume``; ``--compare-supervised`` also trains
   supervised-only and keeps the better model on the validation cases (``compare_supervised``).
5. **Save** the model file atomically, plus the run record ``<model>.run.json`` (``modelfile``). A run stopped
   before its first iteration writes nothing (an existing model stays as it was).

Cancel (``errors.Cancelled``): no model file is written; this run's resume checkpoint is removed, unless the
run was itself resumed from it (then it stays resumable, and the cancel message says so).

Prediction is ``prediction.py``. ``LabeledInput`` and ``TrainRequest`` (``preparation``) are re-exported here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import cleanup
from .budget import recipe_for_minutes, short_run_warning
from .companions import checkpoint_path
from .data import Case
from .devices import choose_device
from .errors import Cancelled, InputError
from .metrics import mean_dice_over_cases
from .modelfile import (
    build_from_record,
    make_record,
    plain,
    save_checkpoint,
    save_model,
    write_run_record,
)
from .pace import estimate_seconds, iterations_for_minutes, memo_timer
from .planning import check_memory, format_bytes, plan_run
from .preflight import OutputLock, sweep_leftovers
from .preparation import CaseInfo, Emit, LabeledInput, TrainRequest, inspect_cases, resolve_classes, run_fingerprint
from .preprocessing import open_cache, preprocess_cases
from .pretrained import read_starting_point, starting_state
from .resume import resume_checkpoint
from .trainchecks import check_case_grids, check_disk_space, check_request, unlabeled_grids
from .trainer import TrainConfig, Trainer, TrainResult

__all__ = ["LabeledInput", "TrainRequest", "train", "compare_supervised"]

MakeTrainer = Callable[[TrainConfig, Optional[Callable[[Trainer, int], None]]], Trainer]


def _quiet(event: Dict[str, Any]) -> None:
    pass


@dataclass
class _Run:
    """What ``train`` settles before preprocessing: config, device, classes, case infos and the plan."""

    request: TrainRequest
    cfg: TrainConfig
    device: torch.device
    classes: List[Dict[str, Any]]
    infos: List[CaseInfo]
    plan: Dict[str, Any]
    init_record: Optional[Dict[str, Any]]
    init_state: Optional[Dict[str, Any]]
    unlabeled_paths: List[str]  # the unlabeled images plus the images of sparsely labeled cases
    say: Emit  # emit on rank 0, nothing elsewhere
    rank0: bool
    resume_state: Optional[Dict[str, Any]] = None  # the checkpoint's trainer state with --resume
    fingerprint: Optional[Dict[str, Any]] = None
    planned_from_minutes: bool = False  # ``--minutes`` planned the iterations from a timed step (``_plan_minutes``)

    @property
    def names(self) -> List[str]:
        return [c["name"] for c in self.classes[1:]]


def train(request: TrainRequest, emit: Optional[Emit] = None, should_stop: Optional[Callable[[], bool]] = None,
          distributed: Any = None) -> Dict[str, Any]:
    """Runs a whole training request; returns a summary dict (also written to the run record)."""
    t_start = time.time()
    emit = emit or _quiet
    rank0 = distributed is None or distributed.rank == 0
    say = emit if rank0 else _quiet
    check_request(request, say)  # paths and values, before anything is read or written
    lock = OutputLock(request.out).acquire(say) if rank0 else None
    ckpt_file = checkpoint_path(request.out)
    wrote_ckpt: List[bool] = []
    try:
        if rank0:
            sweep_leftovers([os.path.dirname(os.path.abspath(request.out)), request.options.work_dir], say)
        run = _prepare(request, emit, distributed)
        cache = open_cache(request)
        try:
            labeled, validation, unlabeled = preprocess_cases(request, run.classes, run.plan, run.unlabeled_paths, cache, run.say,
                                                             distributed)
            _check_validation_labels(run, validation)
            start_eval = _score_starting_model(run, validation)

            def make_trainer(cfg: TrainConfig, checkpoint: Optional[Callable[[Trainer, int], None]]) -> Trainer:
                return Trainer(cfg, labeled, unlabeled, len(run.classes), class_names=run.names, validation=validation,
                               init_state=run.init_state, on_progress=run.say, should_stop=should_stop, checkpoint=checkpoint,
                               distributed=distributed)

            save_ckpt = _checkpointer(run, ckpt_file, wrote_ckpt)
            comparison = None
            if request.options.compare_supervised and run.cfg.method != "supervised":
                cfg, result, score, comparison = compare_supervised(run, make_trainer, run.resume_state, save_ckpt, validation)
            else:
                cfg, trainer = run.cfg, make_trainer(run.cfg, save_ckpt)
                if run.resume_state is not None:
                    trainer.load_state(run.resume_state)
                result = trainer.run()
                score = _validation_score(run, result, cfg, validation)
            if result.iterations_done == 0:
                kept = f" (the existing {os.path.basename(str(request.out))} is unchanged)" if os.path.exists(request.out) else ""
                raise Cancelled(f"stopped before the first training iteration: no model was written{kept}")
            _save(run, cfg, result, comparison, start_eval, t_start, ckpt_file)
        finally:
            cache.release()
    except Cancelled:
        if rank0 and wrote_ckpt and not request.options.resume and os.path.exists(ckpt_file):
            os.remove(ckpt_file)  # a cancelled run leaves nothing; a resumed one keeps its checkpoint resumable
            cleanup.keep_on_cancel(ckpt_file)
        raise
    finally:
        if lock is not None:
            lock.release()
    return {
        "model": str(request.out), "status": result.status, "iterations": result.iterations_done, "method": result.method,
        "validation_mean_dice": score, "comparison": comparison, "seconds": round(time.time() - t_start, 1),
        "best": result.best,
    }


def compare_supervised(run: _Run, make_trainer: MakeTrainer, resume_state: Optional[Dict[str, Any]],
                       save_ckpt: Callable[[Trainer, int], None], validation: Sequence[Case],
                       ) -> Tuple[TrainConfig, TrainResult, Optional[float], Optional[Dict[str, Optional[float]]]]:
    """``--compare-supervised``: trains the requested method, then supervised-only on the same cases and budget,
    and keeps the model with the better mean Dice on the validation cases, saying which. A stopped first run is
    kept without comparing. Returns ``(config, result, its validation score, {method: score, ...} or None)``."""
    cfg = run.cfg
    run.say({"event": "info", "message": f"--compare-supervised: training the {cfg.method} model"})
    trainer = make_trainer(cfg, save_ckpt)
    if resume_state is not None:
        trainer.load_state(resume_state)
    first = trainer.run()
    s1 = _validation_score(run, first, cfg, validation)
    if first.status == "stopped":
        return cfg, first, s1, None
    sup = TrainConfig.from_dict(cfg.to_dict())
    sup.method = "supervised"
    run.say({"event": "info", "message": "--compare-supervised: training the supervised model"})
    second = make_trainer(sup, None).run()
    s2 = _validation_score(run, second, sup, validation)
    comparison = {cfg.method: s1, "supervised": s2}
    if s1 is None or s2 is None:  # no validation Dice (e.g. a class absent from every validation case's labels)
        run.say({"event": "warning", "message": f"--compare-supervised: no mean Dice on the validation cases ({cfg.method}: "
                 f"{_score_text(s1)}, supervised-only: {_score_text(s2)}), so nothing could be compared; keeping the {cfg.method} model"})
        return cfg, first, s1, comparison
    if s2 > s1:
        run.say({"event": "warning", "message": f"the unlabeled cases did not help here: supervised-only scored {s2:.4f} "
                 f"mean Dice on the validation cases vs {s1:.4f} for {cfg.method}; keeping the supervised-only model"})
        return sup, second, s2, comparison
    run.say({"event": "info", "message": f"{cfg.method} scored {s1:.4f} mean Dice on the validation cases vs "
             f"{s2:.4f} for supervised-only; keeping the {cfg.method} model"})
    return cfg, first, s1, comparison


# ------------------------------------------------------------------------------------ before training


def _prepare(request: TrainRequest, emit: Emit, distributed: Any) -> _Run:
    """Resolves classes, inspects the cases, plans the run (from the checkpoint with ``--resume``), checks grids,
    memory and disk space, and emits the summary."""
    rank0 = distributed is None or distributed.rank == 0
    say = emit if rank0 else _quiet
    device, note = (distributed.device, None) if distributed else choose_device(request.config.device)
    if note:  # e.g. Apple MPS passed over: too old a torch, or its self-test step failed
        say({"event": "warning", "message": note})
    init_record = read_starting_point(request.options.init) if request.options.init else None
    classes = resolve_classes(request)
    cfg = request.config
    init_state = starting_state(init_record, request.options.init, classes, cfg, request.network_overrides, say) if init_record else None
    # with keep_model_segments, the starting model's other segments too (no labeled case need have them)
    all_classes = init_state["classes"] if init_state is not None else classes
    fingerprint = run_fingerprint(request, all_classes)
    checkpoint = resume_checkpoint(request, fingerprint, say) if request.options.resume else None
    cfg = request.config  # with --resume, the interrupted run's
    infos, fg_samples, is_ct = inspect_cases(request, classes, say)
    for info in infos:
        info.counts.update({c: 0 for c in range(len(classes), len(all_classes))})
    classes = all_classes
    others = unlabeled_grids(request)  # headers read once: the memory plan (the largest volume) and the grid check
    plan = plan_run(request, classes, infos, fg_samples, is_ct, init_record, device, say, [(size, sp) for _, size, sp in others])
    if checkpoint is not None:  # the interrupted run's grid and normalisation, whatever planning says today
        plan.update(spacing=checkpoint["plan"].get("spacing"), normalization=checkpoint["plan"].get("normalization", plan["normalization"]))
    sparse = [item.image for item, info in zip(request.labeled, infos) if info.known_fraction < 1.0]
    run = _Run(request, cfg, device, classes, infos, plan, init_record, init_state, list(request.unlabeled) + sparse, say, rank0,
               checkpoint["trainer"] if checkpoint else None, fingerprint)
    if cfg.method != "supervised" and not run.unlabeled_paths:  # said once, here; the trainer is given supervised-only
        cfg = run.cfg = TrainConfig.from_dict(dict(cfg.to_dict(), method="supervised"))
        say({"event": "warning", "message": "no unlabeled cases given: training supervised-only" + (
            "; --compare-supervised has nothing to compare (both models would be this supervised one), so one model is trained"
            if request.options.compare_supervised else "")})
    planned = request.options.spacing is None and init_record is None and checkpoint is None
    # first the grids: a case too large at the target spacing is named (the memory estimate counts the largest)
    check_case_grids(infos, others, plan["spacing"], say, planned)
    check_memory(plan, device, cfg, len(classes))
    if cfg.minutes is not None and checkpoint is None:
        cfg = _plan_minutes(run, distributed)
    if rank0:
        check_disk_space(request, cfg, classes, infos, plan["spacing"], run.unlabeled_paths)
    say(_summary(run))
    if cfg.method != "supervised" and request.validation and not request.options.compare_supervised:
        say({"event": "info", "message": "the unlabeled cases do not improve every model (BENCHMARKS.md): add --compare-supervised "
             "to also train supervised-only and keep whichever scores better on the validation cases"})
    short = short_run_warning(cfg, bool(run.unlabeled_paths), request.options.compare_supervised)
    if short:
        say({"event": "warning", "message": short})
    return run


def _plan_minutes(run: _Run, distributed: Any) -> TrainConfig:
    """The iterations that fit ``--minutes`` at the measured step time, and the recipe the minutes can afford
    (``budget.recipe_for_minutes``: too few for the semi-supervised recipe to pay off gets a supervised warm start,
    or trains supervised-only)."""
    if distributed is not None:
        raise InputError("--minutes plans the iterations from one process's step time: with torchrun give --iterations")
    K, timer = len(run.classes), memo_timer()
    requested = iterations_for_minutes(run.cfg, K, run.device, timer)
    cfg, switched = recipe_for_minutes(run.cfg, requested, lambda c: iterations_for_minutes(c, K, run.device, timer),
                                       bool(run.unlabeled_paths), run.request.options.compare_supervised)
    run.cfg = run.request.config = cfg
    run.planned_from_minutes = True
    if switched:
        if cfg.method == "supervised":
            run.unlabeled_paths = []  # not read, not preprocessed: the run is supervised-only
        run.say({"event": "warning", "message": switched})
    # the plan as fields too (JSON progress): the recipe's iterations, and those of the recipe asked for (before a switch)
    plan = {"minutes": cfg.minutes, "method": cfg.method, "iterations": cfg.iterations,
            "warm_start_iterations": cfg.warm_start_iterations(), "requested_iterations": requested, "switched": bool(switched)}
    run.say({"event": "info", "message": f"training for about {cfg.minutes:g} min: {cfg.iterations} iterations at the measured step time",
             "plan": plan})
    return cfg


def _summary(run: _Run) -> Dict[str, Any]:
    """The ``summary`` event: cases, voxels per segment, plan, and estimated time and memory."""
    cfg, classes = run.cfg, run.classes
    if run.planned_from_minutes:  # the iterations were just planned to fill the minutes: no second timing
        est_s: Optional[float] = round(cfg.minutes * 60.0, 0)
    else:
        est_s = estimate_seconds(cfg, len(classes), run.device) if run.rank0 else None
    if est_s is not None and run.request.options.compare_supervised:
        est_s *= 1.6
    return {
        "event": "summary",
        "labeled": [i.name for i in run.infos],
        "unlabeled": len(run.unlabeled_paths),
        "validation": len(run.request.validation),
        "voxels_per_segment": {classes[c]["name"]: sum(i.counts[c] for i in run.infos) for c in range(1, len(classes))},
        "spacing": run.plan["spacing"],
        "patch_size": list(cfg.patch_size),
        "normalization": run.plan["normalization"]["scheme"],
        "iterations": cfg.iterations,
        "method": cfg.method,
        "device": str(run.device),
        "estimated_memory": format_bytes(run.plan["memory"]["total"]),
        "estimated_time_s": est_s,
        "starting_model": (run.init_state or {}).get("summary"),
    }


# ------------------------------------------------------------------------------------ around training


def _score_starting_model(run: _Run, validation: Sequence[Case]) -> Optional[Dict[str, Any]]:
    """With ``--init`` (same segments) and validation cases: the starting model's Dice, so the user sees
    whether fine-tuning helped."""
    if run.init_record is None or not validation or not run.rank0 or not run.init_state or run.init_state.get("teacher") is None:
        return None
    net0 = build_from_record(run.init_record).to(run.device)
    mean, dice = mean_dice_over_cases(net0, validation, run.cfg.patch_size, run.device, len(run.classes), run.cfg.validation_overlap)
    run.say({"event": "validation", "iteration": 0, "label": "starting model", "mean_dice": round(mean, 4),
             "dice": {n: (None if d != d else round(d, 4)) for n, d in zip(run.names, dice)}, "best": False})
    return {"mean_dice": mean, "dice": dict(zip(run.names, dice))}


def _checkpointer(run: _Run, ckpt_file: str, wrote: List[bool]) -> Callable[[Trainer, int], None]:
    """The trainer's checkpoint callback: writes the resume checkpoint (rank 0) and says so. A run that was not
    resumed from it has it removed when cancelled (``cleanup.remove_on_cancel``)."""

    def save_ckpt(trainer: Trainer, iteration: int) -> None:
        if run.rank0:
            save_checkpoint(ckpt_file, {"fingerprint": run.fingerprint, "trainer": trainer.state(), "plan": plain(run.plan)})
            if not wrote:
                wrote.append(True)
                if not run.request.options.resume:
                    cleanup.remove_on_cancel(ckpt_file)
            run.say({"event": "checkpoint", "iteration": iteration, "path": ckpt_file})

    return save_ckpt


def _validation_score(run: _Run, result: TrainResult, cfg: TrainConfig, validation: Sequence[Case]) -> Optional[float]:
    """The teacher's mean Dice on the validation cases (rank 0), or None without validation cases or when no
    validation case holds any of the segments (Dice undefined)."""
    if not validation or not run.rank0:
        return None
    mean = mean_dice_over_cases(result.teacher, validation, cfg.patch_size, run.device, len(run.classes), cfg.validation_overlap)[0]
    return mean if mean == mean else None


def _score_text(score: Optional[float]) -> str:
    return "undefined" if score is None else f"{score:.4f}"


def _check_validation_labels(run: _Run, validation: Sequence[Case]) -> None:
    """Says which validation cases hold none of the segments (Dice is undefined there: they score nothing);
    refuses ``--compare-supervised`` when no validation case can be scored."""
    empty = [item for item, case in zip(run.request.validation, validation)
             if not any(len(case.locations.get(c, ())) for c in range(1, len(run.classes)))]
    for item in empty:
        run.say({"event": "warning", "message": f"validation case {item.image}: its segmentation {item.segmentation} holds none of "
                 f"the segments {run.names} (it is empty), where Dice is undefined: it is not scored"})
    if not empty or len(empty) < len(validation):
        return
    if run.request.options.compare_supervised and run.cfg.method != "supervised":
        raise InputError(f"--compare-supervised compares the Dice on the validation cases, but every validation case's "
                         f"segmentation is empty ({', '.join(i.segmentation for i in empty[:3])}): Dice is undefined there. "
                         "Give validation cases whose segmentations hold the segments")
    run.say({"event": "warning", "message": "no validation case can be scored (every one is empty): validation Dice stays "
             "undefined and no best-on-validation weights are kept"})


def _save(run: _Run, cfg: TrainConfig, result: TrainResult, comparison: Optional[Dict[str, Any]],
          start_eval: Optional[Dict[str, Any]], t_start: float, ckpt_file: str) -> None:
    """Writes the model file and the run record (rank 0); a completed run removes its resume checkpoint."""
    if not run.rank0:
        return
    out, request = str(run.request.out), run.request
    save_model(out, make_record(cfg, result, run.classes, run.plan, request, run.infos, len(run.unlabeled_paths), start_eval, comparison))
    write_run_record(out, request, cfg, result, run.plan, run.classes, t_start, comparison, start_eval)
    if result.status == "completed" and os.path.exists(ckpt_file):
        os.remove(ckpt_file)
        cleanup.keep_on_cancel(ckpt_file)
