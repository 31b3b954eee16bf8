"""``cpcl-segment`` (also ``python -m CPCLSegmentLib.cli``): train | predict | demo | rank | info.

Progress (``--progress json``): stdout carries only JSON lines, one object per line, flushed:
``{"event": "progress", "iteration", "of", "loss": {...}, "eta_s"}``, ``{"event": "validation", ...}``,
``{"event": "warning", "message"}``, ``{"event": "done", "model"}``, ``{"event": "error", "message"}``; the
summary and human-readable text go to stderr. The Slicer module parses these lines.

Exit codes: 0 done; 2 bad input or model file; 3 loss diverged; 4 out of memory; 130 cancelled (SIGTERM,
Ctrl-C, or parent gone with ``--exit-with-parent``); 1 internal error. Cancelled runs leave no output file.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import __version__, cleanup
from .errors import Cancelled, CPCLError, InputError
from .settings import ANNOTATED_SLICES, MODALITIES, OUTPUT_FORMATS, PRESETS, PROGRESS_MODES, WEIGHTS, cli_settings, field_type


# ------------------------------------------------------------------------------------------- output


class Reporter:
    """Turns engine events into JSON lines (stdout), a progress bar, or quiet text (stderr)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.bar = None
        self._lock = threading.Lock()

    def json_line(self, event: Dict[str, Any]) -> None:
        with self._lock:
            sys.stdout.write(json.dumps(event, default=_json_default) + "\n")
            sys.stdout.flush()

    def text(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def __call__(self, event: Dict[str, Any]) -> None:
        kind = event.get("event")
        if self.mode == "json":
            if kind == "summary":
                from .pipeline import print_summary

                print_summary(event)
            self.json_line(event)
            return
        if kind == "summary":
            from .pipeline import print_summary

            print_summary(event)
        elif kind in ("warning", "info"):
            self.text(("warning: " if kind == "warning" else "") + event["message"])
        elif kind == "progress" and self.mode == "bar":
            self._bar(event)
        elif kind == "validation":
            dice = ", ".join(f"{k} {v:.3f}" for k, v in event["dice"].items() if v is not None)
            label = event.get("label") or f"iteration {event['iteration']}"
            self.text(f"validation Dice ({label}): {dice}" + (" (best so far)" if event.get("best") else ""))
        elif kind == "predict":
            self.text(f"[{event['index']}/{event['of']}] {event['image']} -> {event['output']} ({event['seconds']} s)")
        elif kind == "start" and self.mode != "json":
            self.text(f"training {event['method']} on {event['device']}")

    def _bar(self, event: Dict[str, Any]) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=event["of"], initial=event["iteration"] - 1, file=sys.stderr, dynamic_ncols=True, unit="it")
        self.bar.update(event["iteration"] - self.bar.n)
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in event["loss"].items()}, refresh=False)
        if event["iteration"] >= event["of"]:
            self.close()  # training is over: what follows (Dice, paths) prints below a finished bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, (np.floating, np.integer)):
            return o.item()
    except ImportError:
        pass
    return str(o)


# ---------------------------------------------------------------------------------- cancel handling


class StopControl:
    """Cancel (SIGTERM / Ctrl-C / parent gone: no output) and Stop (a stop file: keep the model so far)."""

    def __init__(self, stop_file: Optional[str] = None, exit_with_parent: bool = False, grace_s: float = 3.0) -> None:
        self.cancelled = threading.Event()
        self.stop_file = stop_file
        self.grace_s = grace_s
        self._installed = False
        if exit_with_parent:
            self._watch_parent()

    def install(self) -> None:
        if self._installed:
            return
        self._installed = True
        for sig in (signal.SIGTERM, signal.SIGINT) + ((signal.SIGBREAK,) if hasattr(signal, "SIGBREAK") else ()):
            try:
                signal.signal(sig, self._on_signal)
            except (ValueError, OSError):  # not the main thread
                pass

    def _on_signal(self, signum, frame) -> None:
        self.cancel(f"signal {signum}")

    def cancel(self, why: str) -> None:
        if self.cancelled.is_set():
            return
        self.cancelled.set()
        # The loop notices at its next check; if an iteration runs long, leave anyway within grace_s.
        t = threading.Timer(self.grace_s, self._hard_exit)
        t.daemon = True
        t.start()

    def _hard_exit(self) -> None:
        cleanup.remove_all()
        try:
            sys.stderr.write("cancelled\n")
            sys.stderr.flush()
        finally:
            os._exit(Cancelled.exit_code)

    def _watch_parent(self) -> None:
        """Cancels when the parent dies: the direct parent, and the process named by CPCL_PARENT_PID
        (Slicer itself when a launcher such as PythonSlicer sits in between)."""
        ppid = os.getppid()
        watched = {ppid}
        with contextlib.suppress(ValueError):
            watched.add(int(os.environ.get("CPCL_PARENT_PID", "")))

        def alive() -> bool:
            if os.name != "nt" and os.getppid() != ppid:
                return False
            try:
                import psutil

                return all(psutil.pid_exists(pid) for pid in watched)
            except ImportError:
                return True

        def loop() -> None:
            while not self.cancelled.is_set():
                if not alive():
                    self.cancel("parent process gone")
                    self._hard_exit()
                time.sleep(0.5)

        threading.Thread(target=loop, daemon=True, name="parent-watchdog").start()

    def should_stop(self) -> bool:
        if self.cancelled.is_set():
            raise Cancelled("cancelled")
        return bool(self.stop_file) and os.path.exists(self.stop_file)


