"""Files -> NEW nodes: results become new nodes marked as module outputs; segmentations are named after the
volume, carry the model's segment names and colours, are referenced to the volume geometry and sit beside it in
the subject hierarchy; segments recorded as nested are restored. Input nodes are never modified."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import slicer
from CPCLSegmentLib.errors import InputError

from . import attributes
from .export import RAS_TO_LPS, terminology_to_string, write_segments
from .nodes import ensure_converter_rules, node_name, volume_array
from .resultread import ReadResult, add_segments, read_result
from .scene import OUTPUT_LABELS, OUTPUT_SEGMENTATION, OUTPUT_UNCERTAINTY, new_output_node


HEAT_COLOR_NODE_IDS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeIron")


def _subject_hierarchy_beside(scene: Any, node: Any, reference: Any) -> None:
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return
    item, ref_item = sh.GetItemByDataNode(node), sh.GetItemByDataNode(reference)
    if item and ref_item:
        sh.SetItemParent(item, sh.GetItemParent(ref_item))


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


def read_segmentation_result(path: str, nested: Optional[Dict[str, List[str]]] = None) -> Optional[ReadResult]:
    """What ``import_segmentation`` reads from the file, read on any thread (``resultread.read_result``; nested
    segments restored first, ``nest_segments``); None where the storage node must read it on the GUI thread."""
    if nested and any(nested.values()):
        path = nest_segments(path, nested, os.path.splitext(str(path))[0] + "-nested.seg.nrrd")
    return read_result(path)


def import_segmentation(scene: Any, path: str, volume_node: Any, name: Optional[str] = None,
                        nested: Optional[Dict[str, List[str]]] = None, kind: str = OUTPUT_SEGMENTATION,
                        target: Any = None, read: Optional[ReadResult] = None) -> Any:
    """A NEW segmentation node read from a ``.seg.nrrd`` (names, colours, terminology as in the file),
    named after the volume, referenced to its geometry, beside it in the subject hierarchy, displayed,
    marked as a module output. ``nested``: segments recorded as nested in others are restored
    (``nest_segments``). ``target``: an existing segmentation node whose segments are replaced instead (its name
    kept; marked as a module output from then on). ``read``: the file already read on a worker thread
    (``read_segmentation_result``): the node is built from it, the file is not read again."""
    if read is None:
        if nested and any(nested.values()):
            path = nest_segments(path, nested, os.path.splitext(str(path))[0] + "-nested.seg.nrrd")
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(path))
    fill = (lambda node: storage.ReadData(node)) if read is None else (lambda node: add_segments(node, read) or True)
    if target is not None:
        was = target.StartModify()
        try:
            if not fill(target):  # replaces the node's segments
                raise InputError(f"cannot read the segmentation result {path}")
            target.SetAttribute(attributes.OUTPUT, kind)
            finish_segmentation_node(scene, target, volume_node)
        finally:
            target.EndModify(was)
        return target
    node = new_output_node(scene, "vtkMRMLSegmentationNode", name or f"{node_name(volume_node)} segmentation", kind)
    if not fill(node):
        scene.RemoveNode(node)
        raise InputError(f"cannot read the segmentation result {path}")
    finish_segmentation_node(scene, node, volume_node)
    return node


class ResultImports:
    """A segmentation job's results: each read on a worker thread as the child reports it (``started``, the
    ``predict`` event), made a node on the GUI thread one per poll once read (``import_ready``); ``take`` (the job's
    collect) gives each volume's node, waiting for a read still under way or reading what was never reported.
    ``one(index, path, read)`` builds a volume's node (``import_segmentation``); ``imported`` holds those built."""

    def __init__(self, one: Callable[[int, str, Optional[ReadResult]], Any], count: int,
                 nested: Optional[Dict[str, List[str]]] = None) -> None:
        self.one, self.count, self.nested = one, count, nested
        self.imported: Dict[int, Any] = {}
        self.reads: Dict[int, Tuple[str, "Future[Optional[ReadResult]]"]] = {}
        self._pool: Optional[ThreadPoolExecutor] = None

    def started(self, event: Dict[str, Any]) -> None:
        i, path = int(event.get("index") or 0) - 1, str(event.get("output") or "")
        if 0 <= i < self.count and i not in self.imported and i not in self.reads and os.path.isfile(path):
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpcl-result-read")
            self.reads[i] = (path, self._pool.submit(read_segmentation_result, path, self.nested))

    def import_ready(self) -> bool:
        """Builds the node of one result read by now (GUI thread); whether there was one."""
        for i in sorted(self.reads):
            path, future = self.reads[i]
            if future.done():
                del self.reads[i]
                self.imported[i] = self.one(i, path, _read_or_none(future))
                return True
        return False

    def take(self, i: int, path: str) -> Any:
        if i in self.imported:
            return self.imported.pop(i)
        read_path, future = self.reads.pop(i, (None, None))
        return self.one(i, path, _read_or_none(future) if future is not None and read_path == path else None)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def _read_or_none(future: "Future[Optional[ReadResult]]") -> Optional[ReadResult]:
    """The read's result; None when it failed (the storage node then reads the file and reports its error)."""
    try:
        return future.result()
    except Exception:  # noqa: BLE001
        return None


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


def import_scalar_volume(scene: Any, path: str, reference_node: Any, name: str, heat: bool = True,
                         kind: str = OUTPUT_UNCERTAINTY, node: Any = None) -> Any:
    """A NEW scalar volume node read from ``path`` (e.g. an uncertainty map), shown with a heat colour map,
    marked as a module output (never an unlabeled training volume by default) and referencing ``reference_node``
    (``attributes.SOURCE_VOLUME_ROLE``). ``node``: an earlier output to read the file into instead (it is reused, not duplicated)."""
    made = node is None
    if made:
        node = new_output_node(scene, "vtkMRMLScalarVolumeNode", name, kind)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        if made:
            scene.RemoveNode(node)
        raise InputError(f"cannot read {path}")
    node.SetNodeReferenceID(attributes.SOURCE_VOLUME_ROLE, reference_node.GetID())
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
