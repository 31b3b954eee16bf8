"""Every decision the CPCLSegment panel makes, without Qt: the widget is a thin mapping of ``view()`` to Qt.

``PanelController`` holds the panel's state in the module's parameter node (saved with the scene) and in its
running jobs, and answers the widget's questions:

- **Cases are pairs.** Each labeled case is stored under its own node-reference roles
  (``CaseVolume.<key>`` / ``CaseSegmentation.<key>``), so deleting a node drops that pair (with a message)
  and never shifts a segmentation onto another volume, as two parallel reference lists would.
- **Auto-selection** never picks the module's own outputs (``core.is_module_output``): predictions and
  label-next segmentations are not "segmented volumes", uncertainty maps are not unlabeled volumes.
- **Enabled states** (``view().enabled``): one job of each kind at a time; Label next is off while a
  segmentation runs (its pre-fill is one); nothing starts while the inputs are missing.
- **Scene close** while jobs run: segmentation / ranking / model-check jobs are cancelled and their results
  dropped (their volumes are gone); training continues and its model node is added to the new scene and
  selected there. The parameter node is looked up again after every close, never cached.
- **Settings** are TrainConfig fields by name (``CPCLSegmentLib/settings.py``) plus the panel's own
  (``PANEL_SETTINGS``); the widget binds any widget whose ``cpclSetting`` property names one, so a new
  TrainConfig field reaches the engine by adding a widget, with no code here.
- **Effects** the GUI must carry out (show volumes, open the Segment Editor, show the plot, an error
  dialog) are queued (``take_effects``) instead of performed here.

Imports ``slicer`` / ``vtk`` (MRML) but never ``qt``, ``ctk`` or ``torch``: tested with pytest on slicer-core.
"""

from __future__ import annotations

import html
import json
import shutil
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import vtk

from CPCLSegmentLib import settings
from CPCLSegmentLib.errors import Cancelled, CPCLError, InputError

from . import core, environment

MODULE_NAME = "CPCLSegment"
KINDS = ("train", "segment", "rank", "inspect", "probe")
LENGTH_MODES = ("minutes", "iterations")
# The panel's own settings (not TrainConfig fields): name -> (default, choices or None).
PANEL_SETTINGS: Dict[str, Tuple[Any, Optional[Sequence[str]]]] = {
    "device": ("auto", core.DEVICES),
    "init": ("", None),
    "length_mode": ("minutes", LENGTH_MODES),
    "partial_segments": (False, None),
    "hold_out_last": (False, None),
    "compare_supervised": (True, None),
    "later_wins": (False, None),
    "prefill": (False, None),
}
# Where the panel's default differs from the engine's (the engine's minutes is None: iterations decide).
PANEL_DEFAULTS = {"minutes": core.DEFAULT_MINUTES}
PLOT_REFRESH_S = 1.0
RED, ORANGE, GREY, GREEN = "#c62828", "#e65100", "#555555", "#2e7d32"


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


def _h(text: Any) -> str:
    return html.escape(str(text), quote=False)


def _span(color: str, text: str) -> str:
    return f'<span style="color:{color}">{text}</span>'


@dataclass
class PanelView:
    """What the widget shows; keys are the ``.ui`` file's object names."""

    enabled: Dict[str, bool] = field(default_factory=dict)
    visible: Dict[str, bool] = field(default_factory=dict)
    text: Dict[str, str] = field(default_factory=dict)
    progress: Dict[str, Tuple[int, int, str]] = field(default_factory=dict)  # value, maximum, format
    cases: List[Tuple[str, str, bool]] = field(default_factory=list)  # volume, segmentation, painted slices only
    segments: List[Tuple[str, Tuple[float, float, float], bool]] = field(default_factory=list)  # name, colour, checked
    rank_rows: List[Tuple[int, str, float]] = field(default_factory=list)
    settings: Dict[str, Any] = field(default_factory=dict)
    unlabeled: List[str] = field(default_factory=list)  # checked node IDs
    segment_volumes: List[str] = field(default_factory=list)


