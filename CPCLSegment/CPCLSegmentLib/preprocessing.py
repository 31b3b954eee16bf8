"""A run's cases on the model grid, through the preprocessing cache (``prepcache``), in parallel.

nnU-Net's preprocessed folder, per user: each case is looked up by its key (its input files' identity, the
segments and the plan's spacing and normalisation, ``preparation.labeled_key`` / ``unlabeled_key``); only the
missing ones are preprocessed, by worker processes (``concurrent.futures.ProcessPoolExecutor``, one volume per
worker in memory at a time, as many workers as cores and free memory allow) that write each case straight into
the cache. The run then reads every case memory-mapped from there. A second run on the same files (retraining,
``--compare-supervised``, another seed) preprocesses nothing.

- A labeled case is read once: its image on the model grid also serves as the unlabeled case of the same file
  (sparsely labeled cases train in both streams).
- Results are the same whatever the number of workers (each case is preprocessed by the same function).
- A cancel stops at the next finished case; what was finished stays in the cache (complete entries only).
- After preprocessing the cache is trimmed to its size limit, least recently used first, never this run's cases.
- Under torchrun the first process on each machine (local rank 0) preprocesses while the others wait; then they
  all read the cases from the cache (``preprocess_cases``'s ``distributed``).
"""

from __future__ import annotations

import concurrent.futures
import errno
import multiprocessing
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import cleanup
from . import io as cio
from .data import Case, cached_case
from .errors import Cancelled, InputError, OutputError
from .prepcache import PreprocessCache, canonical_path, case_key, default_cache_dir, parse_size
from .preparation import Emit, LabeledInput, TrainRequest, labels_to_grid, model_input, read_labeled
from .writers import format_bytes, no_space_message

WORKERS_ENV = "CPCL_SEGMENT_PREPROCESS_WORKERS"
MAX_WORKERS = 8
# below this many voxels to preprocess in all, starting worker processes (each imports the engine) takes
# longer than doing the work here
PARALLEL_MIN_VOXELS = 3e7
_VOLUME_COPIES = 6  # float32 copies of a volume a worker holds at its peak (read, reoriented, resampled, normalised, labels)


@dataclass
class Task:
    """One case to preprocess (picklable: it travels to a worker process)."""

    key: str
    name: str
    image: str
    plan: Dict[str, Any]
    item: Optional[LabeledInput] = None  # a labeled case; None: an unlabeled image
    wanted: Optional[List[str]] = None
    segment_names: Optional[Dict[int, str]] = None
    partial: bool = False
    stage: str = "unlabeled"  # labeled | validation | unlabeled


def build_entry(task: Task, root: str) -> str:
    """Reads and preprocesses one case and stores it in the cache at ``root`` (in a worker or here); returns its key."""
    if task.item is None:
        _, arr = model_input(cio.read_image(task.image), task.plan["spacing"], task.plan["normalization"])
        arrays: Dict[str, np.ndarray] = {"image": np.ascontiguousarray(arr, dtype=np.float32)}
        meta: Dict[str, Any] = {"class_known": None}
    else:
        image, labels, class_known = read_labeled(task.item, task.wanted or [], task.segment_names, task.partial, lambda e: None)
        grid, arr = model_input(image, task.plan["spacing"], task.plan["normalization"])
        arrays = {"image": np.ascontiguousarray(arr, dtype=np.float32), "label": labels_to_grid(labels, image, grid)}
        meta = {"class_known": None if class_known.all() else [bool(k) for k in class_known],
                "segmentation": canonical_path(task.item.segmentation)}
    meta.update(name=task.name, source=canonical_path(task.image), kind="unlabeled" if task.item is None else "labeled", pad_value=float(arrays["image"].min()),
                spacing=task.plan["spacing"])
    PreprocessCache(root, limit=2**62).store(task.key, arrays, meta)
    return task.key


