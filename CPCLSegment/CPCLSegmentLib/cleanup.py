"""What a run leaves on disk: one registry for this process, and a sweep of what dead runs left behind.

This process (all thread-safe):

- **temporary files and folders** (``register`` / ``unregister``): removed at exit and on cancel
  (``remove_all``); ``register(tmp, target=...)`` also says which output a temporary file is about to become,
  so a cancel can name the write it interrupted;
- **files removed only when the run is cancelled** (``remove_on_cancel``): a training's own resume checkpoint;
- **outputs written** (``commit``): the one place where a finished temporary file replaces its target
  (``os.replace``). After a cancel was requested nothing is committed any more (``Cancelled``), and the cancel
  message (``cancel_report``) names exactly what was written before it;
- the **cancel flag** (``request_cancel`` / ``cancel_requested``), set by the CLI's signal handler.

Dead runs (``kill -9``, power loss) cannot clean up: temporary names carry the writing process's id
(``temp_prefix``: ``.tmp-p<pid>-``, ``work_prefix``: ``cpcl-work-p<pid>-``) and ``sweep`` removes those whose
process is gone (or whose pid now belongs to a younger process).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
import time
from typing import Dict, Iterable, List, Optional, Set

from .errors import Cancelled

_lock = threading.RLock()
_temps: Dict[str, Optional[str]] = {}  # temporary path -> the output it becomes (None: a plain temporary)
_on_cancel: Set[str] = set()
_written: Dict[str, str] = {}  # output path -> note ("" or why it matters)
_abandoned: Set[str] = set()  # outputs whose write a cancel stopped before it replaced them
_cancel = threading.Event()

TEMP_PREFIX = ".tmp-p"
WORK_PREFIX = "cpcl-work-p"
_OWNED = re.compile(r"^(?:\.tmp-p|cpcl-work-p)(\d+)-")
SWEEP_MIN_AGE_S = 30.0  # a live writer on another machine keeps its temporary file's mtime fresh


def temp_prefix() -> str:
    """Prefix of this process's temporary files beside outputs (``.tmp-p<pid>-``)."""
    return f"{TEMP_PREFIX}{os.getpid()}-"


def work_prefix() -> str:
    """Prefix of this process's preprocessing folders in the temporary directory (``cpcl-work-p<pid>-``)."""
    return f"{WORK_PREFIX}{os.getpid()}-"


# ------------------------------------------------------------------------------------------ registry


def register(path: str, target: Optional[str] = None) -> None:
    """A temporary file or folder, removed at exit; ``target``: the output it is being written for."""
    with _lock:
        _temps[os.path.abspath(path)] = os.path.abspath(target) if target else None


def unregister(path: str) -> None:
    with _lock:
        _temps.pop(os.path.abspath(path), None)


def remove_on_cancel(path: str) -> None:
    """``path`` (an output of this run, e.g. its resume checkpoint) is removed if the run is cancelled."""
    with _lock:
        _on_cancel.add(os.path.abspath(path))


def keep_on_cancel(path: str) -> None:
    with _lock:
        _on_cancel.discard(os.path.abspath(path))


def note_written(path: str, note: str = "") -> None:
    """Records an output this run has written (``commit`` does it for atomic writes)."""
    with _lock:
        _written[os.path.abspath(path)] = note


def written() -> List[str]:
    """The outputs this run has written that still exist, in order."""
    with _lock:
        return [p for p in _written if os.path.exists(p)]


def commit(tmp: str, target: str, note: str = "") -> None:
    """Replaces ``target`` by the finished temporary file ``tmp`` (atomic), unless a cancel was requested:
    then ``tmp`` is removed, ``target`` stays as it was and ``Cancelled`` is raised."""
    with _lock:
        if _cancel.is_set():
            _remove(tmp)
            _temps.pop(os.path.abspath(tmp), None)
            _abandoned.add(os.path.abspath(target))
            raise Cancelled("cancelled")
        os.replace(tmp, target)
        _temps.pop(os.path.abspath(tmp), None)
        _written[os.path.abspath(target)] = note


def request_cancel() -> None:
    """From now on nothing is committed (``commit`` raises ``Cancelled``)."""
    _cancel.set()


def cancel_requested() -> bool:
    return _cancel.is_set()


