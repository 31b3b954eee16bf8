"""Multi-GPU (or multi-process CPU) training with torch.distributed and DistributedDataParallel.

Launch with PyTorch's own launcher, nothing home-made::

    torchrun --nproc_per_node N -m CPCLSegmentLib.cli train ...

Semantics (also in docs/command-line.md, "Training on many GPUs"):

- ``labeled_batch`` / ``unlabeled_batch`` are **per rank**; the global batch is ``world_size ×`` that.
  The learning rate is not rescaled: give the one that suits the global batch.
- Each rank draws a different slice of the global batch (sample streams are seeded by their global
  position, so an N-rank run sees exactly the samples of a 1-rank run with an N× batch).
- The loss is the **global batch's** loss on every rank: Dice statistics, batch prototypes and every
  mean are all-reduced with a differentiable all-reduce (``torch.distributed.nn.functional.all_reduce``),
  and DDP averages gradients; the first optimizer step equals the 1-rank step with the doubled batch
  (``Testing/test_distributed.py``).
- The EMA teacher is updated from identical student weights on every rank, so it stays identical.
- BatchNorm (``norm="batch"``) is converted to SyncBatchNorm on CUDA; on CPU (gloo) its statistics are
  per rank. The default instance norm has no cross-sample statistics at all.
- Seeds: weights are initialised from ``seed`` on every rank; dropout streams use ``seed + rank``.
- Validation is sharded: each rank scores its share of the validation cases and the Dice sums are all-reduced.
- Only rank 0 prints progress and writes checkpoints and the model file.
- The first process on each machine (local rank 0) preprocesses the cases into the cache while the others wait;
  then every process reads them from there.
- Collectives wait ``process_group_timeout()`` (60 min; ``CPCL_DDP_TIMEOUT_MINUTES``) for a slow rank.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Tuple

import numpy as np

import torch
import torch.distributed as dist
from torch import nn

from .errors import InputError


@dataclass
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    flags_group: Any = None  # a gloo group for the loop's yes/no questions when the tensors' group is NCCL

    @classmethod
    def from_environment(cls, device: str = "auto") -> "DistributedContext":
        """Initialises the process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, ...)."""
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        use_cuda = device != "cpu" and not device.startswith("mps") and torch.cuda.is_available()
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError("device 'cuda' requested for distributed training but CUDA is not available")
        if use_cuda:
            if local >= torch.cuda.device_count():
                raise InputError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible")
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
        else:
            dev = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=process_group_timeout())
        # with NCCL a flag would travel as a GPU tensor, queued behind the step: reading it would wait for the step
        flags = dist.new_group(backend="gloo", timeout=process_group_timeout()) if use_cuda else None
        return cls(rank, world, local, dev, flags)

    def wrap(self, net: nn.Module) -> nn.Module:
        """DistributedDataParallel around the student (whose parameters rank 0 broadcasts)."""
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(net, device_ids=ids, broadcast_buffers=False)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Differentiable sum over ranks (its backward all-reduces the incoming gradients)."""
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(t, op=dist.ReduceOp.SUM)

    @torch.no_grad()
    def max_difference_from_rank0(self, net: nn.Module) -> float:
        """max |θ_rank - θ_rank0| over all parameters and buffers, the same value on every rank."""
        flat = torch.cat([v.detach().float().flatten() for v in net.state_dict().values()])
        ref = flat.clone()
        dist.broadcast(ref, src=0)
        diff = (flat - ref).abs().max().reshape(1)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        return float(diff.item())

    def sum_arrays(self, *arrays: np.ndarray) -> Tuple[np.ndarray, ...]:
        """Element-wise sums over ranks of float arrays (one all-reduce; e.g. validation's Dice sums and counts)."""
        sizes = [a.size for a in arrays]
        t = torch.tensor(np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays]), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        parts = np.split(t.cpu().numpy(), np.cumsum(sizes)[:-1])
        return tuple(p.reshape(a.shape) for p, a in zip(parts, arrays))

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (the loop asks every iteration: stop? loss sane?). On the host, over
        the gloo ``flags_group`` beside NCCL: the answer does not wait for the device to finish its queued step."""
        host = self.flags_group is not None or self.device.type == "cpu"
        t = torch.tensor([1.0 if flag else 0.0], device="cpu" if host else self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.flags_group)
        return bool(t.item() > 0)

    def close(self) -> None:
        """Destroys the process group, after collecting unreachable objects that may still hold it (a DDP
        reducer in a reference cycle): gloo's threads must not outlive the group at the interpreter's exit."""
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


DEFAULT_TIMEOUT_MINUTES = 60.0  # a collective waits this long for a slow rank (torch's default: 10 min with NCCL)


def process_group_timeout() -> timedelta:
    """How long a collective waits for the other ranks: ``CPCL_DDP_TIMEOUT_MINUTES`` or ``DEFAULT_TIMEOUT_MINUTES``
    (rank 0 alone scores a starting model and writes the model file; the first process on each machine
    preprocesses the cases while the others wait)."""
    text = os.environ.get("CPCL_DDP_TIMEOUT_MINUTES", "")
    try:
        minutes = float(text) if text.strip() else DEFAULT_TIMEOUT_MINUTES
    except ValueError:
        raise InputError(f"CPCL_DDP_TIMEOUT_MINUTES must be a number of minutes, not {text!r}") from None
    if not minutes > 0:
        raise InputError(f"CPCL_DDP_TIMEOUT_MINUTES must be > 0, not {text!r}")
    return timedelta(minutes=minutes)


def convert_batchnorm(net: nn.Module, device: Any) -> nn.Module:
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return net
