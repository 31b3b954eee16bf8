"""``cpcl-segment`` (also ``python -m CPCLSegmentLib.cli``): train | predict | demo | rank | info | cache.

Progress (``--progress json``): stdout carries only JSON lines, one object per line, flushed:
``{"event": "progress", "iteration", "of", "loss": {...}, "eta_s"}``, ``{"event": "validation", ...}``,
``{"event": "warning", "message"}``, ``{"event": "done", "model"}``, ``{"event": "error", "message"}``; the
summary and human-readable text go to stderr. The Slicer module parses these lines.

Exit codes: 0 done; 2 bad input or model file (also: an output that cannot be written, a full disk); 3 loss
diverged; 4 out of memory (GPU or RAM); 130 cancelled (SIGTERM, Ctrl-C, or parent gone with
``--exit-with-parent``); 1 internal error (a bug: please report it). A cancel writes nothing more: a training
leaves no model file (and removes the checkpoint it wrote, unless it was resumed from it), a multi-image
``predict`` / ``rank`` keeps the outputs finished before the cancel; the error message names what exists.

Every command checks its paths and values before any work (``preflight``); a user's mistake is an exit 2 with
a message that names the file or flag, never an internal error.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from . import cleanup
from .cli_args import build_parser, build_train_request
from .console import Reporter, StopControl
from .errors import Cancelled, CPCLError, InputError, OutOfMemory
from .preflight import check_stop_file


# ---------------------------------------------------------------------------------------- commands


def cmd_train(args, report: Reporter, control: StopControl) -> int:
    from . import pipeline

    request = build_train_request(args)
    if args.retry_smaller_on_oom and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("--retry-smaller-on-oom cannot be used with torchrun: the rank that ran out of memory would retry "
                         "alone while the others wait for it; give a smaller --patch-size instead")
    dist = _init_distributed(request.config.device)
    try:
        result = train_with_retry(pipeline.train, request, args.retry_smaller_on_oom, report, control.should_stop, dist)
    finally:
        if dist is not None:
            dist.close()
    if dist is None or dist.rank == 0:
        report.close()
        report({"event": "done", **result}) if report.mode == "json" else report.text(
            f"model written to {result['model']} ({result['status']}, {result['iterations']} iterations, {result['seconds']} s)"
        )
    return 0


def train_with_retry(train: Callable[..., Dict[str, Any]], request: Any, retry: bool, report: Callable[[Dict[str, Any]], None],
                     should_stop: Callable[[], bool], dist: Any = None) -> Dict[str, Any]:
    """``train(request, ...)``; with ``retry`` (``--retry-smaller-on-oom``), after an ``OutOfMemory`` once more with
    a patch estimated to need half the memory. The retry runs after the ``except`` block, once the failed run's trainer, optimizer state and
    activations (which the exception's traceback holds) are released and the device's cached memory is freed."""
    try:
        return train(request, report, should_stop, distributed=dist)
    except OutOfMemory as e:
        smaller = e.smaller_patch  # estimated to need at most half the patch-dependent memory
        if not retry or request.config.patch_size is None or smaller is None:
            raise
    free_memory()
    from .planning import xyz

    report({"event": "warning", "message": f"out of memory: retrying once with --patch-size {xyz(smaller)} "
            f"(was {xyz(request.config.patch_size)})"})
    request.config.patch_size = smaller
    request.options.resume = False
    return train(request, report, should_stop, distributed=dist)


def free_memory() -> None:
    """Collects unreachable objects (trainers hold reference cycles) and returns cached GPU memory to the driver."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        mps.empty_cache()


def _init_distributed(device: str):
    """A DistributedContext when launched by torchrun (WORLD_SIZE > 1), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from .distributed import DistributedContext

    return DistributedContext.from_environment(device)


def cmd_predict(args, report: Reporter, control: StopControl) -> int:
    from . import prediction

    written = prediction.predict(args.model, args.image, args.out, args.weights, args.device, args.largest_component,
                                 args.format, report, control.should_stop, crop=args.crop_to_segments)
    report({"event": "done", "outputs": written}) if report.mode == "json" else report.text(
        f"wrote {len(written)} segmentation(s)" + (f": {written[0]}" if len(written) == 1 else f" to {args.out}")
    )
    return 0


def cmd_demo(args, report: Reporter, control: StopControl) -> int:
    from . import demo

    result = demo.run_demo(args, report, control.should_stop)
    if report.mode == "json":
        report({"event": "done", **result})
    return 0


def cmd_rank(args, report: Reporter, control: StopControl) -> int:
    from . import uncertainty

    def emit(event: Dict[str, Any]) -> None:
        if event.get("event") == "rank" and report.mode != "json":
            report.text(f"[{event['index']}/{event['of']}] {event['image']}: {event['score']:.4f} ({event['seconds']} s)")
        else:
            report(event)

    rows = uncertainty.rank_files(args.model, args.images, args.out, args.score, args.device, args.uncertainty_dir, emit, control.should_stop)
    chosen = uncertainty.resolve_score(args.score, [k for k in uncertainty.SCORES if rows and k in rows[0]] or uncertainty.SCORES)
    if report.mode == "json":
        report({"event": "done", "ranking": rows, "csv": args.out, "score_name": chosen, "uncertainty_dir": args.uncertainty_dir})
    else:
        report.text(uncertainty.format_ranking(rows, chosen))
        if args.out:
            report.text(f"ranking written to {args.out}")
    return 0


def cmd_info(args, report: Reporter, control: StopControl) -> int:
    from .modelfile import load_model

    rec = load_model(args.model)  # every field checked: a crafted file is a ModelFileError
    tr = rec.get("training") or {}
    labeled = tr.get("labeled_cases")
    lines = [
        f"{args.model}: CPCLSegment model (format {rec['format_version']}, engine {rec.get('engine_version')})",
        "  segments: " + ", ".join(f"{c['name']} ({c.get('label_value')})" for c in rec["classes"][1:]),
        f"  network: {rec['network']}",
        f"  spacing: {rec.get('spacing')} mm, patch {' '.join(str(v) for v in reversed(rec['patch_size']))} (X Y Z), normalisation {rec['normalization'].get('scheme')}",
        f"  training: {tr.get('method')}, {tr.get('iterations')} iterations ({tr.get('status')}), "
        f"{len(labeled) if isinstance(labeled, list) else '?'} labeled + {tr.get('unlabeled_cases')} unlabeled cases",
        f"  best-on-validation weights: {rec.get('best') or 'none'}",
    ]
    print("\n".join(str(line) for line in lines))
    return 0


def cmd_cache(args, report: Reporter, control: StopControl) -> int:
    """``cpcl-segment cache [list|clear]``: the preprocessing cache's entries, sizes and total, or clears it."""
    import time

    from .prepcache import PreprocessCache
    from .writers import format_bytes

    cache = PreprocessCache(args.cache_dir)
    if args.older_than is not None and (args.action != "clear" or args.older_than < 0):
        raise InputError("--older-than DAYS goes with clear and is 0 or more, e.g. cpcl-segment cache clear --older-than 30")
    if args.action == "clear":
        removed, busy = cache.clear(args.older_than)
        which = f" not used for {args.older_than:g} days" if args.older_than is not None else ""
        print(f"removed {len(removed)} preprocessed case(s){which} ({format_bytes(sum(e.size for e in removed))}) from {cache.root}"
              + (f"; kept {len(busy)} that a running training is using" if busy else ""))
        return 0
    entries = cache.entries()
    print(f"preprocessing cache {cache.root} (limit {format_bytes(cache.limit)})")
    for e in reversed(entries):  # most recently used first
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        what = f"DAMAGED ({e.meta['damaged']})" if "damaged" in e.meta else f"{e.meta.get('kind', '?')} {e.meta.get('source', '?')}"
        print(f"  {e.key[:12]}  {format_bytes(e.size):>10}  last used {used}  {what}")
    print(f"{len(entries)} entries, {format_bytes(sum(e.size for e in entries))} in all")
    return 0


COMMANDS: Dict[str, Callable[..., int]] = {"train": cmd_train, "predict": cmd_predict, "demo": cmd_demo, "rank": cmd_rank, "info": cmd_info,
                                           "cache": cmd_cache}


def main(argv: Optional[Sequence[str]] = None) -> int:
    # torch's CPU OpenMP threads spin while waiting; when Slicer or other jobs share the cores a
    # descheduled spinner stalls every parallel region. Set before torch
    # is first imported; a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    mode = getattr(args, "progress", "none")
    report = Reporter(mode)
    cleanup.reset()
    control = StopControl(getattr(args, "stop_file", None), getattr(args, "exit_with_parent", False),
                          on_hard_exit=lambda message: _error(report, message, Cancelled.exit_code),
                          cancel_file=getattr(args, "cancel_file", None))
    control.install()
    report.start_heartbeat()
    torch_cache = cleanup.torch_cache_folder()  # made empty by importing torch's compiler: removed again at the end
    code = 0
    try:
        check_stop_file(getattr(args, "stop_file", None))
        code = COMMANDS[args.command](args, report, control)
    except (Cancelled, KeyboardInterrupt) as e:
        code = Cancelled.exit_code
        text = cleanup.cancel_report()
        detail = str(e) if isinstance(e, Cancelled) else ""
        _error(report, f"{detail} ({text})" if detail and detail != "cancelled" else text, code)  # the detail: e.g. stopped at 0
    except CPCLError as e:
        code = e.exit_code
        _error(report, str(e), code)
    except Exception as e:  # MemoryError, OSError and the rest: a user's situation when recognised, else a bug
        code, message = classify(e)
        _error(report, message, code)
        if code == 1 and (getattr(args, "debug", False) or os.environ.get("CPCL_DEBUG")):
            traceback.print_exc()
    finally:
        control.close()
        report.stop_heartbeat()
        report.close()
        cleanup.remove_all()
        cleanup.remove_if_empty(torch_cache)
        cleanup.reset()  # the next command in this process (Slicer's console, tests) starts afresh
    return code


_ALLOCATION_FAILURES = ("can't allocate memory", "cannot allocate memory", "defaultcpuallocator", "bad_alloc",
                        "failed to allocate", "out of memory", "memoryerror")


def classify(e: BaseException) -> Tuple[int, str]:
    """Exit code and message of an exception that is not one of ours: running out of RAM (a ``MemoryError`` or
    an allocation failure that torch, numpy or ITK reports as ``RuntimeError``) is 4 with a hint; an
    ``OSError`` (a full disk, a permission, a file that vanished) names the file: 2; anything else is an
    internal error: 1."""
    text = f"{type(e).__name__}: {e}"
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(k in text.lower() for k in _ALLOCATION_FAILURES)):
        return OutOfMemory.exit_code, ("the computer ran out of memory (RAM) (" + text.splitlines()[0][:200] + "): use a smaller "
                                       "--patch-size, a coarser --spacing, fewer or smaller images at once, or close other programs")
    if isinstance(e, OSError):
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            from .writers import no_space_message

            return CPCLError.exit_code, f"cannot write{where}: {no_space_message(e.filename or os.getcwd())}"
        return CPCLError.exit_code, f"cannot access{where}: {e.strerror or e}"
    return 1, f"internal error: {text} (run with --debug for details; please report it)"


def _error(report: Reporter, message: str, code: int) -> None:
    if report.mode == "json":
        report.json_line({"event": "error", "message": message, "exit_code": code})
    print(f"cpcl-segment: error: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
