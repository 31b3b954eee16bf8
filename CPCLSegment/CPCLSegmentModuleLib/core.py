"""Qt-free logic of the CPCLSegment Slicer module: nodes <-> files, the background jobs, results -> new nodes.

Imports ``slicer`` and ``vtk`` but never ``qt``, ``ctk``, ``torch`` or ``slicer.modules`` / ``slicer.app``, so
the same code runs inside the Slicer application and in **slicer-core** (PyPI: Slicer's MRML scene and
segmentation logic without a GUI), where pytest exercises it. ``CPCLSegmentLogic`` (console) and the panel's
controller (``panel.PanelController``) both call ``LogicCore``: there is one train / segment / rank API.

Flow (the engine does the work, in a child process; see ``CPCLSegmentLib/jobs.py``):

- **Check and export in one pass** (``check_inputs(..., export_dir=...)``): each labeled case's selected
  segments are rasterised **once** onto the volume's grid with
  ``vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry(...,
  vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, ...)`` (the segmentation's own transform and grid are resampled
  away); the same masks give the check's counts and overlap test and are written as the engine's
  ``.seg.nrrd`` (names, colours, IDs, terminology kept). Each volume is written as ``.nrrd`` with its
  IJK-to-RAS geometry; a volume under a linear transform is written *hardened* from an unscened copy, the
  user's node is untouched; a non-linear transform is refused with a message.
- **Overlapping segments** are an error, unless ``later_wins``: then a later segment in the list wins where
  they overlap (organ, then lesion, as the Decathlon's label maps store them). Which segment was nested in
  which is recorded with the model, and predictions are written back nested the same way (the organ
  segment includes its lesion).
- **Train / segment / rank**: ``cpcl-segment`` command lines built here, run by ``jobs.Job``; ``wait=True``
  blocks (console), ``wait=False`` returns the job, which the panel polls from a QTimer. The job's
  ``result()`` imports what it wrote.
- **Models live in the scene**: a trained or loaded model is a ``vtkMRMLTextNode`` ("CPCLSegment model",
  the model file base64-encoded, with a text storage node), so saving the scene (``.mrml`` + data, or
  ``.mrb``) saves the model and loading the scene restores it; the file in the temporary folder is only a
  cache, re-created from the node when it is gone.
- **Import**: results become **new** nodes, marked as module outputs (``OUTPUT_ATTRIBUTE``) so the panel
  never picks them as training inputs by itself; segmentations are named after the volume, carry the
  model's segment names and colours, are referenced to the volume geometry and sit beside it in the subject
  hierarchy. Input nodes are never modified.
"""

from __future__ import annotations

import base64
import hashlib
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
from CPCLSegmentLib import jobs, settings
from CPCLSegmentLib.errors import InputError
from CPCLSegmentLib.settings import WEIGHTS

Event = Dict[str, Any]
OnEvent = Optional[Callable[[Event], None]]

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
HEAT_COLOR_NODE_IDS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeIron")

# Nodes the module creates carry this attribute (value: what they are); they are never selected as training
# inputs automatically (``is_module_output``).
OUTPUT_ATTRIBUTE = "CPCLSegment.Output"
OUTPUT_SEGMENTATION, OUTPUT_UNCERTAINTY, OUTPUT_LABELS, OUTPUT_MODEL = "segmentation", "uncertainty", "labels", "model"
MODEL_NODE_CLASS = "vtkMRMLTextNode"
MODEL_ATTRIBUTES = ("CPCLSegment.SHA256", "CPCLSegment.Bytes", "CPCLSegment.Classes", "CPCLSegment.Nested",
                    "CPCLSegment.Summary", "CPCLSegment.RunDir", "CPCLSegment.File")

# Settings the module owns (not TrainConfig fields): which device, which starting model, the target spacing,
# the meaning of a missing segment, hold-out validation, the supervised-only comparison and the overlap order.
# Everything else a caller passes must be a TrainConfig field (``CPCLSegmentLib/settings.py``) and goes to the
# engine as ``--config``. ``compare_supervised`` (on unless turned off) acts only with a held-out case and
# unlabeled volumes: the engine then also trains supervised-only and keeps the model that scores better on the
# held-out case, saying which, so a run where the unlabeled volumes do not help never silently keeps the worse
# model (BENCHMARKS.md: they do not help at every budget).
MODULE_SETTINGS: Dict[str, Any] = {"device": "auto", "init": None, "spacing": None, "partial_segments": False,
                                   "hold_out_last": False, "compare_supervised": True, "later_wins": False}
DEVICES = ("auto", "cpu", "cuda", "mps")
# "Train for N minutes" is what the panel and the console do unless iterations are asked for.
DEFAULT_MINUTES = 10.0

# Every slicer.* name this package calls (checked against Slicer 5.8's sources; ``missing_slicer_api()`` checks the
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
    # models in the scene, module outputs, the parameter node (panel.py)
    "vtkMRMLTextNode.SetText", "vtkMRMLTextNode.GetText", "vtkMRMLTextNode.SetForceCreateStorageNode",
    "vtkMRMLTextNode.CreateStorageNodeAlways", "vtkMRMLTextNode.AddDefaultStorageNode", "vtkMRMLTextStorageNode",
    "vtkMRMLScene.CreateNodeByClass", "vtkMRMLScene.AddNode", "vtkMRMLScene.GetSingletonNode", "vtkMRMLScene.GetNodesByClass",
    "vtkMRMLScene.IsImporting", "vtkMRMLScene.StartCloseEvent", "vtkMRMLScene.EndCloseEvent", "vtkMRMLScene.NodeAddedEvent",
    "vtkMRMLScene.NodeAboutToBeRemovedEvent", "vtkMRMLScriptedModuleNode.SetParameter", "vtkMRMLScriptedModuleNode.GetParameter",
    "vtkMRMLScriptedModuleNode.SetSingletonTag", "vtkMRMLScriptedModuleNode.SetAttribute", "vtkMRMLScriptedModuleNode.GetAttribute",
    "vtkMRMLScriptedModuleNode.SetNodeReferenceID", "vtkMRMLScriptedModuleNode.GetNodeReference",
    "vtkMRMLScriptedModuleNode.GetNodeReferenceID", "vtkMRMLScriptedModuleNode.AddNodeReferenceID",
    "vtkMRMLScriptedModuleNode.RemoveNodeReferenceIDs", "vtkMRMLScriptedModuleNode.GetNumberOfNodeReferences",
    "vtkMRMLScriptedModuleNode.GetNthNodeReference", "vtkMRMLScriptedModuleNode.StartModify",
    "vtkMRMLScriptedModuleNode.EndModify",
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


