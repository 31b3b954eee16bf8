"""The pace of a run: seconds per iteration timed on real ``Trainer`` steps with the run's own settings, and the
iteration count that fits ``--minutes``.

``step_seconds`` builds a ``Trainer`` from the run's config (method, copy-paste, batch sizes, patch, width,
precision, device) on two synthetic cases of the patch's size and times whole iterations, as the loop runs them:
patch sampling and augmentation, the copy to the device, the loss terms, backward, the optimizer step and the EMA
update, waiting for the device at the end of each. One warm-up iteration (oneDNN / cuDNN set-up), then the
median of the next ones.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch

from .data import make_case
from .errors import InputError
from .settings import TrainConfig
from .trainer import Trainer

TIMED_STEPS = 3  # after one warm-up step


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
    timed.device, timed.minutes, timed.iterations, timed.sampling_workers = str(device), None, steps + 1, 0
    try:
        trainer = Trainer(timed, [make_case("timing", image, label)], [make_case("timing-u", image)], num_classes)
        times = []
        for it in range(steps + 1):
            t = clock()
            trainer.step(trainer.sample(it), it).read()  # reading the values waits for the device
            times.append(clock() - t)
    except Exception:  # noqa: BLE001 - no estimate rather than a failed run
        return None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return float(np.median(times[1:]))


def estimate_seconds(cfg: TrainConfig, num_classes: int, device: torch.device) -> Optional[float]:
    """The whole run's estimated time in seconds (``step_seconds`` × iterations), or None."""
    per_it = step_seconds(cfg, num_classes, device)
    return None if per_it is None else round(per_it * cfg.iterations, 0)


def iterations_for_minutes(cfg: TrainConfig, num_classes: int, device: torch.device) -> int:
    """The iteration count that fits ``cfg.minutes`` at the timed pace (``step_seconds``); at least 1."""
    per_it = step_seconds(cfg, num_classes, device)
    if not per_it:
        raise InputError("--minutes: could not time a training step on this device; give --iterations instead")
    return max(1, int(cfg.minutes * 60.0 / per_it))
