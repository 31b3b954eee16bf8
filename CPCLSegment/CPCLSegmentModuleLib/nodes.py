"""Reading the scene's nodes: volumes, their voxels and geometry, segments and their masks on a volume's grid.

Each labeled case's selected segments are rasterised onto the volume's grid with
``vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry(...,
vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, ...)`` (the segmentation's own transform and grid are resampled away);
a volume under a linear transform is read *hardened* from an unscened copy, the user's node is untouched; a
non-linear transform is refused with a message. Arrays are numpy ``(k, j, i)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer
from CPCLSegmentLib.errors import InputError

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # Slicer's RAS world to the LPS of NRRD and ITK files


def node_name(node: Any) -> str:
    return node.GetName() if node is not None and node.GetName() else "(unnamed)"


def check_volume(node: Any, role: str = "volume") -> None:
    """A 3-D scalar volume with voxels, and no non-linear transform; InputError naming the node otherwise."""
    if node is None:
        raise InputError(f"no {role} selected")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"{role} '{node_name(node)}' is a {node.GetClassName()}, not a scalar volume")
    browser = sequence_browser_of(node)
    if browser is not None:
        raise InputError(f"{role} '{node_name(node)}' is the shown frame of the sequence '{node_name(browser)}': only that one "
                         "frame would be used. To use this frame, clone it first (Data module: right-click the volume, "
                         "'Clone'); to use several frames, clone each")
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


def sequence_browser_of(node: Any) -> Optional[Any]:
    """The sequence browser whose proxy node ``node`` is (the frame a sequence shows now), or None
    (``vtkMRMLSequenceBrowserNode::IsProxyNodeID``, as ``vtkSlicerSequencesLogic::GetBrowserNodesForProxyNode`` finds it)."""
    scene = node.GetScene() if node is not None else None
    if scene is None or node.GetID() is None:
        return None
    browsers = scene.GetNodesByClass("vtkMRMLSequenceBrowserNode")
    for i in range(browsers.GetNumberOfItems()):
        browser = browsers.GetItemAsObject(i)
        if browser is not None and browser.IsProxyNodeID(node.GetID()):
            return browser
    return None


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
    labelmap_name = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    seg = segmentation_node.GetSegmentation()
    if seg.GetNumberOfSegments() and not seg.ContainsRepresentation(labelmap_name):
        segmentation_node = labelmap_copy(segmentation_node)  # the user's node is never converted
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


def labelmap_copy(segmentation_node: Any) -> Any:
    """An unscened copy of a segmentation whose source is not a labelmap (closed surface), its parent transform
    hardened, with the labelmap representation made in the copy: the user's node keeps its source
    representation and content (converting in place is what Slicer's exporters do to the node itself)."""
    copy = slicer.vtkMRMLSegmentationNode()
    copy.SetName(segmentation_node.GetName())
    copy.GetSegmentation().DeepCopy(segmentation_node.GetSegmentation())
    transform = segmentation_node.GetParentTransformNode()
    if transform is not None:
        to_world = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(transform, None, to_world)
        copy.ApplyTransform(to_world)  # the surfaces and the conversion's reference geometry, in world coordinates
    copy.GetSegmentation().CreateRepresentation(slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName())
    return copy


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