def split_settings(values: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(module settings, TrainConfig settings)`` of a caller's keyword settings; any other name is an
    ``InputError`` listing the known ones. Module settings win where a name is both (``device``)."""
    names = set(settings.setting_names())
    unknown = sorted(k for k in values if k not in MODULE_SETTINGS and k not in names)
    if unknown:
        raise InputError(f"unknown training setting(s): {', '.join(unknown)} (module settings: {', '.join(MODULE_SETTINGS)}; "
                         f"engine settings: {', '.join(settings.setting_names())})")
    module = dict(MODULE_SETTINGS)
    module.update({k: v for k, v in values.items() if k in MODULE_SETTINGS})
    return module, {k: v for k, v in values.items() if k not in MODULE_SETTINGS}


def compares_supervised(module: Dict[str, Any], config: Dict[str, Any], unlabeled: Sequence[Any]) -> bool:
    """Whether a training run also trains supervised-only and keeps the better model (``--compare-supervised``):
    asked for (the default), a case held out to compare on, unlabeled volumes, and a semi-supervised method."""
    method = config.get("method", settings.default_settings().get("method"))
    return bool(module.get("compare_supervised") and module.get("hold_out_last") and list(unlabeled) and method != "supervised")


def train_config(values: Dict[str, Any]) -> Dict[str, Any]:
    """The ``--config`` mapping for the engine from TrainConfig settings given by name (console keywords, the
    panel's widgets): values equal to the default are left out, fields whose CLI flag takes X Y Z (``xyz``
    metadata) are given as X Y Z here (all zero or None: planned) and stored (D, H, W). Without
    ``iterations`` the run is planned in minutes (``DEFAULT_MINUTES`` unless ``minutes`` is given).
    Validated with ``TrainConfig.from_dict(...).validate()``: an invalid value is an ``InputError`` naming it."""
    fields = {name: meta for name, meta in ((f, settings.TrainConfig.__dataclass_fields__[f].metadata) for f in settings.setting_names())}
    defaults = settings.default_settings()
    out: Dict[str, Any] = {}
    for name, value in values.items():
        if name not in fields:
            raise InputError(f"unknown training setting {name!r} (known: {', '.join(fields)})")
        if fields[name].get("xyz"):
            if value is None or not any(value):
                continue
            value = [int(v) for v in reversed(list(value))]
        if isinstance(value, tuple):
            value = list(value)
        default = defaults.get(name)
        if value == default and type(value) is type(default):
            continue
        out[name] = value
    if out.get("minutes") is None and "iterations" not in out and values.get("iterations") is None:
        out["minutes"] = DEFAULT_MINUTES
    if out.get("minutes") is None:
        out.pop("minutes", None)
    settings.TrainConfig.from_dict(out).validate()
    return out


# ------------------------------------------------------------------------------------------- cases


@dataclass
class LabeledCase:
    """A labeled case: a volume and its segmentation; ``sparse``: only the painted slices are labeled."""

    volume: Any
    segmentation: Any
    sparse: bool = False


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
    arr = arr.reshape(ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    if tuple(ext) == (0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1):
        return arr > 0  # the usual case: exactly the reference grid
    # paste the extent into the full grid (EXTENT_REFERENCE_GEOMETRY gives 0..dim-1; be safe anyway)
    lo = [max(0, ext[4]), max(0, ext[2]), max(0, ext[0])]
    hi = [min(shape[0], ext[5] + 1), min(shape[1], ext[3] + 1), min(shape[2], ext[1] + 1)]
    if any(h <= l for l, h in zip(lo, hi)):
        return out
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = arr[lo[0] - ext[4]:hi[0] - ext[4], lo[1] - ext[2]:hi[1] - ext[2],
                                                     lo[2] - ext[0]:hi[2] - ext[0]] > 0
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


# ------------------------------------------------------------------------------ module outputs, scene


def is_module_output(node: Any) -> bool:
    """True for nodes this module created (predictions, uncertainty maps, label-next segmentations, models)."""
    return node is not None and bool(node.GetAttribute(OUTPUT_ATTRIBUTE))


def new_output_node(scene: Any, class_name: str, name: str, kind: str) -> Any:
    """A NEW node of ``class_name``, marked as a module output **before** it enters the scene (so observers
    of NodeAddedEvent already see the mark), with a unique name."""
    node = scene.CreateNodeByClass(class_name)
    node.UnRegister(None)  # owned by the Python variable (as ScriptedLoadableModuleLogic.createParameterNode does)
    node.SetAttribute(OUTPUT_ATTRIBUTE, kind)
    node.SetName(unique_name(scene, name))
    scene.AddNode(node)
    return node


def nodes_by_class(scene: Any, class_name: str) -> List[Any]:
    collection = scene.GetNodesByClass(class_name)
    nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
    return [n for n in nodes if n is not None]


def is_plain_volume(node: Any) -> bool:
    """A scalar volume the user brought (not a label map, not something this module made)."""
    return (node is not None and node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode")
            and not is_module_output(node))


def segmented_volume_pairs(scene: Any) -> List[LabeledCase]:
    """Every segmentation the user made, paired with the volume it references (was drawn on). The module's
    own segmentations (predictions, label-next segmentations) are left out: they are unreviewed."""
    cases = []
    for seg in nodes_by_class(scene, "vtkMRMLSegmentationNode"):
        if is_module_output(seg):
            continue
        volume = seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole())
        if is_plain_volume(volume):
            cases.append(LabeledCase(volume, seg))
    return cases


def volumes_without_segmentation(scene: Any, exclude: Sequence[Any] = ()) -> List[Any]:
    """The user's scalar volumes that no segmentation references and that are not in ``exclude`` (the
    default unlabeled volumes). The module's own volumes (uncertainty maps) are never among them."""
    referenced = set(v.GetID() for v in exclude if v is not None)
    for seg in nodes_by_class(scene, "vtkMRMLSegmentationNode"):
        ref = seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole())
        if ref is not None:
            referenced.add(ref.GetID())
    return [v for v in nodes_by_class(scene, "vtkMRMLScalarVolumeNode") if is_plain_volume(v) and v.GetID() not in referenced]


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