def reset() -> None:
    """Forgets the cancel flag and the outputs written (a new command in the same process, e.g. tests)."""
    with _lock:
        _cancel.clear()
        _written.clear()
        _on_cancel.clear()
        _abandoned.clear()


def _remove(path: str) -> bool:
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
    return not os.path.lexists(path)


def remove_all() -> None:
    """Removes every registered temporary file and folder (at exit, or on cancel)."""
    with _lock:
        paths = list(_temps)
        _temps.clear()
    for p in paths:
        _remove(p)


def cancel_report() -> str:
    """Cleans up after a cancel (temporaries, ``remove_on_cancel`` files) and says what exists now:
    "cancelled: no output was written", or the outputs written before the cancel, and any write it interrupted."""
    request_cancel()
    with _lock:
        interrupted = sorted({t for t in _temps.values() if t} | _abandoned)
        removed = [p for p in sorted(_on_cancel) if os.path.lexists(p) and _remove(p)]
        _on_cancel.clear()
        kept = [(p, n) for p, n in _written.items() if os.path.exists(p) and p not in removed]
    remove_all()
    if kept:
        items = ", ".join(p + (f" ({n})" if n else "") for p, n in kept)
        text = f"cancelled: kept what was finished before the cancel: {items}"
    else:
        text = "cancelled: no output was written"
    if removed:
        text += f"; removed this run's {', '.join(os.path.basename(p) for p in removed)}"
    previous = [p for p in interrupted if os.path.exists(p)]
    if interrupted:
        text += "; the cancel stopped the writing of " + ", ".join(interrupted)
        text += f" ({', '.join(os.path.basename(p) for p in previous)}: the previous file is unchanged)" if previous else " (not written)"
    return text


# ------------------------------------------------------------------------------------- dead runs


def _owner_alive(pid: int, since: float) -> bool:
    """Whether process ``pid`` exists and is older than ``since`` (a younger one reused the pid)."""
    if pid == os.getpid():
        return True
    try:
        import psutil

        if not psutil.pid_exists(pid):
            return False
        return psutil.Process(pid).create_time() <= since + 2.0
    except Exception:  # psutil.NoSuchProcess (gone meanwhile), AccessDenied (alive, another user's)
        try:
            import psutil

            return psutil.pid_exists(pid)
        except Exception:
            return True


def sweep(folders: Iterable[Optional[str]], min_age_s: float = SWEEP_MIN_AGE_S) -> List[str]:
    """Removes leftovers of dead CPCLSegment runs in ``folders`` (``.tmp-p<pid>-*`` files, ``cpcl-work-p<pid>-*``
    folders whose process is gone and that were not touched for ``min_age_s``); returns the removed paths."""
    removed: List[str] = []
    now = time.time()
    seen = set()
    for folder in folders:
        if not folder:
            continue
        folder = os.path.abspath(folder)
        if folder in seen or not os.path.isdir(folder):
            continue
        seen.add(folder)
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            m = _OWNED.match(name)
            if not m:
                continue
            path = os.path.join(folder, name)
            try:
                mtime = os.lstat(path).st_mtime
            except OSError:
                continue
            if now - mtime < min_age_s or _owner_alive(int(m.group(1)), mtime):
                continue
            with _lock:
                if os.path.abspath(path) in _temps:
                    continue
            if _remove(path):
                removed.append(path)
    return removed


def torch_cache_folder() -> Optional[str]:
    """The folder torch's compiler creates in the temporary folder when it is first imported
    (``torchinductor_<user>``, made even when nothing is compiled), unless ``TORCHINDUCTOR_CACHE_DIR`` names
    another; None if it already exists (a cache someone keeps). ``remove_if_empty`` removes it afterwards."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return None
    import getpass
    import tempfile

    try:
        user = re.sub(r'[\\/:*?"<>|]', "_", getpass.getuser())
    except Exception:  # no user name (a container without one): torch then uses its own fallback name
        return None
    path = os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")
    return None if os.path.exists(path) else path


def remove_if_empty(folder: Optional[str]) -> None:
    """Removes ``folder`` and its empty subfolders; anything holding a file stays."""
    if not folder or not os.path.isdir(folder):
        return
    for root, dirs, files in os.walk(folder, topdown=False):
        if not files:
            with contextlib.suppress(OSError):
                os.rmdir(root)
