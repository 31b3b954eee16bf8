"""Qt-free logic of the CPCLSegment Slicer module: nodes <-> arrays/files, the CLI jobs, results -> new nodes.

Imports ``slicer`` and ``vtk`` but never ``qt``, ``ctk`` or ``slicer.modules``/``slicer.app``, so the same
code runs inside the Slicer application and in **slicer-core** (PyPI: Slicer's MRML scene and segmentation
logic without a GUI), where pytest exercises it. ``CPCLSegmentLogic`` in ``CPCLSegment.py`` is a thin
wrapper around ``LogicCore``.

Flow (the engine does the work, in a child process; see ``CPCLSegmentLib/jobs.py``):

- **Export** (``export_volume`` / ``export_segmentation``): each volume is written as ``.nrrd`` with its
  IJK-to-RAS geometry; a volume under a linear transform is written *hardened* (world coordinates) from an
  unscened copy, the user's node is untouched; a non-linear transform is refused with a message. Each
  selected segment is rasterised onto the **volume's** grid with
  ``vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry(...,
  vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, ...)`` (the segmentation's own transform and grid are
  resampled away) and written as a ``.seg.nrrd`` (slicerio) keeping segment names, colours, IDs and the
  terminology tag.
- **Train / segment / rank**: ``cpcl-segment`` command lines built here, run by ``jobs.Job``;
  ``wait=True`` blocks (console), ``wait=False`` returns a ``Run`` that the widget polls from a QTimer.
- **Import**: results become **new** segmentation nodes named after the volume, with the model's segment
  names and colours, referenced to the volume geometry (``SetReferenceImageGeometryParameterFromVolumeNode``
  + node reference), placed beside the volume in the subject hierarchy, with a display node.
  Input nodes are never modified.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer
from CPCLSegmentLib import jobs
from CPCLSegmentLib.errors import Cancelled, InputError

Event = Dict[str, Any]
OnEvent = Optional[Callable[[Event], None]]

# Defaults that finish a useful run on a laptop CPU in minutes and fit an 8 GB GPU (the CLI plans the patch
# size from the free memory of the device when it is left on "auto").
DEFAULT_ITERATIONS = 300
DEVICES = ("auto", "cpu", "cuda", "mps")
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
HEAT_COLOR_NODE_IDS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeIron")

# Every slicer.* name this file calls (checked against Slicer 5.8's sources; ``missing_slicer_api()`` checks the
# running Slicer / slicer-core, in pytest and in the in-Slicer CPCLSegmentGlueTest).
SLICER_API = (
    "vtkMRMLScalarVolumeNode.GetIJKToRASMatrix", "vtkMRMLScalarVolumeNode.SetIJKToRASMatrix",
    "vtkMRMLScalarVolumeNode.SetAndObserveImageData", "vtkMRMLScalarVolumeNode.GetParentTransformNode",
    "vtkMRMLScalarVolumeNode.CreateDefaultDisplayNodes", "vtkMRMLTransformNode.IsTransformToWorldLinear",
    "vtkMRMLTransformNode.GetMatrixTransformToWorld", "vtkMRMLVolumeArchetypeStorageNode.UseCompressionOff",
    "vtkMRMLVolumeArchetypeStorageNode.WriteData", "vtkMRMLVolumeArchetypeStorageNode.ReadData",
    "vtkMRMLSegmentationStorageNode.ReadData", "vtkMRMLSegmentationNode.SetReferenceImageGeometryParameterFromVolumeNode",
    "vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole", "vtkMRMLSegmentationNode.SetSourceRepresentationToBinaryLabelmap",
    "vtkMRMLSegmentationNode.CreateDefaultDisplayNodes", "vtkSegmentation.EXTENT_REFERENCE_GEOMETRY",
    "vtkSegmentation.ContainsRepresentation", "vtkSegmentation.CreateRepresentation", "vtkSegmentation.AddEmptySegment",
    "vtkSegment.GetTerminologyEntryTagName", "vtkSegment.GetTag", "vtkSegment.SetTag",
    "vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName", "vtkOrientedImageData",
    "vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry",
    "vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation",
    "vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode", "vtkMRMLSubjectHierarchyNode.SetItemParent",
    "vtkMRMLScalarVolumeDisplayNode.SetWindowLevelMinMax", "vtkMRMLScalarVolumeDisplayNode.ApplyThresholdOn",
    "vtkMRMLTableNode.RemoveAllColumns", "vtkMRMLTableNode.AddColumn", "vtkMRMLPlotSeriesNode.SetXColumnName",
    "vtkMRMLPlotSeriesNode.PlotTypeScatter", "vtkMRMLPlotSeriesNode.MarkerStyleNone", "vtkMRMLPlotSeriesNode.LineStyleDash",
    "vtkMRMLPlotChartNode.AddAndObservePlotSeriesNodeID", "vtkMRMLPlotChartNode.RemoveAllPlotSeriesNodeIDs",
    "vtkMRMLScene.GenerateUniqueName", "vtkMRMLScene.AddNewNodeByClass", "vtkSegmentationConverterFactory.GetInstance",
    "vtkBinaryLabelmapToClosedSurfaceConversionRule", "vtkClosedSurfaceToBinaryLabelmapConversionRule",
    "vtkMRMLSegmentationNode.SetNodeReferenceID", "vtkMRMLSegmentationNode.GetNodeReference",
    "vtkMRMLScene.GetFirstNode", "vtkMRMLScene.GetFirstNodeByName", "vtkMRMLScene.RemoveNode", "vtkMRMLScene.GetNodeByID",
    "vtkMRMLTableNode.GetTable", "vtkMRMLTableNode.StartModify", "vtkMRMLTableNode.EndModify",
    "vtkMRMLPlotChartNode.SetTitle", "vtkMRMLPlotChartNode.SetXAxisTitle", "vtkMRMLPlotChartNode.SetYAxisTitle",
    "vtkMRMLPlotChartNode.SetLegendVisibility", "vtkMRMLPlotSeriesNode.SetAndObserveTableNodeID",
    "vtkMRMLPlotSeriesNode.SetYColumnName", "vtkMRMLPlotSeriesNode.SetPlotType", "vtkMRMLPlotSeriesNode.SetMarkerStyle",
    "vtkMRMLPlotSeriesNode.SetLineStyle", "vtkMRMLPlotSeriesNode.SetColor", "vtkMRMLPlotSeriesNode.MarkerStyleCircle",
    "vtkMRMLPlotSeriesNode.LineStyleSolid", "vtkMRMLScalarVolumeDisplayNode.SetAndObserveColorNodeID",
    "vtkMRMLScalarVolumeDisplayNode.AutoWindowLevelOff", "vtkMRMLScalarVolumeDisplayNode.SetLowerThreshold",
    "vtkMRMLSubjectHierarchyNode.GetItemByDataNode", "vtkMRMLSubjectHierarchyNode.GetItemParent",
    "vtkSegmentation.GetSegment", "vtkSegmentation.GetNthSegmentID", "vtkSegmentation.GetNumberOfSegments",
    "vtkMRMLSegmentationNode.GetSegmentation", "vtkMRMLScalarVolumeNode.GetImageData",
)


def missing_slicer_api() -> List[str]:
    """The names of ``SLICER_API`` that this Slicer (or slicer-core) lacks."""
    missing = []
    for dotted in SLICER_API:
        obj: Any = slicer
        for part in dotted.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                missing.append(dotted)
                break
    return missing


# ------------------------------------------------------------------------------------------ settings


@dataclass
class LabeledCase:
    """A labeled case: a volume and its segmentation; ``sparse``: only the painted slices are labeled."""

    volume: Any
    segmentation: Any
    sparse: bool = False


@dataclass
class TrainSettings:
    """The panel's training settings; ``None`` leaves a setting to the engine's default / plan."""

    iterations: int = DEFAULT_ITERATIONS
    patch_size: Optional[Sequence[int]] = None  # X Y Z voxels (multiples of 16); None: planned for the device
    device: str = "auto"
    init: Optional[str] = None  # starting model file
    lambda_max: Optional[float] = None
    beta: Optional[float] = None
    rampup: Optional[float] = None
    lr: Optional[float] = None
    method: Optional[str] = None  # cpcl | mean_teacher | supervised
    width: Optional[int] = None
    spacing: Optional[Sequence[float]] = None  # X Y Z mm
    seed: Optional[int] = None
    partial_segments: bool = False  # a missing segment means "not annotated there"
    hold_out_last: bool = False  # validate on the last labeled case instead of training on it
    extra_args: List[str] = field(default_factory=list)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "TrainSettings":
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown training setting(s) {unknown}; known: {sorted(names)}")
        return cls(**kwargs)

    def config_overrides(self) -> Dict[str, Any]:
        """Settings that have no CLI flag and go through ``--config``."""
        out = {}
        for key in ("lambda_max", "beta", "rampup"):
            v = getattr(self, key)
            if v is not None:
                out[key] = float(v)
        return out


def as_cases(labeled: Sequence[Any]) -> List[LabeledCase]:
    """Accepts ``LabeledCase`` objects or ``(volume, segmentation[, sparse])`` tuples."""
    cases = []
    for item in labeled or []:
        if isinstance(item, LabeledCase):
            cases.append(item)
        elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
            cases.append(LabeledCase(item[0], item[1], bool(item[2]) if len(item) == 3 else False))
        else:
            raise InputError(f"a labeled case is a (volume node, segmentation node) pair, got {item!r}")
    return cases


# ----------------------------------------------------------------------------------- node helpers


def node_name(node: Any) -> str:
    return node.GetName() if node is not None and node.GetName() else "(unnamed)"


def check_volume(node: Any, role: str = "volume") -> None:
    """A 3-D scalar volume with voxels, and no non-linear transform; InputError naming the node otherwise."""
    if node is None:
        raise InputError(f"no {role} selected")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"{role} '{node_name(node)}' is a {node.GetClassName()}, not a scalar volume")
    image = node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise InputError(f"{role} '{node_name(node)}' has no voxels")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(f"{role} '{node_name(node)}' has {image.GetNumberOfScalarComponents()} components per voxel "
                         "(RGB / vector volume); CPCLSegment needs a scalar (grayscale) volume")
    if min(image.GetDimensions()) < 2:
        raise InputError(f"{role} '{node_name(node)}' is 2-D ({image.GetDimensions()}); CPCLSegment segments 3-D volumes")
    transform = node.GetParentTransformNode()
    if transform is not None and not transform.IsTransformToWorldLinear():
        raise InputError(f"{role} '{node_name(node)}' is under the non-linear transform '{node_name(transform)}': harden it "
                         "first (Data module: right-click the volume, 'Harden transform') or remove the transform")


def ensure_converter_rules() -> None:
    """Registers the labelmap <-> surface conversion rules when none are (slicer-core; the Slicer app's
    Segmentations module registers them at startup, so this is a no-op there). Empty segments need them."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    try:
        rules = factory.GetConverterRules()
    except (AttributeError, TypeError):  # not wrapped for Python: assume the application registered them
        return
    if not rules:
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def world_ijk_to_ras(node: Any) -> vtk.vtkMatrix4x4:
    """The volume's IJK-to-RAS matrix with its (linear) parent transforms applied."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    transform = node.GetParentTransformNode()
    if transform is not None:
        to_world = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(to_world)
        vtk.vtkMatrix4x4.Multiply4x4(to_world, m, m)
    return m


def matrix_to_array(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def world_copy(node: Any) -> Any:
    """An unscened scalar volume node sharing ``node``'s voxels with its transform hardened into its
    geometry. Nothing is added to the scene and ``node`` is not modified."""
    check_volume(node)
    copy = slicer.vtkMRMLScalarVolumeNode()
    copy.SetName(node.GetName())
    copy.SetIJKToRASMatrix(world_ijk_to_ras(node))
    copy.SetAndObserveImageData(node.GetImageData())
    return copy


def volume_array(node: Any) -> np.ndarray:
    """A copy of the voxels, numpy ``(k, j, i)`` like ``slicer.util.arrayFromVolume``."""
    image = node.GetImageData()
    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1]).copy()


def segment_ids(segmentation_node: Any) -> List[str]:
    seg = segmentation_node.GetSegmentation()
    return [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]


def segment_names(segmentation_node: Any) -> List[str]:
    seg = segmentation_node.GetSegmentation()
    return [seg.GetSegment(i).GetName() for i in segment_ids(segmentation_node)]


def find_segment_id(segmentation_node: Any, name: str) -> Optional[str]:
    """Segment ID by name: exact first, then a unique case-insensitive match (the engine's rule)."""
    seg = segmentation_node.GetSegmentation()
    ids = segment_ids(segmentation_node)
    for sid in ids:
        if seg.GetSegment(sid).GetName() == name:
            return sid
    lowered = [sid for sid in ids if seg.GetSegment(sid).GetName().lower() == str(name).lower()]
    return lowered[0] if len(lowered) == 1 else None


def segment_tag(segment: Any, tag: str) -> Optional[str]:
    value = vtk.mutable("")  # vtkSegment::GetTag(std::string, std::string&) (vtkSegment.h)
    return str(value) if segment.GetTag(tag, value) else None


def segment_masks(volume_node: Any, segmentation_node: Any, names: Sequence[str]) -> Dict[str, np.ndarray]:
    """Boolean ``(k, j, i)`` masks of the named segments on the **volume's** grid (segments not in the
    segmentation are left out). The segmentation's own grid and parent transform are resampled away;
    the volume's transform is hardened (both as Slicer's labelmap export does)."""
    reference = world_copy(volume_node)
    seg = segmentation_node.GetSegmentation()
    labelmap_name = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if seg.GetNumberOfSegments() and not seg.ContainsRepresentation(labelmap_name):
        # A closed-surface-only segmentation gets its labelmap representation (what every exporter does).
        seg.CreateRepresentation(labelmap_name)
    dims = reference.GetImageData().GetDimensions()
    masks = {}
    for name in names:
        sid = find_segment_id(segmentation_node, name)
        if sid is None:
            continue
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(sid)
        merged = slicer.vtkOrientedImageData()
        slicer.vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry(
            segmentation_node, reference, ids, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, merged)
        masks[name] = _oriented_to_mask(merged, dims)
    return masks


def _oriented_to_mask(image: Any, dims: Sequence[int]) -> np.ndarray:
    """The (k, j, i) mask of an oriented labelmap whose extent should be the reference grid's."""
    shape = tuple(dims[::-1])
    out = np.zeros(shape, dtype=bool)
    if image.GetPointData().GetScalars() is None or image.GetNumberOfPoints() == 0:
        return out
    ext = image.GetExtent()
    arr = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    arr = arr.reshape(ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1) > 0
    # paste the extent into the full grid (EXTENT_REFERENCE_GEOMETRY gives 0..dim-1; be safe anyway)
    lo = [max(0, ext[4]), max(0, ext[2]), max(0, ext[0])]
    hi = [min(shape[0], ext[5] + 1), min(shape[1], ext[3] + 1), min(shape[2], ext[1] + 1)]
    if any(h <= l for l, h in zip(lo, hi)):
        return out
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = arr[lo[0] - ext[4]:hi[0] - ext[4], lo[1] - ext[2]:hi[1] - ext[2],
                                                     lo[2] - ext[0]:hi[2] - ext[0]]
    return out


@dataclass
class LabeledArrays:
    """What a labeled case looks like on its volume's grid (arrays ``(k, j, i)``, IJK-to-RAS hardened)."""

    volume: np.ndarray
    masks: Dict[str, np.ndarray]
    ijk_to_ras: np.ndarray
    segments: List[Dict[str, Any]]  # name, color, id, terminology of each segment found

    def labels(self, names: Sequence[str]) -> np.ndarray:
        """int16 class indices (0 background, c for ``names[c-1]``); later names win where masks overlap."""
        out = np.zeros(self.volume.shape, dtype=np.int16)
        for c, name in enumerate(names, start=1):
            if name in self.masks:
                out[self.masks[name]] = c
        return out


def segment_record(segmentation_node: Any, segment_id: str) -> Dict[str, Any]:
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    record: Dict[str, Any] = {"id": segment_id, "name": segment.GetName(), "color": [float(c) for c in segment.GetColor()]}
    terminology = segment_tag(segment, slicer.vtkSegment.GetTerminologyEntryTagName())
    if terminology:
        record["terminology"] = terminology
    return record


def labeled_arrays(volume_node: Any, segmentation_node: Any, names: Optional[Sequence[str]] = None) -> LabeledArrays:
    """Volume voxels, segment masks on the volume grid and the (hardened) IJK-to-RAS of one labeled case."""
    check_volume(volume_node)
    names = list(names) if names is not None else segment_names(segmentation_node)
    masks = segment_masks(volume_node, segmentation_node, names)
    records = [segment_record(segmentation_node, find_segment_id(segmentation_node, n)) for n in names if n in masks]
    return LabeledArrays(volume_array(volume_node), masks, matrix_to_array(world_ijk_to_ras(volume_node)), records)


# ------------------------------------------------------------------------------------------- export


def export_volume(volume_node: Any, path: str) -> str:
    """Writes the volume (transform hardened, voxels and scalar type as they are) to ``path`` (.nrrd)."""
    copy = world_copy(volume_node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.UseCompressionOff()  # fast; the file lives only as long as the job
    if not storage.WriteData(copy):
        raise InputError(f"cannot write volume '{node_name(volume_node)}' to {path}")
    return str(path)


def export_segmentation(volume_node: Any, segmentation_node: Any, names: Sequence[str], path: str) -> Dict[str, Any]:
    """Writes the named segments, rasterised on the volume's grid, as a ``.seg.nrrd`` with their names,
    colours, IDs and terminology. Overlapping segments go to separate layers. Returns
    ``{"found": [...], "counts": {name: voxels}}``."""
    import slicerio

    arrays = labeled_arrays(volume_node, segmentation_node, names)
    ijk_to_lps = RAS_TO_LPS @ arrays.ijk_to_ras
    shape_ijk = arrays.volume.shape[::-1]
    layers: List[np.ndarray] = []
    segments = []
    value_in_layer: List[int] = []
    for record in arrays.segments:
        mask = arrays.masks[record["name"]].transpose(2, 1, 0)  # (k, j, i) -> slicerio's (i, j, k)
        layer = next((n for n, lay in enumerate(layers) if not (lay[mask] > 0).any()), None)
        if layer is None:
            layers.append(np.zeros(shape_ijk, dtype=np.uint8))
            value_in_layer.append(0)
            layer = len(layers) - 1
        value_in_layer[layer] += 1
        value = value_in_layer[layer]
        if value > 255:
            raise InputError(f"segmentation '{node_name(segmentation_node)}': too many segments to export (more than 255 in a layer)")
        layers[layer][mask] = value
        idx = np.nonzero(mask)
        extent = [int(v) for axis in range(3) for v in ((idx[axis].min(), idx[axis].max()) if idx[0].size else (0, -1))]
        seg = {"id": record["id"], "name": record["name"], "color": record["color"], "labelValue": value,
               "layer": layer, "extent": extent, "status": "completed"}
        if record.get("terminology"):
            seg["tags"] = {"TerminologyEntry": record["terminology"]}
        segments.append(seg)
    if not layers:
        layers.append(np.zeros(shape_ijk, dtype=np.uint8))
    voxels = layers[0] if len(layers) == 1 else np.stack(layers)
    slicerio.write_segmentation(str(path), {
        "voxels": np.ascontiguousarray(voxels),
        "ijkToLPS": ijk_to_lps,
        "segments": segments,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
    }, compression_level=1)
    return {"found": [s["name"] for s in arrays.segments], "counts": {n: int(m.sum()) for n, m in arrays.masks.items()}}


# ------------------------------------------------------------------------------------------- import


def _subject_hierarchy_beside(scene: Any, node: Any, reference: Any) -> None:
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return
    item, ref_item = sh.GetItemByDataNode(node), sh.GetItemByDataNode(reference)
    if item and ref_item:
        sh.SetItemParent(item, sh.GetItemParent(ref_item))


def unique_name(scene: Any, base: str) -> str:
    return scene.GenerateUniqueName(base) if scene.GetFirstNodeByName(base) is not None else base


def import_segmentation(scene: Any, path: str, volume_node: Any, name: Optional[str] = None) -> Any:
    """A NEW segmentation node read from a ``.seg.nrrd`` (names, colours, terminology as in the file),
    named after the volume, referenced to its geometry, beside it in the subject hierarchy, displayed."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", unique_name(scene, name or f"{node_name(volume_node)} segmentation"))
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        raise InputError(f"cannot read the segmentation result {path}")
    finish_segmentation_node(scene, node, volume_node)
    return node


def finish_segmentation_node(scene: Any, node: Any, volume_node: Any) -> None:
    # The two lines the reference extensions use (TotalSegmentator / MONAIAuto3DSeg); the first also sets
    # the "referenceImageGeometryRef" node reference (vtkMRMLSegmentationNode.cxx).
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    node.SetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole(), volume_node.GetID())
    node.CreateDefaultDisplayNodes()
    _subject_hierarchy_beside(scene, node, volume_node)


def empty_segmentation(scene: Any, volume_node: Any, classes: Sequence[Dict[str, Any]], name: Optional[str] = None) -> Any:
    """A NEW segmentation with one empty segment per model class (background skipped), ready to paint."""
    ensure_converter_rules()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", unique_name(scene, name or f"{node_name(volume_node)} labels"))
    node.SetSourceRepresentationToBinaryLabelmap()
    seg = node.GetSegmentation()
    for i, c in enumerate(classes[1:], start=1):
        sid = str(c.get("segment_id") or f"Segment_{i}")
        seg.AddEmptySegment(sid, str(c["name"]), [float(v) for v in c.get("color", (0.5, 0.5, 0.5))][:3])
        term = c.get("terminology")
        if isinstance(term, dict):
            term = terminology_to_string(term)
        if term:
            seg.GetSegment(sid).SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), str(term))
    finish_segmentation_node(scene, node, volume_node)
    return node


def terminology_to_string(term: Dict[str, Any]) -> str:
    """A terminology dict (as slicerio reads it) back to Slicer's ``TerminologyEntry`` tag string."""
    try:
        from slicerio.segmentation import terminology_entry_to_string

        return terminology_entry_to_string(term)
    except ImportError:
        code = lambda key: "^".join(term.get(key) or ["", "", ""])  # noqa: E731
        return "~".join([term.get("contextName", ""), code("category"), code("type"), code("typeModifier"),
                         term.get("anatomicContextName", ""), code("anatomicRegion"), code("anatomicRegionModifier")])


def import_scalar_volume(scene: Any, path: str, reference_node: Any, name: str, heat: bool = True) -> Any:
    """A NEW scalar volume node read from ``path`` (e.g. an uncertainty map), shown with a heat colour map."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", unique_name(scene, name))
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        raise InputError(f"cannot read {path}")
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None and heat:
        for cid in HEAT_COLOR_NODE_IDS:
            if scene.GetNodeByID(cid) is not None:
                display.SetAndObserveColorNodeID(cid)
                break
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, max(1e-6, float(np.nanmax(volume_array(node)))))
        display.SetLowerThreshold(1e-3)
        display.ApplyThresholdOn()
    _subject_hierarchy_beside(scene, node, reference_node)
    return node


# -------------------------------------------------------------------------------------- input check


@dataclass
class CheckResult:
    """Messages from ``check_inputs``: ``errors`` block training; ``warnings`` and ``infos`` are shown."""

    errors: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    infos: List[str] = field(default_factory=list)
    counts: Dict[str, Dict[str, int]] = field(default_factory=dict)  # case -> segment -> voxels

    @property
    def ok(self) -> bool:
        return not self.errors

    def messages(self) -> List[Tuple[str, str]]:
        return [("error", m) for m in self.errors] + [("warning", m) for m in self.warnings] + [("info", m) for m in self.infos]


def check_inputs(labeled: Sequence[Any], segments: Optional[Sequence[str]] = None, unlabeled: Sequence[Any] = (),
                 partial_segments: bool = False, hold_out_last: bool = False) -> CheckResult:
    """What the panel shows before training: segment names across cases, empty segments, geometry."""
    res = CheckResult()
    cases = as_cases(labeled)
    if not cases:
        res.errors.append("add at least one labeled case (a volume and its segmentation)")
        return res
    if hold_out_last and len(cases) < 2:
        res.errors.append("holding out a case for validation needs at least two labeled cases")
    names = list(segments) if segments else []
    first_seg = cases[0].segmentation
    if not names and first_seg is not None:
        names = segment_names(first_seg)
    if not names:
        res.errors.append("select at least one segment to learn")
    seen_pairs = set()
    for n, case in enumerate(cases, start=1):
        label = f"case {n} ('{node_name(case.volume)}' + '{node_name(case.segmentation)}')"
        try:
            check_volume(case.volume, f"volume of case {n}")
        except InputError as e:
            res.errors.append(str(e))
            continue
        if case.segmentation is None or not case.segmentation.IsA("vtkMRMLSegmentationNode"):
            res.errors.append(f"case {n}: no segmentation selected for volume '{node_name(case.volume)}'")
            continue
        key = (case.volume.GetID(), case.segmentation.GetID())
        if key in seen_pairs:
            res.warnings.append(f"{label} is listed twice")
        seen_pairs.add(key)
        ref = case.segmentation.GetNodeReference(case.segmentation.GetReferenceImageGeometryReferenceRole())
        if ref is not None and ref is not case.volume:
            res.warnings.append(f"segmentation '{node_name(case.segmentation)}' was drawn on volume '{node_name(ref)}' but is paired "
                                f"with '{node_name(case.volume)}': check the pair (it is resampled onto '{node_name(case.volume)}')")
        available = segment_names(case.segmentation)
        masks = segment_masks(case.volume, case.segmentation, names)
        counts = {name: int(m.sum()) for name, m in masks.items()}
        res.counts[label] = counts
        what = "not annotated there (partial segments)" if partial_segments else "absent (background)"
        for name in names:
            if name not in masks:
                res.warnings.append(f"segment '{name}' is missing from '{node_name(case.segmentation)}' (it has: "
                                    f"{', '.join(available) or 'no segments'}): treated as {what}")
            elif counts[name] == 0:
                sid = find_segment_id(case.segmentation, name)
                if _segment_has_voxels(case.segmentation, sid):
                    res.errors.append(f"segment '{name}' of '{node_name(case.segmentation)}' does not overlap volume "
                                      f"'{node_name(case.volume)}': are they from the same scan?")
                else:
                    res.warnings.append(f"segment '{name}' is empty in '{node_name(case.segmentation)}': treated as {what}")
        clash = _overlaps(masks)
        if clash:
            a, b, voxels = clash
            res.errors.append(f"segments '{a}' and '{b}' overlap in '{node_name(case.segmentation)}' ({voxels} voxels): "
                              "a voxel can belong to one learned segment only; deselect one of them")
        if case.sparse:
            res.infos.append(f"{label}: only the painted slices count as labeled")
    for name in names:
        if res.counts and all(name not in c for c in res.counts.values()):
            res.errors.append(f"segment '{name}' is in none of the labeled segmentations: nothing to learn it from")
        elif res.counts and all(c.get(name, 0) == 0 for c in res.counts.values()):
            res.errors.append(f"segment '{name}' is empty in every labeled case: nothing to learn it from")
    spacings = [tuple(round(s, 2) for s in c.volume.GetSpacing()) for c in cases if c.volume is not None]
    if len(set(spacings)) > 1:
        res.infos.append("the volumes have different voxel spacings " + ", ".join(str(list(s)) for s in sorted(set(spacings)))
                         + ": they are resampled to one spacing for training")
    labeled_ids = {c.volume.GetID() for c in cases if c.volume is not None}
    both = [node_name(v) for v in unlabeled or [] if v is not None and v.GetID() in labeled_ids]
    if both:
        res.infos.append(f"{', '.join(both)} also listed as unlabeled: used in both streams")
    if not unlabeled:
        res.infos.append("no unlabeled volumes: the model learns from the labeled cases only")
    return res


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


def _overlaps(masks: Dict[str, np.ndarray]) -> Optional[Tuple[str, str, int]]:
    names = list(masks)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            n = int((masks[a] & masks[b]).sum())
            if n:
                return a, b, n
    return None


# ---------------------------------------------------------------------------------------- backends


def compute_backend() -> Tuple[str, Optional[str]]:
    """(what torch will compute on, a warning or None). Never raises; imports torch if it is installed."""
    gpu = _nvidia_gpu_present()
    try:
        import torch
    except Exception as e:  # not installed, or broken
        return "PyTorch is not installed", f"PyTorch cannot be imported ({type(e).__name__}: {e})"
    try:
        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            free, total = torch.cuda.mem_get_info(0)
            return f"CUDA GPU: {', '.join(names)} ({total / 2**30:.0f} GB)", None
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "Apple GPU (MPS)", None
    except Exception as e:
        return f"CPU ({torch.get_num_threads()} threads)", f"the GPU could not be queried: {e}"
    cpu = f"CPU ({torch.get_num_threads()} threads)"
    if gpu:
        build = "a CPU-only build" if getattr(torch.version, "cuda", None) is None else f"built for CUDA {torch.version.cuda}"
        return cpu, (f"an NVIDIA GPU is present but PyTorch ({torch.__version__}, {build}) cannot use it: reinstall PyTorch "
                     "with CUDA support in the 'PyTorch Util' module (or update the NVIDIA driver)")
    return cpu, None


def _nvidia_gpu_present() -> bool:
    if os.path.exists("/proc/driver/nvidia/gpus") and os.listdir("/proc/driver/nvidia/gpus"):
        return True
    exe = shutil.which("nvidia-smi")
    if not exe:
        return False
    import subprocess

    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


# ------------------------------------------------------------------------------------------- runs


class Run:
    """A background CLI job plus what to do with its results (import nodes, clean the work folder).

    The widget calls ``poll()`` from a QTimer; when ``finished``, ``result()`` imports the outputs (on the
    calling, i.e. GUI, thread) and returns them. ``wait()`` does both, blocking.
    """

    def __init__(self, kind: str, job: jobs.Job, run_dir: str, on_done: Callable[["Run"], Any],
                 keep_dir: Callable[["Run"], bool] = lambda run: False) -> None:
        self.kind = kind
        self.job = job
        self.run_dir = run_dir
        self._on_done = on_done
        self._keep_dir = keep_dir
        self._result: Any = None
        self._collected = False

    @property
    def finished(self) -> bool:
        return self.job.finished

    @property
    def status(self) -> str:
        return self.job.status

    @property
    def error(self) -> Optional[str]:
        return self.job.error

    def start(self) -> "Run":
        self.job.start()
        return self

    def poll(self) -> List[Event]:
        return self.job.poll()

    def stop(self) -> None:
        self.job.stop()

    def cancel(self, block: bool = True) -> None:
        self.job.cancel(block=block)

    def result(self) -> Any:
        """After the job has finished: the imported result; raises like ``Job.outcome`` on failure/cancel."""
        if not self.job.finished:
            raise RuntimeError(f"the {self.kind} job has not finished")
        if not self._collected:
            self._collected = True
            try:
                self.job.outcome()
                self._result = self._on_done(self)
            finally:
                if not self._keep_dir(self):
                    shutil.rmtree(self.run_dir, ignore_errors=True)
        elif self.job.status in ("cancelled", "failed"):
            self.job.outcome()
        return self._result

    def wait(self, on_event: OnEvent = None, timeout: Optional[float] = None) -> Any:
        try:
            self.job.wait(on_event, timeout)
        except (Cancelled, jobs.JobError):
            pass  # result() raises it after cleaning up
        return self.result()


class LogicCore:
    """Train / segment / rank from nodes. ``scene`` defaults to ``slicer.mrmlScene``.

    Args:
        python: interpreter for the child processes (``PythonSlicer`` inside Slicer).
        env: environment for the child processes (default: this process's).
        work_root: folder for run folders (exported inputs, models, results).
    """

    def __init__(self, scene: Any = None, python: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                 work_root: Optional[str] = None) -> None:
        self.scene = scene if scene is not None else slicer.mrmlScene
        ensure_converter_rules()
        self.python = python
        self.env = env
        self.work_root = work_root or os.path.join(tempfile.gettempdir(), "CPCLSegment")

    # ------------------------------------------------------------------------------------ helpers

    def new_run_dir(self, kind: str) -> str:
        os.makedirs(self.work_root, exist_ok=True)
        return tempfile.mkdtemp(prefix=f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-", dir=self.work_root)

    def _job(self, args: Sequence[Any], name: str, device: str = "auto") -> jobs.Job:
        extra = {"CUDA_VISIBLE_DEVICES": "-1"} if device == "cpu" else None
        return jobs.Job(args, python=self.python, env=self.env, extra_env=extra, name=name)

    @staticmethod
    def _device_arg(device: Optional[str]) -> str:
        device = (device or "auto").lower()
        return "cuda" if device in ("gpu", "cuda") else device

    # ----------------------------------------------------------------------------------- training

    def build_train_args(self, cases: List[LabeledCase], unlabeled: Sequence[Any], segments: Sequence[str],
                         settings: TrainSettings, run_dir: str, out: str) -> List[str]:
        """Exports the inputs into ``run_dir/inputs`` and returns the ``train`` arguments."""
        inputs = os.path.join(run_dir, "inputs")
        os.makedirs(inputs, exist_ok=True)
        args: List[str] = ["train"]
        n_train = len(cases) - 1 if settings.hold_out_last and len(cases) > 1 else len(cases)
        exported: Dict[str, str] = {}
        for n, case in enumerate(cases):
            image = os.path.join(inputs, f"labeled-{n:03d}.nrrd")
            seg = os.path.join(inputs, f"labeled-{n:03d}.seg.nrrd")
            export_volume(case.volume, image)
            export_segmentation(case.volume, case.segmentation, segments, seg)
            exported[case.volume.GetID()] = image
            if n < n_train:
                args += ["--labeled", image, seg]
                if case.sparse:
                    args += ["--annotated-slices", "auto"]
            else:
                args += ["--validation", image, seg]
        unlabeled_files = []
        for n, volume in enumerate(unlabeled or []):
            path = exported.get(volume.GetID())
            if path is None:
                path = os.path.join(inputs, f"unlabeled-{n:03d}.nrrd")
                export_volume(volume, path)
                exported[volume.GetID()] = path
            unlabeled_files.append(path)
        if unlabeled_files:
            args += ["--unlabeled", *unlabeled_files]
        args += ["--segments", *segments, "--out", out, "--iterations", str(int(settings.iterations)),
                 "--device", self._device_arg(settings.device)]
        if settings.patch_size:
            args += ["--patch-size", *[str(int(v)) for v in settings.patch_size]]
        if settings.spacing:
            args += ["--spacing", *[repr(float(v)) for v in settings.spacing]]
        for flag, value in (("--lr", settings.lr), ("--method", settings.method), ("--width", settings.width),
                            ("--seed", settings.seed), ("--init", settings.init)):
            if value is not None and value != "":
                args += [flag, str(value)]
        if settings.partial_segments:
            args.append("--partial-segments")
        overrides = settings.config_overrides()
        if overrides:
            config = os.path.join(run_dir, "config.json")
            with open(config, "w", encoding="utf-8") as f:
                json.dump(overrides, f, indent=1)
            args += ["--config", config]
        args += list(settings.extra_args)
        return args

    def start_training(self, labeled: Sequence[Any], unlabeled: Sequence[Any] = (), segments: Optional[Sequence[str]] = None,
                       settings: Optional[TrainSettings] = None, out: Optional[str] = None) -> Run:
        """Checks and exports the inputs, then starts ``cpcl-segment train`` in the background."""
        settings = settings or TrainSettings()
        cases = as_cases(labeled)
        unlabeled = [v for v in (unlabeled or []) if v is not None]
        for v in unlabeled:
            check_volume(v, "unlabeled volume")
        if not segments and cases and cases[0].segmentation is not None:
            segments = segment_names(cases[0].segmentation)
        segments = list(segments or [])
        check = check_inputs(cases, segments, unlabeled, settings.partial_segments, settings.hold_out_last)
        if not check.ok:
            raise InputError("; ".join(check.errors))
        run_dir = self.new_run_dir("train")
        out = os.path.abspath(out) if out else os.path.join(run_dir, "model.pt")
        try:
            args = self.build_train_args(cases, unlabeled, segments, settings, run_dir, out)
        except Exception:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        with open(os.path.join(run_dir, "command.json"), "w", encoding="utf-8") as f:
            json.dump({"args": args, "out": out, "segments": segments, "device": settings.device}, f, indent=1)
        return self._train_run(args, run_dir, out, settings.device).start()

    def resume_training(self, run_dir: str) -> Run:
        """Continues a stopped or interrupted run from its checkpoint (same inputs, ``--resume``)."""
        path = os.path.join(run_dir, "command.json")
        if not os.path.isfile(path):
            raise InputError(f"{run_dir} is not a CPCLSegment training folder (no command.json)")
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if not os.path.exists(saved["out"] + ".checkpoint.pt"):
            raise InputError(f"nothing to resume: no checkpoint {saved['out']}.checkpoint.pt (the run completed or was cancelled)")
        args = [a for a in saved["args"] if a != "--resume"] + ["--resume"]
        return self._train_run(args, run_dir, saved["out"], saved.get("device", "auto")).start()

    @staticmethod
    def can_resume(run_dir: Optional[str]) -> bool:
        if not run_dir or not os.path.isfile(os.path.join(run_dir, "command.json")):
            return False
        with open(os.path.join(run_dir, "command.json"), encoding="utf-8") as f:
            out = json.load(f).get("out", "")
        return os.path.exists(out + ".checkpoint.pt")

    def _train_run(self, args: List[str], run_dir: str, out: str, device: str) -> Run:
        job = self._job(args, "training", self._device_arg(device))

        def on_done(run: Run) -> str:
            if not os.path.isfile(out):
                raise jobs.JobError(f"training ended but wrote no model file {out}")
            if not os.path.exists(out + ".checkpoint.pt"):  # completed: the exported inputs are not needed any more
                shutil.rmtree(os.path.join(run_dir, "inputs"), ignore_errors=True)
            return out

        def keep(run: Run) -> bool:
            if run.status in ("done", "stopped"):
                return True  # the model (and, when stopped, the checkpoint + inputs for resume) live here
            if run.status == "failed" and os.path.exists(out + ".checkpoint.pt"):
                return True  # interrupted: resumable
            if run.status == "cancelled" and not out.startswith(run_dir):
                # The CLI never writes the model when cancelled (an older file at `out` stays as it was);
                # a checkpoint this run wrote beside it goes.
                ckpt = out + ".checkpoint.pt"
                if os.path.exists(ckpt) and os.path.getmtime(ckpt) >= (run.job.started_at or 0) - 1:
                    os.remove(ckpt)
            return False

        return Run("training", job, run_dir, on_done, keep)

    def train(self, labeled: Sequence[Any], unlabeled: Sequence[Any] = (), segments: Optional[Sequence[str]] = None,
              iterations: Optional[int] = None, wait: bool = True, on_event: OnEvent = None, out: Optional[str] = None,
              **settings: Any) -> Union[str, Run]:
        """Trains a model; returns the model file path (``wait=True``) or the running ``Run``."""
        if iterations is not None:
            settings["iterations"] = iterations
        run = self.start_training(labeled, unlabeled, segments, TrainSettings.from_kwargs(**settings), out)
        return run.wait(on_event) if wait else run

    # ---------------------------------------------------------------------------------- segmenting

    def start_segmentation(self, model: str, volumes: Sequence[Any], weights: str = "teacher", device: str = "auto",
                           names: Optional[Sequence[str]] = None) -> Run:
        """Starts ``cpcl-segment predict`` on the volumes; ``result()`` is one new segmentation node per volume."""
        volumes = list(volumes)
        if not volumes:
            raise InputError("select at least one volume to segment")
        model = self._check_model(model)
        for v in volumes:
            check_volume(v, "volume to segment")
        run_dir = self.new_run_dir("segment")
        try:
            files = []
            for n, v in enumerate(volumes):
                files.append(export_volume(v, os.path.join(run_dir, f"volume-{n:03d}.nrrd")))
        except Exception:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        out_dir = os.path.join(run_dir, "out")
        args = ["predict", "--model", model, "--image", *files, "--out", out_dir + os.sep, "--format", ".seg.nrrd",
                "--weights", weights, "--device", self._device_arg(device)]
        os.makedirs(out_dir, exist_ok=True)
        job = self._job(args, "segmentation", self._device_arg(device))

        def on_done(run: Run) -> List[Any]:
            outputs = (run.job.result or {}).get("outputs") or []
            if len(outputs) != len(volumes):
                raise jobs.JobError(f"segmentation wrote {len(outputs)} result(s) for {len(volumes)} volume(s)")
            return [import_segmentation(self.scene, path, v, names[i] if names else None)
                    for i, (path, v) in enumerate(zip(outputs, volumes))]

        return Run("segmentation", job, run_dir, on_done).start()

    def segment(self, model: str, volume: Any, wait: bool = True, on_event: OnEvent = None, weights: str = "teacher",
                device: str = "auto", name: Optional[str] = None) -> Any:
        """Segments one volume (or a list) into NEW segmentation node(s); a Run when ``wait=False``."""
        many = isinstance(volume, (list, tuple))
        run = self.start_segmentation(model, list(volume) if many else [volume], weights, device, None if many or not name else [name])
        if not wait:
            return run
        nodes = run.wait(on_event)
        return nodes if many else nodes[0]

    # ------------------------------------------------------------------------------------ ranking

    def start_ranking(self, model: str, volumes: Sequence[Any], score: str = "auto", device: str = "auto") -> Run:
        """Starts ``cpcl-segment rank`` with uncertainty maps; ``result()`` is a list of dicts
        ``{rank, volume, score, uncertainty}`` (most useful to label first). The run folder (maps) is kept
        until ``discard`` is called on it."""
        volumes = list(volumes)
        if not volumes:
            raise InputError("select at least one unlabeled volume to rank")
        model = self._check_model(model)
        run_dir = self.new_run_dir("rank")
        files = []
        try:
            for n, v in enumerate(volumes):
                files.append(export_volume(v, os.path.join(run_dir, f"volume-{n:03d}.nrrd")))
        except Exception:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        unc_dir = os.path.join(run_dir, "uncertainty")
        args = ["rank", "--model", model, "--images", *files, "--out", os.path.join(run_dir, "ranking.csv"),
                "--score", score, "--uncertainty-dir", unc_dir, "--device", self._device_arg(device)]
        job = self._job(args, "ranking", self._device_arg(device))
        by_file = {os.path.normcase(os.path.abspath(f)): v for f, v in zip(files, volumes)}

        def on_done(run: Run) -> List[Dict[str, Any]]:
            rows = []
            for row in (run.job.result or {}).get("ranking") or []:
                image = os.path.normcase(os.path.abspath(str(row.get("image", ""))))
                volume = by_file.get(image)
                if volume is None:
                    continue
                stem = os.path.basename(image)[: -len(".nrrd")]
                unc = row.get("uncertainty_map") or os.path.join(unc_dir, f"{stem}-uncertainty.nrrd")
                rows.append({"rank": int(row.get("rank", len(rows) + 1)), "volume": volume, "score": float(row["score"]),
                             "uncertainty": unc if os.path.isfile(unc) else None, "row": row})
            return rows

        return Run("ranking", job, run_dir, on_done, keep_dir=lambda run: run.status == "done").start()

    def show_uncertainty(self, row: Dict[str, Any]) -> Any:
        """A NEW heat-coloured volume node from a ranking row's uncertainty map."""
        if not row.get("uncertainty"):
            raise InputError(f"no uncertainty map was written for '{node_name(row['volume'])}'")
        return import_scalar_volume(self.scene, row["uncertainty"], row["volume"], f"{node_name(row['volume'])} uncertainty")

    # ------------------------------------------------------------------------------------- models

    @staticmethod
    def _check_model(model: Any) -> str:
        path = os.path.abspath(str(model or ""))
        if not model or not os.path.isfile(path):
            raise InputError(f"model file not found: {model}")
        return path

    @staticmethod
    def model_record(model: str) -> Dict[str, Any]:
        """The model file's record without weights (needs torch; raises ModelFileError on a bad file)."""
        from CPCLSegmentLib.modelfile import load_model

        record = load_model(str(model))
        return {k: v for k, v in record.items() if k not in ("weights", "prototypes", "prototype_valid")}

    def empty_segmentation_for(self, model: str, volume: Any, name: Optional[str] = None) -> Any:
        """A NEW empty segmentation with the model's segment names / colours / terminology on ``volume``."""
        return empty_segmentation(self.scene, volume, self.model_record(model)["classes"], name)


# ---------------------------------------------------------------------------------- training plot


class TrainingPlot:
    """Loss and validation-Dice curves in MRML table + plot nodes (shown in a Slicer plot view)."""

    LOSS_COLUMNS = ("total", "supervised", "forward", "backward")
    COLORS = {"total": (0.1, 0.1, 0.1), "supervised": (0.12, 0.47, 0.71), "forward": (1.0, 0.5, 0.05),
              "backward": (0.17, 0.63, 0.17), "mean Dice": (0.84, 0.15, 0.16)}

    def __init__(self, scene: Any, name: str = "CPCLSegment training") -> None:
        self.scene = scene
        self.name = name
        self.loss: Dict[str, List[float]] = {"iteration": []}
        self.dice: Dict[str, List[float]] = {"iteration": [], "mean Dice": []}
        self.loss_table = self._node("vtkMRMLTableNode", f"{name} loss")
        self.dice_table = self._node("vtkMRMLTableNode", f"{name} validation Dice")
        self.chart = self._node("vtkMRMLPlotChartNode", f"{name} chart")
        self.chart.SetTitle("CPCLSegment training")
        self.chart.SetXAxisTitle("iteration")
        self.chart.SetYAxisTitle("loss / Dice")
        self.chart.SetLegendVisibility(True)
        self.series: Dict[str, Any] = {}

    def _node(self, cls: str, name: str) -> Any:
        node = self.scene.GetFirstNode(name, cls)
        if node is None:
            node = self.scene.AddNewNodeByClass(cls, name)
        return node

    def reset(self) -> None:
        self.loss = {"iteration": []}
        self.dice = {"iteration": [], "mean Dice": []}
        self.chart.RemoveAllPlotSeriesNodeIDs()
        for s in self.series.values():
            self.scene.RemoveNode(s)
        self.series = {}
        self.loss_table.RemoveAllColumns()
        self.dice_table.RemoveAllColumns()

    def _series(self, column: str, table: Any, dashed: bool = False) -> Any:
        if column not in self.series:
            s = self._node("vtkMRMLPlotSeriesNode", f"{self.name} {column}")
            s.SetAndObserveTableNodeID(table.GetID())
            s.SetXColumnName("iteration")
            s.SetYColumnName(column)
            s.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            s.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle if dashed else slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
            s.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleDash if dashed else slicer.vtkMRMLPlotSeriesNode.LineStyleSolid)
            s.SetColor(*self.COLORS.get(column, (0.5, 0.2, 0.6)))
            self.chart.AddAndObservePlotSeriesNodeID(s.GetID())
            self.series[column] = s
        return self.series[column]

    def add(self, event: Event) -> None:
        """Feeds a ``progress`` or ``validation`` event; other events are ignored."""
        kind = event.get("event")
        if kind == "progress":
            self.loss["iteration"].append(float(event["iteration"]))
            losses = event.get("loss") or {}
            n = len(self.loss["iteration"])
            for key, value in losses.items():
                col = self.loss.setdefault(key, [float("nan")] * (n - 1))
                col.append(float(value) if value is not None else float("nan"))
            for key, col in self.loss.items():
                if len(col) < n:
                    col.append(float("nan"))
        elif kind == "validation" and event.get("mean_dice") is not None and event.get("iteration"):
            self.dice["iteration"].append(float(event["iteration"]))
            self.dice["mean Dice"].append(float(event["mean_dice"]))
            n = len(self.dice["iteration"])
            for seg, value in (event.get("dice") or {}).items():
                col = self.dice.setdefault(f"Dice {seg}", [float("nan")] * (n - 1))
                col.append(float("nan") if value is None else float(value))
            for col in self.dice.values():
                if len(col) < n:
                    col.append(float("nan"))

    def update(self) -> None:
        """Copies the collected values into the table nodes (call at most a few times per second)."""
        _fill_table(self.loss_table, self.loss)
        _fill_table(self.dice_table, self.dice)
        for column in self.loss:
            if column != "iteration" and (column in self.LOSS_COLUMNS or column == "mean_teacher"):
                self._series(column, self.loss_table)
        if self.dice["iteration"]:
            self._series("mean Dice", self.dice_table, dashed=True)


def _fill_table(table_node: Any, columns: Dict[str, List[float]]) -> None:
    """Table content from equal-length columns (like slicer.util.updateTableFromArray, without slicer.util)."""
    table = table_node.GetTable()
    if table is None:
        return
    wasModified = table_node.StartModify()
    table_node.RemoveAllColumns()
    for name, values in columns.items():
        arr = numpy_support.numpy_to_vtk(np.asarray(values, dtype=np.float32), deep=True, array_type=vtk.VTK_FLOAT)
        arr.SetName(name)
        table_node.AddColumn(arr)
    table_node.Modified()
    table_node.EndModify(wasModified)


def format_seconds(seconds: Optional[float]) -> str:
    if seconds is None or seconds != seconds:
        return "?"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {(seconds % 3600) // 60:02d} min"