def _worker_init(threads: int) -> None:
    """A worker leaves cancelling to the run (Ctrl-C reaches the whole process group) and shares the cores."""
    import signal

    import SimpleITK as sitk

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def worker_count(tasks: Sequence[Task]) -> int:
    """How many processes preprocess ``tasks``: ``$CPCL_SEGMENT_PREPROCESS_WORKERS`` if set; else 1 for little
    work (``PARALLEL_MIN_VOXELS``), otherwise the cores (at most ``MAX_WORKERS``), fewer when free memory
    would not hold ``_VOLUME_COPIES`` copies of the largest volume per worker."""
    given = os.environ.get(WORKERS_ENV, "").strip()
    if given.isdigit():
        return max(1, min(int(given), len(tasks)))
    voxels = [_voxels(t) for t in tasks]
    if len(tasks) < 2 or sum(voxels) < PARALLEL_MIN_VOXELS:
        return 1
    n = min(_cores(), MAX_WORKERS, len(tasks))
    try:
        import psutil

        per_worker = 4.0 * _VOLUME_COPIES * max(voxels)
        n = min(n, max(1, int(0.7 * psutil.virtual_memory().available // max(per_worker, 1.0))))
    except Exception:
        pass
    return max(1, n)


def _voxels(task: Task) -> float:
    """Voxels of the case before and after resampling, whichever is more (from the header; 0 if unknown)."""
    header = cio.read_header(task.image)
    if header is None:
        return 0.0
    size, spacing = header[0], header[1]
    target = task.plan.get("spacing") or spacing
    resampled = np.prod([s * a / b for s, a, b in zip(size, spacing, target)])
    return float(max(np.prod(size), resampled))


def _compute(tasks: List[Task], cache: PreprocessCache, emit: Callable[[Task], None]) -> None:
    """Preprocesses ``tasks`` into the cache, in worker processes when it pays; checks for a cancel after each case."""
    workers = worker_count(tasks)
    if workers <= 1:
        for task in tasks:
            if cleanup.cancel_requested():
                raise Cancelled("cancelled")
            build_entry(task, cache.root)
            emit(task)
        return
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_worker_init, initargs=(_cores() // workers,))
    try:
        futures = {pool.submit(build_entry, t, cache.root): t for t in tasks}
        pending = set(futures)
        while pending:
            done, pending = concurrent.futures.wait(pending, timeout=0.5, return_when=concurrent.futures.FIRST_COMPLETED)
            for f in done:
                f.result()  # a worker's error (InputError naming the file, a full disk) is this run's
                emit(futures[f])
            if cleanup.cancel_requested():
                raise Cancelled("cancelled")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _plan_parts(plan: Dict[str, Any]) -> Dict[str, Any]:
    """What of a plan changes the preprocessed arrays: the target spacing and the normalisation."""
    return {"spacing": plan.get("spacing"), "normalization": plan.get("normalization")}


def labeled_key(item: LabeledInput, wanted: Sequence[str], request: TrainRequest, plan: Dict[str, Any],
                identity: Callable[[str], str]) -> str:
    """The cache key of a labeled case: its image's and segmentation's identities, which slices are annotated,
    the segments learnt and how label values are named, and the plan."""
    names = {str(k): v for k, v in (request.segment_names or {}).items()}
    return case_key({"kind": "labeled", "image": identity(item.image), "segmentation": identity(item.segmentation),
                     "annotated_slices": item.annotated_slices, "segments": list(wanted), "segment_names": names,
                     "partial": bool(request.options.partial_segments), **_plan_parts(plan)})


def unlabeled_key(path: str, plan: Dict[str, Any], identity: Callable[[str], str]) -> str:
    """The cache key of an unlabeled image: its identity and the plan."""
    return case_key({"kind": "unlabeled", "image": identity(path), **_plan_parts(plan)})


def _identities(paths: Sequence[str], cache: PreprocessCache) -> Dict[str, str]:
    """Every input's content identity (``PreprocessCache.identity``), new files hashed in parallel threads."""
    unique = sorted({str(p) for p in paths})
    with concurrent.futures.ThreadPoolExecutor(max(1, min(4, _cores(), len(unique)))) as pool:
        return dict(zip(unique, pool.map(cache.identity, unique)))


def cache_folder(request: TrainRequest) -> str:
    """The run's preprocessing cache folder: ``--cache-dir``, its older name ``--work-dir``, else the default."""
    return os.path.abspath(request.options.cache_dir or request.options.work_dir or default_cache_dir())


def open_cache(request: TrainRequest) -> PreprocessCache:
    """The run's preprocessing cache, created if needed (an ``OutputError`` naming the folder if it cannot be)."""
    limit = request.options.cache_limit  # the --cache-limit text, e.g. "50GB"
    return PreprocessCache(cache_folder(request), parse_size(limit) if limit is not None else None).prepare()


def preprocess_cases(request: TrainRequest, classes: List[Dict[str, Any]], plan: Dict[str, Any], unlabeled_paths: Sequence[str],
                     cache: PreprocessCache, emit: Emit, distributed: Any = None) -> Tuple[List[Case], List[Case], List[Case]]:
    """The labeled, validation and unlabeled cases on the model grid, memory-mapped from the cache: found there,
    or preprocessed into it (in parallel). The run's keys stay held (``PreprocessCache.hold``) until
    ``cache.release()``; afterwards the cache is trimmed to its limit. A full disk is an ``OutputError`` naming
    the disk and what to do.

    With ``distributed`` (torchrun) the process of local rank 0 preprocesses and the others wait for it in one
    collective (``any_rank``, a barrier that also says whether it failed); then they find every case in the
    cache. Each machine's cache is filled once, not once per process."""
    if distributed is None:
        return _checked(request, classes, plan, unlabeled_paths, cache, emit)
    if distributed.local_rank != 0:
        if distributed.any_rank(False):
            raise InputError("preprocessing failed in the first process on a machine (local rank 0): its error says why")
        return _checked(request, classes, plan, unlabeled_paths, cache, emit)
    try:
        cases = _checked(request, classes, plan, unlabeled_paths, cache, emit)
    except BaseException:
        distributed.any_rank(True)  # the waiting processes stop too, instead of waiting out the timeout
        raise
    distributed.any_rank(False)
    return cases


def _checked(request: TrainRequest, classes: List[Dict[str, Any]], plan: Dict[str, Any], unlabeled_paths: Sequence[str],
             cache: PreprocessCache, emit: Emit) -> Tuple[List[Case], List[Case], List[Case]]:
    """``_preprocess_cases`` with a full disk or an unwritable cache as an ``OutputError`` that says what to do."""
    try:
        return _preprocess_cases(request, classes, plan, unlabeled_paths, cache, emit)
    except OSError as e:
        full = e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))
        reason = no_space_message(cache.root) if full else (e.strerror or str(e))
        raise OutputError(f"cannot write the preprocessed cases to the preprocessing cache {cache.root}: {reason}; "
                          + ("free some space, give --cache-dir on a disk with room or lower --cache-limit" if full else
                             "give --cache-dir (or set CPCL_SEGMENT_CACHE_DIR) to a writable folder")) from None


def _preprocess_cases(request: TrainRequest, classes: List[Dict[str, Any]], plan: Dict[str, Any], unlabeled_paths: Sequence[str],
                      cache: PreprocessCache, emit: Emit) -> Tuple[List[Case], List[Case], List[Case]]:
    wanted = [c["name"] for c in classes[1:]]
    items = list(request.labeled) + list(request.validation)
    ids = _identities([p for it in items for p in (it.image, it.segmentation)] + list(unlabeled_paths), cache)

    def labeled_tasks(items: Sequence[LabeledInput], stage: str) -> List[Task]:
        return [Task(labeled_key(it, wanted, request, plan, ids.__getitem__), it.name, it.image, plan, it, wanted,
                     request.segment_names, request.options.partial_segments, stage) for it in items]

    labeled, validation = labeled_tasks(request.labeled, "labeled"), labeled_tasks(request.validation, "validation")
    by_image = {canonical_path(t.image): t for t in labeled + validation}  # a labeled image is read once
    unlabeled = [by_image.get(canonical_path(p)) or Task(unlabeled_key(p, plan, ids.__getitem__), cio.strip_extension(p) or f"unlabeled-{n}", p, plan)
                 for n, p in enumerate(unlabeled_paths)]
    tasks = {t.key: t for t in labeled + validation + unlabeled}
    cache.hold(tasks)
    entries = {k: cache.load(k) for k in tasks}
    missing = [t for k, t in tasks.items() if entries[k] is None]
    for note in cache.damaged:
        emit({"event": "warning", "message": f"a damaged preprocessing cache entry was removed and is rebuilt ({note})"})
    if len(missing) < len(tasks):
        emit({"event": "info", "message": f"{len(tasks) - len(missing)} of {len(tasks)} preprocessed cases are reused from the "
              f"preprocessing cache {cache.root}"})
    done: List[Task] = []

    def progress(task: Task) -> None:
        done.append(task)
        emit({"event": "preprocess", "stage": task.stage, "index": len(done), "of": len(missing), "case": task.name})

    _compute(missing, cache, progress)
    for t in missing:
        entries[t.key] = cache.load(t.key)
        if entries[t.key] is None:
            raise OSError(f"the preprocessed case {t.name} vanished from the preprocessing cache {cache.root}")
    _trim(cache, tasks, emit)
    return ([_case(entries[t.key], t.name, n, True) for n, t in enumerate(labeled)],
            [_case(entries[t.key], t.name, n, True) for n, t in enumerate(validation)],
            [_case(entries[t.key], t.name, n, False) for n, t in enumerate(unlabeled)])


def _trim(cache: PreprocessCache, keys: Any, emit: Emit) -> None:
    """Keeps the cache within its limit (least recently used first, never this run's cases) and says what it did."""
    removed = cache.trim(keep=keys)
    if removed:
        emit({"event": "info", "message": f"preprocessing cache: removed {len(removed)} least recently used case(s) "
              f"({format_bytes(sum(e.size for e in removed))}) to stay within its limit of {format_bytes(cache.limit)}"})
    mine = sum(e.size for e in cache.entries() if e.key in keys)
    if mine > cache.limit:
        emit({"event": "warning", "message": f"this run's preprocessed cases ({format_bytes(mine)}) exceed the preprocessing "
              f"cache's limit ({format_bytes(cache.limit)}); they are kept for this run and removed by later runs first. "
              "Raise the limit with --cache-limit (or CPCL_SEGMENT_CACHE_LIMIT) to reuse them"})


def _case(entry: Any, name: str, seed: int, labeled: bool) -> Case:
    label = entry.arrays.get("label") if labeled else None
    known = entry.meta.get("class_known") if labeled else None
    return cached_case(name, entry.arrays["image"], label, None if known is None else np.asarray(known, dtype=bool),
                       float(entry.meta.get("pad_value", 0.0)), seed)
