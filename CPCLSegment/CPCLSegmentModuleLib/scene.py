"""The user's cases and volumes in the scene, and the module's own outputs.

Nodes the module creates carry ``attributes.OUTPUT`` (value: what they are) so the panel never picks them as
training inputs by itself (``is_module_output``): predictions and label-next segmentations are not "segmented
volumes", uncertainty maps are not unlabeled volumes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Sequence

from CPCLSegmentLib.errors import InputError

from . import attributes
from .nodes import sequence_browser_of


# What a node the module created is (the value of its ``attributes.OUTPUT``); such nodes are never selected as
# training inputs automatically (``is_module_output``).
OUTPUT_SEGMENTATION, OUTPUT_UNCERTAINTY, OUTPUT_LABELS, OUTPUT_MODEL = "segmentation", "uncertainty", "labels", "model"


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


def is_module_output(node: Any) -> bool:
    """True for nodes this module created (predictions, uncertainty maps, label-next segmentations, models)."""
    return node is not None and bool(node.GetAttribute(attributes.OUTPUT))


def unique_name(scene: Any, base: str) -> str:
    return scene.GenerateUniqueName(base) if scene.GetFirstNodeByName(base) is not None else base


def new_output_node(scene: Any, class_name: str, name: str, kind: str) -> Any:
    """A NEW node of ``class_name``, marked as a module output **before** it enters the scene (so observers
    of NodeAddedEvent already see the mark), with a unique name."""
    node = scene.CreateNodeByClass(class_name)
    node.UnRegister(None)  # owned by the Python variable (as ScriptedLoadableModuleLogic.createParameterNode does)
    node.SetAttribute(attributes.OUTPUT, kind)
    node.SetName(unique_name(scene, name))
    scene.AddNode(node)
    return node


def nodes_by_class(scene: Any, class_name: str) -> List[Any]:
    collection = scene.GetNodesByClass(class_name)
    nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
    return [n for n in nodes if n is not None]


def is_plain_volume(node: Any) -> bool:
    """A scalar volume the user brought (not a label map, not something this module made, not the frame a sequence
    shows now: only that frame would be used)."""
    return (node is not None and node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode")
            and not is_module_output(node) and sequence_browser_of(node) is None)


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


def output_for(scene: Any, kind: str, volume: Any) -> Any:
    """The module's output of ``kind`` made for ``volume`` (the latest), or None: Label next reuses the uncertainty
    map (``attributes.SOURCE_VOLUME_ROLE``) and the labels segmentation (drawn on the volume) of a volume instead of adding new ones.
    A labels segmentation added as a labeled case is no longer an output and is not found."""
    if volume is None:
        return None
    class_name = "vtkMRMLScalarVolumeNode" if kind == OUTPUT_UNCERTAINTY else "vtkMRMLSegmentationNode"
    found = None
    for node in nodes_by_class(scene, class_name):
        if node.GetAttribute(attributes.OUTPUT) != kind:
            continue
        role = attributes.SOURCE_VOLUME_ROLE if kind == OUTPUT_UNCERTAINTY else node.GetReferenceImageGeometryReferenceRole()
        if node.GetNodeReference(role) is volume:
            found = node
    return found
