"""Volumes handed to the child process with little work on the GUI thread.

- A volume **unchanged since it was read** (its storage node's file exists and is a format the engine reads,
  ``vtkMRMLVolumeNode::GetModifiedSinceRead`` is false: neither voxels nor geometry changed, no parent transform, not
  centred on load) is handed over as that file: nothing is copied or written (``original_file``).
- Any other volume is captured on the GUI thread without a copy (``livevolume.capture``: its image data kept, a
  zero-copy view of its voxels, its modification time and hardened geometry); the file is written later, from a worker
  thread (``Handoff.write_all``), and compared with the node on the GUI thread once written (``Handoff.verify``): a
  volume changed meanwhile is written again before the child starts.
- A labeled case's segmentation **unchanged since it was read from (or saved to) a** ``.seg.nrrd``
  (``vtkMRMLStorableNode::GetModifiedSinceRead`` is false: no segment added, removed, renamed, recoloured or painted
  since; no parent transform; the selected segments in one labelmap layer, so none overlap) is handed over as that
  file: the child reads it and resamples it onto the volume's grid (``original_segmentation``). Any other
  segmentation is captured without a copy where it can be (``segsnapshot``: compared with its node once written, as
  a volume is, through ``watch``), else rasterised on the GUI thread (``nodes.segment_masks`` reads the node); either
  is written from the worker too.

``Handoff`` collects the paths (known at once, so the command line can be built) and the writes still to do;
``PreparedJob`` is a job whose child starts once they are done, on a worker thread, so the click returns at once.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

import slicer
from CPCLSegmentLib import jobs
from CPCLSegmentLib.errors import CPCLError, InputError

from .livevolume import LiveVolume, capture, unchanged
from .nodes import RAS_TO_LPS, check_volume, find_segment_id

# What the engine reads (SimpleITK) the way Slicer read it; DICOM series and other multi-file formats are written.
READABLE = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


def _unchanged_file(node: Any, suffixes: tuple) -> Optional[str]:
    """The one file ``node`` was read from (or last saved to), ending in one of ``suffixes``, when the node has no
    parent transform and is unchanged since (``GetModifiedSinceRead``) and the file exists; else None."""
    storage = node.GetStorageNode() if hasattr(node, "GetStorageNode") else None
    if storage is None or node.GetParentTransformNode() is not None or node.GetModifiedSinceRead():
        return None
    path = storage.GetFileName()
    if not path or not str(path).lower().endswith(suffixes) or storage.GetNumberOfFileNames() > 1:
        return None
    return os.path.abspath(path) if os.path.isfile(path) else None


def original_file(node: Any) -> Optional[str]:
    """The file ``node`` was read from, when the child can read it as the node is now; else None."""
    storage = node.GetStorageNode() if hasattr(node, "GetStorageNode") else None
    if storage is not None and hasattr(storage, "GetCenterImage") and storage.GetCenterImage():
        return None
    return _unchanged_file(node, READABLE)


def original_segmentation(node: Any, names: Sequence[str]) -> Optional[str]:
    """The ``.seg.nrrd`` ``node`` was read from or last saved to, when the child reads the same segments ``names``
    from it as the node holds them; else None (the node is rasterised instead). Slicer marks a segmentation modified
    since read (``GetModifiedSinceRead``) when a segment is added, removed, renamed, recoloured or painted; a parent
    transform does not mark it, so it is checked here. The named segments must share one labelmap layer: segments in
    separate layers may overlap, and overlaps are settled (or refused) by the check on the GUI thread."""
    segmentation = node.GetSegmentation()
    if segmentation.GetSourceRepresentationName() != slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName():
        return None
    ids = [sid for sid in (find_segment_id(node, name) for name in names) if sid is not None]
    if len({segmentation.GetLayerIndex(sid) for sid in ids}) > 1:
        return None
    return _unchanged_file(node, (".seg.nrrd",))


NRRD_TYPES = {"int8": "int8", "uint8": "uint8", "int16": "int16", "uint16": "uint16", "int32": "int32", "uint32": "uint32",
              "int64": "int64", "uint64": "uint64", "float32": "float", "float64": "double"}


def nrrd_header(snap: LiveVolume) -> bytes:
    """A detached-free, uncompressed NRRD header for the snapshot (LPS space, as Slicer writes volumes). Written here
    rather than by pynrrd, which stamps the time into every header: the same volume written twice must be the same
    bytes, so the engine's preprocessing cache (keyed by content) recognises it."""
    ijk_to_lps = RAS_TO_LPS @ snap.ijk_to_ras
    vector = lambda v: "(" + ",".join(repr(float(x)) for x in v) + ")"  # noqa: E731
    sizes = " ".join(str(n) for n in snap.voxels.shape[::-1])
    lines = ["NRRD0004", f"type: {NRRD_TYPES[snap.voxels.dtype.name]}", "dimension: 3", "space: left-posterior-superior",
             f"sizes: {sizes}", "space directions: " + " ".join(vector(ijk_to_lps[:3, c]) for c in range(3)),
             "kinds: domain domain domain", "endian: little", "encoding: raw", f"space origin: {vector(ijk_to_lps[:3, 3])}"]
    return ("\n".join(lines) + "\n\n").encode("ascii")


