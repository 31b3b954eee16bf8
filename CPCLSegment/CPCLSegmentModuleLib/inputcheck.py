"""What the panel shows before training, checked from the nodes; writes nothing.

Segment names across cases, empty and overlapping segments, geometry. Each case's selected segments are
rasterised **once** (``nodes.segment_masks``); ``check_inputs(..., on_case=...)`` hands those masks to the caller
(``export.export_inputs`` writes the engine's input files from them in the same pass). With ``hand_over=True`` (the
Train click) a segmentation unchanged since it was read from a ``.seg.nrrd`` (``handoff.original_segmentation``) is
not rasterised: the check takes its segment names from the node, and the child counts its voxels on the volume's
grid (a segment empty in a case is a warning there, empty in every case an error); any other segmentation is not rasterised either where its selected segments share one stored labelmap layer, or
lie in several layers on the volume's voxel grid: those layers are held as they are stored, without a copy
(``segsnapshot.snapshot_segmentation``; the voxels of each segment and of each overlap are counted on them)
and handed over the same way. Overlapping segments are
an error, unless ``later_wins``: then a later segment in the list wins where they overlap (organ, then lesion),
and ``CheckResult.nested`` records which segment was nested in which."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

import slicer
from CPCLSegmentLib.errors import InputError

from .handoff import original_segmentation
from .nodes import check_volume, find_segment_id, node_name, segment_masks, segment_names, segment_record
from .scene import LabeledCase, as_cases
from .segsnapshot import SegmentationSnapshot, snapshot_segmentation


class CheckFailed(InputError):
    """The input check found errors (``check`` holds every message); nothing was started or left behind."""

    def __init__(self, check: "CheckResult") -> None:
        super().__init__("; ".join(check.errors))
        self.check = check


@dataclass
class CheckResult:
    """Messages from ``check_inputs``: ``errors`` block training; ``warnings`` and ``infos`` are shown."""

    errors: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    infos: List[str] = field(default_factory=list)
    counts: Dict[str, Dict[str, Optional[int]]] = field(default_factory=dict)  # case -> segment -> voxels (None: in a file)
    files: Dict[int, str] = field(default_factory=dict)  # case index -> its original .seg.nrrd, handed to the child
    segments: List[str] = field(default_factory=list)  # the names checked, in order (a later one wins overlaps)
    records: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # name -> id, colour, terminology (first case)
    overlap: Dict[Tuple[str, str], int] = field(default_factory=dict)  # (earlier, later) -> voxels in both
    rasterised: int = 0  # segment rasterisations done (one per case)
    snapshots: int = 0  # segmentations handed over as their stored labelmap layer(s), held
    _pending: Dict[int, SegmentationSnapshot] = field(default_factory=dict, repr=False)  # until on_case takes it

    @property
    def ok(self) -> bool:
        return not self.errors

    def messages(self) -> List[Tuple[str, str]]:
        return [("error", m) for m in self.errors] + [("warning", m) for m in self.warnings] + [("info", m) for m in self.infos]

    def nested(self) -> Dict[str, List[str]]:
        """``{earlier: [later, ...]}`` where at least half of the later segment's voxels lay inside the earlier
        one (over all cases): the nesting the predictions are written back with."""
        total: Dict[str, int] = {}
        for counts in self.counts.values():
            for name, n in counts.items():
                total[name] = total.get(name, 0) + (n or 0)
        out: Dict[str, List[str]] = {}
        for (a, b), n in self.overlap.items():
            if total.get(b) and n >= 0.5 * total[b]:
                out.setdefault(a, []).append(b)
        return out

    def classes(self) -> List[Dict[str, Any]]:
        """The model's classes as the engine records them (background first)."""
        out: List[Dict[str, Any]] = [{"name": "background", "color": [0.0, 0.0, 0.0], "label_value": 0}]
        for i, name in enumerate(self.segments, start=1):
            r = self.records.get(name, {"name": name})
            c = {"name": name, "color": r.get("color", [0.5, 0.5, 0.5]), "label_value": i, "segment_id": r.get("id")}
            if r.get("terminology"):
                c["terminology"] = r["terminology"]
            out.append(c)
        return out


# ``on_case(index, case, masks, records, source)``: a case's masks (``(k, j, i)``, by name) and segment records, or
# masks None and ``source`` the .seg.nrrd the case's segmentation is handed over as (``CheckResult.files[index]``) or
# the snapshot of its labelmap layer to write (``segsnapshot.SegmentationSnapshot``)
OnCase = Callable[[int, LabeledCase, Optional[Dict[str, np.ndarray]], List[Dict[str, Any]],
                   Optional[Union[str, SegmentationSnapshot]]], None]


