"""Files in, model file out (train); model file and images in, segmentations out (predict).

This is what the CLI, the Slicer module's child process and the benchmarks call. Steps of ``train``:

1. **Inspect** every labeled case once (image + segmentation → labels on the image grid): spacing, shape,
   voxels per segment, foreground intensities. Segments are matched across cases by name (``.seg.nrrd``)
   or by label value (label maps, named "Label N"). Problems are found here, before any training.
2. **Plan**: target spacing, patch size, normalisation (``planning``), unless the config / init model fixes them.
3. **Preprocess** each case onto the model grid and store it as ``.npy`` in a work folder (read back
   memory-mapped, so hundreds of cases are never all in memory).
4. **Train** (``trainer``), with checkpoints for ``--resume``.
5. **Save** the model file atomically, plus a run record (``<model>.run.json``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__, cleanup
from . import io as cio
from .data import (
    CANONICAL_ORIENTATION,
    Case,
    foreground_intensity_sample,
    labels_to_grid,
    looks_like_ct,
    make_case,
    normalize,
    plan_normalization,
    to_model_grid,
)
from .errors import CPCLError, InputError, ModelFileError
from .inference import predict_probabilities
from .metrics import dice_per_class, nanmean
from .modelfile import (
    build_from_record,
    compare_networks,
    load_checkpoint,
    load_model,
    save_checkpoint,
    save_model,
    state_dict_cpu,
)
from .planning import describe_plan, estimate_memory, format_bytes, median_spacing, plan_patch_size, shape_at_spacing
from .prototypes import IGNORE_INDEX
from .settings import ANNOTATED_SLICES
from .trainer import TrainConfig, TrainResult, Trainer, resolve_device

Emit = Callable[[Dict[str, Any]], None]
_PATIENT_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}  # L, P, S components of LPS


@dataclass
class LabeledInput:
    """A labeled case: image file + segmentation file (and how much of it is annotated)."""

    image: str
    segmentation: str
    annotated_slices: str = "all"
    name: str = ""

    def __post_init__(self) -> None:
        self.image, self.segmentation = str(self.image), str(self.segmentation)
        if self.annotated_slices not in ANNOTATED_SLICES:
            raise InputError(f"annotated_slices must be one of {ANNOTATED_SLICES}, not {self.annotated_slices!r}")
        self.name = self.name or cio.strip_extension(self.image)


@dataclass
class TrainRequest:
    """Everything a training run needs (the CLI's arguments, the Slicer panel's selections)."""

    labeled: List[LabeledInput]
    out: str
    unlabeled: List[str] = field(default_factory=list)
    validation: List[LabeledInput] = field(default_factory=list)
    segments: Optional[List[str]] = None  # names or label values; None: all segments of the first case
    segment_names: Optional[Dict[int, str]] = None  # label value -> name for label maps
    partial_segments: bool = False  # a missing segment means "not annotated" instead of "absent"
    config: TrainConfig = field(default_factory=TrainConfig)
    modality: str = "auto"  # auto | ct | mr | other
    spacing: Optional[List[float]] = None  # override target spacing (x, y, z) mm
    init: Optional[str] = None  # model file to fine-tune from
    network_overrides: Optional[Dict[str, Any]] = None  # network settings the user set explicitly
    resume: bool = False
    compare_supervised: bool = False
    work_dir: Optional[str] = None
    memory_budget: Optional[float] = None  # bytes; GPU planning budget


# --------------------------------------------------------------------------------- case inspection


def _annotated_mask(labels: np.ndarray, image: sitk.Image, mode: str, case_name: str, emit: Emit) -> Optional[np.ndarray]:
    """Known-voxel mask for sparse labels, or None when the whole volume is annotated."""
    if mode == "all":
        return None
    fg = labels > 0
    if not fg.any():
        return None
    direction = np.array(image.GetDirection()).reshape(3, 3)

    def array_axis(patient: str) -> int:
        voxel_axis = int(np.argmax(np.abs(direction[_PATIENT_AXIS[patient], :])))  # i, j or k
        return 2 - voxel_axis  # numpy (k, j, i)

    def slices_with_labels(axis: int) -> np.ndarray:
        return fg.any(axis=tuple(a for a in range(3) if a != axis))

    if mode == "auto":
        best, best_frac = None, 1.0
        for patient in ("axial", "coronal", "sagittal"):
            ax = array_axis(patient)
            has = slices_with_labels(ax)
            idx = np.nonzero(has)[0]
            frac = has[idx.min() : idx.max() + 1].mean()
            if frac < best_frac - 1e-9:
                best, best_frac = patient, frac
        if best is None or best_frac > 0.75:
            return None  # labels are contiguous along every axis: a fully annotated volume
        mode = best
        emit({"event": "info", "message": f"{case_name}: labels look painted on every few {best} slices "
              f"({best_frac:.0%} of slices in range); only those slices are used as labeled"})
    ax = array_axis(mode)
    has = slices_with_labels(ax)
    shape = [1, 1, 1]
    shape[ax] = -1
    return np.broadcast_to(has.reshape(shape), labels.shape)


@dataclass
class CaseInfo:
    name: str
    spacing: List[float]
    size: List[int]
    counts: Dict[int, int]
    missing: List[int]
    known_fraction: float
    looks_ct: bool


def _read_labeled(
    item: LabeledInput, wanted: Sequence[str], segment_names: Optional[Dict[int, str]], partial: bool, emit: Emit
) -> Tuple[sitk.Image, np.ndarray, np.ndarray]:
    """(image, labels on the image grid with -1 for unknown voxels, class_known (K,))."""
    image = cio.read_image(item.image)
    seg = cio.read_segmentation(item.segmentation, segment_names)
    labels, missing = cio.build_label_array(seg, wanted, image, item.image)
    known_mask = _annotated_mask(labels, image, item.annotated_slices, item.name, emit)
    if known_mask is not None:
        labels = np.where(known_mask, labels, IGNORE_INDEX).astype(np.int16)
    class_known = np.ones(len(wanted) + 1, dtype=bool)
    if partial:
        class_known[missing] = False
    return image, labels, class_known


def resolve_classes(request: TrainRequest) -> List[Dict[str, Any]]:
    """The class list (background first) from the requested segments and the labeled cases' headers."""
    firsts = []
    wanted: Optional[List[str]] = None
    names_map = request.segment_names or {}
    for item in request.labeled:
        seg = cio.read_segmentation(item.segmentation, names_map) if not cio.is_seg_nrrd(item.segmentation) else _seg_header(item.segmentation)
        firsts.append(seg)
    if request.segments:
        wanted = []
        for key in request.segments:
            key = str(key)
            if key.lstrip("-").isdigit() and all(s.from_labelmap for s in firsts):
                key = names_map.get(int(key), f"Label {int(key)}")
            wanted.append(key)
    else:
        if firsts[0].from_labelmap:
            values = sorted({s.label_value for seg in firsts for s in seg.segments})
            wanted = [names_map.get(v, f"Label {v}") for v in values]
        else:
            wanted = firsts[0].names()
    if not wanted:
        raise InputError(f"no segments found in {request.labeled[0].segmentation}")
    if len(set(wanted)) != len(wanted):
        raise InputError(f"segment names must be unique, got {wanted}")
    classes: List[Dict[str, Any]] = [{"name": "background", "color": [0.0, 0.0, 0.0], "label_value": 0}]
    for i, name in enumerate(wanted, start=1):
        info = None
        for seg in firsts:
            info = cio._find_segment(seg, name)
            if info is not None:
                break
        if info is None:
            where = ", ".join(os.path.basename(it.segmentation) for it in request.labeled[:5])
            available = sorted({s.name for seg in firsts for s in seg.segments})
            raise InputError(f"segment {name!r} is in none of the labeled segmentations ({where}); available: {available}")
        rec: Dict[str, Any] = {"name": info.name, "color": list(info.color), "label_value": int(info.label_value), "segment_id": info.segment_id}
        if info.terminology:
            rec["terminology"] = info.terminology
        classes.append(rec)
    if not all(s.from_labelmap for s in firsts):
        # .seg.nrrd label values are storage details; class indices become the output values
        for i, c in enumerate(classes):
            c["label_value"] = i if c.get("label_value", 0) > 255 else c["label_value"]
    return classes


