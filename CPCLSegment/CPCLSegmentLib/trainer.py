"""The training loop: student + EMA teacher, CPCL / mean-teacher / supervised-only, with callbacks.

``train(config, labeled, unlabeled, num_classes, ...)`` returns a ``TrainResult``. The loop body is
deliberately short (nanoGPT style): ``inputs = sample(it)`` → ``step(inputs, it)`` (the method's loss terms
from ``losses.LOSS_TERMS``, ``total_loss``, one optimizer step, EMA teacher) → report. The step's logged values
stay on the device until the next step has been dispatched (``steplog``): no iteration waits for the device
just to log, except where validation or a checkpoint needs that iteration's weights.

Callbacks: ``on_progress(event: dict)`` receives ``start`` / ``progress`` / ``validation`` / ``warning`` /
``checkpoint`` events (the CLI prints them as JSON lines); ``should_stop() -> bool`` is polled every
iteration (Stop in Slicer, SIGTERM): the loop ends cleanly and the result holds the model trained so far.

Multi-GPU: pass ``distributed=DistributedContext(...)`` (see ``distributed.py``). Each rank draws its own
slice of the global batch; Dice statistics and batch prototypes are all-reduced so every rank computes the
global batch's loss; gradients are averaged by DDP; the EMA teacher is identical on every rank.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from .data import Augmenter, Case, PatchSampler
from .devices import describe_device, is_oom, resolve_device  # noqa: F401  (re-exported)
from .errors import InputError, TrainingDiverged
from .loader import BatchMaker, host_batches, sampling_workers
from .losses import LOSS_TERMS, StepInputs, learning_rate, sigmoid_rampup, supervised_terms, total_loss
from .metrics import dice_sums, mean_from_sums
from .modelfile import Snapshot, state_dict_cpu
from .network import build_network
from .planning import oom_error
from .precision import autocast_context, choose_precision
from .prototypes import labeled_prototypes
from .settings import TrainConfig  # noqa: F401  (TrainConfig is re-exported: ``trainer.TrainConfig``)
from .steplog import StepValues, progress_event
from .teacher import make_teacher, update_teacher

@dataclass
class TrainResult:
    student: nn.Module
    teacher: nn.Module
    history: List[Dict[str, Any]]
    iterations_done: int
    status: str  # completed | stopped
    best_state: Optional[Dict[str, torch.Tensor]] = None
    best: Optional[Dict[str, Any]] = None
    prototypes: Optional[torch.Tensor] = None
    prototype_valid: Optional[torch.Tensor] = None
    method: str = "cpcl"
    validation: List[Dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Holds the networks, optimizer and samplers; ``run()`` trains. See module docstring."""

    def __init__(
        self,
        config: TrainConfig,
        labeled: Sequence[Case],
        unlabeled: Sequence[Case],
        num_classes: int,
        *,
        class_names: Optional[Sequence[str]] = None,
        validation: Sequence[Case] = (),
        init_state: Optional[Dict[str, Any]] = None,
        on_progress: Optional[Callable[[Dict[str, Any]], None]] = None,
        should_stop: Optional[Callable[[], bool]] = None,
        checkpoint: Optional[Callable[["Trainer", int], None]] = None,
        distributed: Any = None,
    ) -> None:
        self.cfg = cfg = copy.deepcopy(config).validate()
        if not labeled:
            raise InputError("training needs at least one labeled case")
        if cfg.patch_size is None:
            raise InputError("patch_size must be set (planning.plan_patch_size chooses one)")
        self.K = num_classes
        self.names = list(class_names) if class_names else [f"class {i}" for i in range(1, num_classes)]
        self.labeled, self.unlabeled, self.validation = list(labeled), list(unlabeled), list(validation)
        self.dist = distributed
        self.rank = distributed.rank if distributed else 0
        self.world = distributed.world_size if distributed else 1
        self._emit = on_progress or (lambda e: None)
        self.should_stop = should_stop or (lambda: False)
        self.checkpoint_fn = checkpoint
        self.device = distributed.device if distributed else resolve_device(cfg.device)
        self.method = cfg.method
        if self.method != "supervised" and (not self.unlabeled or cfg.unlabeled_batch == 0):
            self.warn("no unlabeled cases: training supervised-only (add unlabeled volumes for semi-supervised learning)" if not self.unlabeled
                      else "unlabeled_batch is 0: training supervised-only")
            self.method = "supervised"
        self._build_networks(init_state)
        self.loss_terms = LOSS_TERMS[self.method]  # (student, teacher, StepInputs, cfg, sync) -> terms
        params = [p for p in self.student.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision.scaler) if self.device.type == "cuda" else None
        aug = Augmenter(cfg.patch_size, cfg.flip, cfg.rot90, cfg.intensity_prob)
        self.lab_sampler = PatchSampler(self.labeled, cfg.patch_size, num_classes, aug, cfg.seed, 1, cfg.foreground_oversample)
        self.unl_sampler = (
            PatchSampler(self.unlabeled, cfg.patch_size, num_classes, aug, cfg.seed, 2, 0.0, cfg.teacher_noise, cfg.strong_unlabeled)
            if self.method != "supervised"
            else None
        )
        self.maker = BatchMaker(cfg, self.lab_sampler, self.unl_sampler, self.rank)  # pure in the iteration: see loader
        self.workers = sampling_workers(cfg.sampling_workers, self.device)
        self.iteration = 0
        self.history: List[Dict[str, Any]] = []
        self.validations: List[Dict[str, Any]] = []
        self.best_state: Optional[Dict[str, torch.Tensor]] = None
        self.best: Optional[Dict[str, Any]] = None
        self._t0 = self._last_read = 0.0
        self._first = 0  # the iteration this run() started at
        self._time_per_it: Optional[float] = None
        self._pending: Optional[Snapshot] = None  # a checkpoint waiting for the next loss to confirm its weights are sane
        self._kept: Optional[int] = None  # the iteration of the last checkpoint written by this run

    def _build_networks(self, init_state: Optional[Dict[str, Any]]) -> None:
        """Student (``self.student``; ``self.model`` is what the loss calls: DDP / compiled), EMA teacher, device
        placement and precision."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        net = build_network(cfg.network_config(self.K))
        if init_state is not None:
            net.load_state_dict(init_state["student"])
        if self.dist and cfg.norm == "batch":
            from .distributed import convert_batchnorm

            net = convert_batchnorm(net, self.device)
        self.teacher = make_teacher(net)
        torch.manual_seed(cfg.seed + self.rank)  # per-rank dropout streams
        # Fine-tuning continues the starting model's EMA: its teacher is loaded and α counts from the iterations it
        # was trained for (α = min(1 - 1/(t0 + t + 1), decay)), so the first update does not replace it with a copy of
        # the student. A new output head (other segments) starts a new EMA (t0 = 0, teacher = student).
        self.ema_offset = 0
        if init_state is not None and init_state.get("teacher") is not None:
            self.teacher.load_state_dict(init_state["teacher"])
            self.ema_offset = int(init_state.get("iterations") or 0)
        use_cuda = self.device.type == "cuda"
        self.precision = choose_precision(self.device, cfg.amp, cfg.cpu_bf16)  # by compute capability / CPU features
        self.amp = self.precision.dtype is not None
        # channels-last 3D (NDHWC) on CUDA and the CPU (oneDNN: the CPU plan's default-recipe step 0.77-0.85x)
        channels_last = cfg.channels_last and self.device.type in ("cuda", "cpu")
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        net = net.to(self.device, memory_format=self.memory_format)
        self.teacher = self.teacher.to(self.device, memory_format=self.memory_format)
        if use_cuda:
            torch.backends.cudnn.benchmark = True
        if cfg.freeze_encoder:
            for m in net.encoder_modules():
                for p in m.parameters():
                    p.requires_grad_(False)
        self.student = net  # the plain module (EMA source, state dicts)
        self.model = self.dist.wrap(net) if self.dist else net
        if cfg.compile:
            self.model = torch.compile(self.model)

    # ------------------------------------------------------------------------------------- reporting

    def emit(self, event: Dict[str, Any]) -> None:
        if self.rank == 0:
            self._emit(event)

    def warn(self, message: str) -> None:
        self.emit({"event": "warning", "message": message})

    # ---------------------------------------------------------------------------------------- state

    def state(self) -> Dict[str, Any]:
        """Everything needed to resume at ``self.iteration`` (weights_only-loadable)."""
        return {
            "iteration": self.iteration,
            "config": self.cfg.to_dict(),
            "method": self.method,
            "student": state_dict_cpu(self.student),
            "teacher": state_dict_cpu(self.teacher),
            "optimizer": copy.deepcopy(self.opt.state_dict()),  # a copy: the next steps update it in place
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "torch_rng": torch.get_rng_state(),
            "history": list(self.history),
            "validations": self.validations,
            "best_state": self.best_state,
            "best": self.best,
        }

    def load_state(self, state: Dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.opt.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        self.iteration = int(state["iteration"])
        self._kept = self.iteration  # the checkpoint resumed from stays where it is
        self.history = list(state.get("history", []))
        self.validations = list(state.get("validations", []))
        self.best_state = state.get("best_state")
        self.best = state.get("best")

    # ------------------------------------------------------------------------------------------ loop

    def _tensor(self, a: Any, dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
        """A host array (numpy, or a pinned tensor from a sampling worker) on the device, copied without blocking;
        images in the networks' parameter dtype (float32; float64 in tests)."""
        if a is None:
            return None
        dtype = dtype or next(self.student.parameters()).dtype
        t = torch.as_tensor(a).to(self.device, non_blocking=True).to(dtype)
        return t.contiguous(memory_format=self.memory_format) if t.dim() == 5 else t

    def to_device(self, host: Dict[str, Any]) -> StepInputs:
        """A host batch (``loader.BatchMaker``) as the step's inputs on the device."""
        return StepInputs(self._tensor(host["labeled"]), self._tensor(host["labels"], torch.int64),
                          self._tensor(host.get("unlabeled")), self._tensor(host.get("teacher_view")),
                          self._tensor(host.get("class_known"), torch.bool), self._tensor(host.get("paste_mask"), torch.bool))

    def sample(self, it: int) -> StepInputs:
        """This rank's slice of iteration ``it``'s global batch, on the device (sampled in this process)."""
        return self.to_device(self.maker(it))

    def step(self, inputs: StepInputs, it: int) -> StepValues:
        """One iteration on ``inputs``: loss terms, backward, optimizer step, EMA update. Returns the logged values
        (every term, the total, lr and ramp) still on the device: reading them (``read()``, or as a mapping) waits
        for the step to finish and raises ``TrainingDiverged`` when the loss is not finite."""
        cfg = self.cfg
        lr = learning_rate(it, cfg.iterations, cfg.lr, cfg.poly_power, cfg.lr_warmup_iterations())
        for g in self.opt.param_groups:
            g["lr"] = lr
        warm = cfg.warm_start_iterations()
        terms_fn = supervised_terms if it < warm else self.loss_terms  # a supervised warm start: L_s alone
        ramp = sigmoid_rampup(it - warm, cfg.rampup_iterations()) if it >= warm else 0.0
        with autocast_context(self.device, self.precision):
            terms = terms_fn(self.model, self.teacher, inputs, cfg, self.dist.all_reduce if self.dist else None)
        loss = total_loss(terms, ramp, cfg)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None and self.scaler.is_enabled():
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        update_teacher(self.teacher, self.student, self.ema_offset + it, cfg.ema_decay)
        return StepValues(it, terms, loss, {"lr": lr, "ramp": ramp}, (inputs.labeled, inputs.unlabeled), self._nonfinite)

    def _nonfinite(self, it: int, values: Dict[str, float], inputs_finite: bool) -> TrainingDiverged:
        bad = ", ".join(f"{k}={v}" for k, v in values.items())
        return self._diverged(f"the loss became non-finite at iteration {it + 1} ({bad})", bad_input=not inputs_finite)

    def _guarded_step(self, it: int, host: Optional[Dict[str, Any]], late: Optional[StepValues]) -> StepValues:
        """``step(to_device(host) or sample(it), it)``; out of memory becomes ``OutOfMemory``, raised after the
        handler so that the original error's traceback (and the activations its frames hold) is already released."""
        try:
            return self.step(self.sample(it) if host is None else self.to_device(host), it)
        except RuntimeError as e:
            if not is_oom(e):
                raise
        if late is not None:
            self._report(late)  # the previous step's loss still judges the pending checkpoint
        self._write_pending()  # running out of memory says nothing against the weights
        raise oom_error(self.cfg, self.device.type, self.K)

    def _report(self, values: StepValues) -> None:
        """Reads a dispatched step's values (waiting for the device), checks them (``_check_sane``), and records and
        emits them as the progress of its iteration."""
        logged = values.read()
        self._check_sane(logged["total"], values.iteration)
        now = time.perf_counter()
        dt, self._last_read = now - self._last_read, now  # between two reads: one step of the device's
        self._time_per_it = dt if self._time_per_it is None else 0.9 * self._time_per_it + 0.1 * dt
        done, of = values.iteration + 1, self.cfg.iterations
        self.history.append({"iteration": done, **{k: round(v, 6) for k, v in logged.items()}})
        eta = (of - done) * (now - self._t0) / max(1, done - self._first)
        self.emit(progress_event(logged, done, of, self.cfg.lambda_max, self._time_per_it, eta))

    def _loop(self, batches: Iterator[Optional[Dict[str, Any]]], val_every: int, ckpt_every: int) -> str:
        """Steps on ``batches`` (one host batch per iteration from ``self.iteration``) until done or stopped;
        reports, validates and checkpoints. Returns ``completed`` or ``stopped``. Step N's values are read after
        step N+1 has been dispatched; where validation, a checkpoint or the end needs step N's weights they are
        read at once (so a pending checkpoint is always judged by the loss its own weights gave)."""
        cfg = self.cfg
        status, late = "completed", None
        while self.iteration < cfg.iterations:
            stop = self.should_stop()
            if self.dist is not None:
                stop = self.dist.any_rank(stop)  # ranks must leave the loop together
            if stop:
                status = "stopped"
                break
            it = self.iteration
            values = self._guarded_step(it, next(batches), late)
            if late is not None:
                self._report(late)  # the previous step's values: the device has this step queued meanwhile
            late, self.iteration = values, it + 1
            validate = self.validation and (self.iteration % val_every == 0 or self.iteration == cfg.iterations)
            snapshot = self.checkpoint_fn and self.iteration % ckpt_every == 0 and self.iteration < cfg.iterations
            if validate or snapshot or self.iteration == cfg.iterations:
                self._report(late)
                late = None
            if validate:
                self.validate()
            if snapshot:
                self._pending = Snapshot(self.iteration, self.state())  # written once the next loss shows it sane
            if validate or snapshot:
                self._last_read = time.perf_counter()  # the time per iteration leaves validation and checkpoints out
        if late is not None:  # stopped: the last step's values
            self._report(late)
        return status

    def run(self) -> TrainResult:
        cfg = self.cfg
        n_val = max(1, cfg.iterations // 10)
        val_every = cfg.validation_every or n_val
        ckpt_every = cfg.checkpoint_every or n_val
        self.emit({
            "event": "start", "method": self.method, "iterations": cfg.iterations, "start_iteration": self.iteration,
            "device": describe_device(self.device), "labeled": len(self.labeled), "unlabeled": len(self.unlabeled),
            "validation": len(self.validation), "patch_size": list(cfg.patch_size), "world_size": self.world,
            "precision": self.precision.name, "precision_reason": self.precision.reason,
        })
        status = "completed"
        self.student.train()
        self._t0 = self._last_read = time.perf_counter()
        self._first = first = self.iteration
        # sampling workers make the host batches ahead; without them ``sample(it)`` runs in the loop
        batches = (host_batches(self.maker, first, cfg.iterations, self.workers, pin=self.device.type == "cuda")
                   if self.workers else _nothing_ahead())
        try:
            status = self._loop(batches, val_every, ckpt_every)
        finally:
            batches.close()  # a stopped or failed loop ends the sampling workers
        if status == "stopped" and self.checkpoint_fn:
            self.checkpoint_fn(self, self.iteration)  # so --resume can continue a stopped run
        if self.dist is not None:
            self.emit({"event": "distributed_check", "world_size": self.world,
                       "teacher_max_abs_diff": self.dist.max_difference_from_rank0(self.teacher),
                       "student_max_abs_diff": self.dist.max_difference_from_rank0(self.student)})
        protos, valid = (None, None)
        if self.rank == 0:
            protos, valid = labeled_prototypes(self.teacher, self.labeled, cfg.patch_size, self.K, self.device, seed=cfg.seed)
        return TrainResult(
            self.student, self.teacher, self.history, self.iteration, status, self.best_state, self.best, protos, valid,
            self.method, self.validations,
        )

    # ------------------------------------------------------------------------------ divergence

    def _check_sane(self, total: float, it: int) -> None:
        """Writes the pending checkpoint when this loss (of its weights) is within ``SANE_FACTOR`` of the first, drops
        it otherwise; a loss grown ``DIVERGED_FACTOR``-fold stops the run (``TrainingDiverged``) while still finite."""
        first = max(LOSS_FLOOR, float(self.history[0]["total"]) if self.history else total)
        sane, blown = total <= SANE_FACTOR * first, total > DIVERGED_FACTOR * first
        if self.dist is not None:  # every rank decides alike (a rank raising alone would leave the others waiting)
            blown = self.dist.any_rank(blown)
            sane = not self.dist.any_rank(not sane)
        if sane:
            self._write_pending()
        elif self._pending is not None:
            self._pending = None
        if blown:
            raise self._diverged(f"the loss grew to {total:.4g} at iteration {it + 1}, {total / first:.0f} times its first value "
                                 f"({first:.3g})", bad_input=False)

    def _write_pending(self) -> None:
        if self._pending is not None and self.checkpoint_fn is not None:  # rank 0 writes (the callback checks)
            self.checkpoint_fn(self._pending, self._pending.iteration)
            self._kept = self._pending.iteration
        self._pending = None

    def _diverged(self, what: str, bad_input: bool) -> TrainingDiverged:
        """The error for a diverged run: which checkpoint was kept and what to do (a lower --lr, with --resume)."""
        if bad_input:  # NaN / inf in the batch: the weights were fine up to here
            self._write_pending()
            return TrainingDiverged(f"{what}: the training batch holds NaN or infinite values; check the input intensities"
                                    + (f". The checkpoint of iteration {self._kept} was kept" if self._kept else ""))
        self._pending = None
        lr = f"--lr {self.cfg.lr / 10:.3g}"
        if self._kept:
            advice = (f"the last checkpoint from before the loss grew (iteration {self._kept}) was kept: continue it with a "
                      f"lower learning rate, e.g. {lr} --resume")
        else:
            advice = f"no checkpoint from before the loss grew was written: start again with a lower learning rate, e.g. {lr}"
        return TrainingDiverged(f"{what}; training stopped: {advice}")

    def validate(self) -> Dict[str, Any]:
        """Teacher Dice per segment on the validation cases; keeps the best weights. With several ranks each scores
        its share of the cases and the Dice sums are all-reduced (no rank waits for another's whole validation)."""
        sums, counts = dice_sums(self.teacher, self.validation[self.rank::self.world], self.cfg.patch_size, self.device,
                                 self.K, self.cfg.validation_overlap, self.amp)
        if self.dist is not None:
            sums, counts = self.dist.sum_arrays(sums, counts)
        if self.rank != 0:
            return {}
        mean, dice = mean_from_sums(sums, counts)
        improved = mean == mean and (self.best is None or mean > self.best["mean_dice"])  # NaN: no case could be scored
        if improved:
            self.best_state = state_dict_cpu(self.teacher)
            self.best = {"iteration": self.iteration, "mean_dice": mean, "dice": dict(zip(self.names, dice))}
        event = {
            "event": "validation", "iteration": self.iteration, "dice": {n: (None if d != d else round(d, 4)) for n, d in zip(self.names, dice)},
            "mean_dice": None if mean != mean else round(mean, 4), "best": bool(improved),
        }
        stuck = [n for n, d in zip(self.names, dice) if d == 0.0]
        if stuck and self.iteration >= self.cfg.iterations // 3:
            event["zero_dice_segments"] = stuck
            self.warn(f"segment(s) {', '.join(stuck)} still have Dice 0 on the validation cases at iteration {self.iteration}: "
                      "check that they are labeled in enough training cases")
        self.validations.append(event)
        self.emit(event)
        return event


def _nothing_ahead() -> Iterator[None]:
    """The loop's batches when it samples in process: ``None`` for every iteration."""
    while True:
        yield None


LOSS_FLOOR = 0.5  # the first loss, at least this, is what "grown" is measured against
SANE_FACTOR = 10.0  # a checkpoint's weights are sane when the next loss is at most this many times the first
DIVERGED_FACTOR = 1000.0  # a loss this many times the first: the run has diverged, even while finite


def train(
    config: TrainConfig,
    labeled: Sequence[Case],
    unlabeled: Sequence[Case],
    num_classes: int,
    **kwargs: Any,
) -> TrainResult:
    """Convenience wrapper: ``Trainer(...).run()`` (optionally resuming from ``resume_state``)."""
    resume = kwargs.pop("resume_state", None)
    trainer = Trainer(config, labeled, unlabeled, num_classes, **kwargs)
    if resume is not None:
        trainer.load_state(resume)
    return trainer.run()