def check_inputs(labeled: Sequence[Any], segments: Optional[Sequence[str]] = None, unlabeled: Sequence[Any] = (),
                 partial_segments: bool = False, hold_out_last: bool = False, later_wins: bool = False,
                 on_case: Optional[OnCase] = None, on_unlabeled: Optional[Callable[[int, Any], None]] = None,
                 hand_over: bool = False) -> CheckResult:
    """What the panel shows before training: segment names across cases, empty and overlapping segments,
    geometry. Each case's segments are rasterised once (not at all when ``hand_over`` and the segmentation is
    unchanged since it was read from a ``.seg.nrrd``: ``CheckResult.files``). Writes nothing: while no error was
    found, ``on_case`` gets each case's masks and ``on_unlabeled(index, volume)`` each unlabeled volume
    (``export.export_inputs``)."""
    res = CheckResult()
    cases = as_cases(labeled)
    if not cases:
        res.errors.append("add at least one labeled case (a volume and its segmentation)")
        return res
    if hold_out_last and len(cases) < 2:
        res.errors.append("holding out a case for validation needs at least two labeled cases")
    names = list(segments) if segments else []
    if not names:  # every case's segments, in order of first appearance; each case then says which it lacks
        for case in cases:
            if case.segmentation is not None and case.segmentation.IsA("vtkMRMLSegmentationNode"):
                names += [n for n in segment_names(case.segmentation) if n not in names]
    res.segments = names
    if not names:
        res.errors.append("select at least one segment to learn")
    seen_pairs: set = set()
    for n, case in enumerate(cases, start=1):
        masks = _check_case(res, n, case, names, seen_pairs, partial_segments, later_wins, hand_over)
        snap = res._pending.pop(n - 1, None)
        if (masks is not None or n - 1 in res.files or snap is not None) and on_case is not None and not res.errors:
            found = masks if masks is not None else res.counts[_case_label(n, case)]
            source = snap if snap is not None else res.files.get(n - 1)
            on_case(n - 1, case, masks, [res.records[nm] for nm in names if nm in found], source)
        del masks, snap
    _check_segments_overall(res, cases, names, later_wins)
    _check_unlabeled(res, cases, unlabeled, on_unlabeled)
    return res


def _check_case(res: CheckResult, n: int, case: LabeledCase, names: Sequence[str], seen_pairs: set, partial_segments: bool,
                later_wins: bool, hand_over: bool = False) -> Optional[Dict[str, np.ndarray]]:
    """Checks the ``n``-th case (1-based) into ``res``; its segment masks, or None when it cannot be read or is
    handed over as its file (``res.files``)."""
    label = _case_label(n, case)
    try:
        check_volume(case.volume, f"volume of case {n}")
    except InputError as e:
        res.errors.append(str(e))
        return None
    if case.segmentation is None or not case.segmentation.IsA("vtkMRMLSegmentationNode"):
        res.errors.append(f"case {n}: no segmentation selected for volume '{node_name(case.volume)}'")
        return None
    key = (case.volume.GetID(), case.segmentation.GetID())
    if key in seen_pairs:
        res.warnings.append(f"{label} is listed twice")
    seen_pairs.add(key)
    ref = case.segmentation.GetNodeReference(case.segmentation.GetReferenceImageGeometryReferenceRole())
    if ref is not None and ref is not case.volume:
        res.warnings.append(f"segmentation '{node_name(case.segmentation)}' was drawn on volume '{node_name(ref)}' but is paired "
                            f"with '{node_name(case.volume)}': check the pair (it is resampled onto '{node_name(case.volume)}')")
    source = original_segmentation(case.segmentation, names) if hand_over else None
    snap = snapshot_segmentation(case.segmentation, names, case.volume) if hand_over and source is None else None
    if source is not None or snap is not None:  # the child reads the file (or the layer's copy): no rasterising here
        if source is not None:
            res.files[n - 1] = source
        else:
            res._pending[n - 1], res.snapshots = snap, res.snapshots + 1
        found = [name for name in names if find_segment_id(case.segmentation, name) is not None]
        masks, counts = None, {name: None if snap is None or snap.counts is None else snap.counts[name] for name in found}
    else:
        masks = segment_masks(case.volume, case.segmentation, names)  # the one rasterisation of this case
        res.rasterised += 1
        found, counts = list(masks), {name: int(np.count_nonzero(m)) for name, m in masks.items()}
    res.counts[label] = counts
    for name in found:
        if name not in res.records:
            res.records[name] = segment_record(case.segmentation, find_segment_id(case.segmentation, name))
    _check_missing_or_empty(res, case, names, found, counts, partial_segments)
    if masks is not None:
        _check_overlaps(res, case, names, masks, counts, later_wins)
    for (a, b), both in (snap.overlaps.items() if snap is not None else ()):  # several layers: found on the held layers
        _overlap(res, case, a, b, both, later_wins)
    if case.sparse:
        res.infos.append(f"{label}: only the painted slices count as labeled")
    return masks