class PanelController:
    """The panel's state machine. ``core``: the ``LogicCore`` that runs the jobs (its scene is the panel's)."""

    def __init__(self, logic: core.LogicCore, observe: bool = True) -> None:
        self.core = logic
        self.scene = logic.scene
        self.jobs: Dict[str, Optional[Any]] = dict.fromkeys(KINDS)
        self._discarded: List[Any] = []  # jobs whose results must not be imported (scene closed)
        self.rank_rows: List[Dict[str, Any]] = []
        self.selected_rank_row: Optional[int] = None
        self.open_in_editor: Optional[Any] = None  # the volume whose pre-filled segmentation opens in the editor
        self.plot: Optional[core.TrainingPlot] = None
        self._plot_updated = 0.0
        self.check_result: Optional[core.CheckResult] = None
        self.probe: Optional[Dict[str, Any]] = None
        self.problems: List[environment.Problem] = []
        self.log: List[str] = []
        self._effects: List[Tuple[str, Any]] = []
        self.progress: Dict[str, Tuple[int, int, str]] = {"trainProgressBar": (0, 100, ""), "segmentProgressBar": (0, 1, "")}
        self.text: Dict[str, str] = {"lossLabel": "", "diceLabel": "", "checkResultLabel": ""}
        self._closing = False
        self._observers: List[Tuple[Any, int]] = []
        if observe:
            for event, method in ((self.scene.StartCloseEvent, self.on_scene_start_close),
                                  (self.scene.EndCloseEvent, self.on_scene_end_close),
                                  (self.scene.NodeRemovedEvent, self.on_node_removed)):
                self._observers.append((self.scene, self.scene.AddObserver(event, _observer(method))))
            self._observers.append((self.scene, self.scene.AddObserver(self.scene.NodeAddedEvent, _node_observer(self.on_node_added))))

    def close(self) -> None:
        """Stops observing the scene and cancels every job (the module is being unloaded / Slicer exits)."""
        for obj, tag in self._observers:
            obj.RemoveObserver(tag)
        self._observers = []
        for kind, job in self.jobs.items():
            if job is not None and not job.finished:
                job.cancel(block=True)

    # ------------------------------------------------------------------------------ parameter node

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
        for case in core.segmented_volume_pairs(self.scene):
            self._add_case(node, case.volume, case.segmentation, False)
        for v in core.volumes_without_segmentation(self.scene, [c.volume for c in self._cases(node)]):
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

    # ------------------------------------------------------------------------------ cases

    def _entries(self, node: Any) -> List[Dict[str, Any]]:
        return self._json("Cases", [], node)

    def _cases(self, node: Any) -> List[core.LabeledCase]:
        out = []
        for e in self._entries(node):
            v, s = node.GetNodeReference(f"CaseVolume.{e['key']}"), node.GetNodeReference(f"CaseSegmentation.{e['key']}")
            if v is not None and s is not None:
                out.append(core.LabeledCase(v, s, bool(e.get("sparse"))))
        return out

    def cases(self) -> List[core.LabeledCase]:
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
            raise InputError(f"'{core.node_name(volume)}' is not a scalar volume")
        if not segmentation.IsA("vtkMRMLSegmentationNode"):
            raise InputError(f"'{core.node_name(segmentation)}' is not a segmentation")
        node = self.node
        was = node.StartModify()
        if self._add_case(node, volume, segmentation, sparse):
            self._set_refs("UnlabeledVolume", [v for v in self.unlabeled() if v is not volume])
        node.EndModify(was)

    def add_all_cases(self) -> int:
        """Adds every segmentation the user made with the volume it was drawn on (module outputs excluded)."""
        node = self.node
        was = node.StartModify()
        added = [c for c in core.segmented_volume_pairs(self.scene) if self._add_case(node, c.volume, c.segmentation, False)]
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

    # ------------------------------------------------------------------------------ segments

    def _available_segments(self) -> List[Tuple[str, Tuple[float, float, float]]]:
        cases = self.cases()
        if not cases:
            return []
        seg = cases[0].segmentation
        return [(name, tuple(seg.GetSegmentation().GetSegment(core.find_segment_id(seg, name)).GetColor()))
                for name in core.segment_names(seg)]

    def segment_choices(self) -> List[Tuple[str, Tuple[float, float, float], bool]]:
        """The first case's segments in the panel's order (``move_segment``; a later one wins overlaps),
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

    # ------------------------------------------------------------------------------ volumes

    def unlabeled(self) -> List[Any]:
        return self._refs("UnlabeledVolume")

    def set_unlabeled(self, nodes: Sequence[Any]) -> None:
        self._set_refs("UnlabeledVolume", nodes)

    def segment_volumes(self) -> List[Any]:
        return self._refs("SegmentVolume")

    def set_segment_volumes(self, nodes: Sequence[Any]) -> None:
        self._set_refs("SegmentVolume", nodes)

    def on_node_added(self, node: Any) -> bool:
        """A new volume is an unlabeled candidate by default, unless the module made it, a segmentation
        references it, or a scene is being loaded (the loaded scene's own selections apply). True if checked."""
        if node is None or self._closing or self.scene.IsImporting() or not core.is_plain_volume(node):
            return False
        pnode = parameter_node(self.scene)
        if pnode.GetParameter("Initialized") != "1":
            return False  # the first look at the scene picks the defaults
        if node not in core.volumes_without_segmentation(self.scene, [c.volume for c in self.cases()]):
            return False
        if node.GetID() not in {v.GetID() for v in self.unlabeled()}:
            pnode.AddNodeReferenceID("UnlabeledVolume", node.GetID())
        return True

    # ------------------------------------------------------------------------------ settings

    @staticmethod
    def is_setting(name: str) -> bool:
        return name in PANEL_SETTINGS or name in settings.setting_names()

    @staticmethod
    def default(name: str) -> Any:
        if name in PANEL_SETTINGS:
            return PANEL_SETTINGS[name][0]
        if name in PANEL_DEFAULTS:
            return PANEL_DEFAULTS[name]
        value = settings.default_settings()[name]
        if name in _xyz_settings() and value is not None:
            return list(reversed(value))
        return value

    @staticmethod
    def choices(name: str) -> Optional[Sequence[str]]:
        if name in PANEL_SETTINGS:
            return PANEL_SETTINGS[name][1]
        meta = settings.TrainConfig.__dataclass_fields__[name].metadata
        return meta.get("choices")

    def setting(self, name: str) -> Any:
        if not self.is_setting(name):
            raise InputError(f"unknown setting {name!r}")
        return self._json(f"Setting.{name}", self.default(name))

    def set_setting(self, name: str, value: Any) -> None:
        if not self.is_setting(name):
            raise InputError(f"unknown setting {name!r}")
        choices = self.choices(name)
        if choices and value not in choices:
            raise InputError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
        self._set_json(f"Setting.{name}", value)

    def stored_settings(self) -> Dict[str, Any]:
        node = self.node
        names = list(PANEL_SETTINGS) + settings.setting_names()
        return {n: self.setting(n) for n in names if node.GetParameter(f"Setting.{n}")}

    def train_values(self) -> Dict[str, Any]:
        """The keyword settings ``LogicCore.train`` gets from the panel: module settings, the training length
        (minutes or iterations) and every TrainConfig setting the user changed."""
        stored = self.stored_settings()
        values: Dict[str, Any] = {k: v for k, v in stored.items() if k in settings.setting_names() and k not in ("minutes", "iterations")}
        for name in ("device", "partial_segments", "hold_out_last", "compare_supervised", "later_wins"):
            values[name] = self.setting(name)
        values["init"] = self.setting("init") or None
        if self.setting("length_mode") == "iterations":
            values["iterations"] = int(self.setting("iterations"))
        else:
            values["minutes"] = float(self.setting("minutes"))
        return values

    # ------------------------------------------------------------------------------ model

    def model(self) -> Optional[Any]:
        node = self.node.GetNodeReference("Model")
        return node if core.is_model_node(node) else None

    def set_model(self, model_node: Optional[Any]) -> None:
        self.node.SetNodeReferenceID("Model", model_node.GetID() if model_node is not None else None)

    def model_text(self) -> str:
        model = self.model()
        if model is None:
            return "No model yet: train one or load a model file."
        s = core.model_summary(model)
        parts = [f"Model: {_h(model.GetName())} (saved with the scene)"]
        if s.get("segments"):
            parts.append("segments: " + _h(", ".join(s["segments"])))
        if s.get("method") or s.get("iterations"):
            parts.append(f"{_h(s.get('method') or '')} ({_h(s.get('status') or '')}), {_h(s.get('iterations'))} iterations")
        nested = core.model_nested(model)
        if nested:
            parts.append("nested: " + _h("; ".join(f"{k} contains {', '.join(v)}" for k, v in nested.items())))
        return "<br>".join(parts)

    def load_model(self, path: str) -> None:
        """Starts checking a model file in a child process; when it is usable it becomes the model node."""
        if self.busy("inspect"):
            raise InputError("a model file is being checked already")
        self._start("inspect", self.core.inspect_model(path))

    def save_model(self, target: str) -> str:
        model = self.model()
        if model is None:
            raise InputError("no model to save")
        if not target.lower().endswith(".pt"):
            target += ".pt"
        self.core.save_model(model, target)
        self.log.append(f"model saved to {target}")
        return target

    # ------------------------------------------------------------------------------ environment

    def start_probe(self) -> None:
        """Asks the child's Python what it computes on (no torch in this process); versions from metadata."""
        self.problems = environment.check_requirements()
        if not self.busy("probe"):
            from CPCLSegmentLib import jobs

            self._start("probe", jobs.probe_job(self.core.python, self.core.env).start())

    # ------------------------------------------------------------------------------ jobs

    def busy(self, kind: str) -> bool:
        return self.jobs.get(kind) is not None

    def _start(self, kind: str, job: Any) -> None:
        self.jobs[kind] = job

    def check(self) -> core.CheckResult:
        """Checks the inputs (no files written) and shows the result."""
        res = core.check_inputs(self.cases(), self.checked_segments(), self.unlabeled(), self.setting("partial_segments"),
                                self.setting("hold_out_last"), self.setting("later_wins"))
        self._show_check(res)
        return res

    def _show_check(self, res: core.CheckResult) -> None:
        self.check_result = res
        colors = {"error": RED, "warning": ORANGE, "info": GREY}
        lines = [_span(colors[level], f"{level}: {_h(msg)}") for level, msg in res.messages()]
        if res.ok:
            total: Dict[str, int] = {}
            for counts in res.counts.values():
                for name, n in counts.items():
                    total[name] = total.get(name, 0) + n
            lines.insert(0, _span(GREEN, "ready: " + _h(", ".join(f"{k} {v} voxels" for k, v in total.items()))))
        self.text["checkResultLabel"] = "<br>".join(lines)

    def train(self) -> Any:
        """Checks, exports (one rasterisation per case) and starts training; InputError when the check fails
        (its messages are shown)."""
        if self.busy("train"):
            raise InputError("training is running already")
        try:
            job = self.core.start_training(self.cases(), self.unlabeled(), self.checked_segments(), **self.train_values())
        except core.CheckFailed as e:
            self._show_check(e.check)
            self._effects.append(("expand", "unlabeledCollapsibleButton"))
            raise
        self._show_check(job.check)
        self._reset_training_display()
        self.node.SetParameter("LastRunDir", job.work_dir)
        self.log.append(f"training started: {job.work_dir}")
        self._start("train", job)
        return job

    def resume(self) -> Any:
        if self.busy("train"):
            raise InputError("training is running already")
        run_dir = self.node.GetParameter("LastRunDir")
        self._reset_training_display()
        job = self.core.resume_training(run_dir)
        self.log.append(f"training resumed: {run_dir}")
        self._start("train", job)
        return job

    def _reset_training_display(self) -> None:
        self.progress["trainProgressBar"] = (0, 100, "starting…")
        self.text["lossLabel"] = ""
        self.text["diceLabel"] = ""
        if self.plot is None:
            self.plot = core.TrainingPlot(self.scene)
        self.plot.reset()

    def stop(self) -> None:
        job = self.jobs["train"]
        if job is not None:
            job.stop()
            self.progress["trainProgressBar"] = self.progress["trainProgressBar"][:2] + ("stopping after this iteration…",)

    def cancel(self, kind: str) -> None:
        job = self.jobs.get(kind)
        if job is not None:
            job.cancel(block=False)  # terminate, then kill the process tree after a grace period, off the GUI thread
            if kind == "train":
                self.progress["trainProgressBar"] = self.progress["trainProgressBar"][:2] + ("cancelling…",)
            self.log.append(f"{kind}: cancel requested")

    def segment(self, volumes: Optional[Sequence[Any]] = None, names: Optional[Sequence[str]] = None,
                kind: str = core.OUTPUT_SEGMENTATION) -> Any:
        if self.busy("segment"):
            raise InputError("a segmentation is running already: wait for it or cancel it")
        volumes = list(volumes if volumes is not None else self.segment_volumes())
        if not volumes:
            raise InputError("check at least one volume to segment")
        model = self.model()
        if model is None:
            raise InputError("no model: train one or load a model file")
        job = self.core.start_segmentation(model, volumes, device=self.setting("device"), names=names, kind=kind)
        self.progress["segmentProgressBar"] = (0, len(volumes), "starting…")
        self._start("segment", job)
        return job

    def rank(self) -> Any:
        if self.busy("rank"):
            raise InputError("ranking is running already")
        volumes = self.unlabeled()
        if not volumes:
            raise InputError("check the unlabeled volumes to rank (section 2)")
        model = self.model()
        if model is None:
            raise InputError("no model: train one or load a model file")
        self._discard_ranking()
        job = self.core.start_ranking(model, volumes, device=self.setting("device"))
        self._start("rank", job)
        return job

    def _discard_ranking(self) -> None:
        core.LogicCore.discard_ranking(self.rank_rows)
        self.rank_rows = []
        self.selected_rank_row = None

    def select_rank_row(self, row: Optional[int]) -> None:
        self.selected_rank_row = row if row is not None and 0 <= row < len(self.rank_rows) else None

    def label_next(self) -> None:
        """Shows the selected ranked volume with its uncertainty map and opens a new segmentation for it:
        empty, or pre-filled by a segmentation job (refused while another segmentation runs)."""
        if self.selected_rank_row is None:
            raise InputError("select a volume in the ranking first")
        if self.busy("segment"):
            raise InputError("a segmentation is running: wait for it or cancel it before starting to label")
        model = self.model()
        if model is None:
            raise InputError("no model: train one or load a model file")
        row = self.rank_rows[self.selected_rank_row]
        volume = row["volume"]
        foreground = self.core.show_uncertainty(row) if row.get("uncertainty") else None
        self._effects.append(("show", (volume, foreground)))
        if self.setting("prefill"):
            self.open_in_editor = volume
            self.segment([volume], names=[f"{core.node_name(volume)} labels"], kind=core.OUTPUT_LABELS)
        else:
            segmentation = self.core.empty_segmentation_for(model, volume)
            self._effects.append(("edit", (segmentation, volume)))

    def show_plot(self) -> None:
        if self.plot is None:
            self.plot = core.TrainingPlot(self.scene)
        self.plot.update()
        self._effects.append(("plot", self.plot.chart))

    # ------------------------------------------------------------------------------ polling

    def poll(self) -> bool:
        """Drains the jobs' events and finishes those that ended (on the calling, i.e. GUI, thread).
        Returns whether anything happened."""
        changed = False
        for kind, job in list(self.jobs.items()):
            if job is None:
                continue
            for event in job.poll():
                changed = True
                self._on_event(kind, event)
            if job.finished:
                self.jobs[kind] = None
                self._finish(kind, job)
                changed = True
        for job in list(self._discarded):
            job.poll()
            if job.finished:
                self._discarded.remove(job)
                if job.work_dir:
                    shutil.rmtree(job.work_dir, ignore_errors=True)
        if self.plot is not None and time.time() - self._plot_updated > PLOT_REFRESH_S:
            self._plot_updated = time.time()
            self.plot.update()
        return changed

    def running(self) -> bool:
        return any(self.jobs.values()) or bool(self._discarded)

    def _on_event(self, kind: str, event: Dict[str, Any]) -> None:
        name = event.get("event")
        if name == "log":
            self.log.append(event.get("message", ""))
            return
        if name in ("warning", "error", "info"):
            self.log.append(f"{name}: {event.get('message')}")
        if kind == "train":
            self._on_train_event(event)
        elif kind == "segment" and name == "predict":
            self.progress["segmentProgressBar"] = (int(event["index"]), int(event["of"]), f"{event['index']}/{event['of']} segmented")
        elif kind == "rank" and name == "rank":
            self.log.append(f"ranked {event.get('index')}/{event.get('of')}: score {event.get('score')}")

    def _on_train_event(self, event: Dict[str, Any]) -> None:
        name = event.get("event")
        if self.plot is not None:
            self.plot.add(event)
        value, maximum, _ = self.progress["trainProgressBar"]
        if name == "summary":
            self.progress["trainProgressBar"] = (value, maximum, f"preparing ({event.get('device')}, patch {event.get('patch_size')})…")
        elif name == "preprocess":
            self.progress["trainProgressBar"] = (value, maximum, f"preparing {event.get('stage')} case {event.get('index')}/{event.get('of')}…")
        elif name == "progress":
            it, of = int(event["iteration"]), int(event["of"])
            self.progress["trainProgressBar"] = (it, of, f"iteration {it}/{of}, ETA {core.format_seconds(event.get('eta_s'))}")
            terms = ", ".join(f"{k} {v:.3f}" for k, v in (event.get("loss") or {}).items() if v is not None)
            self.text["lossLabel"] = f"loss: {_h(terms)}; λ {event.get('lambda', 0):.3f}"
        elif name == "validation":
            dice = event.get("dice") or {}
            parts = []
            for seg, value in dice.items():
                text = "n/a" if value is None else f"{value:.3f}"
                parts.append(_span(RED, f"<b>{_h(seg)} {text}</b>") if value == 0 else f"{_h(seg)} {text}")
            label = event.get("label") or f"iteration {event.get('iteration')}"
            out = f"validation Dice ({_h(label)}): " + ", ".join(parts)
            zero = event.get("zero_dice_segments") or [s for s, v in dice.items() if v == 0]
            if zero:
                out += "<br>" + _span(RED, "warning: " + _h(", ".join(zero)) + " still at Dice 0: check that segment's labels in every "
                                      "case (name, non-empty) before a long run")
            self.text["diceLabel"] = out

    def _finish(self, kind: str, job: Any) -> None:
        try:
            result = job.result()
        except Cancelled:
            self.log.append(f"{kind} cancelled" + (": no model was written" if kind == "train" else ""))
            if kind == "train":
                self.progress["trainProgressBar"] = self.progress["trainProgressBar"][:2] + ("cancelled: no model was kept",)
            elif kind == "segment":
                self.progress["segmentProgressBar"] = self.progress["segmentProgressBar"][:2] + ("cancelled",)
                self.open_in_editor = None
            return
        except Exception as e:
            self.log.append(f"{kind} failed: {e}")
            if kind == "train":
                self.progress["trainProgressBar"] = self.progress["trainProgressBar"][:2] + ("failed",)
            elif kind == "segment":
                self.progress["segmentProgressBar"] = self.progress["segmentProgressBar"][:2] + ("failed",)
                self.open_in_editor = None
            if kind == "probe":
                self.probe = {"error": str(e)}
                return
            what = {"inspect": "This is not a usable CPCLSegment model file"}.get(kind, f"CPCLSegment {kind} failed")
            self._effects.append(("error", f"{what}:\n{e}"))
            return
        if kind == "train":
            stopped = job.status == "stopped"
            value, maximum, _ = self.progress["trainProgressBar"]
            self.progress["trainProgressBar"] = (value if stopped else maximum, maximum,
                                                 "stopped: model kept (Resume continues)" if stopped else "done")
            self.set_model(result)
            self.node.SetParameter("LastRunDir", job.work_dir or "")
            self.log.append(f"model: {result.GetName()} (saved with the scene; file {result.GetAttribute('CPCLSegment.File')})")
        elif kind == "segment":
            names = ", ".join(n.GetName() for n in result)
            self.progress["segmentProgressBar"] = (len(result), max(1, len(result)), f"done: {names}")
            if result:
                volume = result[0].GetNodeReference(result[0].GetReferenceImageGeometryReferenceRole())
                if self.open_in_editor is not None:
                    self._effects.append(("edit", (result[0], self.open_in_editor)))
                else:
                    self._effects.append(("show", (volume, None)))
            self.open_in_editor = None
        elif kind == "rank":
            self.rank_rows = result
            self.selected_rank_row = 0 if result else None
            self._effects.append(("expand", "labelNextCollapsibleButton"))
        elif kind == "inspect":
            path = job.args[1] if len(job.args) > 1 else ""
            model = self.core.load_model(path, result)
            self.set_model(model)
            self.log.append(f"loaded {path}: segments {', '.join(c['name'] for c in result['classes'][1:])}")
        elif kind == "probe":
            self.probe = result

    # ------------------------------------------------------------------------------ scene close

    def on_scene_start_close(self) -> None:
        """The scene is closing: jobs whose results belong to its volumes are cancelled and dropped; training
        continues (its model goes into the new scene)."""
        self._closing = True
        for kind in ("segment", "rank", "inspect"):
            job = self.jobs.get(kind)
            if job is not None:
                job.cancel(block=False)
                self._discarded.append(job)
                self.jobs[kind] = None
                self.log.append(f"{kind}: cancelled because the scene was closed")
        if self.jobs["train"] is not None:
            self.log.append("the scene was closed: training continues and its model will be added to the new scene")
        self._discard_ranking()
        self.open_in_editor = None
        self.plot = None
        self.check_result = None
        self.text["checkResultLabel"] = ""

    def on_scene_end_close(self) -> None:
        self._closing = False

    # ------------------------------------------------------------------------------ view

    def take_effects(self) -> List[Tuple[str, Any]]:
        out, self._effects = self._effects, []
        return out

    def take_log(self) -> List[str]:
        out, self.log = self.log, []
        return out

    def view(self) -> PanelView:
        training, segmenting, ranking = self.busy("train"), self.busy("segment"), self.busy("rank")
        cases = self.cases()
        model = self.model()
        has_model = model is not None
        segments = self.segment_choices()
        unlabeled = self.unlabeled()
        segment_volumes = self.segment_volumes()
        v = PanelView()
        v.enabled = {
            "addCaseButton": True,
            "addAllCasesButton": True,
            "removeCaseButton": bool(cases),
            "moveSegmentUpButton": len(segments) > 1,
            "moveSegmentDownButton": len(segments) > 1,
            "checkInputsButton": bool(cases) and not training,
            "trainButton": bool(cases) and not training,
            "stopButton": training,
            "cancelTrainButton": training,
            "resumeButton": not training and core.LogicCore.can_resume(self.node.GetParameter("LastRunDir")),
            "showPlotButton": self.plot is not None,
            "saveModelButton": has_model,
            "loadModelButton": not self.busy("inspect"),
            "segmentButton": has_model and not segmenting and bool(segment_volumes),
            "cancelSegmentButton": segmenting,
            "rankButton": has_model and not ranking and bool(unlabeled),
            "cancelRankButton": ranking,
            "labelNextButton": has_model and not segmenting and self.selected_rank_row is not None,
            "installButton": not self.busy("probe"),
            # the comparison needs a held-out case to score both models on
            "compareSupervisedCheckBox": bool(self.setting("hold_out_last")) and not training,
        }
        backend, warning = environment.describe_backend(self.probe, self.problems)
        label = f"Compute: {_h(backend)}"
        if warning:
            label += "<br>" + _span(ORANGE, _h(warning))
        minutes = self.setting("length_mode") == "minutes"
        v.visible = {"installButton": bool(self.problems) or bool((self.probe or {}).get("torch", {}).get("error")),
                     "minutesSpinBox": minutes, "iterationsSpinBox": not minutes}
        v.text = dict(self.text, backendLabel=label, modelInfoLabel=self.model_text(),
                      lengthHintLabel=("the iteration count is planned from a timed training step" if minutes
                                       else "training steps (for experts: the time they take depends on the computer)"))
        v.progress = dict(self.progress)
        v.cases = [(c.volume.GetName(), c.segmentation.GetName(), c.sparse) for c in cases]
        v.segments = segments
        v.rank_rows = [(int(r["rank"]), r["volume"].GetName(), float(r["score"])) for r in self.rank_rows]
        names = list(PANEL_SETTINGS) + settings.setting_names()
        v.settings = {n: self.setting(n) for n in names}
        v.unlabeled = [n.GetID() for n in unlabeled]
        v.segment_volumes = [n.GetID() for n in segment_volumes]
        return v


def _observer(method: Any) -> Any:
    """A scene observer calling ``method`` through a weak reference: the scene must not keep the controller
    alive (VTK observers are invisible to Python's garbage collector, so a cycle would be torn down in an
    arbitrary order)."""
    ref = weakref.WeakMethod(method)

    def callback(caller: Any, event: Any) -> None:
        m = ref()
        if m is not None:
            m()

    return callback


def _node_observer(method: Any) -> Any:
    """As ``_observer``, for events whose call data is the node (NodeAddedEvent)."""
    ref = weakref.WeakMethod(method)

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def callback(caller: Any, event: Any, node: Any) -> None:
        m = ref()
        if m is not None:
            m(node)

    return callback


def _xyz_settings() -> List[str]:
    return [name for name, meta in settings.cli_settings() if meta.get("xyz")]


def error_text(error: BaseException) -> str:
    """The one message an action's error shows (the widget displays it once)."""
    if isinstance(error, CPCLError):
        return str(error)
    return f"{type(error).__name__}: {error}"
