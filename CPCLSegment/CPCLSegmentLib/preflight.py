"""Checks every command makes before any work: the paths it reads and writes, and the values that name them.

- ``check_outputs(outputs, inputs)``: each output (a path and the flag that names it) is not empty, not a
  folder where a file is meant (or a file where a folder is meant), lies in a folder that exists or can be
  created and is writable, is not a write-protected file, and is **not one of the inputs**: not the same path,
  not a link to it, not the same file under another name (``os.path.samefile``), and, for a folder output,
  none of the file names mapped into it lands on an input. The message names both.
- ``check_free_space``: the disks that will hold outputs and work files have the estimated bytes free.
- ``OutputLock``: ``<model>.lock`` beside a training's model file (pid, host, start time): a second training
  writing the same file is refused; the lock of a process that is gone is taken over (with a message).
- ``check_stop_file``: a stop file that exists before the run starts (left from an earlier run: it would stop
  this one at iteration 0) or is a folder is refused.
- ``check_spacing``: target spacings are three finite numbers > 0.
- ``sweep_leftovers``: what dead runs left beside the outputs and in the temporary folder (``cleanup.sweep``).
"""

from __future__ import annotations

import json
import math
import os
import socket
import stat
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from . import cleanup
from .companions import lock_path
from .errors import InputError, OutputError
from .writers import check_free_space as _check_disk
from .writers import mount_point

Emit = Callable[[Dict[str, Any]], None]
Named = Tuple[str, str]  # (what names the path, e.g. "--out" or "labeled image", the path)


def _real(path: str) -> str:
    return os.path.normcase(os.path.realpath(os.path.abspath(path)))


