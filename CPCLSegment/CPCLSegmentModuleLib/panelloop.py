"""The label -> train loop in the panel: rank, correct the segmentation "Label next" opened, add it as a labeled
case, train again, and see how the held-out case's Dice changed from the last round.

- **The segmentation being labeled** is the one Label next last opened in the Segment Editor (empty or pre-filled),
  kept as a node reference of the parameter node (``LABELING_ROLE``), so it survives a scene save.
- **Add as labeled case** pairs it with the volume it was drawn on, refuses it while nothing is painted, takes the
  module's output mark off it (reviewed by the user, it is an input now) and puts the case before the held-out
  case, so that every round scores the same held-out case (``rounds.order_cases``).
- **Rounds**: when training starts, what it holds out and how many cases it trains on are kept with its run folder;
  when it ends, its held-out Dice joins the parameter node's round history and the panel shows the change from the
  previous round (``rounds.dice_change``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
from vtk.util import numpy_support

from CPCLSegmentLib.errors import InputError

from . import attributes, rounds
from .nodes import node_name, segment_ids
from .scene import OUTPUT_LABELS, LabeledCase

LABELING_ROLE = "LabelingSegmentation"
ROUNDS_KEY, PENDING_KEY = "Rounds", "RoundPending"
MAX_ROUNDS = 50
# vtkSegmentationConverter::GetSegmentationBinaryLabelmapRepresentationName() / ...ClosedSurfaceRepresentationName()
LABELMAP, SURFACE = "Binary labelmap", "Closed surface"


def painted(segmentation: Any) -> bool:
    """Whether any segment of ``segmentation`` has a voxel (its binary labelmap holds its label value), or, without
    a labelmap, a closed surface with points: an untouched Label next segmentation is not a labeled case."""
    seg = segmentation.GetSegmentation()
    for sid in segment_ids(segmentation):
        segment = seg.GetSegment(sid)
        labelmap = segment.GetRepresentation(LABELMAP)
        if labelmap is not None:
            scalars = labelmap.GetPointData().GetScalars() if labelmap.GetPointData() is not None else None
            if scalars is not None and np.any(numpy_support.vtk_to_numpy(scalars) == segment.GetLabelValue()):
                return True
            continue
        surface = segment.GetRepresentation(SURFACE)
        if surface is not None and surface.GetNumberOfPoints() > 0:
            return True
    return False


def drawn_on(segmentation: Any) -> Optional[Any]:
    """The volume a segmentation was drawn on (its reference image geometry node)."""
    return segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())


class PanelLoop:
    """The loop's state for ``panel.PanelController`` (uses ``node``, ``cases``, ``add_case``, ``setting``,
    ``_entries``, ``_json``, ``_set_json`` of ``PanelState`` / ``PanelSettings``)."""

    node: Any
    log: List[str]

    # ------------------------------------------------------------------ the segmentation being labeled

    def start_labeling(self, segmentation: Any) -> None:
        """Label next opened ``segmentation`` in the Segment Editor: it is the one "Add as labeled case" adds."""
        self.node.SetNodeReferenceID(LABELING_ROLE, segmentation.GetID() if segmentation is not None else None)

    def labeling(self) -> Optional[Any]:
        """The segmentation Label next opened, while it is not a labeled case yet (else None)."""
        seg = self.node.GetNodeReference(LABELING_ROLE)
        if seg is None or drawn_on(seg) is None:
            return None
        if any(c.segmentation is seg for c in self.cases()):  # type: ignore[attr-defined]
            return None
        return seg

    def add_labeled_case(self) -> LabeledCase:
        """Adds the segmentation being labeled, with its volume, as a labeled case (before the held-out case)."""
        seg = self.labeling()
        if seg is None:
            raise InputError("no segmentation to add: rank the unlabeled volumes, select one and press Label next first")
        volume = drawn_on(seg)
        if not painted(seg):
            raise InputError(f"'{node_name(seg)}' is empty: paint (or correct) its segments in the Segment Editor first")
        node = self.node
        was = node.StartModify()
        if seg.GetAttribute(attributes.OUTPUT) == OUTPUT_LABELS:
            seg.RemoveAttribute(attributes.OUTPUT)  # reviewed by the user: an input from now on ("Add all" finds it too)
        self.add_case(volume, seg, False)  # type: ignore[attr-defined]
        entries = self._entries(node)  # type: ignore[attr-defined]
        key = next(e["key"] for e in entries if node.GetNodeReferenceID(f"CaseSegmentation.{e['key']}") == seg.GetID())
        order = rounds.order_cases([e["key"] for e in entries], key, bool(self.setting("hold_out_last")))  # type: ignore[attr-defined]
        by_key = {e["key"]: e for e in entries}
        self._set_json("Cases", [by_key[k] for k in order], node)  # type: ignore[attr-defined]
        node.SetNodeReferenceID(LABELING_ROLE, None)
        node.EndModify(was)
        self.log.append(f"'{node_name(volume)}' + '{node_name(seg)}' added to the labeled cases")
        return LabeledCase(volume, seg)

    # ------------------------------------------------------------------------------------- rounds

    def start_round(self, run_dir: str) -> None:
        """Training started in ``run_dir``: keeps what it holds out and how many labeled cases it trains on."""
        cases = self.cases()  # type: ignore[attr-defined]
        held_out = node_name(cases[-1].volume) if self.setting("hold_out_last") and len(cases) > 1 else None  # type: ignore[attr-defined]
        self._set_json(PENDING_KEY, {"run_dir": run_dir, "held_out": held_out,  # type: ignore[attr-defined]
                                     "labeled": len(cases) - (1 if held_out else 0)})

    def finish_round(self, run_dir: Optional[str], done: Dict[str, Any]) -> Optional[str]:
        """Training in ``run_dir`` ended with the CLI's ``done`` event: its round joins the history (a resumed run
        replaces its own); returns the line the panel shows, or None when the run was not started here."""
        pending = self._json(PENDING_KEY, {})  # type: ignore[attr-defined]
        if not run_dir or pending.get("run_dir") != run_dir:
            return None
        record = dict(rounds.round_record(done or {}, pending.get("held_out"), int(pending.get("labeled") or 0)), run_dir=run_dir)
        history = [r for r in self.rounds() if r.get("run_dir") != run_dir] + [record]
        self._set_json(ROUNDS_KEY, history[-MAX_ROUNDS:])  # type: ignore[attr-defined]
        return self.round_text()

    def rounds(self) -> List[Dict[str, Any]]:
        history = self._json(ROUNDS_KEY, [])  # type: ignore[attr-defined]
        return [r for r in history if isinstance(r, dict)] if isinstance(history, list) else []

    def round_text(self) -> str:
        """How the held-out Dice changed from the previous round ("" before a round that held a case out)."""
        history = self.rounds()
        if not history:
            return ""
        return rounds.dice_change(history[-2] if len(history) > 1 else None, history[-1]) or ""