def _case_label(n: int, case: LabeledCase) -> str:
    return f"case {n} ('{node_name(case.volume)}' + '{node_name(case.segmentation)}')"


def _check_missing_or_empty(res: CheckResult, case: LabeledCase, names: Sequence[str], found: Sequence[str],
                            counts: Dict[str, Optional[int]], partial_segments: bool) -> None:
    what = "not annotated there (partial segments)" if partial_segments else "absent (background)"
    available = segment_names(case.segmentation)
    for name in names:
        if name not in found:
            res.warnings.append(f"segment '{name}' is missing from '{node_name(case.segmentation)}' (it has: "
                                f"{', '.join(available) or 'no segments'}): treated as {what}")
        elif counts[name] == 0:
            sid = find_segment_id(case.segmentation, name)
            if _segment_has_voxels(case.segmentation, sid):
                res.errors.append(f"segment '{name}' of '{node_name(case.segmentation)}' does not overlap volume "
                                  f"'{node_name(case.volume)}': are they from the same scan?")
            else:
                res.warnings.append(f"segment '{name}' is empty in '{node_name(case.segmentation)}': treated as {what}")


def _check_overlaps(res: CheckResult, case: LabeledCase, names: Sequence[str], masks: Dict[str, np.ndarray],
                    counts: Dict[str, Optional[int]], later_wins: bool) -> None:
    present = [nm for nm in names if counts.get(nm)]  # counts of rasterised masks: all known
    if len(present) > 1:  # one pass to see whether anything overlaps at all; pairs only then
        layered = np.zeros(masks[present[0]].shape, dtype=np.uint8)
        for nm in present:
            layered += masks[nm]
        if not (layered > 1).any():
            present = []
        del layered
    for i, a in enumerate(present):
        for b in present[i + 1:]:
            both = int(np.count_nonzero(masks[a] & masks[b]))
            if both:
                _overlap(res, case, a, b, both, later_wins)


def _overlap(res: CheckResult, case: LabeledCase, a: str, b: str, both: int, later_wins: bool) -> None:
    res.overlap[(a, b)] = res.overlap.get((a, b), 0) + both
    if not later_wins:
        res.errors.append(f"segments '{a}' and '{b}' overlap in '{node_name(case.segmentation)}' ({both} voxels): a voxel "
                          "can belong to one learned segment only; deselect one of them, or let the later segment in "
                          "the list win where they overlap (organ, then lesion)")


def _check_segments_overall(res: CheckResult, cases: Sequence[LabeledCase], names: Sequence[str], later_wins: bool) -> None:
    """Over all cases: which segment won overlaps, segments with nothing to learn from, different spacings."""
    if later_wins:
        for (a, b), n in sorted(res.overlap.items()):
            res.infos.append(f"'{b}' overlaps '{a}' ({n} voxels): the later segment, '{b}', wins there")
    for name in names:
        if res.counts and all(name not in c for c in res.counts.values()):
            res.errors.append(f"segment '{name}' is in none of the labeled segmentations: nothing to learn it from")
        elif res.counts and all(c.get(name, 0) == 0 for c in res.counts.values()):
            res.errors.append(f"segment '{name}' is empty in every labeled case: nothing to learn it from")
    spacings = [tuple(round(s, 2) for s in c.volume.GetSpacing()) for c in cases if c.volume is not None]
    if len(set(spacings)) > 1:
        res.infos.append("the volumes have different voxel spacings " + ", ".join(str(list(s)) for s in sorted(set(spacings)))
                         + ": they are resampled to one spacing for training")


def _check_unlabeled(res: CheckResult, cases: Sequence[LabeledCase], unlabeled: Sequence[Any],
                     on_unlabeled: Optional[Callable[[int, Any], None]]) -> None:
    labeled_ids = {c.volume.GetID() for c in cases if c.volume is not None}
    both = [node_name(v) for v in unlabeled or [] if v is not None and v.GetID() in labeled_ids]
    if both:
        res.infos.append(f"{', '.join(both)} also listed as unlabeled: used in both streams")
    if not unlabeled:
        res.infos.append("no unlabeled volumes: the model learns from the labeled cases only")
    for n, volume in enumerate(unlabeled or []):
        try:
            check_volume(volume, "unlabeled volume")
        except InputError as e:
            res.errors.append(str(e))
            continue
        if on_unlabeled is not None and not res.errors:
            on_unlabeled(n, volume)


def _segment_has_voxels(segmentation_node: Any, segment_id: Optional[str]) -> bool:
    if segment_id is None:
        return False
    image = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(segmentation_node, segment_id, image):
        return False
    scalars = image.GetPointData().GetScalars()
    if scalars is None:
        return False
    lo, hi = scalars.GetRange()
    return hi > 0
