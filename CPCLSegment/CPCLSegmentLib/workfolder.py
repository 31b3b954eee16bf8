"""The run's work folder: the given ``--work-dir`` or a temporary folder removed afterwards (on cancel too), and
the cases preprocessed into it. A full disk is an ``OutputError`` naming the disk."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from . import cleanup
from .data import Case
from .errors import OutputError
from .preparation import Emit, TrainRequest, preprocess_labeled, preprocess_unlabeled
from .writers import no_space_message


@contextlib.contextmanager
def work_folder(work_dir: Optional[str]) -> Iterator[str]:
    """``work_dir`` (created if needed), or a temporary folder removed afterwards (on cancel too: ``cleanup``)."""
    if work_dir is not None:
        try:
            os.makedirs(work_dir, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create --work-dir {work_dir}: {e.strerror or e}") from None
        yield work_dir
        return
    try:
        folder = tempfile.mkdtemp(prefix=cleanup.work_prefix())
    except OSError as e:
        where = tempfile.gettempdir()
        raise OutputError(f"cannot create a temporary folder in {where}: {_reason(e, where)}; set TMPDIR to another folder or give --work-dir") from None
    cleanup.register(folder)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        cleanup.unregister(folder)


def preprocess_cases(request: TrainRequest, classes: List[Dict[str, Any]], plan: Dict[str, Any], unlabeled_paths: Sequence[str],
                     work_dir: str, say: Emit) -> Tuple[List[Case], List[Case], List[Case]]:
    """The labeled, validation and unlabeled cases on the model grid, in ``work_dir`` (a full disk is an
    ``OutputError`` naming the disk, not an internal error)."""
    try:
        labeled = preprocess_labeled(request.labeled, classes, plan, request, work_dir, say, "labeled")
        validation = preprocess_labeled(request.validation, classes, plan, request, work_dir, say, "validation")
        unlabeled = preprocess_unlabeled(unlabeled_paths, plan, work_dir, say)
    except OSError as e:
        raise OutputError(f"cannot write the preprocessed cases to {work_dir}: {_reason(e, work_dir)}; free some space or give --work-dir "
                          "on a disk with room") from None
    return labeled, validation, unlabeled


def _reason(e: OSError, where: str) -> str:
    """Why writing in ``where`` failed: "no space left on <disk>" for a full disk or quota, else the OS's words."""
    return no_space_message(where) if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)) else (e.strerror or str(e))
