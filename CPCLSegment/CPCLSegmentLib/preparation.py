"""Preparation (nnU-Net's fingerprint + preprocessing): the files a run is given, made ready for training.

- What a run is given: ``LabeledInput`` (image + segmentation + which slices are annotated) and
  ``TrainRequest`` (everything ``pipeline.train`` needs).
- Classes: ``resolve_classes`` matches segments across cases by name (``.seg.nrrd``) or label value (label maps).
- Reading a labeled case: ``read_labeled`` gives the labels on the image grid, with unknown voxels (sparse
  labels, ``annotated_mask``) set to ``IGNORE_INDEX``.
- Fingerprint: ``inspect_cases`` reads every labeled case once (spacing, size, voxels per segment,
  foreground intensities); ``run_fingerprint`` identifies a run for ``--resume``.
- Preprocessing, applied identically at training and prediction time (parameters in the model file):

  1. reorient to the canonical voxel order ``CANONICAL_ORIENTATION`` (``sitk.DICOMOrient``), so cases with
     different direction matrices (LPS vs RAS, axis permutations) present the anatomy the same way;
  2. resample to the model's target spacing (linear for images, nearest for labels) when it differs;
  3. normalise intensities (``intensity``): nnU-Net's CT scheme with statistics fixed at planning time, a
     per-volume z-score for MR and other modalities, or a starting model's own scheme.

  ``preprocessing`` applies them to a run's cases, through the preprocessing cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from . import io as cio
from .errors import InputError
from .intensity import foreground_intensity_sample, looks_like_ct, normalize, plan_normalization  # noqa: F401 (re-exported)
from .labels import build_label_array, find_segment, geometry_difference, same_grid
from .prepcache import canonical_path
from .settings import ANNOTATED_SLICES, IGNORE_INDEX, RunOptions, TrainConfig

Emit = Callable[[Dict[str, Any]], None]
CANONICAL_ORIENTATION = "LPS"  # identity direction matrix for axis-aligned images
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
    config: TrainConfig = field(default_factory=TrainConfig)
    # how the run is run: partial segments, starting model, spacing, resume, the comparison, the cache (``settings``)
    options: RunOptions = field(default_factory=RunOptions)
    network_overrides: Optional[Dict[str, Any]] = None  # network settings the user set explicitly
    memory_budget: Optional[float] = None  # bytes; GPU planning budget
    # the settings the user gave explicitly (config file keys, flags): what ``--resume`` compares with the
    # interrupted run; None: every field of ``config`` counts as given (the Python API)
    settings_given: Optional[List[str]] = None
    # other files the run reads, as (what names it, path): ``--config``, ``--cases``, ``--color-table``; no output may replace them
    other_inputs: List[Tuple[str, str]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- preprocessing


def reorient(image: sitk.Image) -> sitk.Image:
    """Permutes / flips the voxel axes to ``CANONICAL_ORIENTATION`` (exact, no interpolation)."""
    return sitk.DICOMOrient(image, CANONICAL_ORIENTATION)


def resample_image(image: sitk.Image, spacing: Sequence[float], interpolator=sitk.sitkLinear, default: float = 0.0) -> sitk.Image:
    """Resamples to ``spacing`` (x, y, z mm) keeping origin, direction and physical extent."""
    old_sp = np.array(image.GetSpacing())
    new_sp = np.array(spacing, dtype=float)
    if np.allclose(old_sp, new_sp, rtol=1e-3):
        return image
    size = np.maximum(1, np.round(np.array(image.GetSize()) * old_sp / new_sp)).astype(int)
    return sitk.Resample(
        image, [int(s) for s in size], sitk.Transform(), interpolator, image.GetOrigin(), [float(s) for s in new_sp],
        image.GetDirection(), default, image.GetPixelID(),
    )


def to_model_grid(image: sitk.Image, spacing: Optional[Sequence[float]]) -> sitk.Image:
    """Canonical orientation, then the model's spacing (None keeps the image's own)."""
    img = reorient(image)
    if spacing is not None:
        img = resample_image(img, spacing)
    return img


def labels_to_grid(labels: np.ndarray, image: sitk.Image, grid: sitk.Image) -> np.ndarray:
    """Moves a label array defined on ``image``'s grid onto ``grid`` (nearest neighbour)."""
    lab = sitk.GetImageFromArray(labels.astype(np.int16))
    lab.CopyInformation(image)
    lab = reorient(lab)
    if lab.GetSize() != grid.GetSize() or not np.allclose(lab.GetSpacing(), grid.GetSpacing(), rtol=1e-3):
        lab = sitk.Resample(lab, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkInt16)
    return sitk.GetArrayFromImage(lab).astype(np.int16)