def write_segments(path: str, masks: Dict[str, np.ndarray], records: Sequence[Dict[str, Any]], ijk_to_ras: np.ndarray,
                   later_wins: bool = False, compression_level: int = 1) -> None:
    """Writes the masks (``(k, j, i)``, one per record, in the records' order) as a ``.seg.nrrd`` with the
    records' names, colours, IDs and terminology. ``later_wins``: one layer, a later segment overwrites an
    earlier one where they overlap; otherwise overlapping segments go to separate layers.

    The layers are built and written in numpy's (k, j, i) order (no transposed copy of a large volume); each
    segment's extent is the whole grid (what slicerio writes by default; Slicer accepts a larger extent)."""
    import inspect

    import slicerio

    shape = next(iter(masks.values())).shape if masks else None
    layers: List[np.ndarray] = []
    segments = []
    value_in_layer: List[int] = []
    for record in [r for r in records if r["name"] in masks]:
        mask = masks[record["name"]]
        if later_wins:
            layer = 0
        else:
            layer = next((n for n, lay in enumerate(layers) if not lay[mask].any()), None)
            layer = len(layers) if layer is None else layer
        if layer == len(layers):
            layers.append(np.zeros(shape, dtype=np.uint8))
            value_in_layer.append(0)
        value_in_layer[layer] += 1
        value = value_in_layer[layer]
        if value > 255:
            raise InputError(f"too many segments to write to {path} (more than 255 in a layer)")
        layers[layer][mask] = value
        seg = {"id": record.get("id") or record.get("segment_id") or f"Segment_{len(segments) + 1}", "name": record["name"],
               "color": [float(c) for c in record.get("color", (0.5, 0.5, 0.5))][:3], "labelValue": value, "layer": layer,
               "status": "completed", "extent": [0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1]}
        term = record.get("terminology")
        if isinstance(term, dict):
            term = terminology_to_string(term)
        if term:
            seg["tags"] = {"TerminologyEntry": term}
        segments.append(seg)
    if not layers:
        if shape is None:
            raise InputError(f"nothing to write to {path}: no segment")
        layers.append(np.zeros(shape, dtype=np.uint8))
    # numpy (k, j, i) [, layer] in C order is NRRD's ([layer,] i, j, k): written as it is
    voxels = layers[0] if len(layers) == 1 else np.stack(layers, axis=-1)
    header = {
        "ijkToLPS": RAS_TO_LPS @ np.asarray(ijk_to_ras, dtype=float),
        "segments": segments,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
    }
    if "index_order" in inspect.signature(slicerio.write_segmentation).parameters:
        slicerio.write_segmentation(str(path), dict(header, voxels=voxels), compression_level=compression_level, index_order="C")
    else:  # older slicerio: ([layer,] i, j, k) arrays in Fortran order
        voxels = voxels.transpose(2, 1, 0) if voxels.ndim == 3 else voxels.transpose(3, 2, 1, 0)
        slicerio.write_segmentation(str(path), dict(header, voxels=np.ascontiguousarray(voxels)), compression_level=compression_level)


def export_segmentation(volume_node: Any, segmentation_node: Any, names: Sequence[str], path: str,
                        later_wins: bool = False) -> Dict[str, Any]:
    """Writes the named segments, rasterised on the volume's grid, as a ``.seg.nrrd`` (see ``write_segments``).
    Returns ``{"found": [...], "counts": {name: voxels}}``."""
    check_volume(volume_node)
    masks = segment_masks(volume_node, segmentation_node, names)
    records = [segment_record(segmentation_node, find_segment_id(segmentation_node, n)) for n in names if n in masks]
    shape = tuple(volume_node.GetImageData().GetDimensions()[::-1])
    if not masks:
        masks = {"": np.zeros(shape, dtype=bool)}
    write_segments(path, masks, records, matrix_to_array(world_ijk_to_ras(volume_node)), later_wins)
    return {"found": [r["name"] for r in records], "counts": {n: int(m.sum()) for n, m in masks.items() if n}}


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