# ----------------------------------------------------------------------------------------- parsing


class _LabeledAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        items = getattr(namespace, self.dest) or []
        items.append({"image": values[0], "segmentation": values[1], "annotated_slices": None})
        setattr(namespace, self.dest, items)


class _AnnotatedAction(argparse.Action):
    """``--annotated-slices`` right after a ``--labeled`` applies to that case; before any, to all."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = getattr(namespace, "labeled") or []
        if items and items[-1]["annotated_slices"] is None:
            items[-1]["annotated_slices"] = values
        else:
            setattr(namespace, self.dest, values)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--progress", choices=PROGRESS_MODES, default="bar", help="bar (terminal), json (JSON lines on stdout), none")
    p.add_argument("--stop-file", help="when this file appears, stop early and keep what was done so far")
    p.add_argument("--exit-with-parent", action="store_true", help="cancel if the parent process goes away (used by Slicer)")
    p.add_argument("--debug", action="store_true", help="print tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpcl-segment", description="Semi-supervised 3D segmentation with cyclic prototype consistency (CPCL).")
    parser.add_argument("--version", action="version", version=f"cpcl-segment {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or fine-tune) a model on labeled and unlabeled volumes")
    t.add_argument("--labeled", nargs=2, action=_LabeledAction, metavar=("IMAGE", "SEGMENTATION"), default=[],
                   help="a labeled case (repeatable); SEGMENTATION is a .seg.nrrd or a label map")
    t.add_argument("--annotated-slices", action=_AnnotatedAction, choices=ANNOTATED_SLICES, default=None,
                   help="after a --labeled: which of its slices are annotated (sparse labels); before any: default for all")
    t.add_argument("--unlabeled", nargs="+", default=[], metavar="IMAGE", help="unlabeled volumes (repeatable)")
    t.add_argument("--validation", nargs=2, action=_LabeledAction, metavar=("IMAGE", "SEGMENTATION"), default=[],
                   help="held-out labeled case scored during training (repeatable); never trained on")
    t.add_argument("--cases", help="CSV or JSON list of cases (columns/keys: image, segmentation, role, annotated_slices)")
    t.add_argument("--dataset", help="folder in the Decathlon layout: imagesTr/ + labelsTr/ (labeled), unlabeled images in imagesTr/ without a label and imagesTs/")
    t.add_argument("--out", required=True, help="model file to write (.pt); a run record <name>.run.json is written beside it")
    t.add_argument("--segments", nargs="+", help="segments to learn, by name (.seg.nrrd) or label value (label maps); default: all")
    t.add_argument("--segment-names", nargs="+", metavar="VALUE=NAME", help="names for label-map values, e.g. 1=anterior 2=posterior")
    t.add_argument("--color-table", help="Slicer colour table (.ctbl / .txt: 'value name r g b a') naming label-map values")
    t.add_argument("--partial-segments", action="store_true", help="a segment missing from a case means 'not annotated there', not 'absent'")
    t.add_argument("--init", help="model file to fine-tune from (same segments: continue; other segments: new output head)")
    t.add_argument("--config", help="JSON or YAML file of training settings (TrainConfig in CPCLSegmentLib/settings.py), or a "
                                    f"named recipe: {', '.join(PRESETS)}; flags override it")
    for name, meta in cli_settings():  # one flag per TrainConfig field that declares one (settings.py)
        kind = field_type(name)
        kw: Dict[str, Any] = {"dest": name, "default": None, "help": meta["help"]}
        if kind is bool:
            kw["action"] = "store_const"
            kw["const"] = True
        elif meta.get("xyz"):
            kw.update(nargs=3, type=int, metavar=("X", "Y", "Z"))
        else:
            kw["type"] = kind
            if meta.get("choices"):
                kw["choices"] = meta["choices"]
        t.add_argument(meta["flag"], **kw)
    t.add_argument("--modality", choices=MODALITIES, default="auto", help="intensity normalisation (auto: CT if it has air at -1000)")
    t.add_argument("--spacing", nargs=3, type=float, metavar=("X", "Y", "Z"), help="target spacing in mm (default: median of the labeled cases)")
    t.add_argument("--compare-supervised", action="store_true", help="also train supervised-only; keep the better on the validation cases")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run from <out>.checkpoint.pt")
    t.add_argument("--retry-smaller-on-oom", action="store_true", help="on out-of-memory, retry once with half the patch size")
    t.add_argument("--work-dir", help="folder for preprocessed cases (default: a temporary folder, removed afterwards)")
    _add_common(t)

    p = sub.add_parser("predict", help="segment images with a trained model")
    p.add_argument("--model", required=True)
    p.add_argument("--image", nargs="+", required=True, help="image file(s) or DICOM folder(s)")
    p.add_argument("--out", required=True, help="output file (.seg.nrrd, .nii.gz, .nrrd, .mha) or folder for several images")
    p.add_argument("--format", default=".seg.nrrd", choices=OUTPUT_FORMATS, help="file type when --out is a folder")
    p.add_argument("--weights", default="teacher", choices=WEIGHTS, help="teacher (last), best (on validation), student")
    p.add_argument("--largest-component", action="store_true", help="keep only the largest connected component of each segment")
    _add_common(p)

    d = sub.add_parser("demo", help="train and segment on bundled real data (slicerio's chest CT) and print Dice")
    d.add_argument("--data", help="a Decathlon-layout folder (imagesTr/, labelsTr/) to run the demo on instead")
    d.add_argument("--out", default="cpcl-demo", help="folder for the model and the segmentation (default: ./cpcl-demo)")
    d.add_argument("--iterations", type=int)
    d.add_argument("--labeled", type=int, default=4, help="with --data: number of labeled cases")
    d.add_argument("--unlabeled", type=int, default=40, help="with --data: number of unlabeled cases")
    d.add_argument("--seed", type=int, default=0)
    _add_common(d)

    r = sub.add_parser("rank", help="rank unlabeled images by how much labeling them would help (uncertainty)")
    r.add_argument("--model", required=True)
    r.add_argument("--images", nargs="+", required=True)
    r.add_argument("--out", help="CSV file for the ranking")
    r.add_argument("--score", default="auto",
                   help="which uncertainty score ranks the cases: auto (the best on the hippocampus benchmark), entropy, "
                        "student_teacher, label_disagreement or prototype (docs/uncertainty.md)")
    r.add_argument("--uncertainty-dir", help="also write a per-voxel uncertainty map per image into this folder")
    _add_common(r)

    i = sub.add_parser("info", help="print what a model file holds")
    i.add_argument("model")
    i.add_argument("--debug", action="store_true")
    return parser


def _parse_names(pairs: Optional[Sequence[str]], color_table: Optional[str]) -> Optional[Dict[int, str]]:
    names: Dict[int, str] = {}
    if color_table:
        names.update(read_color_table(color_table))
    for pair in pairs or []:
        if "=" not in pair:
            raise InputError(f"--segment-names takes VALUE=NAME pairs, got {pair!r}")
        v, n = pair.split("=", 1)
        try:
            names[int(v)] = n
        except ValueError:
            raise InputError(f"--segment-names: {v!r} is not a label value") from None
    return names or None


def read_color_table(path: str) -> Dict[int, str]:
    """Slicer colour table: lines ``value name r g b a`` (``#`` comments)."""
    if not os.path.isfile(path):
        raise InputError(f"colour table not found: {path}")
    names = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.strip().split()
            if not parts or parts[0].startswith("#"):
                continue
            try:
                names[int(parts[0])] = parts[1]
            except (ValueError, IndexError):
                raise InputError(f"colour table {path}: cannot read line {line.strip()!r}") from None
    return names


def read_case_list(path: str) -> Dict[str, List[Dict[str, Any]]]:
    """CSV (header: image, segmentation, role, annotated_slices) or JSON (a list, or {labeled, unlabeled,
    validation}). Roles: labeled (default when a segmentation is given), unlabeled, validation. Relative
    paths are relative to the list's folder."""
    if not os.path.isfile(path):
        raise InputError(f"case list not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    rows: List[Dict[str, Any]] = []
    try:
        if path.lower().endswith(".json"):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, dict):
                for role in ("labeled", "unlabeled", "validation"):
                    for item in data.get(role, []):
                        item = {"image": item} if isinstance(item, str) else dict(item)
                        item["role"] = role
                        rows.append(item)
            else:
                rows = [dict(r) for r in data]
        else:
            with open(path, newline="", encoding="utf-8") as f:
                rows = [dict(r) for r in csv.DictReader(f)]
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as e:
        raise InputError(f"cannot read case list {path}: {e}") from None
    out: Dict[str, List[Dict[str, Any]]] = {"labeled": [], "unlabeled": [], "validation": []}
    for n, r in enumerate(rows, start=1):
        if not r.get("image"):
            raise InputError(f"case list {path}, entry {n}: no image")
        img = os.path.join(base, r["image"])
        seg = os.path.join(base, r["segmentation"]) if r.get("segmentation") else None
        role = (r.get("role") or ("labeled" if seg else "unlabeled")).strip().lower()
        if role not in out:
            raise InputError(f"case list {path}, entry {n}: unknown role {role!r}")
        if role != "unlabeled" and not seg:
            raise InputError(f"case list {path}, entry {n}: a {role} case needs a segmentation")
        out[role].append({"image": img, "segmentation": seg, "annotated_slices": r.get("annotated_slices") or None})
    return out


def decathlon_cases(folder: str) -> Dict[str, List[Dict[str, Any]]]:
    """imagesTr/X + labelsTr/X → labeled; imagesTr without a label and imagesTs/ → unlabeled."""
    from .io import IMAGE_EXTENSIONS, has_extension

    tr = os.path.join(folder, "imagesTr")
    lb = os.path.join(folder, "labelsTr")
    if not os.path.isdir(tr):
        raise InputError(f"{folder} is not in the Decathlon layout: no imagesTr/ folder")
    out: Dict[str, List[Dict[str, Any]]] = {"labeled": [], "unlabeled": [], "validation": []}
    for name in sorted(os.listdir(tr)):
        if name.startswith(".") or not has_extension(name, IMAGE_EXTENSIONS):
            continue
        label = os.path.join(lb, name.replace("_0000", ""))
        if os.path.exists(label):
            out["labeled"].append({"image": os.path.join(tr, name), "segmentation": label, "annotated_slices": None})
        else:
            out["unlabeled"].append({"image": os.path.join(tr, name)})
    ts = os.path.join(folder, "imagesTs")
    if os.path.isdir(ts):
        out["unlabeled"] += [{"image": os.path.join(ts, n)} for n in sorted(os.listdir(ts)) if has_extension(n, IMAGE_EXTENSIONS)]
    return out


def load_config_file(path: str) -> Dict[str, Any]:
    """A ``--config`` value: a named recipe (``settings.PRESETS``) or a JSON / YAML file of settings."""
    if path in PRESETS:
        return dict(PRESETS[path])
    if not os.path.isfile(path):
        raise InputError(f"config file not found: {path} (or name a recipe: {', '.join(PRESETS)})")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.lower().endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise InputError(f"cannot read config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"config file {path} must hold a mapping of setting: value")
    return data


def build_train_request(args: argparse.Namespace):
    from .pipeline import LabeledInput, TrainRequest
    from .settings import TrainConfig

    cfg_dict: Dict[str, Any] = load_config_file(args.config) if args.config else {}
    for name, meta in cli_settings():
        v = getattr(args, name)
        if v is not None:
            cfg_dict[name] = list(reversed(v)) if meta.get("xyz") else v  # X Y Z on the command line, (D, H, W) inside
    if args.device != "auto" or "device" not in cfg_dict:
        cfg_dict["device"] = args.device
    network_overrides = {k: cfg_dict[k] for k in ("width", "depth", "norm", "feature_level") if k in cfg_dict}
    cfg = TrainConfig.from_dict(cfg_dict).validate()  # every setting checked before any work
    default_sparse = args.annotated_slices or "all"
    labeled = [dict(c) for c in args.labeled]
    unlabeled = list(args.unlabeled)
    validation = [dict(c) for c in args.validation]
    for source in ([read_case_list(args.cases)] if args.cases else []) + ([decathlon_cases(args.dataset)] if args.dataset else []):
        labeled += source["labeled"]
        unlabeled += [u["image"] for u in source["unlabeled"]]
        validation += source["validation"]
    if not labeled:
        raise InputError("no labeled cases: give --labeled IMAGE SEGMENTATION (repeatable), --cases or --dataset")
    return TrainRequest(
        labeled=[LabeledInput(c["image"], c["segmentation"], c.get("annotated_slices") or default_sparse) for c in labeled],
        out=args.out,
        unlabeled=unlabeled,
        validation=[LabeledInput(c["image"], c["segmentation"]) for c in validation],
        segments=args.segments,
        segment_names=_parse_names(args.segment_names, args.color_table),
        partial_segments=args.partial_segments,
        config=cfg,
        modality=args.modality,
        spacing=args.spacing,
        init=args.init,
        network_overrides=network_overrides if args.init else None,
        resume=args.resume,
        compare_supervised=args.compare_supervised,
        work_dir=args.work_dir,
    )


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
    from . import pipeline

    written = pipeline.predict(args.model, args.image, args.out, args.weights, args.device, args.largest_component,
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
