"""``cpcl-segment`` (also ``python -m CPCLSegmentLib.cli``): train | predict | demo | rank | info.

Progress (``--progress json``): stdout carries only JSON lines, one object per line, flushed:
``{"event": "progress", "iteration", "of", "loss": {...}, "eta_s"}``, ``{"event": "validation", ...}``,
``{"event": "warning", "message"}``, ``{"event": "done", "model"}``, ``{"event": "error", "message"}``; the
summary and human-readable text go to stderr. The Slicer module parses these lines.

Exit codes: 0 done; 2 bad input or model file; 3 loss diverged; 4 out of memory; 130 cancelled (SIGTERM,
Ctrl-C, or parent gone with ``--exit-with-parent``); 1 internal error. Cancelled runs leave no output file.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any, Callable, Dict, Optional, Sequence

from . import cleanup
from .cli_args import build_parser, build_train_request
from .console import Reporter, StopControl
from .errors import Cancelled, CPCLError


# ---------------------------------------------------------------------------------------- commands


def cmd_train(args, report: Reporter, control: StopControl) -> int:
    from . import pipeline
    from .errors import OutOfMemory

    request = build_train_request(args)
    dist = _init_distributed(request.config.device)
    try:
        try:
            result = pipeline.train(request, report, control.should_stop, distributed=dist)
        except OutOfMemory:
            if not args.retry_smaller_on_oom or request.config.patch_size is None:
                raise
            from .planning import suggest_smaller

            smaller = suggest_smaller(request.config.patch_size, request.config.depth)
            report({"event": "warning", "message": f"out of memory: retrying once with patch {list(smaller)} (D, H, W)"})
            request.config.patch_size = smaller
            request.resume = False
            result = pipeline.train(request, report, control.should_stop, distributed=dist)
    finally:
        if dist is not None:
            dist.close()
    if dist is None or dist.rank == 0:
        report.close()
        report({"event": "done", **result}) if report.mode == "json" else report.text(
            f"model written to {result['model']} ({result['status']}, {result['iterations']} iterations, {result['seconds']} s)"
        )
    return 0


def _init_distributed(device: str):
    """A DistributedContext when launched by torchrun (WORLD_SIZE > 1), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from .distributed import DistributedContext

    return DistributedContext.from_environment(device)


def cmd_predict(args, report: Reporter, control: StopControl) -> int:
    from . import prediction

    written = prediction.predict(args.model, args.image, args.out, args.weights, args.device, args.largest_component,
                                 args.format, report, control.should_stop)
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

    rec = load_model(args.model)
    tr = rec.get("training", {})
    lines = [
        f"{args.model}: CPCLSegment model (format {rec['format_version']}, engine {rec.get('engine_version')})",
        f"  segments: " + ", ".join(f"{c['name']} ({c.get('label_value')})" for c in rec["classes"][1:]),
        f"  network: {rec['network']}",
        f"  spacing: {rec.get('spacing')} mm, patch {rec['patch_size']}, normalisation {rec['normalization'].get('scheme')}",
        f"  training: {tr.get('method')}, {tr.get('iterations')} iterations ({tr.get('status')}), "
        f"{len(tr.get('labeled_cases', []))} labeled + {tr.get('unlabeled_cases')} unlabeled cases",
        f"  best-on-validation weights: {rec.get('best') or 'none'}",
    ]
    print("\n".join(lines))
    return 0


COMMANDS: Dict[str, Callable[..., int]] = {"train": cmd_train, "predict": cmd_predict, "demo": cmd_demo, "rank": cmd_rank, "info": cmd_info}


def main(argv: Optional[Sequence[str]] = None) -> int:
    # torch's CPU OpenMP threads spin while waiting; when Slicer or other jobs share the cores a
    # descheduled spinner stalls every parallel region. Set before torch
    # is first imported; a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    mode = getattr(args, "progress", "none")
    report = Reporter(mode)
    control = StopControl(getattr(args, "stop_file", None), getattr(args, "exit_with_parent", False))
    control.install()
    code = 0
    try:
        code = COMMANDS[args.command](args, report, control)
    except Cancelled:
        code = Cancelled.exit_code
        _error(report, "cancelled: no output was written", code)
    except CPCLError as e:
        code = e.exit_code
        _error(report, str(e), code)
    except KeyboardInterrupt:
        code = Cancelled.exit_code
        _error(report, "cancelled: no output was written", code)
    except MemoryError:
        code = 4
        _error(report, "the computer ran out of memory (RAM): use a smaller patch size or fewer cases at once", code)
    except Exception as e:  # an unexpected internal error: one line unless --debug
        code = 1
        _error(report, f"internal error: {type(e).__name__}: {e} (run with --debug for details; please report it)", code)
        if getattr(args, "debug", False) or os.environ.get("CPCL_DEBUG"):
            traceback.print_exc()
    finally:
        report.close()
        cleanup.remove_all()
    return code


def _error(report: Reporter, message: str, code: int) -> None:
    if report.mode == "json":
        report.json_line({"event": "error", "message": message, "exit_code": code})
    print(f"cpcl-segment: error: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