def nest_segments(path: str, nested: Dict[str, List[str]], out_path: str) -> str:
    """Rewrites a one-layer prediction so that each segment also holds the segments recorded as nested in it
    (``{"liver": ["tumour"]}``: the liver segment includes the tumour), in separate layers."""
    import slicerio

    seg = slicerio.read_segmentation(str(path))
    voxels = np.asarray(seg["voxels"])
    names = [s["name"] for s in seg["segments"]]

    def mask(s: Dict[str, Any]) -> np.ndarray:
        layer = voxels[int(s.get("layer", 0) or 0)] if voxels.ndim == 4 else voxels
        return (layer == int(s.get("labelValue", 1))).transpose(2, 1, 0)  # (i, j, k) -> (k, j, i)

    masks = {s["name"]: mask(s) for s in seg["segments"]}
    closure = {name: set(nested.get(name, [])) & set(names) for name in names}
    changed = True
    while changed:  # nested in a nested segment: also in the outer one
        changed = False
        for name, inner in closure.items():
            more = set().union(*[closure[i] for i in inner]) - inner - {name} if inner else set()
            if more:
                inner |= more
                changed = True
    for name, inner in closure.items():
        for other in inner:
            masks[name] = masks[name] | masks[other]
    records = [{"id": s.get("id"), "name": s["name"], "color": s.get("color", (0.5, 0.5, 0.5)),
                "terminology": s.get("terminology")} for s in seg["segments"]]
    ijk_to_ras = RAS_TO_LPS @ np.asarray(seg["ijkToLPS"], dtype=float)
    write_segments(out_path, masks, records, ijk_to_ras, later_wins=False)
    return out_path


def import_segmentation(scene: Any, path: str, volume_node: Any, name: Optional[str] = None,
                        nested: Optional[Dict[str, List[str]]] = None, kind: str = OUTPUT_SEGMENTATION) -> Any:
    """A NEW segmentation node read from a ``.seg.nrrd`` (names, colours, terminology as in the file),
    named after the volume, referenced to its geometry, beside it in the subject hierarchy, displayed,
    marked as a module output. ``nested``: segments recorded as nested in others are restored
    (``nest_segments``)."""
    if nested and any(nested.values()):
        path = nest_segments(path, nested, os.path.splitext(str(path))[0] + "-nested.seg.nrrd")
    node = new_output_node(scene, "vtkMRMLSegmentationNode", name or f"{node_name(volume_node)} segmentation", kind)
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
    node = new_output_node(scene, "vtkMRMLSegmentationNode", name or f"{node_name(volume_node)} labels", OUTPUT_LABELS)
    node.SetSourceRepresentationToBinaryLabelmap()
    seg = node.GetSegmentation()
    for i, c in enumerate(classes[1:], start=1):
        sid = str(c.get("segment_id") or c.get("id") or f"Segment_{i}")
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


def import_scalar_volume(scene: Any, path: str, reference_node: Any, name: str, heat: bool = True,
                         kind: str = OUTPUT_UNCERTAINTY) -> Any:
    """A NEW scalar volume node read from ``path`` (e.g. an uncertainty map), shown with a heat colour map,
    marked as a module output (never an unlabeled training volume by default)."""
    node = new_output_node(scene, "vtkMRMLScalarVolumeNode", name, kind)
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


class CheckFailed(InputError):
    """The input check found errors (``check`` holds every message); nothing was started or left behind."""

    def __init__(self, check: "CheckResult") -> None:
        super().__init__("; ".join(check.errors))
        self.check = check


@dataclass
class CheckResult:
    """Messages from ``check_inputs``: ``errors`` block training; ``warnings`` and ``infos`` are shown.

    With an ``export_dir`` the same pass wrote the engine's input files: ``labeled`` (image, segmentation,
    sparse) per case in order and ``volume_files`` (volume ID -> .nrrd)."""

    errors: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    infos: List[str] = field(default_factory=list)
    counts: Dict[str, Dict[str, int]] = field(default_factory=dict)  # case -> segment -> voxels
    segments: List[str] = field(default_factory=list)  # the names checked, in order (a later one wins overlaps)
    records: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # name -> id, colour, terminology (first case)
    overlap: Dict[Tuple[str, str], int] = field(default_factory=dict)  # (earlier, later) -> voxels in both
    labeled: List[Tuple[str, str, bool]] = field(default_factory=list)
    volume_files: Dict[str, str] = field(default_factory=dict)
    rasterised: int = 0  # segment rasterisations done (one per case)

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
                total[name] = total.get(name, 0) + n
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


def check_inputs(labeled: Sequence[Any], segments: Optional[Sequence[str]] = None, unlabeled: Sequence[Any] = (),
                 partial_segments: bool = False, hold_out_last: bool = False, later_wins: bool = False,
                 export_dir: Optional[str] = None) -> CheckResult:
    """What the panel shows before training: segment names across cases, empty and overlapping segments,
    geometry. Each case's segments are rasterised once; with ``export_dir`` that same pass writes the
    engine's input files there (the volume as .nrrd, the segments as one-layer .seg.nrrd)."""
    res = CheckResult()
    cases = as_cases(labeled)
    if not cases:
        res.errors.append("add at least one labeled case (a volume and its segmentation)")
        return res
    if hold_out_last and len(cases) < 2:
        res.errors.append("holding out a case for validation needs at least two labeled cases")
    names = list(segments) if segments else []
    first_seg = cases[0].segmentation
    if not names and first_seg is not None and first_seg.IsA("vtkMRMLSegmentationNode"):
        names = segment_names(first_seg)
    res.segments = names
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
        masks = segment_masks(case.volume, case.segmentation, names)  # the one rasterisation of this case
        res.rasterised += 1
        counts = {name: int(np.count_nonzero(m)) for name, m in masks.items()}
        res.counts[label] = counts
        for name in masks:
            if name not in res.records:
                res.records[name] = segment_record(case.segmentation, find_segment_id(case.segmentation, name))
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
        present = [nm for nm in names if counts.get(nm)]
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
                if not both:
                    continue
                res.overlap[(a, b)] = res.overlap.get((a, b), 0) + both
                if not later_wins:
                    res.errors.append(f"segments '{a}' and '{b}' overlap in '{node_name(case.segmentation)}' ({both} voxels): a voxel "
                                      "can belong to one learned segment only; deselect one of them, or let the later segment in "
                                      "the list win where they overlap (organ, then lesion)")
        if case.sparse:
            res.infos.append(f"{label}: only the painted slices count as labeled")
        if export_dir and not res.errors:
            image = _export_once(res, case.volume, os.path.join(export_dir, f"labeled-{n - 1:03d}.nrrd"))
            seg_path = os.path.join(export_dir, f"labeled-{n - 1:03d}.seg.nrrd")
            records = [res.records[nm] for nm in names if nm in masks]
            if masks:
                write_segments(seg_path, masks, records, matrix_to_array(world_ijk_to_ras(case.volume)), later_wins=True)
            else:
                write_segments(seg_path, {"": np.zeros(tuple(case.volume.GetImageData().GetDimensions()[::-1]), dtype=bool)}, [],
                               matrix_to_array(world_ijk_to_ras(case.volume)))
            res.labeled.append((image, seg_path, case.sparse))
        del masks
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
        if export_dir and not res.errors:
            _export_once(res, volume, os.path.join(export_dir, f"unlabeled-{n:03d}.nrrd"))
    return res


