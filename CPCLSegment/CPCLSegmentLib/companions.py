"""The files written beside a model file, named in one place. Torch-free and import-free: the engine and the
Slicer module both name them from here.

- ``<model>.checkpoint.pt``: the resume checkpoint while a training runs (``--resume`` continues from it);
- ``<model>.run.json`` (``model.pt`` -> ``model.run.json``): the run record beside a finished model file;
- ``<model>.lock``: the output lock while a training writes the model file.
"""

from __future__ import annotations

from typing import Dict

CHECKPOINT_SUFFIX = ".checkpoint.pt"
RUN_RECORD_SUFFIX = ".run.json"
LOCK_SUFFIX = ".lock"
MODEL_SUFFIX = ".pt"


def checkpoint_path(out: str) -> str:
    """The resume checkpoint of model file ``out``: ``model.pt`` -> ``model.pt.checkpoint.pt``."""
    return str(out) + CHECKPOINT_SUFFIX


def run_record_path(out: str) -> str:
    """The run record (JSON) of model file ``out``: ``model.pt`` -> ``model.run.json``."""
    base = str(out)
    return (base[: -len(MODEL_SUFFIX)] if base.endswith(MODEL_SUFFIX) else base) + RUN_RECORD_SUFFIX


def lock_path(out: str) -> str:
    """The output lock of model file ``out`` while a training writes it: ``model.pt`` -> ``model.pt.lock``."""
    return str(out) + LOCK_SUFFIX


def is_checkpoint(file_name: str) -> bool:
    """Whether a file name is a resume checkpoint's."""
    return str(file_name).endswith(CHECKPOINT_SUFFIX)


def companion_paths(out: str) -> Dict[str, str]:
    """Every file a training may write beside model file ``out``, by what it is."""
    return {"run record": run_record_path(out), "resume checkpoint": checkpoint_path(out), "lock file": lock_path(out)}