def write_then_rename(path: str, partial: str, write: Callable[[str], Any], what: str) -> str:
    """Runs ``write(partial)`` and moves ``partial`` over ``path``, from any thread: a partial file never has the final
    name, and is removed on failure (an ``InputError`` naming ``what`` and ``path``)."""
    try:
        write(partial)
        os.replace(partial, path)
    except OSError as e:
        raise InputError(f"cannot write {what} to {path}: {e}") from None
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


def write_seg_nrrd_kji(path: str, header: Dict[str, Any], voxels: np.ndarray, compression_level: int) -> None:
    """slicerio's ``write_segmentation`` of numpy ``(k, j, i[, layer])`` voxels: written as they are where slicerio
    takes C-order arrays (``index_order``), transposed for an older slicerio (``([layer,] i, j, k)`` in Fortran order)."""
    import inspect

    import slicerio

    if "index_order" in inspect.signature(slicerio.write_segmentation).parameters:
        slicerio.write_segmentation(path, dict(header, voxels=voxels), compression_level=compression_level, index_order="C")
    else:
        voxels = voxels.transpose(2, 1, 0) if voxels.ndim == 3 else voxels.transpose(3, 2, 1, 0)
        slicerio.write_segmentation(path, dict(header, voxels=np.ascontiguousarray(voxels)), compression_level=compression_level)


def _write_voxels(f: Any, voxels: np.ndarray) -> None:
    f.write(memoryview(voxels).cast("B"))


def write_snapshot(snap: LiveVolume) -> str:
    """Writes a captured volume as an uncompressed ``.nrrd`` from any thread (the voxels go to the file without a
    copy), atomically: a partial file never has the final name."""
    if snap.voxels.dtype.name not in NRRD_TYPES:
        raise InputError(f"volume '{snap.name}' has voxels of type {snap.voxels.dtype}, which CPCLSegment cannot pass on")
    voxels = np.ascontiguousarray(snap.voxels, dtype=snap.voxels.dtype.newbyteorder("<"))

    def write(partial: str) -> None:
        with open(partial, "wb") as f:
            f.write(nrrd_header(snap))
            _write_voxels(f, voxels)

    return write_then_rename(snap.path, snap.path + ".partial", write, f"volume '{snap.name}'")