def _export_once(res: CheckResult, volume: Any, path: str) -> str:
    if volume.GetID() not in res.volume_files:
        res.volume_files[volume.GetID()] = export_volume(volume, path)
    return res.volume_files[volume.GetID()]


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


# ------------------------------------------------------------------------------ models in the scene


def is_model_node(node: Any) -> bool:
    return node is not None and node.IsA(MODEL_NODE_CLASS) and node.GetAttribute(OUTPUT_ATTRIBUTE) == OUTPUT_MODEL


def _json_attribute(node: Any, name: str, default: Any) -> Any:
    text = node.GetAttribute(name) if node is not None else None
    try:
        return json.loads(text) if text else default
    except ValueError:
        return default


def model_classes_of(node: Any) -> Optional[List[Dict[str, Any]]]:
    return _json_attribute(node, "CPCLSegment.Classes", None)


def model_nested(node: Any) -> Dict[str, List[str]]:
    return _json_attribute(node, "CPCLSegment.Nested", {}) if is_model_node(node) else {}


def model_summary(node: Any) -> Dict[str, Any]:
    return _json_attribute(node, "CPCLSegment.Summary", {}) if is_model_node(node) else {}


def store_model(scene: Any, path: str, name: str = "CPCLSegment model", classes: Optional[Sequence[Dict[str, Any]]] = None,
                nested: Optional[Dict[str, List[str]]] = None, summary: Optional[Dict[str, Any]] = None,
                run_dir: Optional[str] = None, node: Any = None) -> Any:
    """The model file as a scene node: a text node holding the file base64-encoded, with a text storage node,
    so saving the scene (or an .mrb) saves the model and loading the scene restores it. ``path`` stays the
    node's cached file. ``node``: update that model node instead of making a new one."""
    with open(path, "rb") as f:
        data = f.read()
    if node is None:
        node = new_output_node(scene, MODEL_NODE_CLASS, name, OUTPUT_MODEL)
    node.SetForceCreateStorageNode(slicer.vtkMRMLTextNode.CreateStorageNodeAlways)
    node.SetText(base64.b64encode(data).decode("ascii"))
    node.SetAttribute("CPCLSegment.SHA256", hashlib.sha256(data).hexdigest())
    node.SetAttribute("CPCLSegment.Bytes", str(len(data)))
    node.SetAttribute("CPCLSegment.File", os.path.abspath(path))
    if classes is not None:
        node.SetAttribute("CPCLSegment.Classes", json.dumps(_plain_classes(classes)))
    node.SetAttribute("CPCLSegment.Nested", json.dumps(nested or {}))
    if summary is not None:
        node.SetAttribute("CPCLSegment.Summary", json.dumps(summary, default=str))
    if run_dir:
        node.SetAttribute("CPCLSegment.RunDir", run_dir)
    if node.GetStorageNode() is None:
        node.AddDefaultStorageNode()
    return node