def model_input(image: sitk.Image, spacing: Optional[Sequence[float]], normalization: Dict[str, Any]) -> Tuple[sitk.Image, np.ndarray]:
    """The model grid of ``image`` and the normalised float32 ``(D, H, W)`` array on it."""
    grid = to_model_grid(image, spacing)
    return grid, normalize(sitk.GetArrayViewFromImage(grid), normalization)


# ------------------------------------------------------------------------------------ labeled cases


def annotated_mask(labels: np.ndarray, image: sitk.Image, mode: str, case_name: str, emit: Emit) -> Optional[np.ndarray]:
    """Known-voxel mask for sparse labels, or None when the whole volume is annotated."""
    if mode == "all":
        return None
    fg = labels > 0
    if not fg.any():
        if mode == "auto":
            return None  # nothing painted: a fully annotated case without the structures
        raise InputError(f"{case_name}: annotated_slices is {mode!r}, but its segmentation has no painted {mode} slice (no voxel "
                         "of the selected segments), so none of its slices is known to be annotated; paint at least one slice, "
                         "or give the case as unlabeled")
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


def read_labeled(
    item: LabeledInput, wanted: Sequence[str], segment_names: Optional[Dict[int, str]], partial: bool, emit: Emit
) -> Tuple[sitk.Image, np.ndarray, np.ndarray]:
    """(image, labels on the image grid with -1 for unknown voxels, class_known (K,))."""
    image = cio.read_image(item.image)
    seg = cio.read_segmentation(item.segmentation, segment_names)
    labels, missing = build_label_array(seg, wanted, image, item.image)
    note = geometry_note(seg, image, item)
    if note:
        emit({"event": "warning", "message": note})
    for key, n in seg.outside.items():
        emit({"event": "warning", "message": f"segment {key!r} has {n} voxels in {item.segmentation}, but none inside image "
              f"{item.image}: the segmentation lies outside its image ({geometry_difference(seg.layers[0], image)})"})
    known_mask = annotated_mask(labels, image, item.annotated_slices, f"{item.image} (segmentation {item.segmentation})", emit)
    if known_mask is not None:
        labels = np.where(known_mask, labels, IGNORE_INDEX).astype(np.int16)
    class_known = np.ones(len(wanted) + 1, dtype=bool)
    if partial:
        class_known[missing] = False
    return image, labels, class_known


def geometry_note(seg: cio.Segmentation, image: sitk.Image, item: LabeledInput) -> Optional[str]:
    """A warning when a label map has its image's voxel dimensions but another geometry (origin, spacing or
    orientation): typically a label map saved without the image's header (e.g. from numpy), which is then
    placed by physical position, i.e. wrongly. None when nothing looks off."""
    if not seg.from_labelmap or not seg.layers:
        return None
    layer = seg.layers[0]
    if layer.GetSize() != image.GetSize() or same_grid(layer, image):
        return None
    return (f"segmentation {item.segmentation} has the voxel dimensions of image {item.image} but another geometry "
            f"({geometry_difference(layer, image)}); it is placed by physical position. If it was saved without the "
            "image's header (e.g. from numpy), copy the image's geometry into it first")


def resolve_classes(request: TrainRequest) -> List[Dict[str, Any]]:
    """The class list (background first) from the requested segments and the labeled cases' headers."""
    names_map = request.segment_names or {}
    firsts = [cio.read_segment_list(item.segmentation, names_map) for item in request.labeled]
    wanted = _wanted_segments(request.segments, firsts, names_map)
    if not wanted:
        raise InputError(f"no segments found in {request.labeled[0].segmentation}")
    if len(set(wanted)) != len(wanted):
        raise InputError(f"segment names must be unique, got {wanted}")
    classes: List[Dict[str, Any]] = [{"name": "background", "color": [0.0, 0.0, 0.0], "label_value": 0}]
    for name in wanted:
        info = next((s for s in (find_segment(seg, name) for seg in firsts) if s is not None), None)
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


def _wanted_segments(segments: Optional[Sequence[Any]], firsts: Sequence[cio.Segmentation], names_map: Dict[int, str]) -> List[str]:
    """Segment names to learn: the requested ones (label values named as the label maps name them), else
    every label value of the label maps, else every segment of the first ``.seg.nrrd``."""
    if segments:
        wanted = []
        for key in segments:
            key = str(key)
            if key.lstrip("-").isdigit() and all(s.from_labelmap for s in firsts):
                key = names_map.get(int(key), f"Label {int(key)}")
            wanted.append(key)
        return wanted
    if firsts[0].from_labelmap:
        values = sorted({s.label_value for seg in firsts for s in seg.segments})
        return [names_map.get(v, f"Label {v}") for v in values]
    return firsts[0].names()


