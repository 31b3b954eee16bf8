"""Registry of temporary files to remove if the process is stopped abruptly (SIGTERM, parent gone).

Atomic writers register their temporary file while writing; ``remove_all`` is called by the CLI's signal
handler and watchdog before exiting, so an interrupted run leaves neither a partial output nor a stray
temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from typing import Set

_lock = threading.Lock()
_paths: Set[str] = set()


def register(path: str) -> None:
    with _lock:
        _paths.add(os.path.abspath(path))


def unregister(path: str) -> None:
    with _lock:
        _paths.discard(os.path.abspath(path))


def remove_all() -> None:
    with _lock:
        paths = list(_paths)
        _paths.clear()
    for p in paths:
        with contextlib.suppress(OSError):
            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.exists(p):
                os.remove(p)
