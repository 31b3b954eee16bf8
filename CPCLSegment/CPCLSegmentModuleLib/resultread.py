"""A segmentation result (``.seg.nrrd``) read on a worker thread, so that the GUI thread only builds the node.

``read_result`` (any thread) reads the file with pynrrd and makes what ``vtkMRMLSegmentationStorageNode`` makes of it
(``ReadBinaryLabelmapRepresentation``): one ``vtkOrientedImageData`` per layer, over the union of its segments'
extents (``SegmentN_Extent``) shifted by ``Segmentation_ReferenceImageExtentOffset``, with the file's geometry; and one
``vtkSegment`` per segment with its name, colour, label value, tags and the auto-generated flags, sharing its layer's
image. Neither is in a scene. ``add_segments`` (GUI thread) puts the segments into a segmentation node, as the
storage node does (``AddSegment``, the conversion parameters, the representations the file lists). Files this does
not read as Slicer would (no segment list, floating-point voxels, not 3-D) give None: the caller reads those with the
storage node, on the GUI thread, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

from .nodes import RAS_TO_LPS

LABELMAP = "Binary labelmap"  # vtkSegmentationConverter::GetSegmentationBinaryLabelmapRepresentationName()
INTEGER = ("uint8", "int8", "uint16", "int16", "uint32", "int32")


@dataclass
class ReadResult:
    """A result file as the storage node would read it: its segments (``(id, vtkSegment)``, in the file's order), the
    conversion parameters and the representation names it lists."""

    path: str
    segments: List[Any] = field(default_factory=list)
    conversion_parameters: str = ""
    representations: List[str] = field(default_factory=list)


def _ints(text: str, n: int, default: List[int]) -> List[int]:
    try:
        values = [int(v) for v in str(text).split()]
    except ValueError:
        return default
    return values[:n] if len(values) >= n else default


def _layer_image(voxels: np.ndarray, extent: List[int], offset: List[int], ijk_to_ras: np.ndarray) -> Any:
    """The layer's image over ``extent`` (file indices; voxels outside the file are 0), shifted by ``offset``."""
    image = slicer.vtkOrientedImageData()
    shifted = [extent[a] + offset[a // 2] for a in range(6)]
    if any(extent[2 * a] > extent[2 * a + 1] for a in range(3)):
        image.SetExtent(0, -1, 0, -1, 0, -1)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    else:
        k, j, i = voxels.shape
        out = np.zeros((extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1), dtype=voxels.dtype)
        lo = [max(0, extent[4]), max(0, extent[2]), max(0, extent[0])]
        hi = [min(k, extent[5] + 1), min(j, extent[3] + 1), min(i, extent[1] + 1)]
        if all(h > l for l, h in zip(lo, hi)):
            out[lo[0] - extent[4]:hi[0] - extent[4], lo[1] - extent[2]:hi[1] - extent[2], lo[2] - extent[0]:hi[2] - extent[0]] = \
                voxels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        image.SetExtent(*shifted)
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(out.ravel(), deep=True))
    shift = np.eye(4)
    shift[:3, 3] = -np.asarray(offset, dtype=float)
    m = vtk.vtkMatrix4x4()
    for r, row in enumerate(ijk_to_ras @ shift):
        for c, value in enumerate(row):
            m.SetElement(r, c, float(value))
    image.SetImageToWorldMatrix(m)
    return image


def read_result(path: str) -> Optional[ReadResult]:
    """The segments of the ``.seg.nrrd`` at ``path``, made as the storage node makes them (any thread), or None where
    the storage node must read it (see the module's docstring)."""
    try:
        import nrrd  # pynrrd, installed with slicerio
    except ImportError:
        return None
    data, header = nrrd.read(str(path), index_order="C")
    kinds = [str(k) for k in header.get("kinds", [])]
    layered = len(kinds) == 4 and kinds.count("list") + kinds.count("vector") == 1
    if data.dtype.name not in INTEGER or not (data.ndim == 3 or (data.ndim == 4 and layered)) or "Segment0_ID" not in header:
        return None
    if data.ndim == 4:  # the layer axis first: (layer, k, j, i)
        nrrd_axis = next(a for a, k in enumerate(kinds) if k in ("list", "vector"))
        data = np.moveaxis(data, 3 - nrrd_axis, 0)
    else:
        data = data[np.newaxis]
    space = str(header.get("space", "left-posterior-superior")).lower()
    directions = np.asarray([d for d in np.asarray(header["space directions"], dtype=float) if np.all(np.isfinite(d))])
    ijk_to_space = np.eye(4)
    ijk_to_space[:3, :3] = directions.T
    ijk_to_space[:3, 3] = np.asarray(header.get("space origin", [0, 0, 0]), dtype=float)
    ijk_to_ras = ijk_to_space if space in ("right-anterior-superior", "ras") else RAS_TO_LPS @ ijk_to_space
    offset = _ints(header.get("Segmentation_ReferenceImageExtentOffset", "0 0 0"), 3, [0, 0, 0])
    full = [0, data.shape[3] - 1, 0, data.shape[2] - 1, 0, data.shape[1] - 1]
    count = 0
    while f"Segment{count}_ID" in header:
        count += 1
    layer_of = [int(header.get(f"Segment{n}_Layer", n)) for n in range(count)]
    result = ReadResult(str(path), conversion_parameters=str(header.get("Segmentation_ConversionParameters", "")),
                        representations=[r for r in str(header.get("Segmentation_ContainedRepresentationNames", "")).split("|") if r])
    images: Dict[int, Any] = {}
    for n in range(count):
        layer = layer_of[n]
        if layer >= data.shape[0]:
            return None
        if layer not in images:
            extent = [0, -1, 0, -1, 0, -1]
            for m in (m for m in range(count) if layer_of[m] == layer):
                if f"Segment{m}_Extent" not in header:
                    extent = full
                    break
                extent = _union(extent, _ints(header[f"Segment{m}_Extent"], 6, [0, -1, 0, -1, 0, -1]))
            images[layer] = _layer_image(data[layer], extent, offset, ijk_to_ras)
        result.segments.append((str(header[f"Segment{n}_ID"]), _segment(header, n, images[layer])))
    return result


def _union(a: List[int], b: List[int]) -> List[int]:
    if any(b[2 * x] > b[2 * x + 1] for x in range(3)):
        return a
    if any(a[2 * x] > a[2 * x + 1] for x in range(3)):
        return list(b)
    return [min(a[x], b[x]) if x % 2 == 0 else max(a[x], b[x]) for x in range(6)]


def _segment(header: Dict[str, Any], n: int, image: Any) -> Any:
    segment = slicer.vtkSegment()
    key = lambda name: f"Segment{n}_{name}"  # noqa: E731
    color = header.get(key("Color"), header.get(key("DefaultColor")))
    if color is not None:
        values = [float(v) for v in str(color).split()] + [0.5, 0.5, 0.5]
        segment.SetColor(*values[:3])
    for tag in str(header.get(key("Tags"), "")).split("|"):
        if ":" in tag:
            name, value = tag.split(":", 1)
            segment.SetTag(name, value)
    for flag, setter in (("NameAutoGenerated", segment.SetNameAutoGenerated), ("ColorAutoGenerated", segment.SetColorAutoGenerated)):
        if key(flag) in header:
            setter(str(header[key(flag)]) == "1")
    if key("LabelValue") in header:
        segment.SetLabelValue(int(header[key("LabelValue")]))
    segment.SetName(str(header.get(key("Name"), header[key("ID")])))
    segment.AddRepresentation(LABELMAP, image)
    return segment


def add_segments(node: Any, result: ReadResult) -> None:
    """Replaces ``node``'s segments with the ones read (GUI thread), as ``vtkMRMLSegmentationStorageNode::ReadData``."""
    was = node.StartModify()
    try:
        segmentation = node.GetSegmentation()
        if result.conversion_parameters:
            segmentation.DeserializeConversionParameters(result.conversion_parameters)
        if segmentation.GetNumberOfSegments() > 0:
            segmentation.RemoveAllSegments()
        segmentation.SetSourceRepresentationName(LABELMAP)
        for sid, segment in result.segments:
            segmentation.AddSegment(segment, sid)
        for name in result.representations:
            if name != LABELMAP:
                segmentation.CreateRepresentation(name)
    finally:
        node.EndModify(was)
