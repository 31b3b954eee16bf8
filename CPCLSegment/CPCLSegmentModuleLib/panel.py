"""Every decision the CPCLSegment panel makes, without Qt: the widget is a thin mapping of ``view()`` to Qt.

``PanelController`` holds the panel's state in the module's parameter node (``panelstate``, ``panelsettings``)
and in its running jobs, and answers the widget's questions (``panelview``):

- **Scene close** while jobs run: segmentation / ranking / model-check jobs are cancelled and their results
  dropped (their volumes are gone); training continues and its model node is added to the new scene and
  selected there. The parameter node is looked up again after every close, never cached.
- **Effects** the GUI must carry out (show volumes, open the Segment Editor, show the plot, an error
  dialog) are queued (``take_effects``) instead of performed here.

Imports ``slicer`` / ``vtk`` (MRML) but never ``qt``, ``ctk`` or ``torch``: tested with pytest on slicer-core.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import vtk

from CPCLSegmentLib.errors import CPCLError, InputError

from . import environment
from .inputcheck import CheckFailed, CheckResult, check_inputs
from .logic import LogicCore
from .nodes import node_name
from .paneljobs import PanelJobs
from .packageinfo import PanelPackages
from .panelloop import PanelLoop
from .panelmanage import PanelManage
from .panelsettings import PanelSettings
from .panelstate import PanelState
from .panelview import PanelView, build_view, check_text, model_text
from .plot import TrainingPlot
from .scene import OUTPUT_LABELS, OUTPUT_SEGMENTATION, output_for
from .startfrom import PanelStart

KINDS = ("train", "segment", "rank", "inspect", "probe")


class PanelController(PanelJobs, PanelLoop, PanelStart, PanelManage, PanelPackages, PanelState, PanelSettings):
    """The panel's state machine. ``core``: the ``LogicCore`` that runs the jobs (its scene is the panel's)."""

    def __init__(self, logic: LogicCore, observe: bool = True) -> None:
        self.core = logic
        self.scene = logic.scene
        self.jobs: Dict[str, Optional[Any]] = dict.fromkeys(KINDS)
        self._discarded: List[Any] = []  # jobs whose results must not be imported (scene closed)
        self.rank_rows: List[Dict[str, Any]] = []
        self.selected_rank_row: Optional[int] = None
        self.open_in_editor: Optional[Any] = None  # the volume whose pre-filled segmentation opens in the editor
        self.plot: Optional[TrainingPlot] = None
        self._plot_updated = 0.0
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

    # ------------------------------------------------------------------------- model

    def model_text(self) -> str:
        return model_text(self.model())

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

    # ------------------------------------------------------------------- environment

    def start_probe(self) -> None:
        """Asks the child's Python what it computes on (no torch in this process); versions from metadata."""
        self.problems = environment.check_requirements()
        if not self.busy("probe"):
            from CPCLSegmentLib import jobs

            self._start("probe", jobs.probe_job(self.core.python, self.core.env).start())

    # -------------------------------------------------------------------------- jobs

    def check(self) -> CheckResult:
        """Checks the inputs (no files written) and shows the result."""
        res = check_inputs(self.cases(), self.checked_segments(), self.unlabeled(), self.setting("partial_segments"),
                                self.setting("hold_out_last"), self.setting("later_wins"))
        self._show_check(res)
        return res

    def _show_check(self, res: CheckResult) -> None:
        self.text["checkResultLabel"] = check_text(res)

    def train(self) -> Any:
        """Checks, exports (one rasterisation per case) and starts training; InputError when the check fails
        (its messages are shown)."""
        if self.busy("train"):
            raise InputError("training is running already")
        try:
            job = self.core.start_training(self.cases(), self.unlabeled(), self.checked_segments(),
                                           **dict(self.train_values(), init=self.start_init()))
        except CheckFailed as e:
            self._show_check(e.check)
            self._effects.append(("expand", "unlabeledCollapsibleButton"))
            raise
        self._show_check(job.check)
        self._reset_training_display()
        self.node.SetParameter("LastRunDir", job.work_dir)
        self.start_round(job.work_dir)
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
            self.plot = TrainingPlot(self.scene)
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
                kind: str = OUTPUT_SEGMENTATION) -> Any:
        if self.busy("segment"):
            raise InputError("a segmentation is running already: wait for it or cancel it")
        chosen = volumes is None  # the Segment button: the checked volumes, into the chosen output
        volumes = list(volumes if volumes is not None else self.segment_volumes())
        if not volumes:
            raise InputError("check at least one volume to segment")
        model = self.model()
        if model is None:
            raise InputError("no model: train one or load a model file")
        targets = self.output_targets(volumes) if chosen else None
        job = self.core.start_segmentation(model, volumes, device=self.setting("device"), names=names, kind=kind, targets=targets)
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

    def select_rank_row(self, row: Optional[int]) -> None:
        self.selected_rank_row = row if row is not None and 0 <= row < len(self.rank_rows) else None

    def label_next(self) -> None:
        """Shows the selected ranked volume with its uncertainty map and opens its segmentation: the one an earlier
        Label next made for it (map and segmentation are reused, the user's edits kept), else a new one, empty or
        pre-filled by a segmentation job (refused while another segmentation runs)."""
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
        earlier = output_for(self.scene, OUTPUT_LABELS, volume)  # reopened with the user's edits, not made again
        if earlier is not None:
            self.start_labeling(earlier)
            self._effects.append(("edit", (earlier, volume)))
            self.log.append(f"'{node_name(earlier)}' opened again (delete it to start '{node_name(volume)}' afresh)")
        elif self.setting("prefill"):
            self.open_in_editor = None  # set only once the pre-filling job runs: a failed start leaves nothing to open
            self.segment([volume], names=[f"{node_name(volume)} labels"], kind=OUTPUT_LABELS)
            self.open_in_editor = volume
        else:
            segmentation = self.core.empty_segmentation_for(model, volume)
            self.start_labeling(segmentation)
            self._effects.append(("edit", (segmentation, volume)))

    def show_plot(self) -> None:
        if self.plot is None:
            self.plot = TrainingPlot(self.scene)
        self.plot.update()
        self._effects.append(("plot", self.plot.chart))

    # ----------------------------------------------------------------------- polling

    # ------------------------------------------------------------------- scene close

    # -------------------------------------------------------------------------- view

    def take_effects(self) -> List[Tuple[str, Any]]:
        out, self._effects = self._effects, []
        return out

    def take_log(self) -> List[str]:
        out, self.log = self.log, []
        return out

    def view(self) -> PanelView:
        return build_view(self)


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


def error_text(error: BaseException) -> str:
    """The one message an action's error shows (the widget displays it once)."""
    if isinstance(error, CPCLError):
        return str(error)
    return f"{type(error).__name__}: {error}"
