"""A segmentation made or edited in the scene, handed to the child without rasterising it on the GUI thread.

At the Train click a labeled segmentation that is not unchanged since it was read (``handoff.original_segmentation``)
is read on the GUI thread only as far as it must be: each binary labelmap layer that holds a selected segment is
captured as it is stored (its own grid and extent: no resampling), without a copy: the ``vtkOrientedImageData`` and
its scalars array are kept, with a zero-copy numpy view of the voxels and the layer's modification time
(``vtkObject::GetMTime``, which includes its point data and their arrays), as ``livevolume`` captures a volume; so are
each selected segment's label value, layer, name, colour, ID and terminology (``snapshot_segmentation``). The
``.seg.nrrd`` is written later, from a worker thread (``write_segmentation_snapshot``), and the child reads it as it
reads a segmentation's own file: segments mapped by name, the layer resampled (nearest neighbour) onto the volume's grid.

Segments in several layers may overlap. They are captured only where every such layer lies on the volume's voxel
grid; then each segment's voxels inside the volume and the voxels each pair shares are counted on the views at the
click (what rasterising onto that grid counts), so the input check refuses or settles the overlaps as it does for
rasterised segments, and the worker merges the layers into one (``merged``: a later selected segment wins where they
overlap, as the GUI-thread export writes them).

Once the file is written the GUI thread compares the node with what was captured (``unchanged``: the same layers,
scalars arrays and modification times, the same segments, label values and records, the same volume grid) before
the child starts (``hand_over``, ``handoff.Handoff.verify``): a segmentation changed meanwhile is captured again and
written again; where its counts or overlaps changed too (the check's verdict might), the job fails asking for a new
start instead.

The snapshot is refused (None: the segmentation is rasterised on the GUI thread, as before) when the source
representation is not a binary labelmap, the node has a parent transform, the selected segments lie in several
layers not on the volume's grid, or none of them has a voxel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

from CPCLSegmentLib.errors import InputError

from .handoff import Handoff, write_seg_nrrd_kji, write_then_rename
from .nodes import RAS_TO_LPS, find_segment_id, matrix_to_array, node_name, segment_record, world_ijk_to_ras

WRITABLE = ("uint8", "int8", "uint16", "int16", "uint32", "int32")


@dataclass
class SegmentationSnapshot:
    """Labelmap layers of a segmentation (each a zero-copy numpy ``(k, j, i)`` view over the layer's extent), the
    IJK-to-RAS of the first voxel of ``voxels`` (the first layer), and the selected segments (``id``, ``name``,
    ``color``, ``terminology``, ``labelValue``, ``layer``: an index into ``layers``). Several layers: ``firsts`` holds
    each layer's first voxel as an index (i, j, k) of the volume, ``counts`` each segment's voxels inside the volume and
    ``overlaps`` the voxels each pair of them shares there (found on the views, as rasterising would find them).
    ``captured``: each layer's image data, scalars array (kept alive) and modification time; ``grid``: the volume's
    IJK-to-RAS and dimensions when it was captured (None without a volume)."""

    voxels: np.ndarray
    ijk_to_ras: np.ndarray
    segments: List[Dict[str, Any]] = field(default_factory=list)
    name: str = ""
    layers: List[np.ndarray] = field(default_factory=list)
    firsts: List[Tuple[int, int, int]] = field(default_factory=list)
    counts: Optional[Dict[str, int]] = None
    overlaps: Dict[Tuple[str, str], int] = field(default_factory=dict)
    node: Any = None
    names: List[str] = field(default_factory=list)
    volume: Any = None
    captured: List[Any] = field(default_factory=list)
    grid: Optional[Tuple[np.ndarray, Tuple[int, int, int]]] = None


def _layer_view(image: Any) -> Optional[Tuple[np.ndarray, np.ndarray, Tuple[int, int, int], Tuple[Any, Any, int]]]:
    """A zero-copy view of a layer's voxels (numpy ``(k, j, i)``), its index-to-RAS matrix, its first index and what
    ``unchanged`` compares (the image, its scalars, its modification time); None when the layer is not a one-component
    integer labelmap."""
    if image is None or not image.IsA("vtkOrientedImageData") or image.GetNumberOfScalarComponents() != 1:
        return None
    extent = image.GetExtent()
    scalars = image.GetPointData().GetScalars()
    shape = tuple(extent[2 * a + 1] - extent[2 * a] + 1 for a in (2, 1, 0))
    if scalars is None or min(shape) <= 0 or scalars.GetNumberOfTuples() != int(np.prod(shape)):
        return None
    voxels = numpy_support.vtk_to_numpy(scalars)
    if voxels.dtype.name not in WRITABLE:
        return None
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)  # index (with the extent's offset) -> RAS
    return voxels.reshape(shape), matrix_to_array(m), (extent[0], extent[2], extent[4]), (image, scalars, int(image.GetMTime()))


def snapshot_segmentation(node: Any, names: Sequence[str], volume: Any = None) -> Optional[SegmentationSnapshot]:
    """The layer(s) holding the selected segments ``names`` of ``node``, captured without a copy, or None where the
    snapshot cannot stand for the node (see the module's docstring). Segments in several layers need ``volume``, whose
    voxel grid the layers must share. Reads the node: call on the GUI thread."""
    if node is None or node.GetParentTransformNode() is not None:
        return None
    segmentation = node.GetSegmentation()
    labelmap = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if segmentation.GetSourceRepresentationName() != labelmap:
        return None
    ids = [sid for sid in (find_segment_id(node, name) for name in names) if sid is not None]
    order = sorted({segmentation.GetLayerIndex(sid) for sid in ids})
    if not order or order[0] < 0 or (len(order) > 1 and volume is None):
        return None
    copies = [_layer_view(segmentation.GetLayerDataObject(n, labelmap)) for n in order]
    if any(c is None for c in copies):
        return None
    segments = []
    for sid in ids:
        record = segment_record(node, sid)
        record["labelValue"] = int(segmentation.GetSegment(sid).GetLabelValue())
        record["layer"] = order.index(segmentation.GetLayerIndex(sid))
        segments.append(record)
    voxels, m, first, _ = copies[0]
    ijk_to_ras = m.copy()
    ijk_to_ras[:3, 3] += m[:3, :3] @ np.array(first, dtype=float)
    snap = SegmentationSnapshot(voxels, ijk_to_ras, segments, node_name(node), [c[0] for c in copies], [c[2] for c in copies],
                                node=node, names=list(names), volume=volume, captured=[c[3] for c in copies])
    if volume is not None:
        snap.grid = (matrix_to_array(world_ijk_to_ras(volume)), tuple(volume.GetImageData().GetDimensions()))
    if len(order) > 1:
        if not all(np.allclose(c[1], snap.grid[0], atol=1e-4) for c in copies):
            return None  # not the volume's grid: the GUI thread resamples (and settles overlaps) as before
        _count_on_the_volume(snap, snap.grid[1])
        painted = any(snap.counts.values())  # type: ignore[union-attr]
    else:
        painted = any(np.any(voxels == s["labelValue"]) for s in segments)
    return snap if painted else None  # nothing painted: the GUI-thread check says which segment is empty


def _count_on_the_volume(snap: SegmentationSnapshot, dims: Sequence[int]) -> None:
    """Each segment's voxels inside the volume and the voxels each pair of them (in different layers) shares there."""
    boxes = []
    for voxels, first in zip(snap.layers, snap.firsts):
        lo = [max(0, first[a]) for a in (2, 1, 0)]
        hi = [min(dims[a], first[a] + voxels.shape[2 - a]) for a in (2, 1, 0)]
        boxes.append((lo, hi))

    def mask(s: Dict[str, Any], lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
        first = snap.firsts[s["layer"]]
        at = [lo[0] - first[2], lo[1] - first[1], lo[2] - first[0]]
        return snap.layers[s["layer"]][at[0]:at[0] + hi[0] - lo[0], at[1]:at[1] + hi[1] - lo[1], at[2]:at[2] + hi[2] - lo[2]] == s["labelValue"]

    snap.counts, masks = {}, {}  # each segment's mask over its layer's box, made once
    for s in snap.segments:
        lo, hi = boxes[s["layer"]]
        masks[s["name"]] = mask(s, lo, hi) if all(h > l for l, h in zip(lo, hi)) else None
        snap.counts[s["name"]] = 0 if masks[s["name"]] is None else int(np.count_nonzero(masks[s["name"]]))

    def part(s: Dict[str, Any], lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
        own = boxes[s["layer"]][0]
        return masks[s["name"]][lo[0] - own[0]:hi[0] - own[0], lo[1] - own[1]:hi[1] - own[1], lo[2] - own[2]:hi[2] - own[2]]

    for n, a in enumerate(snap.segments):
        for b in snap.segments[n + 1:]:
            if a["layer"] == b["layer"] or not snap.counts[a["name"]] or not snap.counts[b["name"]]:
                continue
            lo = [max(x, y) for x, y in zip(boxes[a["layer"]][0], boxes[b["layer"]][0])]
            hi = [min(x, y) for x, y in zip(boxes[a["layer"]][1], boxes[b["layer"]][1])]
            both = int(np.count_nonzero(part(a, lo, hi) & part(b, lo, hi))) if all(h > l for l, h in zip(lo, hi)) else 0
            if both:
                snap.overlaps[(a["name"], b["name"])] = both


def merged(snap: SegmentationSnapshot) -> Tuple[np.ndarray, np.ndarray, List[Dict[str, Any]]]:
    """The snapshot as one layer (any thread): its voxels over the layers' common box, the IJK-to-RAS of its first
    voxel, and its segments with label values 1, 2, ... in the selected order (a later one wins where they overlap,
    as the GUI-thread export writes them); one layer is returned as it is."""
    if len(snap.layers) <= 1:
        return snap.voxels, snap.ijk_to_ras, snap.segments
    lo = [min(f[a] for f in snap.firsts) for a in range(3)]
    hi = [max(f[a] + v.shape[2 - a] for f, v in zip(snap.firsts, snap.layers)) for a in range(3)]
    out = np.zeros((hi[2] - lo[2], hi[1] - lo[1], hi[0] - lo[0]), dtype=np.uint8 if len(snap.segments) < 256 else np.uint16)
    segments = []
    for value, s in enumerate(snap.segments, start=1):
        voxels, first = snap.layers[s["layer"]], snap.firsts[s["layer"]]
        at = [first[2] - lo[2], first[1] - lo[1], first[0] - lo[0]]
        region = out[at[0]:at[0] + voxels.shape[0], at[1]:at[1] + voxels.shape[1], at[2]:at[2] + voxels.shape[2]]
        region[voxels == s["labelValue"]] = value
        segments.append(dict(s, labelValue=value, layer=0))
    voxels, first = snap.layers[0], snap.firsts[0]
    ijk_to_ras = snap.ijk_to_ras.copy()
    ijk_to_ras[:3, 3] += snap.ijk_to_ras[:3, :3] @ (np.array(lo, dtype=float) - np.array(first, dtype=float))
    return out, ijk_to_ras, segments


def write_segmentation_snapshot(snap: SegmentationSnapshot, path: str, compression_level: int = 1) -> str:
    """Writes the snapshot as a one-layer ``.seg.nrrd`` at ``path`` from any thread (from the views: ``merged`` copies
    several layers into one; one layer goes as it is), atomically (a partial file never
    has the final name); the voxels keep their label values, the segments their names, colours, IDs, terminology."""
    voxels, ijk_to_ras, records = merged(snap)
    shape = voxels.shape
    segments = []
    for s in records:
        seg = {"id": s.get("id") or f"Segment_{len(segments) + 1}", "name": s["name"],
               "color": [float(c) for c in s.get("color", (0.5, 0.5, 0.5))][:3], "labelValue": s["labelValue"], "layer": 0,
               "status": "completed", "extent": [0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1]}
        if s.get("terminology"):  # the node's TerminologyEntry tag string (nodes.segment_record)
            seg["tags"] = {"TerminologyEntry": s["terminology"]}
        segments.append(seg)
    header = {"ijkToLPS": RAS_TO_LPS @ ijk_to_ras, "segments": segments, "containedRepresentationNames": ["Binary labelmap"],
              "masterRepresentation": "Binary labelmap", "referenceImageExtentOffset": [0, 0, 0]}
    partial = str(path)[: -len(".seg.nrrd")] + ".partial.seg.nrrd"
    return write_then_rename(str(path), partial, lambda p: write_seg_nrrd_kji(p, header, voxels, compression_level),
                             f"segmentation '{snap.name}'")


def unchanged(snap: SegmentationSnapshot) -> bool:
    """Whether the node still holds what ``snap`` was captured from (GUI thread): the same selected segments, label
    values, layers and records, each layer the same image data with the same scalars array and modification time, no
    parent transform, and the volume (several layers) on the same grid."""
    node = snap.node
    if node is None or node.GetParentTransformNode() is not None:
        return False
    segmentation = node.GetSegmentation()
    labelmap = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    ids = [sid for sid in (find_segment_id(node, name) for name in snap.names) if sid is not None]
    if ids != [s["id"] for s in snap.segments] or segmentation.GetSourceRepresentationName() != labelmap:
        return False
    order = sorted({segmentation.GetLayerIndex(sid) for sid in ids})
    for sid, s in zip(ids, snap.segments):
        record = dict(segment_record(node, sid), labelValue=int(segmentation.GetSegment(sid).GetLabelValue()),
                      layer=order.index(segmentation.GetLayerIndex(sid)))
        if record != s:
            return False
    for n, (image, scalars, mtime) in zip(order, snap.captured):
        now = segmentation.GetLayerDataObject(n, labelmap)
        if now is not image or now.GetPointData().GetScalars() is not scalars or int(now.GetMTime()) != mtime:
            return False
    return snap.grid is None or (np.array_equal(matrix_to_array(world_ijk_to_ras(snap.volume)), snap.grid[0])
                                 and tuple(snap.volume.GetImageData().GetDimensions()) == snap.grid[1])


def hand_over(handoff: Handoff, snap: SegmentationSnapshot, path: str) -> None:
    """Queues the snapshot's write to ``path`` (worker thread) and has ``handoff.verify`` (GUI thread, before the
    child starts) compare it with its node: a segmentation changed since is captured and written again, with the same
    voxel and overlap counts (the check's verdict), else the job fails asking for a new start."""
    current = [snap]

    def write() -> str:
        return write_segmentation_snapshot(current[0], path)

    def check() -> Optional[str]:
        if unchanged(current[0]):
            return None
        old = current[0]
        new = snapshot_segmentation(old.node, old.names, old.volume)
        if new is None or (new.counts, new.overlaps) != (old.counts, old.overlaps) or len(new.layers) != len(old.layers):
            raise InputError(f"segmentation '{old.name}' changed after the inputs were checked: check them and start again")
        current[0] = new
        handoff.later(write)
        return old.name

    handoff.later(write)
    handoff.watch(check)
