"""Patch sampling off the training loop: a step's host batch is a pure function of the iteration, so it can be
made in ``torch.utils.data.DataLoader`` worker processes while the device runs the previous step.

- ``BatchMaker(it)``: this rank's slice of iteration ``it``'s global batch as numpy arrays (labeled patches,
  labels, segments known, unlabeled student and teacher views, copy-paste boxes). Every sample comes from its own
  random stream seeded by ``(seed, stream, iteration, global index)`` (``data.sample_rng``), so a worker makes the
  bit-identical batch the training process would, in any order, and a resumed run continues the same sequence.
- ``host_batches(maker, start, end, workers, pin)``: the batches of iterations ``start .. end - 1`` in order;
  ``workers`` 0 makes them in this process; more run ``workers`` DataLoader processes, each a couple of
  iterations ahead, with pinned memory for non-blocking copies to a GPU when ``pin``.
- ``sampling_workers(setting, device)``: how many workers a run uses (``sampling_workers`` setting; ``None``, the
  default: none: on the CPU sampling is under 1 % of an iteration's CPU time, measured; on a GPU until the gain is
  measured there; on the CPU at most the cores but one).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .data import PatchSampler, paste_masks
from .settings import TrainConfig

HostBatch = Dict[str, Any]  # name -> numpy array (in-process) or tensor (from a DataLoader)


class BatchMaker:
    """``maker(it)``: this rank's host batch of iteration ``it`` (picklable: it travels to worker processes)."""

    def __init__(self, cfg: TrainConfig, lab: PatchSampler, unl: Optional[PatchSampler], rank: int = 0) -> None:
        self.cfg, self.lab, self.unl, self.rank = cfg, lab, unl, rank

    def indices(self, batch: int) -> Sequence[int]:
        return [self.rank * batch + i for i in range(batch)]

    def __call__(self, it: int) -> HostBatch:
        cfg = self.cfg
        lb = self.lab.sample(it, self.indices(cfg.labeled_batch))
        out: HostBatch = {"labeled": lb.images, "labels": lb.labels.astype(np.int64)}
        if lb.class_known is not None and not lb.class_known.all():
            out["class_known"] = lb.class_known
        if self.unl is not None and it >= cfg.warm_start_iterations():  # no unlabeled patches in a warm start
            ub = self.unl.sample(it, self.indices(cfg.unlabeled_batch))
            out["unlabeled"], out["teacher_view"] = ub.images, ub.teacher_images
            pairs = min(cfg.labeled_batch, cfg.unlabeled_batch)
            if cfg.uses_copy_paste() and pairs:
                out["paste_mask"] = paste_masks(cfg.patch_size, cfg.copy_paste_size, cfg.seed, it, self.indices(pairs))
        return out


class _Iterations(Dataset):
    """Item ``i``: the host batch of iteration ``start + i``."""

    def __init__(self, maker: BatchMaker, start: int, end: int) -> None:
        self.maker, self.start, self.end = maker, start, end

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __getitem__(self, i: int) -> HostBatch:
        return self.maker(self.start + i)


def host_batches(maker: BatchMaker, start: int, end: int, workers: int = 0, pin: bool = False) -> Iterator[HostBatch]:
    """The host batches of iterations ``start .. end - 1``, in order (module docstring)."""
    if workers <= 0:
        for it in range(start, end):
            yield maker(it)
        return
    loader = DataLoader(_Iterations(maker, start, end), batch_size=None, shuffle=False, num_workers=workers,
                        pin_memory=pin, prefetch_factor=2, persistent_workers=False)
    iterator = iter(loader)
    try:
        yield from iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:  # a loop that stops early ends its workers now, not at garbage collection
            shutdown()


def sampling_workers(setting: Optional[int], device: torch.device) -> int:
    """Worker processes for patch sampling: the setting when given, else none (sampling in the training process).
    On the CPU that is the measured choice: sampling an iteration's batch of the default recipe took 0.8 % of the
    iteration's CPU time (``bench/sampling_overlap.py``), all a worker could save, while it competes with the
    step's threads for the cores. On a GPU, none until the prepared GPU check (``bench/gpu_check.py``, sampling
    overlap) has measured the gain there. On the CPU at most the cores but one."""
    if setting is None:
        return 0
    return max(0, min(int(setting), (os.cpu_count() or 1) - 1)) if device.type == "cpu" else int(setting)
