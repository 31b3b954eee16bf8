"""The preprocessing cache: what identifies an input and a preprocessed case, and the folder that keeps them.

A preprocessed case is named by its inputs' **content**, never by their file names: two files
``a/img.nii.gz`` and ``b/img.nii.gz`` are two cases unless they hold the same bytes. An input's identity is
the SHA-256 of its bytes (NRRD header comments left out; a DICOM folder: of its files' names and bytes), memoised per file by its absolute,
link-resolved path, size and modification time in nanoseconds (``file_identity``): an unchanged file is never
read again to be identified, a rewritten one is hashed anew, and the same data exported again under a new
name (the Slicer module exports its nodes for every run) is recognised. A key over path, size and mtime alone
would miss every such re-export; hashing every input on every run would cost a full read of a thousand CTs
per run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from . import cleanup
from .errors import InputError, OutputError

# Bump when preprocessing changes what it writes for the same inputs and plan (reorientation, resampling,
# normalisation, label mapping, array dtypes): every older cache entry then stops matching.
PREPROCESSING_VERSION = 1


def canonical_path(path: str) -> str:
    """The absolute, link-resolved form of a path: the same file given as ``a.nrrd``, ``./a.nrrd`` or
    ``/data/a.nrrd`` is the same file."""
    return os.path.normcase(os.path.realpath(os.path.abspath(str(path))))


def file_identity(path: str) -> List[Any]:
    """``[canonical path, size, mtime_ns]`` of a file; for a folder (a DICOM series) its path and a digest of
    the name, size and mtime_ns of every file directly inside it."""
    path = canonical_path(path)
    st = os.stat(path)
    if not os.path.isdir(path):
        return [path, int(st.st_size), int(st.st_mtime_ns)]
    listing = []
    with os.scandir(path) as it:
        for entry in it:
            if entry.is_file():
                est = entry.stat()
                listing.append([entry.name, int(est.st_size), int(est.st_mtime_ns)])
    listing.sort()
    return [path, "folder", hashlib.sha256(json.dumps(listing).encode("utf-8")).hexdigest()]


def _nrrd_header_end(fh) -> Optional[int]:
    """The offset just past an attached NRRD header (its first blank line), or None when ``fh`` is not a NRRD
    file or its header is not within the first megabyte."""
    head = fh.read(1 << 20)
    fh.seek(0)
    if not head.startswith(b"NRRD"):
        return None
    end = head.find(b"\n\n")
    return None if end < 0 else end + 2


def content_digest(path: str) -> str:
    """SHA-256 of a file's bytes; of a folder (a DICOM series): of the names and bytes of the files directly in it.

    The comment lines (``#``) of a NRRD header are left out: writers stamp them with the time of writing (pynrrd,
    hence slicerio's ``.seg.nrrd``), so the same segmentation exported twice would otherwise be two inputs."""
    digest = hashlib.sha256()
    if os.path.isdir(path):
        names = sorted(e.name for e in os.scandir(path) if e.is_file())
        files = [os.path.join(path, n) for n in names]
        for name in names:
            digest.update(name.encode("utf-8") + b"\0")
    else:
        files = [path]
    for f in files:
        with open(f, "rb") as fh:
            end = _nrrd_header_end(fh)
            if end is not None:
                header = fh.read(end).split(b"\n")
                digest.update(b"\n".join(line for line in header if not line.startswith(b"#")))
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def case_key(parts: Dict[str, Any]) -> str:
    """A short hexadecimal key for everything that determines a preprocessed case (inputs' identities, plan,
    preprocessing version): equal parts give equal keys, any difference another key."""
    text = json.dumps({"version": PREPROCESSING_VERSION, **parts}, sort_keys=True, allow_nan=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


# ---------------------------------------------------------------------------------------- where and how big

CACHE_DIR_ENV = "CPCL_SEGMENT_CACHE_DIR"
CACHE_LIMIT_ENV = "CPCL_SEGMENT_CACHE_LIMIT"
DEFAULT_LIMIT = "20GB"
_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "KIB": 1024, "M": 1e6, "MB": 1e6, "MIB": 1024**2, "G": 1e9, "GB": 1e9,
          "GIB": 1024**3, "T": 1e12, "TB": 1e12, "TIB": 1024**4}


def default_cache_dir() -> str:
    """``$CPCL_SEGMENT_CACHE_DIR``, else the per-user cache folder: ``$XDG_CACHE_HOME/cpcl-segment`` or
    ``~/.cache/cpcl-segment`` (Linux), ``~/Library/Caches/cpcl-segment`` (macOS),
    ``%LOCALAPPDATA%\\cpcl-segment\\Cache`` (Windows)."""
    given = os.environ.get(CACHE_DIR_ENV, "").strip()
    if given:
        return os.path.abspath(os.path.expanduser(given))
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(os.path.expanduser("~"), "AppData", "Local")
        return os.path.join(base, "cpcl-segment", "Cache")
    if sys.platform == "darwin":
        return os.path.join(os.path.expanduser("~"), "Library", "Caches", "cpcl-segment")
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cpcl-segment")


def parse_size(text: Any, what: str = "--cache-limit") -> int:
    """Bytes from ``"20GB"``, ``"500 MB"``, ``"1.5TiB"`` or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise InputError(f"{what} {text!r}: give a size such as 20GB, 500MB or 1.5TB")
    return int(float(m.group(1)) * _UNITS[unit])


def default_limit() -> int:
    """``$CPCL_SEGMENT_CACHE_LIMIT`` or 20 GB."""
    return parse_size(os.environ.get(CACHE_LIMIT_ENV, "").strip() or DEFAULT_LIMIT, CACHE_LIMIT_ENV)


# ------------------------------------------------------------------------------------------------ entries

MANIFEST = "manifest.json"
FORMAT = "cpcl-segment-preprocessed"
_KEY = re.compile(r"^[0-9a-f]{32}$")
_IN_USE = "in-use"  # marker files ``.tmp-p<pid>-in-use-*.json``: the keys a live run is reading
_IDENTITIES = "identities"  # memo of input content hashes by (path, size, mtime_ns)
_TAG = "CACHEDIR.TAG"  # https://bford.info/cachedir/: backup tools skip the folder


@dataclass
class Entry:
    """A verified cache entry: its folder, arrays (memory-mapped paths) and what was recorded with them."""

    key: str
    folder: str
    arrays: Dict[str, str]
    meta: Dict[str, Any]
    size: int
    last_used: float


def _strict_json(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder
    finally:
        os.close(fd)


class PreprocessCache:
    """The preprocessed cases of every run, one folder per case key (``case_key``) under ``root``.

    An entry is ``<root>/<key>/`` with the case's ``.npy`` arrays and ``manifest.json`` (strict JSON: the
    arrays' shapes, dtypes and byte sizes, and what the run records with them). It is written in a temporary
    folder (``.tmp-p<pid>-…``, swept by a later run if this process dies) and renamed into place complete, so
    a crash never leaves a half entry under a key; every read verifies the manifest against the files, and an
    entry that does not match (truncated, damaged) is removed and rebuilt. The manifest's modification time is
    the entry's last use: ``trim`` removes the least recently used entries until the cache fits ``limit``
    bytes, never one a live run holds (``hold``: a marker file naming its keys)."""

    def __init__(self, root: Optional[str] = None, limit: Optional[int] = None) -> None:
        self.root = os.path.abspath(os.path.expanduser(root or default_cache_dir()))
        self.limit = default_limit() if limit is None else int(limit)
        self._marker: Optional[str] = None
        self.damaged: List[str] = []  # entries found damaged (and removed) by this object, with the reason

    def prepare(self) -> "PreprocessCache":
        """Creates the folder (tagged for backup tools) and sweeps what dead runs left in it."""
        try:
            os.makedirs(self.root, exist_ok=True)
            tag = os.path.join(self.root, _TAG)
            if not os.path.exists(tag):
                with open(tag, "w", encoding="utf-8") as f:
                    f.write("Signature: 8a477f597d28d172789f06886806bc55\n# cpcl-segment's preprocessed cases\n")
        except OSError as e:
            raise OutputError(f"cannot create the preprocessing cache folder {self.root}: {e.strerror or e}; give "
                              f"--cache-dir (or set {CACHE_DIR_ENV}) to a writable folder") from None
        cleanup.sweep([self.root, os.path.join(self.root, _IDENTITIES)])
        return self

    # -------------------------------------------------------------------------------- read / write

    def load(self, key: str) -> Optional[Entry]:
        """The verified entry of ``key`` (marked as just used), or None; a damaged entry is removed."""
        folder = os.path.join(self.root, key)
        if not os.path.isdir(folder):
            return None
        try:
            entry = self._read(key, folder)
        except (OSError, ValueError, KeyError, TypeError) as e:
            self._remove(folder)  # a damaged entry is a miss: the caller rebuilds it
            self.damaged.append(f"{key}: {e}")
            return None
        with contextlib.suppress(OSError):
            os.utime(os.path.join(folder, MANIFEST))
        return entry

    def _read(self, key: str, folder: str) -> Entry:
        manifest_path = os.path.join(folder, MANIFEST)
        with open(manifest_path, encoding="utf-8") as f:
            manifest = _strict_json(f.read())
        if manifest.get("format") != FORMAT or manifest.get("key") != key:
            raise ValueError("the manifest is not this entry's")
        arrays: Dict[str, str] = {}
        for name, rec in manifest["arrays"].items():
            if os.path.basename(rec["file"]) != rec["file"]:
                raise ValueError(f"array file {rec['file']!r} lies outside the entry")
            path = os.path.join(folder, rec["file"])
            size = os.path.getsize(path)
            if size != rec["bytes"]:
                raise ValueError(f"{rec['file']} has {size} bytes, {rec['bytes']} were written")
            arr = np.load(path, mmap_mode="r")
            if list(arr.shape) != list(rec["shape"]) or str(arr.dtype) != rec["dtype"]:
                raise ValueError(f"{rec['file']} holds {arr.dtype}{list(arr.shape)}, {rec['dtype']}{rec['shape']} were written")
            del arr
            arrays[name] = path
        size = sum(os.path.getsize(p) for p in arrays.values()) + os.path.getsize(manifest_path)
        return Entry(key, folder, arrays, manifest.get("meta") or {}, size, os.path.getmtime(manifest_path))

    def store(self, key: str, arrays: Dict[str, np.ndarray], meta: Dict[str, Any]) -> Entry:
        """Writes an entry atomically (temporary folder, fsync, manifest last, rename) and returns it verified.
        If another run stored the same key meanwhile, its entry is used."""
        final = os.path.join(self.root, key)
        tmp = tempfile.mkdtemp(prefix=cleanup.temp_prefix(), dir=self.root)
        cleanup.register(tmp)
        try:
            records = {}
            for name, arr in arrays.items():
                path = os.path.join(tmp, f"{name}.npy")
                with open(path, "wb") as f:
                    np.save(f, np.ascontiguousarray(arr))
                    f.flush()
                    os.fsync(f.fileno())
                records[name] = {"file": f"{name}.npy", "shape": [int(s) for s in arr.shape], "dtype": str(arr.dtype),
                                 "bytes": os.path.getsize(path)}
            manifest = {"format": FORMAT, "preprocessing_version": PREPROCESSING_VERSION, "key": key, "arrays": records,
                        "meta": meta, "created": time.time()}
            with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
                f.write(json.dumps(manifest, allow_nan=False, indent=1))
                f.flush()
                os.fsync(f.fileno())
            _fsync_path(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not os.path.isdir(final):
                    raise
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            cleanup.unregister(tmp)
        entry = self.load(key)
        if entry is None:
            raise OutputError(f"the preprocessing cache entry {final} could not be read back after writing it")
        return entry

    def identity(self, path: str) -> str:
        """The content identity of an input (``content_digest``), memoised in ``identities/`` by the file's path,
        size and mtime: an unchanged file is not read again."""
        ident = file_identity(path)
        memo = os.path.join(self.root, _IDENTITIES, case_key({"file": ident, "digest": "nrrd comments skipped"}) + ".json")
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            with open(memo, encoding="utf-8") as f:
                known = _strict_json(f.read())
            if known.get("file") == ident and re.fullmatch(r"[0-9a-f]{64}", str(known.get("sha256"))):
                return str(known["sha256"])
        digest = content_digest(ident[0])
        with contextlib.suppress(OSError):  # a memo that cannot be written only costs a read next time
            os.makedirs(os.path.dirname(memo), exist_ok=True)
            tmp = os.path.join(os.path.dirname(memo), f"{cleanup.temp_prefix()}{uuid.uuid4().hex}")
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps({"file": ident, "sha256": digest}, allow_nan=False))
            os.replace(tmp, memo)
        return digest

    # ------------------------------------------------------------------------------ what is there

    def entries(self) -> List[Entry]:
        """Every entry, least recently used first; a damaged one is listed with ``meta["damaged"]``."""
        out = []
        with contextlib.suppress(OSError):
            for name in os.listdir(self.root):
                folder = os.path.join(self.root, name)
                if not _KEY.match(name) or not os.path.isdir(folder):
                    continue
                try:
                    out.append(self._read(name, folder))
                except (OSError, ValueError, KeyError, TypeError) as e:
                    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) if os.path.isdir(folder) else 0
                    out.append(Entry(name, folder, {}, {"damaged": str(e)}, size, os.path.getmtime(folder)))
        return sorted(out, key=lambda e: e.last_used)

    def hold(self, keys: Iterable[str]) -> None:
        """Marks ``keys`` as read by this run until ``release``: no other run's ``trim`` or ``clear`` removes them."""
        self.release()
        path = os.path.join(self.root, f"{cleanup.temp_prefix()}{_IN_USE}-{uuid.uuid4().hex}.json")
        cleanup.register(path)  # removed at exit and on cancel; a killed run's is swept by the next
        with open(path, "w", encoding="utf-8") as f:
            json.dump(sorted(set(keys)), f)
        self._marker = path

    def release(self) -> None:
        if self._marker is not None:
            with contextlib.suppress(OSError):
                os.remove(self._marker)
            cleanup.unregister(self._marker)
            self._marker = None

    def held(self) -> set:
        """The keys live runs hold (their markers; a dead run's marker is swept first)."""
        cleanup.sweep([self.root])
        keys: set = set()
        with contextlib.suppress(OSError):
            for name in os.listdir(self.root):
                if name.startswith(cleanup.TEMP_PREFIX) and f"-{_IN_USE}-" in name:
                    with contextlib.suppress(OSError, ValueError), open(os.path.join(self.root, name), encoding="utf-8") as f:
                        keys.update(str(k) for k in json.load(f))
        return keys

    # ---------------------------------------------------------------------------------- removing

    def trim(self, keep: Iterable[str] = ()) -> List[Entry]:
        """Removes damaged entries, then least recently used ones until the cache fits its limit; never ``keep``
        nor what a live run holds. Returns the removed entries."""
        protected = set(keep) | self.held()
        entries = self.entries()
        total = sum(e.size for e in entries)
        removed = []
        for e in sorted(entries, key=lambda e: ("damaged" not in e.meta, e.last_used)):
            if (total <= self.limit and "damaged" not in e.meta) or e.key in protected:
                continue
            if self._remove(e.folder):
                total -= e.size
                removed.append(e)
        return removed

    def clear(self, older_than_days: Optional[float] = None) -> Tuple[List[Entry], List[Entry]]:
        """Removes every entry (or those not used for ``older_than_days``) but those a live run holds:
        ``(removed, kept because in use)``."""
        held = self.held()
        cutoff = None if older_than_days is None else time.time() - float(older_than_days) * 86400.0
        removed, busy = [], []
        for e in self.entries():
            if cutoff is not None and e.last_used >= cutoff:
                continue
            if e.key in held:
                busy.append(e)
            elif self._remove(e.folder):
                removed.append(e)
        if cutoff is None:
            shutil.rmtree(os.path.join(self.root, _IDENTITIES), ignore_errors=True)
        return removed, busy

    def _remove(self, folder: str) -> bool:
        """Renames the entry away first (so no reader sees half of it), then deletes it."""
        gone = os.path.join(self.root, f"{cleanup.temp_prefix()}gone-{uuid.uuid4().hex}")
        try:
            os.rename(folder, gone)
        except OSError:
            return not os.path.exists(folder)
        shutil.rmtree(gone, ignore_errors=True)
        return True