def _seg_header(path: str) -> cio.Segmentation:
    """Segment list of a .seg.nrrd without reading its voxels."""
    import slicerio

    cio._check_exists(path, "segmentation")
    try:
        seg = slicerio.read_segmentation(path, skip_voxels=True)
    except Exception as e:
        raise InputError(f"cannot read segmentation {path}: {type(e).__name__}: {cio._first_line(e)}") from None
    segs = [
        cio.SegmentInfo(str(s.get("name", s.get("id", ""))), int(s.get("labelValue", i + 1)),
                        [float(c) for c in s.get("color", cio.default_color(i + 1))][:3], int(s.get("layer", 0) or 0),
                        s.get("terminology"), str(s.get("id", "")))
        for i, s in enumerate(seg.get("segments", []))
    ]
    return cio.Segmentation(path, segs, [], False)


# ------------------------------------------------------------------------------------------ training


def _versions() -> Dict[str, str]:
    out = {"cpcl-segment": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for mod in ("torch", "numpy", "monai", "SimpleITK", "slicerio"):
        with contextlib.suppress(Exception):
            out[mod] = __import__(mod).__version__
    return out


def _inspect(request: TrainRequest, classes: List[Dict[str, Any]], emit: Emit) -> Tuple[List[CaseInfo], List[np.ndarray], bool]:
    wanted = [c["name"] for c in classes[1:]]
    infos, fg_samples, ct_votes = [], [], []
    rng = np.random.RandomState(0)
    for item in request.labeled:
        image, labels, class_known = _read_labeled(item, wanted, request.segment_names, request.partial_segments, emit)
        arr = sitk.GetArrayViewFromImage(image)
        counts = {c: int((labels == c).sum()) for c in range(1, len(classes))}
        missing = [c for c, n in counts.items() if n == 0]
        for c in missing:
            what = "not annotated (--partial-segments)" if request.partial_segments else "absent anatomy (background)"
            emit({"event": "warning", "message": f"segment {classes[c]['name']!r} is missing or empty in {item.segmentation}: treated as {what}"})
        infos.append(CaseInfo(item.name, list(image.GetSpacing()), list(image.GetSize()), counts, missing,
                              float((labels != IGNORE_INDEX).mean()), looks_like_ct(arr)))
        fg_samples.append(foreground_intensity_sample(arr, labels, rng))
        ct_votes.append(looks_like_ct(arr))
    absent = [classes[c]["name"] for c in range(1, len(classes)) if all(i.counts[c] == 0 for i in infos)]
    if absent:
        raise InputError(f"segment(s) {absent} are empty in every labeled case: nothing to learn them from")
    return infos, fg_samples, sum(ct_votes) > len(ct_votes) / 2


def _summary(request, classes, infos, plan, cfg, device, unlabeled_n, est_s) -> Dict[str, Any]:
    counts = {classes[c]["name"]: sum(i.counts[c] for i in infos) for c in range(1, len(classes))}
    return {
        "event": "summary",
        "labeled": [i.name for i in infos],
        "unlabeled": unlabeled_n,
        "validation": len(request.validation),
        "voxels_per_segment": counts,
        "spacing": plan["spacing"],
        "patch_size": list(cfg.patch_size),
        "normalization": plan["normalization"]["scheme"],
        "iterations": cfg.iterations,
        "method": cfg.method,
        "device": str(device),
        "estimated_memory": format_bytes(plan["memory"]["total"]),
        "estimated_time_s": est_s,
    }


def print_summary(s: Dict[str, Any], out=sys.stderr) -> None:
    lines = [
        f"CPCLSegment {__version__}: {s['method']} training on {len(s['labeled'])} labeled + {s['unlabeled']} unlabeled case(s)"
        + (f", {s['validation']} validation" if s["validation"] else ""),
        "  voxels per segment: " + ", ".join(f"{k}: {v}" for k, v in s["voxels_per_segment"].items()),
        f"  spacing {[round(v, 3) for v in s['spacing']]} mm, patch {s['patch_size']} (D, H, W), normalisation {s['normalization']}",
        f"  {s['iterations']} iterations on {s['device']}: about {_fmt_time(s['estimated_time_s'])}, peak memory about {s['estimated_memory']}",
    ]
    print("\n".join(lines), file=out, flush=True)


def _fmt_time(sec: Optional[float]) -> str:
    if sec is None:
        return "unknown time"
    if sec < 90:
        return f"{sec:.0f} s"
    if sec < 5400:
        return f"{sec / 60:.0f} min"
    return f"{sec / 3600:.1f} h"


def plan_run(request: TrainRequest, classes, infos, fg_samples, looks_ct, init_record, device, emit: Emit) -> Dict[str, Any]:
    cfg = request.config
    if init_record is not None:
        spacing = init_record.get("spacing")
        normalization = dict(init_record["normalization"])
        emit({"event": "info", "message": "fine-tuning: spacing and intensity normalisation come from the starting model"})
    else:
        spacing = request.spacing or median_spacing([i.spacing for i in infos])
        modality = request.modality
        if modality == "auto":
            modality = "ct" if looks_ct else "mr"
        normalization = plan_normalization(modality, fg_samples)
        normalization["modality"] = modality
    if request.spacing:
        spacing = list(request.spacing)
    shapes = [shape_at_spacing(i.size, i.spacing, spacing or i.spacing) for i in infos]
    median_shape = [int(np.median([s[a] for s in shapes])) for a in range(3)]
    est = None
    if cfg.patch_size is None:
        patch, est = plan_patch_size(
            median_shape, spacing, cfg.depth, device.type, cfg.width, len(classes), cfg.labeled_batch, cfg.unlabeled_batch,
            request.memory_budget, cfg.method, cfg.amp,
        )
        cfg.patch_size = patch
    if est is None:
        est = estimate_memory(cfg.patch_size, cfg.labeled_batch, cfg.unlabeled_batch, cfg.width, cfg.depth, len(classes),
                              cfg.method, cfg.optimizer, cfg.amp and device.type == "cuda", device.type)
    return {"spacing": spacing, "normalization": normalization, "patch_size": list(cfg.patch_size),
            "median_shape": median_shape, "memory": est, "orientation": CANONICAL_ORIENTATION}


def _check_memory(plan, device, emit) -> None:
    from .planning import available_memory, suggest_smaller

    free = available_memory(device.type, device.index)
    need = plan["memory"]["total"]
    if free is not None and need > free:
        smaller = suggest_smaller(plan["patch_size"], 4)
        raise InputError(
            f"training needs about {format_bytes(need)} of {device.type.upper()} memory but only {format_bytes(free)} is free; "
            f"use a smaller patch (e.g. --patch-size {smaller[2]} {smaller[1]} {smaller[0]}), smaller batches or a narrower network"
        )


def _preprocess(
    items: Sequence[LabeledInput], classes, plan, request: TrainRequest, work_dir: str, emit: Emit, stage: str
) -> List[Case]:
    wanted = [c["name"] for c in classes[1:]]
    cases = []
    for n, item in enumerate(items):
        image, labels, class_known = _read_labeled(item, wanted, request.segment_names, request.partial_segments, lambda e: None)
        grid = to_model_grid(image, plan["spacing"])
        arr = normalize(sitk.GetArrayViewFromImage(grid), plan["normalization"])
        lab = labels_to_grid(labels, image, grid)
        known = None if class_known.all() else class_known
        cases.append(make_case(item.name, arr, lab, known, cache_dir=work_dir, seed=n))
        emit({"event": "preprocess", "stage": stage, "index": n + 1, "of": len(items), "case": item.name})
    return cases


def _preprocess_unlabeled(paths: Sequence[str], plan, work_dir: str, emit: Emit) -> List[Case]:
    cases = []
    for n, path in enumerate(paths):
        image = cio.read_image(path)
        grid = to_model_grid(image, plan["spacing"])
        arr = normalize(sitk.GetArrayViewFromImage(grid), plan["normalization"])
        cases.append(make_case(cio.strip_extension(path) or f"unlabeled-{n}", arr, None, cache_dir=work_dir))
        emit({"event": "preprocess", "stage": "unlabeled", "index": n + 1, "of": len(paths), "case": path})
    return cases


def _estimate_seconds(cfg: TrainConfig, num_classes: int, device: torch.device) -> Optional[float]:
    """The whole run's estimated time in seconds (``step_seconds`` × iterations), or None."""
    per_it = step_seconds(cfg, num_classes, device)
    return None if per_it is None else round(per_it * cfg.iterations, 0)


def step_seconds(cfg: TrainConfig, num_classes: int, device: torch.device) -> Optional[float]:
    """Times the network work of one step at the real batch sizes (student forward + backward on the
    labeled and unlabeled batch, teacher forward on the unlabeled one), best of two after a warm-up, +10 %
    for the losses, sampling, optimizer and EMA update; None if it cannot run."""
    from .network import VNet

    try:
        net = VNet(**cfg.network_config(num_classes)).to(device)
        n_student = cfg.labeled_batch + (cfg.unlabeled_batch if cfg.method != "supervised" else 0)
        x = torch.randn(n_student, 1, *cfg.patch_size, device=device)
        xt = x[: cfg.unlabeled_batch] if cfg.method != "supervised" else None
        times = []
        for _ in range(3):
            t = time.perf_counter()
            net(x)[0].sum().backward()
            if xt is not None and len(xt):
                with torch.no_grad():
                    net(xt)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    except Exception:
        return None
    return min(times[1:]) * 1.1


def iterations_for_minutes(cfg: TrainConfig, num_classes: int, device: torch.device) -> int:
    """The iteration count that fits ``cfg.minutes`` at the timed step (``step_seconds``); at least 1."""
    per_it = step_seconds(cfg, num_classes, device)
    if not per_it:
        raise InputError("--minutes: could not time a training step on this device; give --iterations instead")
    return max(1, int(cfg.minutes * 60.0 / per_it))


def _init_state(request: TrainRequest, record: Dict[str, Any], classes, cfg: TrainConfig, emit: Emit) -> Dict[str, Any]:
    """Checks the starting model against the requested run; returns student/teacher states to load."""
    net_cfg = record["network"]
    if net_cfg.get("in_channels", 1) != 1:
        raise InputError(f"starting model {request.init} expects {net_cfg.get('in_channels')} input channels; CPCLSegment trains on 1")
    overrides = request.network_overrides or {}
    diffs = [f"{k}: model {net_cfg.get(k)} vs requested {v}" for k, v in overrides.items() if k in net_cfg and net_cfg[k] != v]
    if diffs:
        raise InputError(f"starting model {request.init} does not match the requested network: " + "; ".join(diffs))
    for k in ("width", "depth", "norm", "feature_level"):
        setattr(cfg, k, net_cfg[k])
    cfg.dropout = net_cfg.get("dropout", cfg.dropout)
    teacher = record["weights"]["teacher"]
    student = record["weights"].get("student") or teacher
    old_names = [c["name"] for c in record["classes"]]
    new_names = [c["name"] for c in classes]
    if old_names == new_names:
        emit({"event": "info", "message": f"fine-tuning {request.init}: same segments, continuing from its weights"})
        # the EMA continues from the model's own step count (trainer.Trainer: ema_offset)
        return {"student": student, "teacher": teacher, "iterations": int(record.get("training", {}).get("iterations") or 0)}
    trunk = {k: v for k, v in student.items() if not k.startswith("head.")}
    from .network import VNet

    fresh = VNet(**cfg.network_config(len(classes))).state_dict()
    fresh.update(trunk)
    emit({"event": "warning", "message": f"fine-tuning {request.init}: its segments {old_names[1:]} differ from {new_names[1:]}: "
          "keeping the trunk and re-initialising the output head for the new segment list"})
    return {"student": fresh, "teacher": None}


def _fingerprint(request: TrainRequest, classes) -> Dict[str, Any]:
    return {
        "labeled": [[i.image, i.segmentation, i.annotated_slices] for i in request.labeled],
        "unlabeled": list(request.unlabeled),
        "classes": [c["name"] for c in classes],
    }


def checkpoint_path(out: str) -> str:
    return str(out) + ".checkpoint.pt"


def run_record_path(out: str) -> str:
    base = str(out)
    return (base[:-3] if base.endswith(".pt") else base) + ".run.json"


def _evaluate(net: torch.nn.Module, cases: Sequence[Case], patch, device, num_classes: int) -> Tuple[float, List[float]]:
    from .inference import predict_labels

    per = []
    for c in cases:
        pred, _ = predict_labels(net, c.image, patch, device, overlap=0.25)
        per.append(dice_per_class(pred, np.asarray(c.label), num_classes))
    dice = [nanmean([p[k] for p in per]) for k in range(num_classes - 1)]
    return nanmean(dice), dice


def train(request: TrainRequest, emit: Optional[Emit] = None, should_stop: Optional[Callable[[], bool]] = None,
          distributed: Any = None) -> Dict[str, Any]:
    """Runs a whole training request; returns a summary dict (also written to the run record)."""
    emit = emit or (lambda e: None)
    rank0 = distributed is None or distributed.rank == 0
    say = emit if rank0 else (lambda e: None)
    if not request.labeled:
        raise InputError("give at least one labeled case (an image and its segmentation)")
    cfg = request.config.validate()
    out = str(request.out)
    if cio.has_extension(out, (".seg.nrrd",)) or os.path.isdir(out):
        raise InputError(f"--out must be a model file path ending in .pt, not {out}")
    labeled_images = {os.path.abspath(i.image) for i in request.labeled}
    dup = [u for u in request.unlabeled if os.path.abspath(u) in labeled_images]
    if dup:
        say({"event": "warning", "message": f"{len(dup)} image(s) are given both as labeled and unlabeled (e.g. {dup[0]}); "
             "they are used in both streams"})
    t_start = time.time()
    device = distributed.device if distributed else resolve_device(cfg.device)
    init_record = load_model(request.init) if request.init else None
    classes = resolve_classes(request)
    infos, fg_samples, is_ct = _inspect(request, classes, say)
    init_state = _init_state(request, init_record, classes, cfg, say) if init_record else None
    plan = plan_run(request, classes, infos, fg_samples, is_ct, init_record, device, say)
    _check_memory(plan, device, say)
    sparse_items = [i for i, info in zip(request.labeled, infos) if info.known_fraction < 1.0]
    unlabeled_paths = list(request.unlabeled) + [i.image for i in sparse_items]
    if cfg.minutes is not None:
        if distributed is not None:
            raise InputError("--minutes plans the iterations from one process's step time: with torchrun give --iterations")
        cfg.iterations = iterations_for_minutes(cfg, len(classes), device)
        say({"event": "info", "message": f"training for about {cfg.minutes:g} min: {cfg.iterations} iterations at the measured step time"})
    est_s = _estimate_seconds(cfg, len(classes), device) if rank0 else None
    if est_s is not None and request.compare_supervised:
        est_s *= 1.6
    summary = _summary(request, classes, infos, plan, cfg, device, len(unlabeled_paths), est_s)
    say(summary)
    if cfg.method != "supervised" and not unlabeled_paths:
        say({"event": "warning", "message": "no unlabeled cases given: training supervised-only"})
    if request.compare_supervised and not request.validation:
        raise InputError("--compare-supervised needs --validation cases to compare on")
    own_work = request.work_dir is None
    work_dir = tempfile.mkdtemp(prefix="cpcl-work-") if own_work else request.work_dir
    os.makedirs(work_dir, exist_ok=True)
    if own_work:
        cleanup.register(work_dir)
    try:
        labeled = _preprocess(request.labeled, classes, plan, request, work_dir, say, "labeled")
        validation = _preprocess(request.validation, classes, plan, request, work_dir, say, "validation")
        unlabeled = _preprocess_unlabeled(unlabeled_paths, plan, work_dir, say)
        names = [c["name"] for c in classes[1:]]
        start_eval = None
        if init_record is not None and validation and rank0:
            net0 = build_from_record(init_record) if init_state and init_state.get("teacher") is not None else None
            if net0 is not None:
                mean, dice = _evaluate(net0.to(device), validation, cfg.patch_size, device, len(classes))
                start_eval = {"mean_dice": mean, "dice": dict(zip(names, dice))}
                say({"event": "validation", "iteration": 0, "label": "starting model", "mean_dice": round(mean, 4),
                     "dice": {n: (None if d != d else round(d, 4)) for n, d in zip(names, dice)}, "best": False})
        fingerprint = _fingerprint(request, classes)
        ckpt_file = checkpoint_path(out)
        resume_state = None
        if request.resume:
            if not os.path.exists(ckpt_file):
                raise InputError(f"--resume: no checkpoint {ckpt_file} to resume from (start without --resume)")
            ck = load_checkpoint(ckpt_file)
            if ck.get("fingerprint") != fingerprint:
                raise InputError(f"--resume: checkpoint {ckpt_file} belongs to a run with other cases or segments")
            resume_state = ck["trainer"]
            cfg = TrainConfig.from_dict(ck["trainer"]["config"])
            say({"event": "info", "message": f"resuming from iteration {resume_state['iteration']} of {cfg.iterations}"})

        def save_ckpt(trainer: Trainer, iteration: int) -> None:
            if rank0:
                save_checkpoint(ckpt_file, {"fingerprint": fingerprint, "trainer": trainer.state(), "plan": _plain(plan)})
                say({"event": "checkpoint", "iteration": iteration, "path": ckpt_file})

        runs: List[Tuple[str, TrainConfig]] = [(cfg.method, cfg)]
        if request.compare_supervised and cfg.method != "supervised":
            sup = TrainConfig.from_dict(cfg.to_dict())
            sup.method = "supervised"
            runs.append(("supervised", sup))
        results: List[Tuple[TrainConfig, TrainResult, Optional[float]]] = []
        for label, run_cfg in runs:
            if len(runs) > 1:
                say({"event": "info", "message": f"--compare-supervised: training the {label} model"})
            trainer = Trainer(run_cfg, labeled, unlabeled, len(classes), class_names=names, validation=validation,
                              init_state=init_state, on_progress=say, should_stop=should_stop,
                              checkpoint=save_ckpt if label == cfg.method else None, distributed=distributed)
            if resume_state is not None and label == cfg.method:
                trainer.load_state(resume_state)
            result = trainer.run()
            score = None
            if validation and rank0:
                score, _ = _evaluate(result.teacher, validation, run_cfg.patch_size, device, len(classes))
            results.append((run_cfg, result, score))
            if result.status == "stopped":
                break
        chosen_cfg, chosen, chosen_score = results[0]
        comparison = None
        if len(results) == 2:
            (c1, r1, s1), (c2, r2, s2) = results
            comparison = {c1.method: s1, "supervised": s2}
            if s2 is not None and s1 is not None and s2 > s1:
                chosen_cfg, chosen, chosen_score = c2, r2, s2
                say({"event": "warning", "message": f"the unlabeled cases did not help here: supervised-only scored {s2:.4f} "
                     f"mean Dice on the validation cases vs {s1:.4f} for {c1.method}; keeping the supervised-only model"})
            else:
                say({"event": "info", "message": f"{c1.method} scored {s1:.4f} mean Dice on the validation cases vs "
                     f"{s2:.4f} for supervised-only; keeping the {c1.method} model"})
        record = None
        if rank0:
            record = make_record(chosen_cfg, chosen, classes, plan, request, infos, len(unlabeled_paths), start_eval, comparison)
            save_model(out, record)
            _write_run_record(out, request, chosen_cfg, chosen, plan, classes, t_start, comparison, start_eval)
            if chosen.status == "completed" and os.path.exists(ckpt_file):
                os.remove(ckpt_file)
        return {
            "model": out, "status": chosen.status, "iterations": chosen.iterations_done, "method": chosen.method,
            "validation_mean_dice": chosen_score, "comparison": comparison, "seconds": round(time.time() - t_start, 1),
            "best": chosen.best,
        }
    finally:
        if own_work:
            shutil.rmtree(work_dir, ignore_errors=True)
            cleanup.unregister(work_dir)


def _plain(obj: Any) -> Any:
    """JSON-able copy (numpy scalars to floats)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def make_record(cfg: TrainConfig, result: TrainResult, classes, plan, request: TrainRequest, infos, n_unlabeled: int,
                start_eval=None, comparison=None) -> Dict[str, Any]:
    return {
        "network": cfg.network_config(len(classes)),
        "classes": _plain(classes),
        "spacing": _plain(plan["spacing"]),
        "orientation": plan["orientation"],
        "normalization": _plain(plan["normalization"]),
        "patch_size": [int(p) for p in cfg.patch_size],
        "weights": {
            "teacher": state_dict_cpu(result.teacher),
            "student": state_dict_cpu(result.student),
            "best": result.best_state,
        },
        "best": _plain(result.best),
        "prototypes": result.prototypes,
        "prototype_valid": result.prototype_valid,
        "training": {
            "method": result.method,
            "status": result.status,
            "iterations": result.iterations_done,
            "config": cfg.to_dict(),
            "labeled_cases": [i.name for i in infos],
            "unlabeled_cases": n_unlabeled,
            "supervised_only": result.method == "supervised",
            "starting_model": request.init,
            "starting_model_validation": _plain(start_eval),
            "comparison": _plain(comparison),
        },
    }


def _write_run_record(out, request, cfg, result, plan, classes, t_start, comparison, start_eval) -> None:
    record = {
        "model": out,
        "engine_version": __version__,
        "versions": _versions(),
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "method": result.method,
        "status": result.status,
        "plan": _plain({k: v for k, v in plan.items()}),
        "classes": [c["name"] for c in classes],
        "labeled": [{"image": i.image, "segmentation": i.segmentation, "annotated_slices": i.annotated_slices} for i in request.labeled],
        "unlabeled": list(request.unlabeled),
        "validation": [{"image": i.image, "segmentation": i.segmentation} for i in request.validation],
        "starting_model": request.init,
        "starting_model_validation": _plain(start_eval),
        "comparison": _plain(comparison),
        "best": _plain(result.best),
        "validations": _plain(result.validation),
        "losses": result.history,
        "seconds": round(time.time() - t_start, 1),
    }
    with cio.atomic_path(run_record_path(out)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)


# ------------------------------------------------------------------------------------------ prediction


class Predictor:
    """A loaded model that segments images (the model file is read once)."""

    def __init__(self, model_path: str, weights: str = "teacher", device: str = "auto") -> None:
        self.path = str(model_path)
        self.record = load_model(self.path)
        self.device = resolve_device(device)
        self.net = build_from_record(self.record, weights).to(self.device)
        self.classes = self.record["classes"]
        self.patch = tuple(int(p) for p in self.record["patch_size"])

    def preprocess(self, image: sitk.Image) -> Tuple[sitk.Image, np.ndarray]:
        grid = to_model_grid(image, self.record.get("spacing"))
        return grid, normalize(sitk.GetArrayViewFromImage(grid), self.record["normalization"])

    def probabilities(self, image: sitk.Image, overlap: float = 0.5) -> Tuple[sitk.Image, torch.Tensor]:
        grid, arr = self.preprocess(image)
        return grid, predict_probabilities(self.net, arr, self.patch, self.device, overlap=overlap)

    def segment(self, image: sitk.Image, largest_component: bool = False, overlap: float = 0.5) -> np.ndarray:
        """Class-index labels ``(D, H, W)`` uint8 on the **original** image grid."""
        grid, probs = self.probabilities(image, overlap)
        return back_to_image_grid(probs, grid, image, largest_component)


def back_to_image_grid(probs: torch.Tensor, grid: sitk.Image, image: sitk.Image, largest_component: bool = False) -> np.ndarray:
    """Maps model-grid probabilities ``(K, D, H, W)`` to labels on ``image``'s grid.

    Same spacing (only reoriented): argmax, then an exact axis permutation back. Other spacing: each
    class probability is resampled linearly onto the image grid, then argmax.
    """
    same_spacing = np.allclose(sorted(grid.GetSpacing()), sorted(image.GetSpacing()), rtol=1e-3) and sorted(grid.GetSize()) == sorted(image.GetSize())
    labels = None
    if same_spacing:
        lab = sitk.GetImageFromArray(probs.numpy().argmax(0).astype(np.uint8))
        lab.CopyInformation(grid)
        # the exact inverse of the canonical reorientation (an axis permutation / flip, no interpolation)
        code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
        back = sitk.DICOMOrient(lab, code)
        if cio.same_grid(back, image):
            labels = sitk.GetArrayFromImage(back)
        else:
            out = sitk.Resample(lab, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
            labels = sitk.GetArrayFromImage(out)
    else:
        best = None
        for k in range(probs.shape[0]):
            p = sitk.GetImageFromArray(probs[k].numpy())
            p.CopyInformation(grid)
            pk = sitk.GetArrayFromImage(sitk.Resample(p, image, sitk.Transform(), sitk.sitkLinear, 0.0 if k else 1.0, sitk.sitkFloat32))
            if best is None:
                best, labels = pk, np.zeros(pk.shape, dtype=np.uint8)
            else:
                upd = pk > best
                labels[upd] = k
                best = np.where(upd, pk, best)
    if largest_component:
        labels = keep_largest_components(labels)
    return labels.astype(np.uint8)


def keep_largest_components(labels: np.ndarray) -> np.ndarray:
    """Keeps, per class, only its largest connected component (26-connectivity)."""
    out = labels.copy()
    for c in np.unique(labels):
        if c == 0:
            continue
        mask = sitk.GetImageFromArray((labels == c).astype(np.uint8))
        cc = sitk.RelabelComponent(sitk.ConnectedComponent(mask, True), sortByObjectSize=True)
        arr = sitk.GetArrayFromImage(cc)
        out[(labels == c) & (arr != 1)] = 0
    return out


def output_paths(images: Sequence[str], out: str, default_ext: str = ".seg.nrrd") -> List[str]:
    """One output per image: ``out`` itself for one image (unless a folder), else ``out/<input name><ext>``."""
    out = str(out)
    is_file_target = cio.has_extension(out, cio.IMAGE_EXTENSIONS + (cio.SEG_EXTENSION,)) and not os.path.isdir(out)
    if len(images) == 1 and is_file_target:
        return [out]
    if is_file_target:
        raise InputError(f"several images were given, so --out must be a folder, not the file name {out}")
    names = [cio.strip_extension(p) for p in images]
    if len(set(names)) != len(names):
        names = [f"{n}-{i + 1}" for i, n in enumerate(names)]
    return [os.path.join(out, n + default_ext) for n in names]


def predict(model_path: str, images: Sequence[str], out: str, weights: str = "teacher", device: str = "auto",
            largest_component: bool = False, output_format: str = ".seg.nrrd", emit: Optional[Emit] = None,
            should_stop: Optional[Callable[[], bool]] = None) -> List[str]:
    """Segments each image with the model and writes one output per image (atomically)."""
    emit = emit or (lambda e: None)
    if not images:
        raise InputError("give at least one image to segment")
    for p in images:
        cio._check_exists(p, "image")
    predictor = Predictor(model_path, weights, device)
    targets = output_paths(images, out, output_format)
    written = []
    for n, (path, target) in enumerate(zip(images, targets)):
        if should_stop and should_stop():
            break
        t = time.perf_counter()
        image = cio.read_image(path)
        labels = predictor.segment(image, largest_component)
        cio.write_prediction(target, labels, image, predictor.classes)
        written.append(target)
        emit({"event": "predict", "index": n + 1, "of": len(images), "image": path, "output": target,
              "seconds": round(time.perf_counter() - t, 2)})
    return written
