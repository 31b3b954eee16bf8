"""The pace of a run: seconds per iteration timed on real ``Trainer`` steps with the run's own settings, and the
iteration count that fits ``--minutes``.

``step_seconds`` builds a ``Trainer`` from the run's config (method, copy-paste, batch sizes, patch, width,
precision, device) on two synthetic cases of the patch's size and times whole iterations, as the loop runs them:
patch sampling and augmentation, the copy to the device, the loss terms, backward, the optimizer step and the EMA
update, waiting for the device at the end of each. Two warm-up iterations (oneDNN / cuDNN set-up, the allocator
settling), then the median of the next six: with one and three, the same ``--minutes 5`` plan made nine times on a
quiet 2-core CPU timed the semi-supervised step at 0.44-0.58 s (0.45 s in the run); with two and six, 13 of 14
plans timed it at 0.43-0.45 s, one at 0.55 s (docs/benchmarks/equal-time.md).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from .budget import supervised_only
from .data import make_case
from .errors import InputError
from .settings import TrainConfig
from .trainer import Trainer

WARMUP_STEPS = 2
TIMED_STEPS = 6  # after WARMUP_STEPS


def step_seconds(cfg: TrainConfig, num_classes: int, device: torch.device, steps: int = TIMED_STEPS,
                 clock: Callable[[], float] = time.perf_counter) -> Optional[float]:
    """Median seconds of ``steps`` real training iterations with ``cfg`` on ``device`` (module docstring); None when
    a step cannot run (e.g. out of memory: the run itself then reports it). ``clock``: wall time; a test of the
    method on a shared machine gives ``time.process_time`` (the work, whatever else the machine is doing)."""
    patch = tuple(int(p) for p in cfg.patch_size)
    rng = np.random.RandomState(0)
    image = rng.randn(*patch).astype(np.float32)
    label = np.zeros(patch, np.int16)
    for k in range(1, num_classes):  # every class present, as in a foreground-oversampled batch
        label[tuple(slice(int(p * k / (num_classes + 1)), int(p * (k + 1) / (num_classes + 1))) for p in patch)] = k
    timed = TrainConfig.from_dict(cfg.to_dict())
    timed.device, timed.minutes, timed.iterations, timed.sampling_workers = str(device), None, steps + WARMUP_STEPS, 0
    timed.warm_start = 0.0  # the recipe's own steps (a warm start's are timed as supervised-only: ``_paces``)
    try:
        trainer = Trainer(timed, [make_case("timing", image, label)], [make_case("timing-u", image)], num_classes)
        times = []
        for it in range(steps + WARMUP_STEPS):
            t = clock()
            trainer.step(trainer.sample(it), it).read()  # reading the values waits for the device
            times.append(clock() - t)
    except Exception:  # noqa: BLE001 - no estimate rather than a failed run
        return None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return float(np.median(times[WARMUP_STEPS:]))


StepTimer = Callable[[TrainConfig, int, torch.device], Optional[float]]


def _paces(cfg: TrainConfig, num_classes: int, device: torch.device, timer: Optional[StepTimer] = None
           ) -> Optional[Tuple[float, float]]:
    """Seconds per iteration of ``cfg``'s supervised warm start and of its other iterations (the same when it has no
    warm start), or None when a step cannot be timed. ``timer``: ``step_seconds`` or a memo of it."""
    timer = timer or step_seconds
    per_it = timer(cfg, num_classes, device)
    if per_it is None or cfg.method == "supervised" or cfg.warm_start <= 0:
        return None if per_it is None else (per_it, per_it)
    sup = timer(supervised_only(cfg), num_classes, device)
    return None if sup is None else (sup, per_it)


def memo_timer() -> StepTimer:
    """``step_seconds`` timed once per recipe (a warm start's own and its supervised steps; planning a budget's
    recipe times the same steps several times)."""
    seen: dict = {}

    def timer(cfg: TrainConfig, num_classes: int, device: torch.device) -> Optional[float]:
        key = (repr(sorted(replace(cfg, warm_start=0.0, iterations=1, minutes=None).to_dict().items())), num_classes, str(device))
        if key not in seen:
            seen[key] = step_seconds(cfg, num_classes, device)
        return seen[key]

    return timer


def run_seconds(cfg: TrainConfig, warm_pace: float, pace: float) -> float:
    """``W · t_warm + (T - W) · t``: a run of T = ``cfg.iterations`` whose first W (``warm_start_iterations``) are
    supervised-only steps of ``warm_pace`` seconds and the rest of ``pace``."""
    warm = cfg.warm_start_iterations()
    return warm * warm_pace + (cfg.iterations - warm) * pace


def estimate_seconds(cfg: TrainConfig, num_classes: int, device: torch.device) -> Optional[float]:
    """The whole run's estimated time in seconds (``run_seconds`` at the timed paces), or None."""
    paces = _paces(cfg, num_classes, device)
    return None if paces is None else round(run_seconds(cfg, *paces), 0)


def iterations_for_minutes(cfg: TrainConfig, num_classes: int, device: torch.device, timer: Optional[StepTimer] = None) -> int:
    """The most iterations T whose ``run_seconds`` at the timed paces fit ``cfg.minutes``; at least 1. ``run_seconds``
    grows with T (each added iteration is a warm-start or a semi-supervised step), and T · min(t_warm, t) <= budget
    bounds it, so a bisection finds T for any warm start (a fraction of T or a number of iterations)."""
    paces = _paces(cfg, num_classes, device, timer)
    if not paces:
        raise InputError("--minutes: could not time a training step on this device; give --iterations instead")
    budget = cfg.minutes * 60.0
    lo, hi = 1, max(1, int(budget / min(paces)))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if run_seconds(replace(cfg, iterations=mid), *paces) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