# -------------------------------------------------------------------------------------- fingerprint


@dataclass
class CaseInfo:
    """What ``inspect_cases`` learns about one labeled case (before any preprocessing)."""

    name: str
    spacing: List[float]
    size: List[int]
    counts: Dict[int, int]
    missing: List[int]
    known_fraction: float
    looks_ct: bool


def inspect_cases(request: TrainRequest, classes: List[Dict[str, Any]], emit: Emit) -> Tuple[List[CaseInfo], List[np.ndarray], bool]:
    """Reads every labeled case once: ``(case infos, foreground intensity samples, looks like CT)``.

    Problems (a segment empty in every case) are found here, before any training."""
    wanted = [c["name"] for c in classes[1:]]
    infos, fg_samples, ct_votes = [], [], []
    rng = np.random.RandomState(0)
    outside: List[str] = []

    def watch(event: Dict[str, Any]) -> None:
        if event.get("event") == "warning" and "lies outside its image" in event.get("message", ""):
            outside.append(event["message"])
        emit(event)

    for n, item in enumerate(request.labeled):
        emit({"event": "phase", "phase": "checking labeled cases", "index": n + 1, "of": len(request.labeled), "case": item.image})
        image, labels, class_known = read_labeled(item, wanted, request.segment_names, request.options.partial_segments, watch)
        arr = sitk.GetArrayViewFromImage(image)
        counts = {c: int((labels == c).sum()) for c in range(1, len(classes))}
        missing = [c for c, n in counts.items() if n == 0]
        for c in missing:
            what = "not annotated (--partial-segments)" if request.options.partial_segments else "absent anatomy (background)"
            emit({"event": "warning", "message": f"segment {classes[c]['name']!r} is missing or empty in {item.segmentation}: treated as {what}"})
        infos.append(CaseInfo(item.name, list(image.GetSpacing()), list(image.GetSize()), counts, missing,
                              float((labels != IGNORE_INDEX).mean()), looks_like_ct(arr)))
        fg_samples.append(foreground_intensity_sample(arr, labels, rng))
        ct_votes.append(looks_like_ct(arr))
    absent = [classes[c]["name"] for c in range(1, len(classes)) if all(i.counts[c] == 0 for i in infos)]
    if absent:
        why = f"; the segmentation does not lie on its image: {outside[0]}" if outside else ""
        raise InputError(f"segment(s) {absent} are empty in every labeled case: nothing to learn them from{why}")
    return infos, fg_samples, sum(ct_votes) > len(ct_votes) / 2


def run_fingerprint(request: TrainRequest, classes: List[Dict[str, Any]]) -> Dict[str, Any]:
    """What identifies a run's data (stored in resume checkpoints): the cases (paths made absolute and
    link-resolved, ``canonical_path``) and the segment list."""
    return {
        "labeled": [[canonical_path(i.image), canonical_path(i.segmentation), i.annotated_slices] for i in request.labeled],
        "unlabeled": [canonical_path(u) for u in request.unlabeled],
        "classes": [c["name"] for c in classes],
    }


def fingerprint_difference(old: Dict[str, Any], new: Dict[str, Any]) -> Optional[str]:
    """How a checkpoint's fingerprint differs from this run's, in words (None: the same run). Older
    checkpoints stored paths as given: they are made canonical here too."""
    def canon(fp: Dict[str, Any]) -> Dict[str, Any]:
        try:
            return {"labeled": [[canonical_path(a), canonical_path(b), c] for a, b, c in fp.get("labeled", [])],
                    "unlabeled": [canonical_path(u) for u in fp.get("unlabeled", [])], "classes": list(fp.get("classes", []))}
        except (TypeError, ValueError):
            return {}
    a, b = canon(old or {}), canon(new)
    if a == b:
        return None
    parts = []
    if a.get("classes") != b.get("classes"):
        parts.append(f"segments {a.get('classes', [])[1:]} vs {b['classes'][1:]}")
    for key in ("labeled", "unlabeled"):
        before = {tuple(x) if isinstance(x, list) else x for x in a.get(key, [])}
        now = {tuple(x) if isinstance(x, list) else x for x in b[key]}
        if before != now:
            gone, added = len(before - now), len(now - before)
            example = next(iter(now - before), None) or next(iter(before - now), None)
            example = example[0] if isinstance(example, tuple) else example
            parts.append(f"{key} cases: {gone} not given now, {added} new (e.g. {example})")
        elif a.get(key) != b[key]:
            parts.append(f"{key} cases in another order")
    return "; ".join(parts) or "other cases"
