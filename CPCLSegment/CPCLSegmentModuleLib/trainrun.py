"""A training run's folder: the inputs checked and exported in one pass, the ``cpcl-segment train`` command line,
``config.json`` (the TrainConfig settings) and ``command.json`` (what ``--resume`` and the result need), and what
stays of the folder when the job ends (the model, and a stopped or interrupted run's checkpoint and inputs)."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, List, Optional, Sequence

from CPCLSegmentLib import jobs
from CPCLSegmentLib.companions import checkpoint_path
from CPCLSegmentLib.errors import InputError
from CPCLSegmentLib.writers import write_json

from . import attributes
from .export import ExportedInputs, export_inputs
from .inputcheck import CheckFailed, CheckResult
from .models import MODEL_NODE_CLASS, is_model_node, store_model
from .options import compares_supervised, option_args
from .scene import LabeledCase, nodes_by_class


def write_training_run(run_dir: str, cases: Sequence[LabeledCase], unlabeled: Sequence[Any], segments: List[str],
                       module: Dict[str, Any], config: Dict[str, Any], out: Optional[str]) -> Dict[str, Any]:
    """Checks and exports the inputs into ``run_dir/inputs``, writes ``config.json`` and ``command.json``; returns
    the run (``{"args", "run_dir", "out", "check", "module", "config", "record"}``). ``CheckFailed`` when the
    check finds errors; the folder is removed on any failure."""
    inputs = os.path.join(run_dir, "inputs")
    os.makedirs(inputs, exist_ok=True)
    try:
        check, files = export_inputs(cases, segments, unlabeled, bool(module["partial_segments"]), bool(module["hold_out_last"]),
                                     bool(module["later_wins"]), inputs, write=False)
        if not check.ok:
            raise CheckFailed(check)
        out = os.path.abspath(out) if out else os.path.join(run_dir, "model.pt")
        config_path = os.path.join(run_dir, "config.json")
        write_json(config_path, config)
        args = train_command(check, files, len(cases), unlabeled, segments, module, config, config_path, out)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    record = {"args": args, "out": out, "segments": segments, "device": module["device"], "classes": check.classes(),
              "nested": check.nested() if module["later_wins"] else {}, "config": config}
    write_json(os.path.join(run_dir, "command.json"), record)
    return {"args": args, "run_dir": run_dir, "out": out, "check": check, "module": module, "config": config, "record": record,
            "handoff": files.handoff}


def train_command(check: CheckResult, files: ExportedInputs, n_cases: int, unlabeled: Sequence[Any], segments: List[str],
                  module: Dict[str, Any], config: Dict[str, Any], config_path: str, out: str) -> List[str]:
    """The ``cpcl-segment train`` arguments for the exported inputs (the last case held out with ``hold_out_last``)
    and the module's run options (``options.option_args``; the comparison only where ``compares_supervised``)."""
    args: List[str] = ["train"]
    n_train = n_cases - 1 if module["hold_out_last"] and n_cases > 1 else n_cases
    for n, (image, seg, sparse) in enumerate(files.labeled):
        if n < n_train:
            args += ["--labeled", image, seg] + (["--annotated-slices", "auto"] if sparse else [])
        else:
            args += ["--validation", image, seg]
    if unlabeled:
        args += ["--unlabeled", *[files.volume_files[v.GetID()] for v in unlabeled]]
    args += ["--segments", *segments, "--out", out, "--config", config_path]
    return args + option_args(dict(module, compare_supervised=compares_supervised(module, config, unlabeled)))


def read_command(run_dir: Optional[str]) -> Dict[str, Any]:
    """The ``command.json`` of a training folder, for ``--resume``; ``InputError`` when there is nothing to resume."""
    path = os.path.join(run_dir or "", "command.json")
    if not os.path.isfile(path):
        raise InputError(f"{run_dir} is not a CPCLSegment training folder (no command.json)")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    if not os.path.exists(checkpoint_path(saved["out"])):
        raise InputError(f"nothing to resume: no checkpoint {checkpoint_path(saved['out'])} (the run completed or was cancelled)")
    return saved


def can_resume(run_dir: Optional[str]) -> bool:
    if not run_dir or not os.path.isfile(os.path.join(run_dir, "command.json")):
        return False
    try:
        with open(os.path.join(run_dir, "command.json"), encoding="utf-8") as f:
            out = json.load(f).get("out", "")
    except (OSError, ValueError):
        return False
    return os.path.exists(checkpoint_path(out))


def collect_model(scene: Any, job: jobs.Job, run_dir: str, record: Dict[str, Any]) -> Any:
    """The training job's result: the model file stored in the run's model node (made when there is none)."""
    out = record["out"]
    if not os.path.isfile(out):
        raise jobs.JobError(f"training ended but wrote no model file {out}")
    if not os.path.exists(checkpoint_path(out)):  # completed: the exported inputs are not needed any more
        shutil.rmtree(os.path.join(run_dir, "inputs"), ignore_errors=True)
    done = job.done or {}
    summary = {"segments": record.get("segments"), "status": done.get("status"), "iterations": done.get("iterations"),
               "method": (record.get("config") or {}).get("method", "cpcl"), "seconds": done.get("seconds")}
    existing = next((n for n in nodes_by_class(scene, MODEL_NODE_CLASS)
                     if is_model_node(n) and n.GetAttribute(attributes.RUN_DIR) == run_dir), None)
    return store_model(scene, out, classes=record.get("classes"), nested=record.get("nested"), summary=summary,
                       run_dir=run_dir, node=existing)


def keep_run_dir(job: jobs.Job, run_dir: str, out: str) -> bool:
    """Whether the run folder stays when the job ends: the model file (and, when stopped, the checkpoint and
    inputs for resume) live there; a cancelled run's checkpoint beside an outside model goes."""
    if job.status in ("done", "stopped"):
        return True
    if job.status == "failed" and os.path.exists(checkpoint_path(out)):
        return True  # interrupted: resumable
    if job.status == "cancelled" and not out.startswith(run_dir):
        # The CLI never writes the model when cancelled (an older file at `out` stays as it was);
        # a checkpoint this run wrote beside it goes.
        ckpt = checkpoint_path(out)
        if os.path.exists(ckpt) and os.path.getmtime(ckpt) >= (job.started_at or 0) - 1:
            os.remove(ckpt)
    return False


def refuse_second_training(job: Optional[jobs.Job]) -> None:
    """InputError while ``job`` (the training this process started last, from the console or the panel) runs: a
    blocking console ``train()`` keeps the panel clickable, and two trainings would share the CPU / GPU."""
    if job is not None and job.status == "running" and (job.proc is None or job.proc.poll() is None):  # writing or training
        raise InputError("a training is running already (started from the panel or the Python console): wait for it, "
                         "or stop or cancel it, then start another")
