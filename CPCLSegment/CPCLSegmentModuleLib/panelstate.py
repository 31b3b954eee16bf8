"""The panel's state in the module's parameter node (saved with the scene): labeled cases, segments, volumes and
the model, looked up again after every scene close, never cached.

- **Cases are pairs.** Each labeled case is stored under its own node-reference roles
  (``CaseVolume.<key>`` / ``CaseSegmentation.<key>``), so deleting a node drops that pair (with a message)
  and never shifts a segmentation onto another volume, as two parallel reference lists would.
- **Auto-selection** never picks the module's own outputs (``scene.is_module_output``): predictions and
  label-next segmentations are not "segmented volumes", uncertainty maps are not unlabeled volumes.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

from CPCLSegmentLib.errors import InputError

from .models import is_model_node
from .nodes import find_segment_id, node_name, segment_names, sequence_browser_of
from .scene import LabeledCase, is_plain_volume, segmented_volume_pairs, volumes_without_segmentation

MODULE_NAME = "CPCLSegment"


def parameter_node(scene: Any) -> Any:
    """The module's singleton parameter node (made when missing), as ``ScriptedLoadableModuleLogic.getParameterNode``
    finds it: a ``vtkMRMLScriptedModuleNode`` with singleton tag and ``ModuleName`` attribute "CPCLSegment"."""
    node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
    if node is not None:
        if node.GetAttribute("ModuleName") != MODULE_NAME:  # a scene close resets the node's attributes
            node.SetAttribute("ModuleName", MODULE_NAME)
        return node
    node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
    node.UnRegister(None)
    node.SetSingletonTag(MODULE_NAME)
    node.SetAttribute("ModuleName", MODULE_NAME)
    node.SetName(scene.GenerateUniqueName(MODULE_NAME))
    return scene.AddNode(node)


class PanelState:
    """The parameter node's content as the panel uses it. Needs ``scene``, ``log`` and ``_closing``
    (``panel.PanelController`` sets them)."""

    scene: Any
    log: List[str]
    _closing: bool

    # ---------------------------------------------------------------- parameter node

    @property
    def closing(self) -> bool:
        """True between the scene's StartCloseEvent and EndCloseEvent (the widget does not redraw then)."""
        return self._closing

    @property
    def node(self) -> Any:
        node = parameter_node(self.scene)
        if node.GetParameter("Initialized") != "1" and not self._closing:  # no defaults from a half-closed scene
            self._initialize(node)
        return node

    def _initialize(self, node: Any) -> None:
        was = node.StartModify()
        node.SetParameter("Initialized", "1")
        for case in segmented_volume_pairs(self.scene):
            self._add_case(node, case.volume, case.segmentation, False)
        for v in volumes_without_segmentation(self.scene, [c.volume for c in self._cases(node)]):
            node.AddNodeReferenceID("UnlabeledVolume", v.GetID())
        node.EndModify(was)

    def _json(self, key: str, default: Any, node: Any = None) -> Any:
        text = (node or self.node).GetParameter(key)
        try:
            return json.loads(text) if text else default
        except ValueError:
            return default

    def _set_json(self, key: str, value: Any, node: Any = None) -> None:
        (node or self.node).SetParameter(key, json.dumps(value))

    def _refs(self, role: str) -> List[Any]:
        node = self.node
        return [n for n in (node.GetNthNodeReference(role, i) for i in range(node.GetNumberOfNodeReferences(role))) if n is not None]

    def _set_refs(self, role: str, nodes: Sequence[Any]) -> None:
        node = self.node
        was = node.StartModify()
        node.RemoveNodeReferenceIDs(role)
        for n in nodes:
            if n is not None:
                node.AddNodeReferenceID(role, n.GetID())
        node.EndModify(was)

    # ------------------------------------------------------------------------- cases

    def _entries(self, node: Any) -> List[Dict[str, Any]]:
        return self._json("Cases", [], node)

    def _cases(self, node: Any) -> List[LabeledCase]:
        out = []
        for e in self._entries(node):
            v, s = node.GetNodeReference(f"CaseVolume.{e['key']}"), node.GetNodeReference(f"CaseSegmentation.{e['key']}")
            if v is not None and s is not None:
                out.append(LabeledCase(v, s, bool(e.get("sparse"))))
        return out

    def cases(self) -> List[LabeledCase]:
        """The labeled cases: pairs whose two nodes still exist, in the order they were added."""
        return self._cases(self.node)

    def _add_case(self, node: Any, volume: Any, segmentation: Any, sparse: bool) -> bool:
        entries = self._entries(node)
        for e in entries:
            if (node.GetNodeReferenceID(f"CaseVolume.{e['key']}") == volume.GetID()
                    and node.GetNodeReferenceID(f"CaseSegmentation.{e['key']}") == segmentation.GetID()):
                return False
        key = str(max([int(e["key"]) for e in entries] + [0]) + 1)
        was = node.StartModify()
        node.SetNodeReferenceID(f"CaseVolume.{key}", volume.GetID())
        node.SetNodeReferenceID(f"CaseSegmentation.{key}", segmentation.GetID())
        entries.append({"key": key, "sparse": bool(sparse), "volume": volume.GetName(), "segmentation": segmentation.GetName()})
        self._set_json("Cases", entries, node)
        node.EndModify(was)
        return True

    def add_case(self, volume: Any, segmentation: Any, sparse: bool = False) -> None:
        """Adds a (volume, segmentation) pair; a labeled volume is no longer an unlabeled one by default."""
        if volume is None or segmentation is None:
            raise InputError("select a volume and its segmentation first")
        if not volume.IsA("vtkMRMLScalarVolumeNode") or volume.IsA("vtkMRMLLabelMapVolumeNode"):
            raise InputError(f"'{node_name(volume)}' is not a scalar volume")
        if not segmentation.IsA("vtkMRMLSegmentationNode"):
            raise InputError(f"'{node_name(segmentation)}' is not a segmentation")
        node = self.node
        was = node.StartModify()
        if self._add_case(node, volume, segmentation, sparse):
            self._set_refs("UnlabeledVolume", [v for v in self.unlabeled() if v is not volume])
        node.EndModify(was)

    def add_all_cases(self) -> int:
        """Adds every segmentation the user made with the volume it was drawn on (module outputs excluded)."""
        node = self.node
        was = node.StartModify()
        added = [c for c in segmented_volume_pairs(self.scene) if self._add_case(node, c.volume, c.segmentation, False)]
        labeled = {c.volume.GetID() for c in self.cases()}
        self._set_refs("UnlabeledVolume", [v for v in self.unlabeled() if v.GetID() not in labeled])
        node.EndModify(was)
        return len(added)

    def remove_cases(self, rows: Sequence[int]) -> None:
        node = self.node
        valid = [e for e in self._entries(node) if node.GetNodeReference(f"CaseVolume.{e['key']}") is not None
                 and node.GetNodeReference(f"CaseSegmentation.{e['key']}") is not None]
        gone = [e for i, e in enumerate(valid) if i in set(rows)]
        self._drop_entries(node, gone)

    def set_sparse(self, row: int, sparse: bool) -> None:
        node = self.node
        entries = self._entries(node)
        valid = [e for e in entries if node.GetNodeReference(f"CaseVolume.{e['key']}") is not None
                 and node.GetNodeReference(f"CaseSegmentation.{e['key']}") is not None]
        if 0 <= row < len(valid):
            valid[row]["sparse"] = bool(sparse)
            self._set_json("Cases", entries, node)

    def _drop_entries(self, node: Any, gone: Sequence[Dict[str, Any]]) -> None:
        if not gone:
            return
        keys = {e["key"] for e in gone}
        was = node.StartModify()
        for key in keys:
            node.RemoveNodeReferenceIDs(f"CaseVolume.{key}")
            node.RemoveNodeReferenceIDs(f"CaseSegmentation.{key}")
        self._set_json("Cases", [e for e in self._entries(node) if e["key"] not in keys], node)
        node.EndModify(was)

    def on_node_removed(self) -> None:
        """A node was deleted: pairs that lost their volume or segmentation are dropped, with a message."""
        if self._closing:
            return
        node = parameter_node(self.scene)
        broken = []
        for e in self._entries(node):
            v, s = node.GetNodeReference(f"CaseVolume.{e['key']}"), node.GetNodeReference(f"CaseSegmentation.{e['key']}")
            if v is None or s is None:
                broken.append(e)
                what = "volume" if v is None else "segmentation"
                self.log.append(f"case '{e.get('volume')}' + '{e.get('segmentation')}' removed from the labeled cases: its {what} "
                                "was deleted")
        self._drop_entries(node, broken)

    # ---------------------------------------------------------------------- segments

    def _available_segments(self) -> List[Tuple[str, Tuple[float, float, float]]]:
        out: Dict[str, Tuple[float, float, float]] = {}  # every case's segments, in order of first appearance
        for case in self.cases():
            seg = case.segmentation
            for name in segment_names(seg):
                out.setdefault(name, tuple(seg.GetSegmentation().GetSegment(find_segment_id(seg, name)).GetColor()))
        return list(out.items())

    def segment_choices(self) -> List[Tuple[str, Tuple[float, float, float], bool]]:
        """Every case's segments (first appearance first) in the panel's order (``move_segment``; a later one wins overlaps),
        each with its colour and whether it is learned."""
        available = self._available_segments()
        order = self._json("SegmentOrder", [])
        names = [n for n in order if n in dict(available)] + [n for n, _ in available if n not in order]
        unchecked = set(self._json("SegmentsUnchecked", []))
        colors = dict(available)
        return [(n, colors[n], n not in unchecked) for n in names]

    def checked_segments(self) -> List[str]:
        return [n for n, _, checked in self.segment_choices() if checked]

    def set_segment_checked(self, name: str, checked: bool) -> None:
        unchecked = set(self._json("SegmentsUnchecked", []))
        unchecked = unchecked - {name} if checked else unchecked | {name}
        self._set_json("SegmentsUnchecked", sorted(unchecked))

    def move_segment(self, name: str, delta: int) -> None:
        """Moves a segment up (-1) or down (+1) in the list: with ``later_wins``, a later segment wins overlaps."""
        names = [n for n, _, _ in self.segment_choices()]
        if name not in names:
            return
        i = names.index(name)
        j = max(0, min(len(names) - 1, i + delta))
        names.insert(j, names.pop(i))
        self._set_json("SegmentOrder", names)

    # ----------------------------------------------------------------------- volumes

    def unlabeled(self) -> List[Any]:
        """The checked unlabeled volumes; a volume ticked automatically that turned out to be a sequence's shown frame
        (Slicer adds the proxy node before the browser references it) is not among them."""
        auto = set(self._json("AutoUnlabeled", []))
        return [v for v in self._refs("UnlabeledVolume") if v.GetID() not in auto or sequence_browser_of(v) is None]

    def set_unlabeled(self, nodes: Sequence[Any]) -> None:
        self._set_refs("UnlabeledVolume", nodes)
        self._set_json("AutoUnlabeled", [])  # the user's choice: a sequence frame ticked by hand is refused with a message

    def segment_volumes(self) -> List[Any]:
        return self._refs("SegmentVolume")

    def set_segment_volumes(self, nodes: Sequence[Any]) -> None:
        self._set_refs("SegmentVolume", nodes)

    def on_node_added(self, node: Any) -> bool:
        """A new volume is an unlabeled candidate by default, unless the module made it, a segmentation
        references it, or a scene is being loaded (the loaded scene's own selections apply). True if checked."""
        if node is None or self._closing or self.scene.IsImporting() or not is_plain_volume(node):
            return False
        pnode = parameter_node(self.scene)
        if pnode.GetParameter("Initialized") != "1":
            return False  # the first look at the scene picks the defaults
        if node not in volumes_without_segmentation(self.scene, [c.volume for c in self.cases()]):
            return False
        if node.GetID() not in {v.GetID() for v in self.unlabeled()}:
            pnode.AddNodeReferenceID("UnlabeledVolume", node.GetID())
            self._set_json("AutoUnlabeled", self._json("AutoUnlabeled", [], pnode) + [node.GetID()], pnode)
        return True

    # ------------------------------------------------------------------------- model

    def model(self) -> Optional[Any]:
        node = self.node.GetNodeReference("Model")
        return node if is_model_node(node) else None

    def set_model(self, model_node: Optional[Any]) -> None:
        self.node.SetNodeReferenceID("Model", model_node.GetID() if model_node is not None else None)
