"""A segmentation made or edited in the scene, handed to the child without rasterising it on the GUI thread.

At the Train click a labeled segmentation that is not unchanged since it was read (``handoff.original_segmentation``)
is read on the GUI thread only as far as it must be: the one binary labelmap layer that holds the selected segments
is copied as it is stored (its own grid and extent: no resampling, no per-segment work) with each selected segment's
label value, name, colour, ID and terminology (``snapshot_segmentation``). The copy is written as a ``.seg.nrrd``
later, from a worker thread (``write_segmentation_snapshot``), and the child reads it as it reads a segmentation's
own file: segments mapped by name, the layer resampled (nearest neighbour) onto the volume's grid.

The snapshot is refused (None: the segmentation is rasterised on the GUI thread, as before) when the source
representation is not a binary labelmap, the node has a parent transform, the selected segments lie in more than
one layer (they may overlap: the GUI-thread check settles or refuses that), or none of them has a voxel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

from .handoff import write_seg_nrrd_kji, write_then_rename
from .nodes import RAS_TO_LPS, find_segment_id, matrix_to_array, node_name, segment_record

WRITABLE = ("uint8", "int8", "uint16", "int16", "uint32", "int32")


@dataclass
class SegmentationSnapshot:
    """One labelmap layer of a segmentation (a copy, numpy ``(k, j, i)`` over the layer's extent), the IJK-to-RAS of
    its first voxel, and the selected segments in it (``id``, ``name``, ``color``, ``terminology``, ``labelValue``)."""

    voxels: np.ndarray
    ijk_to_ras: np.ndarray
    segments: List[Dict[str, Any]] = field(default_factory=list)
    name: str = ""


def snapshot_segmentation(node: Any, names: Sequence[str]) -> Optional[SegmentationSnapshot]:
    """A copy of the layer holding the selected segments ``names`` of ``node``, or None where the snapshot cannot stand
    for the node (see the module's docstring). Reads the node: call on the GUI thread."""
    if node is None or node.GetParentTransformNode() is not None:
        return None
    segmentation = node.GetSegmentation()
    labelmap = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if segmentation.GetSourceRepresentationName() != labelmap:
        return None
    ids = [sid for sid in (find_segment_id(node, name) for name in names) if sid is not None]
    layers = {segmentation.GetLayerIndex(sid) for sid in ids}
    if len(layers) != 1 or min(layers) < 0:
        return None
    image = segmentation.GetLayerDataObject(layers.pop(), labelmap)
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
    segments = []
    for sid in ids:
        record = segment_record(node, sid)
        record["labelValue"] = int(segmentation.GetSegment(sid).GetLabelValue())
        segments.append(record)
    if not any(np.any(voxels == s["labelValue"]) for s in segments):
        return None  # nothing painted: the GUI-thread check says which segment is empty
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)  # index (with the extent's offset) -> RAS
    ijk_to_ras = matrix_to_array(m)
    ijk_to_ras[:3, 3] += ijk_to_ras[:3, :3] @ np.array([extent[0], extent[2], extent[4]], dtype=float)
    return SegmentationSnapshot(voxels.reshape(shape).copy(), ijk_to_ras, segments, node_name(node))


def write_segmentation_snapshot(snap: SegmentationSnapshot, path: str, compression_level: int = 1) -> str:
    """Writes the snapshot as a one-layer ``.seg.nrrd`` at ``path`` from any thread, atomically (a partial file never
    has the final name); the voxels keep their label values, the segments their names, colours, IDs, terminology."""
    shape = snap.voxels.shape
    segments = []
    for s in snap.segments:
        seg = {"id": s.get("id") or f"Segment_{len(segments) + 1}", "name": s["name"],
               "color": [float(c) for c in s.get("color", (0.5, 0.5, 0.5))][:3], "labelValue": s["labelValue"], "layer": 0,
               "status": "completed", "extent": [0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1]}
        if s.get("terminology"):  # the node's TerminologyEntry tag string (nodes.segment_record)
            seg["tags"] = {"TerminologyEntry": s["terminology"]}
        segments.append(seg)
    header = {"ijkToLPS": RAS_TO_LPS @ snap.ijk_to_ras, "segments": segments, "containedRepresentationNames": ["Binary labelmap"],
              "masterRepresentation": "Binary labelmap", "referenceImageExtentOffset": [0, 0, 0]}
    partial = str(path)[: -len(".seg.nrrd")] + ".partial.seg.nrrd"
    return write_then_rename(str(path), partial, lambda p: write_seg_nrrd_kji(p, header, snap.voxels, compression_level),
                             f"segmentation '{snap.name}'")