def same_file(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` are the same file: the same path, a link to it, or a hard link / other name
    of the same file (``os.path.samefile``); for paths that do not exist yet, the same real path."""
    if os.path.exists(a) and os.path.exists(b):
        try:
            return os.path.samefile(a, b)
        except OSError:
            pass
    return _real(a) == _real(b)


def _nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return p


def _check_writable_folder(folder: str, what: str, path: str) -> None:
    existing = _nearest_existing(folder)
    if not os.path.isdir(existing):
        raise InputError(f"{what} {path}: {existing} is a file, not a folder, so {path} cannot be written")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path}: the folder {existing} is not writable (permission denied)")


def _identities(path: str) -> List[Any]:
    """What makes two paths the same file: the real path, and the (device, inode) of an existing file."""
    keys: List[Any] = [_real(path)]
    try:
        st = os.stat(path)
        keys.append((st.st_dev, st.st_ino))
    except OSError:
        pass
    return keys


def check_outputs(outputs: Sequence[Named], inputs: Sequence[Named], folders: Sequence[Named] = ()) -> None:
    """Refuses, before any work, an output file that would replace an input or cannot be written.

    ``outputs``: files to write; ``folders``: folders to write into (e.g. ``--work-dir``); ``inputs``: every
    file or folder the command reads. Raises ``InputError`` naming the flag(s) and path(s). Linear in the number
    of paths (real paths and (device, inode) pairs are looked up, as ``os.path.samefile`` compares them)."""
    known: Dict[Any, Named] = {}
    for w, p in inputs:
        if p:
            for key in _identities(str(p)):
                known.setdefault(key, (w, str(p)))
    writable: Dict[str, None] = {}
    for what, path in outputs:
        path = str(path)
        if not path.strip():
            raise InputError(f"{what} is empty: give a file path")
        if os.path.isdir(path):
            raise InputError(f"{what} {path} is a folder; give a file path")
        hit = next((known[k] for k in _identities(path) if k in known), None)
        if hit is not None:
            in_what, in_path = hit
            same = "" if os.path.abspath(path) == os.path.abspath(in_path) else f" (given as {in_path})"
            raise InputError(f"{what} {path} is also the {in_what}{same}: writing it would replace that input; "
                             "choose another output path")
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in writable:
            _check_writable_folder(folder, what, path)
            writable[folder] = None
        if os.path.isfile(path) and not (os.stat(path).st_mode & stat.S_IWUSR):
            raise InputError(f"{what} {path} exists and is write-protected; remove the protection or choose another path")
    for what, folder in folders:
        folder = str(folder)
        if not folder.strip():
            raise InputError(f"{what} is empty: give a folder")
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise InputError(f"{what} {folder} is a file, not a folder")
        _check_writable_folder(folder, what, folder)


def check_spacing(spacing: Optional[Sequence[Any]], what: str = "--spacing") -> Optional[List[float]]:
    """Three finite numbers > 0 (millimetres), or None."""
    if spacing is None:
        return None
    try:
        values = [float(v) for v in spacing]
    except (TypeError, ValueError):
        raise InputError(f"{what} must be three numbers (mm), not {spacing!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"{what} must be three finite numbers > 0 (mm, X Y Z), not {list(spacing)}")
    return values


def check_stop_file(path: Optional[str]) -> None:
    """A stop file must not exist when a run starts (it would stop the run at once) and is never a folder."""
    if not path:
        return
    if os.path.isdir(path):
        raise InputError(f"--stop-file {path} is a folder; give the path of a file to create when the run should stop")
    if os.path.lexists(path):
        raise InputError(f"--stop-file {path} already exists (left from an earlier run?): it would stop this run before "
                         "its first iteration; delete it first")


def check_free_space(needs: Iterable[Tuple[str, float, str]]) -> None:
    """``needs``: ``(path, bytes, what)``; bytes on the same disk are added up before comparing with its free space."""
    per_disk: Dict[str, Tuple[str, float, List[str]]] = {}
    for path, need, what in needs:
        if not need:
            continue
        disk = mount_point(path)
        p, total, whats = per_disk.get(disk, (path, 0.0, []))
        per_disk[disk] = (p, total + float(need), whats + [what])
    for disk, (path, total, whats) in per_disk.items():
        try:
            _check_disk(path, int(total), " and ".join(whats))
        except OutputError as e:
            raise OutputError(str(e)) from None


def sweep_leftovers(folders: Iterable[Optional[str]], emit: Emit, with_temp_dir: bool = True) -> List[str]:
    """Removes what dead CPCLSegment runs left in ``folders`` (and the temporary folder); says so."""
    folders = list(folders) + ([tempfile.gettempdir()] if with_temp_dir else [])
    removed = cleanup.sweep(folders)
    if removed:
        shown = ", ".join(removed[:5]) + (f" and {len(removed) - 5} more" if len(removed) > 5 else "")
        emit({"event": "info", "message": f"removed what {len(removed)} earlier run(s) that did not finish left behind: {shown}"})
    return removed


class OutputLock:
    """``<path>.lock`` while a training writes ``path``: a second training on the same output is refused."""

    def __init__(self, path: str) -> None:
        self.target = os.path.abspath(str(path))
        self.path = lock_path(self.target)
        self.held = False

    def _read(self) -> Dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _holder_alive(self, info: Dict[str, Any]) -> bool:
        pid, host = info.get("pid"), info.get("host")
        if not isinstance(pid, int):  # unreadable (being written this instant, or damaged): alive unless old
            try:
                return time.time() - os.path.getmtime(self.path) < 60
            except OSError:
                return False
        if host and host != socket.gethostname():
            return True  # another machine's run: we cannot tell; the message says how to clear it
        started = info.get("started")
        return cleanup._owner_alive(pid, float(started) if isinstance(started, (int, float)) else time.time())

    def acquire(self, emit: Emit) -> "OutputLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "output": self.target}
        try:
            os.makedirs(os.path.dirname(self.target), exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create the folder of {self.target}: {e.strerror or e}") from None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self._read()
                if self._holder_alive(other):
                    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(other["started"])) if isinstance(other.get("started"), (int, float)) else "?"
                    raise InputError(
                        f"another training (pid {other.get('pid', '?')} on {other.get('host', '?')}, started {when}) is writing "
                        f"{self.target}: wait for it to finish or choose another --out (if that run is gone, delete {self.path})"
                    ) from None
                emit({"event": "info", "message": f"taking over {self.path}: the training that held it (pid {other.get('pid', '?')}) is gone"})
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise InputError(f"cannot remove the stale lock {self.path}: {e.strerror}") from None
                continue
            except OSError as e:
                raise InputError(f"cannot create the lock file {self.path}: {e.strerror} (is the folder writable?)") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f, allow_nan=False)
            self.held = True
            cleanup.register(self.path)
            return self
        raise InputError(f"cannot take the lock {self.path}: another process keeps creating it")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._read().get("pid") == os.getpid():
            try:
                os.remove(self.path)
            except OSError:
                pass
        cleanup.unregister(self.path)

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
