"""``LogicCore``: train / segment / rank from nodes, the one API the console logic (``CPCLSegmentLogic``) and the
panel's controller (``panel.PanelController``) call.

Imports ``slicer`` and ``vtk`` but never ``qt``, ``ctk``, ``torch`` or ``slicer.modules`` / ``slicer.app``, so
the same code runs inside the Slicer application and in **slicer-core** (PyPI: Slicer's MRML scene and
segmentation logic without a GUI), where pytest exercises it. The engine does the work in a child process
(``CPCLSegmentLib/jobs.py``): ``cpcl-segment`` command lines are built here, ``wait=True`` blocks (console),
``wait=False`` returns the job, which the panel polls from a QTimer; the job's ``result()`` imports what it
wrote as NEW nodes (``results``). Models live in the scene (``models``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import slicer
from CPCLSegmentLib import jobs
from CPCLSegmentLib.errors import InputError
from CPCLSegmentLib.settings import DEVICES, WEIGHTS

from .handoff import Handoff, PreparedJob
from .logicmodels import ModelAPI, ModelRef
from .models import model_nested
from .nodes import check_volume, ensure_converter_rules, node_name, segment_names
from .options import split_settings, train_config
from .results import ResultImports, import_scalar_volume, import_segmentation
from .scene import OUTPUT_SEGMENTATION, OUTPUT_UNCERTAINTY, as_cases, output_for
from .trainrun import can_resume, collect_model, keep_run_dir, read_command, refuse_second_training, write_training_run

Event = Dict[str, Any]
OnEvent = Optional[Callable[[Event], None]]


class LogicCore(ModelAPI):
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

    # The training this process started last, shared by every LogicCore (the panel's, the console's, a script's
    # ``CPCLSegmentLogic()``): one training at a time (``trainrun.refuse_second_training``).
    training: Optional[jobs.Job] = None

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

    def _export_volumes(self, kind: str, volumes: Sequence[Any]) -> Tuple[str, Handoff, List[str]]:
        """A new run folder and the file the child reads each volume from (``volume-000.nrrd``, ... still to write
        by ``handoff.write_all``, or the volume's original file); nothing left on failure."""
        run_dir = self.new_run_dir(kind)
        try:
            handoff = Handoff(run_dir)
            return run_dir, handoff, [handoff.volume(v, f"volume-{n:03d}") for n, v in enumerate(volumes)]
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise

    def _job(self, args: Sequence[Any], name: str, device: str = "auto", handoff: Optional[Handoff] = None,
             **kwargs: Any) -> jobs.Job:
        """A job whose child starts once ``handoff``'s files are written on a worker thread and its volumes found
        unchanged on the GUI thread (``PreparedJob``)."""
        extra = {"CUDA_VISIBLE_DEVICES": "-1"} if device == "cpu" else None
        if handoff is not None:
            kwargs.update(prepare=handoff.write_all, verify=handoff.verify)
        return PreparedJob(args, python=self.python, env=self.env, extra_env=extra, name=name, **kwargs)

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
        ``--config`` file and the input files, and returns the run: ``{"args", "run_dir", "out", "check", "module",
        "config", "record", "handoff"}``. Raises ``InputError`` (nothing left behind) when the check finds errors."""
        plan = self._plan_training(labeled, unlabeled, segments, out, values)
        try:
            plan["handoff"].write_all()
        except BaseException:
            shutil.rmtree(plan["run_dir"], ignore_errors=True)
            raise
        return plan

    def _plan_training(self, labeled: Sequence[Any], unlabeled: Sequence[Any], segments: Optional[Sequence[str]],
                       out: Optional[str], values: Dict[str, Any]) -> Dict[str, Any]:
        """``prepare_training`` without writing the input files (``plan["handoff"].write_all()`` does)."""
        module, engine = split_settings(values)
        config = train_config(engine)
        cases = as_cases(labeled)
        unlabeled = [v for v in (unlabeled or []) if v is not None]
        if not segments:  # every case's segments, in order of first appearance (as the panel lists them)
            segments = []
            for case in cases:
                if case.segmentation is not None and case.segmentation.IsA("vtkMRMLSegmentationNode"):
                    segments += [n for n in segment_names(case.segmentation) if n not in segments]
        device = self._device_arg(module["device"])
        if device not in DEVICES:
            raise InputError(f"device must be one of {', '.join(DEVICES)}, not {module['device']!r}")
        module.update(device=device, init=self.starting_point(module["init"]) if module["init"] else None,
                      cache_dir=os.path.abspath(os.path.expanduser(str(module["cache_dir"]))) if module["cache_dir"] else None)
        return write_training_run(self.new_run_dir("train"), cases, unlabeled, list(segments or []), module, config, out)

    def start_training(self, labeled: Sequence[Any], unlabeled: Sequence[Any] = (), segments: Optional[Sequence[str]] = None,
                       out: Optional[str] = None, **values: Any) -> jobs.Job:
        """Checks and exports the inputs, then starts ``cpcl-segment train`` in the background. The job's
        ``result()`` is the model node (a NEW ``vtkMRMLTextNode`` saved with the scene). One training at a time."""
        refuse_second_training(self.training)
        self.ensure_dependencies()
        plan = self._plan_training(labeled, unlabeled, segments, out, values)  # the files are written by the job's worker
        job = self._train_job(plan["args"], plan["run_dir"], plan["record"], plan["handoff"])
        job.check = plan["check"]  # what the one rasterisation pass found (warnings, counts), for the panel
        LogicCore.training = job.start()
        return job

    def resume_training(self, run_dir: str) -> jobs.Job:
        """Continues a stopped or interrupted run from its checkpoint (same inputs, ``--resume``); the
        job's result updates the model node of that run (or makes one)."""
        refuse_second_training(self.training)
        saved = read_command(run_dir)
        self.ensure_dependencies()
        args = [a for a in saved["args"] if a != "--resume"] + ["--resume"]
        LogicCore.training = self._train_job(args, run_dir, saved).start()
        return LogicCore.training

    can_resume = staticmethod(can_resume)

    def _train_job(self, args: List[str], run_dir: str, record: Dict[str, Any], handoff: Optional[Handoff] = None) -> jobs.Job:
        return self._job(args, "training", record.get("device", "auto"), work_dir=run_dir, handoff=handoff,
                         collect=lambda job: collect_model(self.scene, job, run_dir, record),
                         keep_work_dir=lambda job: keep_run_dir(job, run_dir, record["out"]))

    def train(self, labeled: Sequence[Any], unlabeled: Sequence[Any] = (), segments: Optional[Sequence[str]] = None,
              wait: bool = True, on_event: OnEvent = None, out: Optional[str] = None, **values: Any) -> Any:
        """Trains a model; returns the model node (``wait=True``) or the running job. ``values``: module
        settings (``options.module_settings``) and any TrainConfig setting by name (``iterations=300``,
        ``minutes=10``, ``lr=1e-3``, ``patch_size=[X, Y, Z]``, ...); without either length, about
        ``DEFAULT_MINUTES`` minutes."""
        job = self.start_training(labeled, unlabeled, segments, out, **values)
        return self._wait(job, on_event) if wait else job

    # ---------------------------------------------------------------------------------- segmenting

    def start_segmentation(self, model: ModelRef, volumes: Sequence[Any], weights: str = "teacher", device: str = "auto",
                           names: Optional[Sequence[str]] = None, kind: str = OUTPUT_SEGMENTATION,
                           targets: Optional[Sequence[Any]] = None) -> jobs.Job:
        """Starts ``cpcl-segment predict`` on the volumes; ``result()`` is one new segmentation node per volume
        (``targets``: existing segmentation nodes to overwrite instead, one per volume)."""
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
        run_dir, handoff, files = self._export_volumes("segment", volumes)
        out_dir = os.path.join(run_dir, "out")
        os.makedirs(out_dir, exist_ok=True)
        args = ["predict", "--model", path, "--image", *files, "--out", out_dir + os.sep, "--format", ".seg.nrrd",
                "--crop-to-segments", "--weights", weights, "--device", self._device_arg(device)]

        imports = ResultImports(lambda i, path, read: import_segmentation(
            self.scene, path, volumes[i], names[i] if names else None, nested, kind, targets[i] if targets else None, read),
            len(volumes), nested)  # the panel has each result read on a worker as the child reports it

        def collect(job: jobs.Job) -> List[Any]:
            outputs = (job.done or {}).get("outputs") or []
            try:
                if len(outputs) != len(volumes):
                    raise jobs.JobError(f"segmentation wrote {len(outputs)} result(s) for {len(volumes)} volume(s)")
                return [imports.take(i, p) for i, p in enumerate(outputs)]
            finally:
                imports.close()

        job = self._job(args, "segmentation", self._device_arg(device), work_dir=run_dir, collect=collect, handoff=handoff)
        job.take_output, job.import_ready = imports.started, imports.import_ready
        job.imported = imports.imported  # what an ended job that returns no result leaves (the panel removes it)
        return job.start()

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
        run_dir, handoff, files = self._export_volumes("rank", volumes)
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
                         keep_work_dir=lambda job: job.status == "done", handoff=handoff).start()

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
        """A heat-coloured volume node from a ranking row's uncertainty map (a module output): the volume's earlier
        map node is reused (the new map read into it), else a NEW node."""
        if not row.get("uncertainty"):
            raise InputError(f"no uncertainty map was written for '{node_name(row['volume'])}'")
        return import_scalar_volume(self.scene, row["uncertainty"], row["volume"], f"{node_name(row['volume'])} uncertainty",
                                    node=output_for(self.scene, OUTPUT_UNCERTAINTY, row["volume"]))
