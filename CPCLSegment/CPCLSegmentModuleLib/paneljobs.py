"""The panel's running jobs: their events drained on the GUI thread (``poll``), their results taken into the
scene when they end (``_finish``), and what a scene close does to them: segmentation / ranking / model-check
jobs are cancelled and their results dropped (their volumes are gone); training continues and its model node
is added to the new scene and selected there."""

from __future__ import annotations

import shutil
import time
from typing import Any, Dict, List, Optional, Tuple

from CPCLSegmentLib.errors import Cancelled

from . import attributes
from .logic import LogicCore
from .panelview import Progress, train_event_display
from .plot import TrainingPlot

PLOT_REFRESH_S = 1.0


class PanelJobs:
    """Job bookkeeping for ``panel.PanelController`` (which sets the attributes below in ``__init__``)."""

    core: LogicCore
    scene: Any
    jobs: Dict[str, Optional[Any]]
    _discarded: List[Any]
    plot: Optional[TrainingPlot]
    _plot_updated: float
    rank_rows: List[Dict[str, Any]]
    selected_rank_row: Optional[int]
    open_in_editor: Optional[Any]
    probe: Optional[Dict[str, Any]]
    log: List[str]
    _effects: List[Tuple[str, Any]]
    progress: Dict[str, Progress]
    text: Dict[str, str]
    _closing: bool
    node: Any  # and ``set_model`` (``panelstate.PanelState``), ``start_labeling`` / ``finish_round`` (``panelloop``),
    # ``segmentation_done`` (``panelmanage``)

    def busy(self, kind: str) -> bool:
        return self.jobs.get(kind) is not None

    def _start(self, kind: str, job: Any) -> None:
        self.jobs[kind] = job

    def _discard_ranking(self) -> None:
        LogicCore.discard_ranking(self.rank_rows)
        self.rank_rows = []
        self.selected_rank_row = None

    def poll(self) -> bool:
        """Drains the jobs' events and finishes those that ended (on the calling, i.e. GUI, thread).
        Returns whether anything happened."""
        changed = False
        for kind, job in list(self.jobs.items()):
            if job is None:
                continue
            for event in job.poll():
                changed = True
                if event.get("event") == "predict" and hasattr(job, "take_output"):
                    self._take_output(job, event)
                self._on_event(kind, event)
            if not job.finished and getattr(job, "import_ready", None) is not None:
                changed = self._import_ready(job) or changed
            if job.finished:
                self.jobs[kind] = None
                if job.status not in ("done", "stopped"):  # a cancelled / failed segmentation leaves no result behind
                    for node in getattr(job, "imported", {}).values():
                        self.scene.RemoveNode(node)
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

    def _take_output(self, job: Any, event: Dict[str, Any]) -> None:
        """One volume's result, as soon as the child wrote it, is read on a worker thread (``_import_ready`` makes it a
        node on a later poll, one per poll)."""
        try:
            job.take_output(event)
        except Exception as e:  # the job's result (collect) reads it again and reports the error
            self.log.append(f"segmentation result {event.get('output')}: {e}")

    def _import_ready(self, job: Any) -> bool:
        """One result read on a worker thread by now becomes a node (the GUI thread builds it from the arrays read)."""
        try:
            return bool(job.import_ready())
        except Exception as e:  # the job's result (collect) reads it again and reports the error
            self.log.append(f"segmentation result: {e}")
            return False

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
        if self.plot is not None:
            self.plot.add(event)
        self.progress["trainProgressBar"], texts = train_event_display(self.progress["trainProgressBar"], event)
        self.text.update(texts)

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
            self.finish_round(job.work_dir, job.done or {})
            self.log.append(f"model: {result.GetName()} (saved with the scene; file {result.GetAttribute(attributes.FILE)})")
        elif kind == "segment":
            names = ", ".join(n.GetName() for n in result)
            self.progress["segmentProgressBar"] = (len(result), max(1, len(result)), f"done: {names}")
            self.segmentation_done(result)
            if result:
                volume = result[0].GetNodeReference(result[0].GetReferenceImageGeometryReferenceRole())
                if self.open_in_editor is not None:
                    self.start_labeling(result[0])
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
        self.text["checkResultLabel"] = ""

    def on_scene_end_close(self) -> None:
        self._closing = False