def _plain_classes(classes: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [{k: v for k, v in c.items() if k in ("name", "color", "label_value", "segment_id", "terminology")} for c in classes]


# ---------------------------------------------------------------------------------------- the API


ModelRef = Union[str, Any]  # a model node (the scene's) or a model file path


class LogicCore:
    """Train / segment / rank from nodes: the one API the console logic and the panel call.
    ``scene`` defaults to ``slicer.mrmlScene``.

    Args:
        python: interpreter for the child processes (``PythonSlicer`` inside Slicer).
        env: environment for the child processes (default: this process's).
        work_root: folder for run folders (exported inputs, models, results) and cached model files.
        ensure_dependencies: called before any job starts; raises when a package is missing and was not
            installed (the Slicer module asks the user and installs there).
        tick: called while a blocking call waits (Slicer keeps its window painted with ``processEvents``).
    """

    def __init__(self, scene: Any = None, python: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                 work_root: Optional[str] = None, ensure_dependencies: Optional[Callable[[], None]] = None,
                 tick: Optional[Callable[[], None]] = None) -> None:
        self.scene = scene if scene is not None else slicer.mrmlScene
        ensure_converter_rules()
        self.python = python
        self.env = env
        self.work_root = work_root or os.path.join(tempfile.gettempdir(), "CPCLSegment")
        self.ensure_dependencies = ensure_dependencies or (lambda: None)
        self.tick = tick

    # ------------------------------------------------------------------------------------ helpers

    def new_run_dir(self, kind: str) -> str:
        os.makedirs(self.work_root, exist_ok=True)
        return tempfile.mkdtemp(prefix=f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-", dir=self.work_root)

    def _export_volumes(self, kind: str, volumes: Sequence[Any]) -> Tuple[str, List[str]]:
        """A new run folder with ``volumes`` exported into it (``volume-000.nrrd``, ...); nothing left on failure."""
        run_dir = self.new_run_dir(kind)
        try:
            return run_dir, [export_volume(v, os.path.join(run_dir, f"volume-{n:03d}.nrrd")) for n, v in enumerate(volumes)]
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise

    def _job(self, args: Sequence[Any], name: str, device: str = "auto", **kwargs: Any) -> jobs.Job:
        extra = {"CUDA_VISIBLE_DEVICES": "-1"} if device == "cpu" else None
        return jobs.Job(args, python=self.python, env=self.env, extra_env=extra, name=name, **kwargs)

    @staticmethod
    def _device_arg(device: Optional[str]) -> str:
        device = (device or "auto").lower()
        return "cuda" if device in ("gpu", "cuda") else device

    def _wait(self, job: jobs.Job, on_event: OnEvent) -> Any:
        return job.wait(on_event, tick=self.tick)

    # ----------------------------------------------------------------------------------- training

    def prepare_training(self, labeled: Sequence[Any], unlabeled: Sequence[Any] = (), segments: Optional[Sequence[str]] = None,
                         out: Optional[str] = None, **values: Any) -> Dict[str, Any]:
        """Checks the inputs and exports them in one pass (each case's segments rasterised once), writes the
        ``--config`` file, and returns the run: ``{"args", "run_dir", "out", "check", "module", "config"}``.
        Raises ``InputError`` (nothing left behind) when the check finds errors."""
        module, engine = split_settings(values)
        config = train_config(engine)
        cases = as_cases(labeled)
        unlabeled = [v for v in (unlabeled or []) if v is not None]
        if not segments and cases and cases[0].segmentation is not None and cases[0].segmentation.IsA("vtkMRMLSegmentationNode"):
            segments = segment_names(cases[0].segmentation)
        segments = list(segments or [])
        device = self._device_arg(module["device"])
        if device not in DEVICES:
            raise InputError(f"device must be one of {', '.join(DEVICES)}, not {module['device']!r}")
        init = self.model_file(module["init"]) if module["init"] else None
        run_dir = self.new_run_dir("train")
        inputs = os.path.join(run_dir, "inputs")
        os.makedirs(inputs, exist_ok=True)
        try:
            check = check_inputs(cases, segments, unlabeled, bool(module["partial_segments"]), bool(module["hold_out_last"]),
                                 bool(module["later_wins"]), export_dir=inputs)
            if not check.ok:
                raise CheckFailed(check)
            out = os.path.abspath(out) if out else os.path.join(run_dir, "model.pt")
            args: List[str] = ["train"]
            n_train = len(cases) - 1 if module["hold_out_last"] and len(cases) > 1 else len(cases)
            for n, (image, seg, sparse) in enumerate(check.labeled):
                if n < n_train:
                    args += ["--labeled", image, seg] + (["--annotated-slices", "auto"] if sparse else [])
                else:
                    args += ["--validation", image, seg]
            if unlabeled:
                args += ["--unlabeled", *[check.volume_files[v.GetID()] for v in unlabeled]]
            config_path = os.path.join(run_dir, "config.json")
            with open(config_path, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=1)
            args += ["--segments", *segments, "--out", out, "--device", device, "--config", config_path]
            if module["partial_segments"]:
                args.append("--partial-segments")
            if compares_supervised(module, config, unlabeled):
                args.append("--compare-supervised")
            if init:
                args += ["--init", init]
            if module["spacing"]:
                args += ["--spacing", *[repr(float(v)) for v in module["spacing"]]]
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        record = {"args": args, "out": out, "segments": segments, "device": device, "classes": check.classes(),
                  "nested": check.nested() if module["later_wins"] else {}, "config": config}
        with open(os.path.join(run_dir, "command.json"), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1, default=str)
        return {"args": args, "run_dir": run_dir, "out": out, "check": check, "module": module, "config": config, "record": record}

    def start_training(self, labeled: Sequence[Any], unlabeled: Sequence[Any] = (), segments: Optional[Sequence[str]] = None,
                       out: Optional[str] = None, **values: Any) -> jobs.Job:
        """Checks and exports the inputs, then starts ``cpcl-segment train`` in the background. The job's
        ``result()`` is the model node (a NEW ``vtkMRMLTextNode`` saved with the scene)."""
        self.ensure_dependencies()
        plan = self.prepare_training(labeled, unlabeled, segments, out, **values)
        job = self._train_job(plan["args"], plan["run_dir"], plan["record"])
        job.check = plan["check"]  # what the one rasterisation pass found (warnings, counts), for the panel
        return job.start()

    def resume_training(self, run_dir: str) -> jobs.Job:
        """Continues a stopped or interrupted run from its checkpoint (same inputs, ``--resume``); the
        job's result updates the model node of that run (or makes one)."""
        path = os.path.join(run_dir or "", "command.json")
        if not os.path.isfile(path):
            raise InputError(f"{run_dir} is not a CPCLSegment training folder (no command.json)")
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if not os.path.exists(saved["out"] + ".checkpoint.pt"):
            raise InputError(f"nothing to resume: no checkpoint {saved['out']}.checkpoint.pt (the run completed or was cancelled)")
        self.ensure_dependencies()
        args = [a for a in saved["args"] if a != "--resume"] + ["--resume"]
        return self._train_job(args, run_dir, saved).start()

    @staticmethod
    def can_resume(run_dir: Optional[str]) -> bool:
        if not run_dir or not os.path.isfile(os.path.join(run_dir, "command.json")):
            return False
        try:
            with open(os.path.join(run_dir, "command.json"), encoding="utf-8") as f:
                out = json.load(f).get("out", "")
        except (OSError, ValueError):
            return False
        return os.path.exists(out + ".checkpoint.pt")

    def _train_job(self, args: List[str], run_dir: str, record: Dict[str, Any]) -> jobs.Job:
        out = record["out"]

        def collect(job: jobs.Job) -> Any:
            if not os.path.isfile(out):
                raise jobs.JobError(f"training ended but wrote no model file {out}")
            if not os.path.exists(out + ".checkpoint.pt"):  # completed: the exported inputs are not needed any more
                shutil.rmtree(os.path.join(run_dir, "inputs"), ignore_errors=True)
            done = job.done or {}
            summary = {"segments": record.get("segments"), "status": done.get("status"), "iterations": done.get("iterations"),
                       "method": (record.get("config") or {}).get("method", "cpcl"), "seconds": done.get("seconds")}
            existing = next((n for n in nodes_by_class(self.scene, MODEL_NODE_CLASS)
                             if is_model_node(n) and n.GetAttribute("CPCLSegment.RunDir") == run_dir), None)
            return store_model(self.scene, out, classes=record.get("classes"), nested=record.get("nested"), summary=summary,
                               run_dir=run_dir, node=existing)

        def keep(job: jobs.Job) -> bool:
            if job.status in ("done", "stopped"):
                return True  # the model file (and, when stopped, the checkpoint + inputs for resume) live here
            if job.status == "failed" and os.path.exists(out + ".checkpoint.pt"):
                return True  # interrupted: resumable
            if job.status == "cancelled" and not out.startswith(run_dir):
                # The CLI never writes the model when cancelled (an older file at `out` stays as it was);
                # a checkpoint this run wrote beside it goes.
                ckpt = out + ".checkpoint.pt"
                if os.path.exists(ckpt) and os.path.getmtime(ckpt) >= (job.started_at or 0) - 1:
                    os.remove(ckpt)
            return False

        return self._job(args, "training", record.get("device", "auto"), work_dir=run_dir, collect=collect, keep_work_dir=keep)

    def train(self, labeled: Sequence[Any], unlabeled: Sequence[Any] = (), segments: Optional[Sequence[str]] = None,
              wait: bool = True, on_event: OnEvent = None, out: Optional[str] = None, **values: Any) -> Any:
        """Trains a model; returns the model node (``wait=True``) or the running job. ``values``: module
        settings (``MODULE_SETTINGS``) and any TrainConfig setting by name (``iterations=300``,
        ``minutes=10``, ``lr=1e-3``, ``patch_size=[X, Y, Z]``, ...); without either length, about
        ``DEFAULT_MINUTES`` minutes."""
        job = self.start_training(labeled, unlabeled, segments, out, **values)
        return self._wait(job, on_event) if wait else job

    # ---------------------------------------------------------------------------------- segmenting

    def start_segmentation(self, model: ModelRef, volumes: Sequence[Any], weights: str = "teacher", device: str = "auto",
                           names: Optional[Sequence[str]] = None, kind: str = OUTPUT_SEGMENTATION) -> jobs.Job:
        """Starts ``cpcl-segment predict`` on the volumes; ``result()`` is one new segmentation node per volume."""
        volumes = list(volumes)
        if not volumes:
            raise InputError("select at least one volume to segment")
        if weights not in WEIGHTS:
            raise InputError(f"weights must be one of {', '.join(WEIGHTS)}, not {weights!r}")
        for v in volumes:
            check_volume(v, "volume to segment")
        self.ensure_dependencies()
        path = self.model_file(model)
        nested = model_nested(model)
        run_dir, files = self._export_volumes("segment", volumes)
        out_dir = os.path.join(run_dir, "out")
        os.makedirs(out_dir, exist_ok=True)
        args = ["predict", "--model", path, "--image", *files, "--out", out_dir + os.sep, "--format", ".seg.nrrd",
                "--weights", weights, "--device", self._device_arg(device)]

        def collect(job: jobs.Job) -> List[Any]:
            outputs = (job.done or {}).get("outputs") or []
            if len(outputs) != len(volumes):
                raise jobs.JobError(f"segmentation wrote {len(outputs)} result(s) for {len(volumes)} volume(s)")
            return [import_segmentation(self.scene, p, v, names[i] if names else None, nested, kind)
                    for i, (p, v) in enumerate(zip(outputs, volumes))]

        return self._job(args, "segmentation", self._device_arg(device), work_dir=run_dir, collect=collect).start()

    def segment(self, model: ModelRef, volume: Any, wait: bool = True, on_event: OnEvent = None, weights: str = "teacher",
                device: str = "auto", name: Optional[str] = None) -> Any:
        """Segments one volume (or a list) into NEW segmentation node(s); the job when ``wait=False``."""
        many = isinstance(volume, (list, tuple))
        job = self.start_segmentation(model, list(volume) if many else [volume], weights, device,
                                      None if many or not name else [name])
        if not wait:
            return job
        nodes = self._wait(job, on_event)
        return nodes if many else nodes[0]

    # ------------------------------------------------------------------------------------ ranking

    def start_ranking(self, model: ModelRef, volumes: Sequence[Any], score: str = "auto", device: str = "auto") -> jobs.Job:
        """Starts ``cpcl-segment rank`` with uncertainty maps; ``result()`` is a list of dicts
        ``{rank, volume, score, uncertainty}`` (most useful to label first). The run folder (maps) is kept
        until ``discard_ranking`` is called on the rows."""
        volumes = list(volumes)
        if not volumes:
            raise InputError("select at least one unlabeled volume to rank")
        self.ensure_dependencies()
        path = self.model_file(model)
        run_dir, files = self._export_volumes("rank", volumes)
        unc_dir = os.path.join(run_dir, "uncertainty")
        args = ["rank", "--model", path, "--images", *files, "--out", os.path.join(run_dir, "ranking.csv"),
                "--score", score, "--uncertainty-dir", unc_dir, "--device", self._device_arg(device)]
        by_file = {os.path.normcase(os.path.abspath(f)): v for f, v in zip(files, volumes)}

        def collect(job: jobs.Job) -> List[Dict[str, Any]]:
            rows = []
            for row in (job.done or {}).get("ranking") or []:
                image = os.path.normcase(os.path.abspath(str(row.get("image", ""))))
                volume = by_file.get(image)
                if volume is None:
                    continue
                stem = os.path.basename(image)[: -len(".nrrd")]
                unc = row.get("uncertainty_map") or os.path.join(unc_dir, f"{stem}-uncertainty.nrrd")
                rows.append({"rank": int(row.get("rank", len(rows) + 1)), "volume": volume, "score": float(row["score"]),
                             "uncertainty": unc if os.path.isfile(unc) else None, "run_dir": run_dir, "row": row})
            return rows

        return self._job(args, "ranking", self._device_arg(device), work_dir=run_dir, collect=collect,
                         keep_work_dir=lambda job: job.status == "done").start()

    def rank(self, model: ModelRef, volumes: Sequence[Any], wait: bool = True, on_event: OnEvent = None, score: str = "auto",
             device: str = "auto") -> Any:
        """Ranks volumes by the model's uncertainty (most useful to label first); the job when ``wait=False``."""
        job = self.start_ranking(model, volumes, score, device)
        return self._wait(job, on_event) if wait else job

    @staticmethod
    def discard_ranking(rows: Sequence[Dict[str, Any]]) -> None:
        """Removes the folders that hold the rows' uncertainty maps."""
        for run_dir in {r.get("run_dir") for r in rows if r.get("run_dir")}:
            shutil.rmtree(run_dir, ignore_errors=True)

    def show_uncertainty(self, row: Dict[str, Any]) -> Any:
        """A NEW heat-coloured volume node from a ranking row's uncertainty map (a module output)."""
        if not row.get("uncertainty"):
            raise InputError(f"no uncertainty map was written for '{node_name(row['volume'])}'")
        return import_scalar_volume(self.scene, row["uncertainty"], row["volume"], f"{node_name(row['volume'])} uncertainty")

    # ------------------------------------------------------------------------------------- models

    def model_file(self, model: ModelRef) -> str:
        """A model file path for the child: a path as given (checked), or the model node's cached file,
        written again from the node when the temporary folder lost it."""
        if model is None or model == "":
            raise InputError("no model: train one or load a model file")
        if not isinstance(model, str) and hasattr(model, "GetAttribute"):
            if not is_model_node(model):
                raise InputError(f"'{node_name(model)}' is not a CPCLSegment model node")
            cached = model.GetAttribute("CPCLSegment.File") or ""
            size = int(model.GetAttribute("CPCLSegment.Bytes") or -1)
            if cached and os.path.isfile(cached) and os.path.getsize(cached) == size:
                return cached
            data = base64.b64decode((model.GetText() or "").encode("ascii"))
            if not data or len(data) != size or hashlib.sha256(data).hexdigest() != model.GetAttribute("CPCLSegment.SHA256"):
                raise InputError(f"model node '{node_name(model)}' holds no intact model (size or checksum differ)")
            folder = os.path.join(self.work_root, "models")
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{model.GetAttribute('CPCLSegment.SHA256')[:16]}.pt")
            with open(path + ".tmp", "wb") as f:
                f.write(data)
            os.replace(path + ".tmp", path)
            model.SetAttribute("CPCLSegment.File", path)
            return path
        path = os.path.abspath(str(model))
        if not os.path.isfile(path):
            raise InputError(f"model file not found: {model}")
        return path

    def inspect_model(self, path: str) -> jobs.Job:
        """A started job whose result is what the model file holds (read by the child: no torch here)."""
        return jobs.model_info_job(os.path.abspath(str(path)), python=self.python, env=self.env).start()

    def load_model(self, path: str, info: Optional[Dict[str, Any]] = None, name: Optional[str] = None) -> Any:
        """A NEW model node from a model file. ``info``: what ``inspect_model`` found (read now, blocking,
        when not given), so a bad file is refused before a node is made."""
        path = self.model_file(str(path))
        if info is None:
            info = self._wait(self.inspect_model(path), None)
        summary = {"segments": [c["name"] for c in info["classes"][1:]], "status": info.get("status"),
                   "iterations": info.get("iterations"), "method": info.get("method"), "file": path}
        nested = {}
        sidecar = os.path.splitext(path)[0] + ".run.json"
        if os.path.isfile(sidecar):  # the panel's "Save model…" keeps the overlap nesting there
            try:
                with open(sidecar, encoding="utf-8") as f:
                    nested = (json.load(f).get("slicer") or {}).get("nested") or {}
            except (OSError, ValueError):
                nested = {}
        return store_model(self.scene, path, name or os.path.splitext(os.path.basename(path))[0], classes=info["classes"],
                           nested=nested, summary=summary)

    def save_model(self, model: Any, target: str) -> str:
        """Writes the model node's file to ``target`` (atomically) with its run record beside it; the run
        record also keeps the overlap nesting (``slicer.nested``) for ``load_model``."""
        source = self.model_file(model)
        shutil.copyfile(source, target + ".tmp")
        os.replace(target + ".tmp", target)
        record: Dict[str, Any] = {}
        run = os.path.splitext(source)[0] + ".run.json"
        if os.path.isfile(run):
            try:
                with open(run, encoding="utf-8") as f:
                    record = json.load(f)
            except (OSError, ValueError):
                record = {}
        if is_model_node(model):
            record["slicer"] = {"nested": model_nested(model), "summary": model_summary(model)}
        if record:
            with open(os.path.splitext(target)[0] + ".run.json", "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1)
        return target

    def model_classes(self, model: ModelRef) -> List[Dict[str, Any]]:
        """The model's classes (background first): from the node, else read by a child process."""
        classes = model_classes_of(model) if is_model_node(model) else None
        if classes:
            return classes
        info = self._wait(self.inspect_model(self.model_file(model)), None)
        if is_model_node(model):
            model.SetAttribute("CPCLSegment.Classes", json.dumps(_plain_classes(info["classes"])))
        return info["classes"]

    def empty_segmentation_for(self, model: ModelRef, volume: Any, name: Optional[str] = None) -> Any:
        """A NEW empty segmentation with the model's segment names / colours / terminology on ``volume``."""
        return empty_segmentation(self.scene, volume, self.model_classes(model), name)


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