@dataclass
class Handoff:
    """The files a job's child reads: each volume's path (its original file, or one to write), the writes still to
    do (``write_all``, from a worker thread), and the volumes captured without a copy (``live``: ``verify`` compares
    them with their nodes on the GUI thread once written)."""

    folder: str
    files: Dict[str, str] = field(default_factory=dict)  # volume ID -> path
    writes: List[Callable[[], Any]] = field(default_factory=list)
    originals: int = 0
    live: List[LiveVolume] = field(default_factory=list)
    rewritten: List[str] = field(default_factory=list)  # names of volumes written again: changed while written
    checks: List[Callable[[], Optional[str]]] = field(default_factory=list)  # see ``watch``
    _names: set = field(default_factory=set)  # file names handed over: the child names its outputs after them

    def volume(self, node: Any, stem: str) -> str:
        """The path the child reads ``node`` from: its original file (unless another volume's file has that name),
        else a file written later from the node's voxels (captured now, without a copy)."""
        if node.GetID() not in self.files:
            check_volume(node)
            path = original_file(node)
            if path is not None and os.path.basename(path).lower() not in self._names:
                self.originals += 1
            else:
                path = self._capture(node, os.path.join(self.folder, f"{stem}.nrrd"))
            self.files[node.GetID()] = path
            self._names.add(os.path.basename(path).lower())
        return self.files[node.GetID()]

    def _capture(self, node: Any, path: str) -> str:
        live = capture(node, path)
        self.live.append(live)
        self.writes.append(lambda live=live: write_snapshot(live))
        return live.path

    def later(self, write: Callable[[], Any]) -> None:
        self.writes.append(write)

    def watch(self, check: Callable[[], Optional[str]]) -> None:
        """``check()`` runs in ``verify``: the name of what changed since captured (its write queued again), else None."""
        self.checks.append(check)

    def write_all(self, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Writes what is still to write, in order, until ``cancelled()``."""
        if self.writes:
            os.makedirs(self.folder, exist_ok=True)
        while self.writes and not cancelled():
            self.writes.pop(0)()

    def verify(self) -> List[str]:
        """On the GUI thread, once ``write_all`` has run: the names of the captured volumes whose node changed since
        (other image data, voxels modified, other geometry); each is captured again and its write queued (``write_all``
        writes it again). ``InputError`` naming the node when it is no longer a volume with voxels."""
        stale = [live for live in self.live if not unchanged(live)]
        for live in stale:
            self.live.remove(live)
            self._capture(live.node, live.path)
        names = [live.name for live in stale] + [name for name in (check() for check in self.checks) if name is not None]
        self.rewritten += names
        return names


MAX_REWRITES = 3  # an input (volume or segmentation) that keeps changing while written fails the job after this many writes


class PreparedJob(jobs.Job):
    """A job whose child starts once ``prepare(cancelled)`` (writing its input files) has run on a worker thread. It is
    running from ``start()`` on: Cancel ends it before the child starts (the child never runs), Stop reaches the
    child; a failing ``prepare`` ends the job as failed with that message. ``verify()`` (optional; ``Handoff.verify``)
    runs on the thread that drains the job's events (``poll``, ``wait``: the GUI thread) once ``prepare`` has run: while
    it names volumes that changed, ``prepare`` runs again (up to ``MAX_REWRITES`` times, then the job fails naming
    them); the child starts once it names none."""

    def __init__(self, *args: Any, prepare: Optional[Callable[[Callable[[], bool]], Any]] = None,
                 verify: Optional[Callable[[], List[str]]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prepare, self.verify = prepare, verify
        self._verified = threading.Event()
        self._verify_outcome: Any = None

    def start(self) -> "PreparedJob":
        if self.prepare is None:
            super().start()
            return self
        if self.status != "created":
            raise RuntimeError("job already started")
        self.status, self.started_at = "running", time.time()
        threading.Thread(target=self._prepare_then_start, daemon=True, name="cpcl-job-prepare").start()
        return self

    def _prepare_then_start(self) -> None:
        prepare, self.prepare = self.prepare, None
        cancelled = lambda: self._cancel_requested  # noqa: E731
        try:
            prepare(cancelled)
            for n in range(1, MAX_REWRITES + 1):
                stale = self._verify_on_gui_thread() if self.verify is not None and not cancelled() else []
                if not stale:
                    break
                if n == MAX_REWRITES:
                    raise InputError(f"input(s) {', '.join(repr(s) for s in stale)} kept changing while written for the "
                                     f"{self.name} ({n} times): start it again once they are no longer being modified")
                prepare(cancelled)
        except Exception as e:  # noqa: BLE001 - ends the job with the message instead of a lost thread
            self._end_unstarted("failed", str(e) if isinstance(e, CPCLError) else f"{type(e).__name__}: {e}")
            return
        if self._cancel_requested:
            self._end_unstarted("cancelled", None)
            return
        jobs.Job.start(self)  # status stays "running": wait() never starts it a second time
        if self._cancel_requested:  # cancelled while the child was being started
            self.cancel(block=False)

    def _verify_on_gui_thread(self) -> List[str]:
        """Asks the thread that drains the events to run ``verify`` and waits for its answer (worker thread)."""
        self._verified.clear()
        self._queue.put({"event": "_verify"})
        while not self._verified.wait(0.05):
            if self._cancel_requested:
                return []
        if isinstance(self._verify_outcome, BaseException):
            raise self._verify_outcome
        return list(self._verify_outcome or [])

    def _handle(self, event: Dict[str, Any]) -> List[Dict[str, Any]]:
        if event.get("event") != "_verify":
            return super()._handle(event)
        try:
            self._verify_outcome = self.verify() if self.verify is not None else []
        except Exception as e:  # noqa: BLE001 - handed to the worker, which fails the job with it
            self._verify_outcome = e
        self._verified.set()
        return []

    def _end_unstarted(self, status: str, error: Optional[str]) -> None:
        self.status, self.exit_code, self.error, self.ended_at = status, 1, error, time.time()
        self._remove_temp()
        self._queue.put({"event": "finished", "status": status, "exit_code": 1, "error": error})
