"""Planning from the data (as nnU-Net does): target spacing, patch size, memory and time estimates.

- Target spacing: the per-axis median spacing of the labeled cases.
- Patch size: the median case shape at that spacing, rounded to a multiple of ``2**depth`` — **up** on a GPU
  (small volumes are seen whole), **down** on the CPU (no step time spent on padding) — then shrunk along its
  longest physical side until it fits the voxel budget of the device (CPU: speed; GPU: the memory estimate
  below within the budget).
- Network width, where the user gave none: ``GPU_WIDTH`` on a GPU, ``CPU_WIDTH`` on the CPU. On a 2-core CPU a
  default-recipe step of the narrower network on its smaller patch is 6.8x faster, so the panel's minutes buy the
  iterations the semi-supervised recipe needs (BENCHMARKS.md, equal time).
- Memory: parameters (student, teacher, gradients, optimizer state) plus the activations the student keeps
  for backward and the teacher's transient ones; ``bench/memory.py`` checks the estimate against
  measured peaks (BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import psutil
import torch

from . import io as cio
from .errors import InputError, OutOfMemory
from .network import VNet, activation_voxels_per_input_voxel, count_parameters
from .precision import choose_precision
from .preparation import CANONICAL_ORIENTATION, CaseInfo, Emit, TrainRequest, plan_normalization
from .settings import TrainConfig
from .writers import format_bytes  # noqa: F401  (re-exported: ``planning.format_bytes``)

CPU_PATCH_VOXELS = 64 * 64 * 64  # CPU: above this a step takes seconds on a laptop
GPU_WIDTH, CPU_WIDTH = 16, 8  # the planned network width per device (``plan_width``)
GPU_MAX_PATCH = (128, 128, 128)
DEFAULT_GPU_BUDGET = 8 * 1024**3  # a GPU whose free memory cannot be read: plan for an 8 GB card
GPU_FREE_MARGIN = 0.85  # plan within this share of the GPU's free memory (other processes, fragmentation)
BYTES_OVERHEAD = 1.35  # GPU: allocator slack, cuDNN workspaces, prototype maps (to be measured on a GPU)
# CPU: the process itself (Python, torch, MONAI, oneDNN scratch and layout copies, the CLI's data, timing and
# validation) plus the tensors counted below at factor 1.0; 512 MiB fell short by up to 390 MiB in the CLI
# runs at width 8 (docs/benchmarks/memory.md), so 1 GiB keeps the estimate an upper bound.
CPU_PROCESS_BASE = 1024 * 1024**2
# CPU: preprocessing the largest volume (reading, reorienting, resampling image and segments) on top of that; a
# 512x512x300 CT peaked 8.4 bytes per voxel over the estimate without this term (docs/benchmarks/memory.md)
CPU_BYTES_PER_VOLUME_VOXEL = 12.0


def median_spacing(spacings: Sequence[Sequence[float]]) -> List[float]:
    arr = np.asarray(spacings, dtype=float)
    return [float(v) for v in np.median(arr, axis=0)]


def shape_at_spacing(size_xyz: Sequence[int], spacing_xyz: Sequence[float], target_xyz: Sequence[float]) -> Tuple[int, int, int]:
    """(D, H, W) voxels of an image of ``size_xyz`` voxels at ``spacing_xyz`` after resampling."""
    s = [max(1, int(round(n * sp / t))) for n, sp, t in zip(size_xyz, spacing_xyz, target_xyz)]
    return (s[2], s[1], s[0])


@functools.lru_cache(maxsize=256)
def count_params(width: int, depth: int, num_classes: int, in_channels: int = 1) -> int:
    """Parameter count of ``VNet(width, depth)`` (instance norm), counted on a network built on the ``meta``
    device (shapes only: no memory, no initialisation cost)."""
    with torch.device("meta"):
        net = VNet(in_channels=in_channels, num_classes=num_classes, width=width, depth=depth, feature_level=0)
    return count_parameters(net)


def student_patches(labeled_batch: int, unlabeled_batch: int, method: str, copy_paste: bool = False) -> int:
    """Patches the student runs per step: the labeled batch, the unlabeled one (semi-supervised methods) and,
    with copy-paste, one mixed patch per labeled/unlabeled pair (``Trainer.sample``)."""
    if method == "supervised":
        return labeled_batch
    return labeled_batch + unlabeled_batch + (min(labeled_batch, unlabeled_batch) if copy_paste else 0)


def estimate_memory(
    patch: Sequence[int],
    labeled_batch: int,
    unlabeled_batch: int,
    width: int,
    depth: int,
    num_classes: int,
    method: str = "cpcl",
    optimizer: str = "sgd",
    amp: bool = False,
    device_type: str = "cuda",
    copy_paste: bool = False,
    volume_voxels: float = 0.0,
) -> Dict[str, float]:
    """Estimated peak training memory in bytes, with its parts (CPU: peak RSS of the process; CUDA:
    allocated GPU memory). ``copy_paste``: the student also sees one mixed patch per labeled/unlabeled pair.
    ``volume_voxels``: the largest volume's voxels (``largest_volume_voxels``), preprocessed in the process on
    the CPU (``CPU_BYTES_PER_VOLUME_VOXEL`` each; no part of the GPU's memory)."""
    voxels = float(np.prod(patch))
    cfg = dict(width=width, depth=depth, num_classes=num_classes)
    per_voxel = activation_voxels_per_input_voxel(cfg)
    act_bytes = 2.0 if amp else 4.0
    student_batch = student_patches(labeled_batch, unlabeled_batch, method, copy_paste)
    activations = per_voxel * voxels * student_batch * act_bytes
    teacher = (per_voxel / 3.0) * voxels * unlabeled_batch * act_bytes * 0.5 if method != "supervised" else 0.0
    losses = 6 * num_classes * voxels * (labeled_batch + unlabeled_batch) * 4.0
    if amp:  # under autocast the losses read fp32 copies of the student's half-precision logits
        losses += num_classes * voxels * student_batch * 4.0
    params = count_params(width, depth, num_classes) * 4.0 * (5 if optimizer == "sgd" else 6)
    raw = activations + teacher + losses + params
    volume = CPU_BYTES_PER_VOLUME_VOXEL * float(volume_voxels) if device_type == "cpu" else 0.0
    total = CPU_PROCESS_BASE + raw + volume if device_type == "cpu" else raw * BYTES_OVERHEAD
    return {"total": total, "activations": activations, "teacher": teacher, "losses": losses, "parameters": params,
            "volume": volume}


def largest_volume_voxels(grids: Sequence[Tuple[Sequence[int], Sequence[float]]], spacing: Optional[Sequence[float]]) -> float:
    """The most voxels one volume has, on its own grid or at the target ``spacing`` (x, y, z mm), over ``grids``
    (each volume's size and spacing, x y z): the largest array preprocessing holds."""
    most = 0.0
    for size, sp in grids:
        model = shape_at_spacing(size, sp, spacing or sp)
        most = max(most, float(np.prod([float(v) for v in size])), float(np.prod([float(v) for v in model])))
    return most


def available_memory(device_type: str, device_index: Optional[int] = None) -> Optional[float]:
    """Free bytes on the device (CUDA: ``mem_get_info``; CPU: available RAM), or None if unknown."""
    if device_type == "cpu":
        return float(psutil.virtual_memory().available)
    if device_type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(device_index if device_index is not None else torch.cuda.current_device())
        except Exception:  # CUDA not usable from this process
            return None
        return float(free)
    return None


def memory_budget(device: torch.device) -> float:
    """The planning budget of a GPU: ``GPU_FREE_MARGIN`` of its free memory now (CUDA ``mem_get_info``; Apple MPS:
    its recommended working set less what torch holds), or ``DEFAULT_GPU_BUDGET`` when that cannot be read."""
    free = available_memory(device.type, device.index)
    if free is None and device.type == "mps":
        mps = getattr(torch, "mps", None)
        try:
            free = float(mps.recommended_max_memory() - mps.driver_allocated_memory())
        except Exception:  # torch < 2.5 or MPS not usable
            free = None
    return GPU_FREE_MARGIN * free if free else float(DEFAULT_GPU_BUDGET)


def planned_amp(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the memory planner counts half-precision activations: only where the run uses them on a GPU
    (``precision.choose_precision``: bf16 / fp16 by compute capability; never on MPS, which trains in fp32)."""
    return device.type == "cuda" and choose_precision(device, cfg.amp).dtype is not None


def _shrink(patch: List[int], spacing_dhw: Sequence[float], multiple: int) -> bool:
    """Shrinks the physically longest axis that can still shrink by one multiple; False if none can."""
    order = sorted(range(3), key=lambda a: -patch[a] * spacing_dhw[a])
    for a in order:
        if patch[a] > multiple:
            patch[a] -= multiple
            return True
    return False


def plan_patch_size(
    median_shape: Sequence[int],
    spacing_xyz: Sequence[float],
    depth: int,
    device_type: str,
    width: int,
    num_classes: int,
    labeled_batch: int = 2,
    unlabeled_batch: int = 2,
    memory_budget: Optional[float] = None,
    method: str = "cpcl",
    amp: bool = True,
    copy_paste: bool = False,
) -> Tuple[Tuple[int, int, int], Dict[str, float]]:
    """Patch (D, H, W) and its memory estimate; see module docstring."""
    m = 2**depth
    whole = math.floor if device_type == "cpu" else math.ceil
    patch = [max(m, int(whole(s / m)) * m) for s in median_shape]
    spacing_dhw = list(reversed(list(spacing_xyz)))
    if all(p == m for p in patch):  # one voxel at the deepest level: instance norm cannot train on it
        patch[max(range(3), key=lambda a: median_shape[a])] = 2 * m
    if device_type == "cpu":
        while np.prod(patch) > CPU_PATCH_VOXELS and _shrink(patch, spacing_dhw, m):
            pass
    else:
        patch = [min(p, g) for p, g in zip(patch, GPU_MAX_PATCH)]
        budget = memory_budget or DEFAULT_GPU_BUDGET
        while estimate_memory(patch, labeled_batch, unlabeled_batch, width, depth, num_classes, method, amp=amp,
                              copy_paste=copy_paste)["total"] > budget:
            if not _shrink(patch, spacing_dhw, m):
                break
    est = estimate_memory(patch, labeled_batch, unlabeled_batch, width, depth, num_classes, method,
                          amp=amp and device_type == "cuda", device_type=device_type, copy_paste=copy_paste)
    return (int(patch[0]), int(patch[1]), int(patch[2])), est


def plan_width(cfg: TrainConfig, device_type: str, settings_given: Optional[Sequence[str]], fine_tuning: bool) -> int:
    """The network width to train: what the user gave (``settings_given`` names it, or a starting model fixes it),
    else ``CPU_WIDTH`` on the CPU and ``GPU_WIDTH`` elsewhere."""
    if fine_tuning or (settings_given is not None and "width" in settings_given) or cfg.width != GPU_WIDTH:
        return cfg.width
    return CPU_WIDTH if device_type == "cpu" else GPU_WIDTH


def smaller_patch(patch: Sequence[int], budget: float, labeled_batch: int, unlabeled_batch: int, width: int, depth: int,
                  num_classes: int, method: str = "cpcl", optimizer: str = "sgd", amp: bool = False, device_type: str = "cuda",
                  copy_paste: bool = False) -> Optional[Tuple[int, int, int]]:
    """The largest patch (D, H, W) below ``patch`` whose ``estimate_memory`` is at most ``budget`` bytes, shrinking
    the longest axis one multiple of ``2**depth`` at a time; None when even the smallest patch needs more."""
    m = 2**depth
    cur = [max(m, (int(p) // m) * m) for p in patch]
    while _shrink(cur, (1.0, 1.0, 1.0), m):
        est = estimate_memory(cur, labeled_batch, unlabeled_batch, width, depth, num_classes, method, optimizer, amp, device_type,
                              copy_paste)["total"]
        if est <= budget:
            return (int(cur[0]), int(cur[1]), int(cur[2]))
    return None


def oom_error(cfg: TrainConfig, device_type: str, num_classes: int, free: Optional[float] = None) -> OutOfMemory:
    """What to reduce after running out of memory: a patch estimated to need half as much (``planning.smaller_after_oom``,
    also the error's ``smaller_patch``), in ``--patch-size`` order (X Y Z)."""
    smaller = smaller_after_oom(cfg, num_classes, device_type, free)
    where = "the computer" if device_type == "cpu" else device_type.upper()
    reduce = f"Reduce the patch size (e.g. --patch-size {xyz(smaller)}), " if smaller else "The patch is already the smallest: reduce "
    error = OutOfMemory(
        f"{where} ran out of memory with patch {xyz(cfg.patch_size)} (X Y Z), batch "
        f"{cfg.labeled_batch}+{cfg.unlabeled_batch}, width {cfg.width}. {reduce}the batch sizes or the network width"
        + ("" if device_type == "cpu" else ", or train on the CPU") + "; the last checkpoint was kept."
    )
    error.smaller_patch = smaller
    return error


def xyz(patch: Sequence[int]) -> str:
    """A patch (D, H, W) as ``--patch-size`` takes it: ``X Y Z``."""
    return " ".join(str(int(v)) for v in reversed(list(patch)))


def smaller_after_oom(cfg: Any, num_classes: int, device_type: str, free: Optional[float] = None) -> Optional[Tuple[int, int, int]]:
    """The patch to suggest after running out of memory with ``cfg.patch_size``: estimated to need at most half
    the patch-dependent memory (halfway between this patch's estimate and the smallest patch's) and, when known,
    at most ``free`` bytes; None when no smaller patch is estimated to fit."""
    args = (cfg.labeled_batch, cfg.unlabeled_batch, cfg.width, cfg.depth, num_classes, cfg.method, cfg.optimizer,
            bool(cfg.amp and device_type == "cuda"), device_type, cfg.uses_copy_paste())
    m = 2**cfg.depth
    need = estimate_memory(cfg.patch_size, *args)["total"]
    least = estimate_memory((m, m, m), *args)["total"]
    budget = (need + least) / 2.0
    return smaller_patch(cfg.patch_size, min(budget, free) if free else budget, *args)


# ------------------------------------------------------------------------------------ a run's plan


def plan_run(request: TrainRequest, classes: List[Dict[str, Any]], infos: Sequence[CaseInfo], fg_samples: Sequence[np.ndarray],
             looks_ct: bool, init_record: Optional[Dict[str, Any]], device: torch.device, emit: Emit,
             other_grids: Sequence[Tuple[Sequence[int], Sequence[float]]] = ()) -> Dict[str, Any]:
    """The run's plan: target spacing, normalisation, patch size (set in ``request.config`` when not given)
    and the memory estimate (with the largest of the labeled cases and ``other_grids``, the other volumes'
    sizes and spacings). A starting model (``init_record``) fixes spacing and normalisation."""
    cfg = request.config
    if init_record is not None:
        spacing = init_record.get("spacing")
        normalization = dict(init_record["normalization"])
        emit({"event": "info", "message": "fine-tuning: spacing and intensity normalisation come from the starting model"})
    else:
        spacing = request.options.spacing or median_spacing([i.spacing for i in infos])
        modality = request.options.modality
        if modality == "auto":
            modality = "ct" if looks_ct else "mr"
        normalization = plan_normalization(modality, fg_samples)
        normalization["modality"] = modality
    if request.options.spacing:
        spacing = list(request.options.spacing)
    shapes = [shape_at_spacing(i.size, i.spacing, spacing or i.spacing) for i in infos]
    median_shape = [int(np.median([s[a] for s in shapes])) for a in range(3)]
    cfg.width = plan_width(cfg, device.type, request.settings_given, init_record is not None or bool(request.options.resume))
    est = None
    if cfg.patch_size is None:
        budget = request.memory_budget or (memory_budget(device) if device.type != "cpu" else None)
        patch, est = plan_patch_size(
            median_shape, spacing, cfg.depth, device.type, cfg.width, len(classes), cfg.labeled_batch, cfg.unlabeled_batch,
            budget, cfg.method, planned_amp(cfg, device), cfg.uses_copy_paste(),
        )
        cfg.patch_size = patch
    volume = largest_volume_voxels([(i.size, i.spacing) for i in infos] + list(other_grids), spacing)
    if est is None or device.type == "cpu":
        est = estimate_memory(cfg.patch_size, cfg.labeled_batch, cfg.unlabeled_batch, cfg.width, cfg.depth, len(classes),
                              cfg.method, cfg.optimizer, planned_amp(cfg, device), device.type, cfg.uses_copy_paste(), volume)
    return {"spacing": spacing, "normalization": normalization, "patch_size": list(cfg.patch_size),
            "median_shape": median_shape, "memory": est, "orientation": CANONICAL_ORIENTATION}


MAX_GRID_VOXELS = 2**31 - 1  # numpy / ITK index limits
LARGE_GRID_VOXELS = 2**27  # above this, resampling one case takes a while: said so
MIN_AXIS_VOXELS = 4  # a labeled case thinner than this along an axis, at the target spacing, has collapsed
SPACING_OUTLIER = 4.0  # a case whose spacing differs from the target by more than this factor on an axis: warned


def check_grids(spacing: Optional[Sequence[float]], cases: Sequence[Tuple[str, Sequence[int], Sequence[float], bool]], emit: Emit,
                planned: bool = True) -> None:
    """Every case at the target ``spacing`` (x, y, z mm): ``cases`` are ``(name, size xyz, spacing xyz, labeled)``.

    Refuses (``InputError``, naming the case, its spacing and the target) a case whose grid would not fit in
    memory or would exceed ITK's limits, and a labeled case that collapses to fewer than ``MIN_AXIS_VOXELS``
    voxels along an axis (e.g. the median spacing pulled up by one case with 500 mm voxels); warns about a
    case whose spacing is far from a ``planned`` target (a wrong header?), a collapsing unlabeled case and a large grid."""
    if spacing is None:
        return
    free = available_memory("cpu")
    for name, size, own, labeled in cases:
        cio.check_not_one_slice(name, size)
        shape = shape_at_spacing(size, own, spacing)
        voxels = int(np.prod([float(v) for v in shape]))
        where = f"{name} ({'x'.join(str(int(v)) for v in size)} voxels of {[float(f'{v:.4g}') for v in own]} mm)"
        target = [float(f"{v:.4g}") for v in spacing]
        if voxels > MAX_GRID_VOXELS or (free is not None and voxels * 4.0 * 3 > free):
            raise InputError(f"at the target spacing {target} mm, case {where} would have {voxels:,} voxels "
                             f"({shape[2]}x{shape[1]}x{shape[0]}), more than this computer can hold: give a coarser --spacing")
        collapsed = [a for a in range(3) if shape[2 - a] < MIN_AXIS_VOXELS <= size[a] // 4]
        if collapsed:
            text = (f"at the target spacing {target} mm, case {where} would shrink to {shape[2]}x{shape[1]}x{shape[0]} voxels")
            if labeled:
                spacings = "; ".join([f"{n}: {[float(f'{v:.4g}') for v in sp]} mm" for n, _, sp, lab in cases if lab][:6])
                raise InputError(text + f": nothing would be left to learn from (labeled cases' spacings: {spacings}). " + (
                    "Is a case's spacing wrong in its header (the target is the median of the labeled cases)? Fix it, or give --spacing"
                    if planned else "Give a finer --spacing"))
            emit({"event": "warning", "message": text + " (an unlabeled case: used as it is)"})
            continue
        ratios = [float(o) / float(t) for o, t in zip(own, spacing)]
        if planned and max(ratios) > SPACING_OUTLIER or min(ratios) < 1.0 / SPACING_OUTLIER:
            emit({"event": "warning", "message": f"case {where} has a spacing far from the target {target} mm: it is resampled "
                  f"by a factor {max(max(ratios), 1 / min(ratios)):.1f}; check its header if this is unexpected"})
        if voxels > LARGE_GRID_VOXELS:
            emit({"event": "info", "message": f"case {where} becomes {voxels / 1e6:.0f} M voxels at the target spacing: "
                  "preprocessing it takes a while"})


def check_memory(plan: Dict[str, Any], device: torch.device, cfg: Any, num_classes: int) -> None:
    """Raises InputError, with a smaller patch to try, when the plan's estimate exceeds the free memory."""
    free = available_memory(device.type, device.index)
    need = plan["memory"]["total"]
    if free is not None and need > free:
        smaller = smaller_patch(cfg.patch_size, free * 0.9 - plan["memory"]["volume"], cfg.labeled_batch, cfg.unlabeled_batch, cfg.width, cfg.depth,
                                num_classes, cfg.method, cfg.optimizer, bool(cfg.amp and device.type == "cuda"), device.type,
                                cfg.uses_copy_paste())
        patch = (f"a smaller patch (e.g. --patch-size {xyz(smaller)}, estimated to fit)" if smaller else
                 f"smaller batches or a narrower network (even the smallest patch, --patch-size {xyz([2**cfg.depth] * 3)}, needs more)")
        raise InputError(
            f"training needs about {format_bytes(need)} of {device.type.upper()} memory with patch {xyz(cfg.patch_size)} (X Y Z) "
            f"but only {format_bytes(free)} is free; use {patch}" + (", smaller batches or a narrower network" if smaller else "")
        )
