"""The ``cpcl-segment`` command line: its parser (``build_parser``) and the ``TrainRequest`` a ``train`` command
line stands for (``build_train_request``). Train flags are derived from ``settings.TrainConfig``.

Importing this module does not import torch, so ``--help`` and argument errors are immediate."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from . import __version__, settings
from .errors import InputError
from .inputfiles import decathlon_cases, load_config_file, parse_segment_names, read_case_list
from .prepcache import CACHE_DIR_ENV, CACHE_LIMIT_ENV, DEFAULT_LIMIT, parse_size
from .settings import (ANNOTATED_SLICES, OUTPUT_FORMATS, PRESETS, PROGRESS_MODES, WEIGHTS, cli_settings, field_type, network_keys,
                       run_option_defaults, run_option_type, run_options)

if TYPE_CHECKING:
    from .preparation import TrainRequest


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
    for name, meta in run_options("cli"):  # --device: every command has it (and it takes cuda:N, so no choices)
        if meta.get("every_command"):
            p.add_argument(meta["flag"], dest=name, default=run_option_defaults("cli")[name], help=meta["help"])
    p.add_argument("--progress", choices=PROGRESS_MODES, default="bar", help="bar (terminal), json (JSON lines on stdout), none")
    p.add_argument("--stop-file", help="when this file appears, stop early and keep what was done so far")
    p.add_argument("--cancel-file", help="when this file appears, cancel: nothing more is written (what Slicer's Cancel uses)")
    p.add_argument("--exit-with-parent", action="store_true", help="cancel if the parent process goes away (used by Slicer)")
    p.add_argument("--debug", action="store_true", help="print tracebacks")


def build_parser() -> argparse.ArgumentParser:
    """The ``cpcl-segment`` parser: ``train``, ``predict``, ``demo``, ``rank``, ``info``, ``cache``."""
    parser = argparse.ArgumentParser(prog="cpcl-segment", description="Semi-supervised 3D segmentation with cyclic prototype consistency (CPCL).")
    parser.add_argument("--version", action="version", version=f"cpcl-segment {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_predict, _add_demo, _add_rank, _add_info, _add_cache):
        add(sub)
    return parser


def _add_train(sub: Any) -> None:
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
    t.add_argument("--config", help="JSON or YAML file of training settings (TrainConfig in CPCLSegmentLib/settings.py), or a "
                                    f"named recipe: {', '.join(PRESETS)}; flags override it")
    _add_settings_flags(t)
    _add_run_option_flags(t)
    _add_common(t)


def _add_run_option_flags(t: argparse.ArgumentParser) -> None:
    """One flag per ``RunOptions`` field that applies to the command line (``settings.run_options("cli")``)."""
    defaults = run_option_defaults("cli")
    help_values = {"CACHE_DIR_ENV": CACHE_DIR_ENV, "CACHE_LIMIT_ENV": CACHE_LIMIT_ENV, "DEFAULT_LIMIT": DEFAULT_LIMIT}
    for name, meta in run_options("cli"):
        if meta.get("every_command"):
            continue
        kw: Dict[str, Any] = {"dest": name, "default": defaults[name], "help": meta["help"].format(**help_values)}
        kind = run_option_type(name)
        if kind is bool:
            kw["action"] = "store_true"
        else:
            kw["type"] = kind
            kw.update({k: meta[k] for k in ("choices", "nargs", "metavar") if k in meta})
        t.add_argument(meta["flag"], **kw)


def _add_settings_flags(t: argparse.ArgumentParser) -> None:
    """One flag per ``TrainConfig`` field that declares one (``settings.cli_settings``); default None = not given."""
    for name, meta in cli_settings():
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


def _add_predict(sub: Any) -> None:
    p = sub.add_parser("predict", help="segment images with a trained model")
    p.add_argument("--model", required=True)
    p.add_argument("--image", nargs="+", required=True, help="image file(s) or DICOM folder(s)")
    p.add_argument("--out", required=True, help="output file (.seg.nrrd, .nii.gz, .nrrd, .mha) or folder for several images")
    p.add_argument("--format", default=".seg.nrrd", choices=OUTPUT_FORMATS, help="file type when --out is a folder")
    p.add_argument("--weights", default="teacher", choices=WEIGHTS, help="teacher (last), best (on validation), student")
    p.add_argument("--largest-component", action="store_true", help="keep only the largest connected component of each segment")
    p.add_argument("--crop-to-segments", action="store_true",
                   help="a .seg.nrrd holds only the box around its segments, placed on the image's grid by its extent offset "
                        "as Slicer saves segmentations (smaller, faster to load into Slicer)")
    _add_common(p)


def _add_demo(sub: Any) -> None:
    d = sub.add_parser("demo", help="train and segment on bundled real data (slicerio's chest CT) and print Dice")
    d.add_argument("--data", help="a Decathlon-layout folder (imagesTr/, labelsTr/) to run the demo on instead")
    d.add_argument("--out", default="cpcl-demo", help="folder for the model and the segmentation (default: ./cpcl-demo)")
    d.add_argument("--iterations", type=int)
    d.add_argument("--labeled", type=int, default=4, help="with --data: number of labeled cases")
    d.add_argument("--unlabeled", type=int, default=40, help="with --data: number of unlabeled cases")
    d.add_argument("--seed", type=int, default=0)
    _add_common(d)


def _add_rank(sub: Any) -> None:
    r = sub.add_parser("rank", help="rank unlabeled images by how much labeling them would help (uncertainty)")
    r.add_argument("--model", required=True)
    r.add_argument("--images", nargs="+", required=True)
    r.add_argument("--out", help="CSV file for the ranking")
    r.add_argument("--score", default="auto",
                   help="which uncertainty score ranks the cases: auto (the best on the hippocampus benchmark), entropy, "
                        "student_teacher, label_disagreement or prototype (docs/uncertainty.md)")
    r.add_argument("--uncertainty-dir", help="also write a per-voxel uncertainty map per image into this folder")
    _add_common(r)


def _add_info(sub: Any) -> None:
    i = sub.add_parser("info", help="print what a model file holds")
    i.add_argument("model")
    i.add_argument("--debug", action="store_true")


def _add_cache(sub: Any) -> None:
    c = sub.add_parser("cache", help="list or clear the preprocessing cache (preprocessed cases kept for later runs)")
    c.add_argument("action", nargs="?", choices=("list", "clear"), default="list",
                   help="list: every entry, its size and last use, and the total (default); clear: remove entries")
    c.add_argument("--older-than", type=float, metavar="DAYS", help="with clear: only entries not used for DAYS days")
    c.add_argument("--cache-dir", help=f"the cache folder (default: ${CACHE_DIR_ENV}, else the per-user cache folder)")
    c.add_argument("--debug", action="store_true")


def cache_settings(args: argparse.Namespace) -> Tuple[Optional[str], Optional[int]]:
    """``(cache folder or None for the default, size limit in bytes or None for the default)`` of ``train``'s
    ``--cache-dir`` / ``--work-dir`` (its older name) and ``--cache-limit``."""
    folder = args.cache_dir or args.work_dir
    if args.cache_dir and args.work_dir and os.path.abspath(args.cache_dir) != os.path.abspath(args.work_dir):
        raise InputError(f"--work-dir {args.work_dir} and --cache-dir {args.cache_dir}: --work-dir is the older name of "
                         "--cache-dir; give one")
    return folder, parse_size(args.cache_limit) if args.cache_limit is not None else None


def build_train_request(args: argparse.Namespace) -> TrainRequest:
    """The ``TrainRequest`` of parsed ``train`` arguments (config file, then flags; case lists and folders added)."""
    from .preparation import LabeledInput, TrainRequest  # torch: imported when a train command runs, not for --help

    cfg_dict: Dict[str, Any] = load_config_file(args.config) if args.config else {}
    given = set(cfg_dict)  # what --resume compares with the interrupted run: settings the user named
    for name, meta in cli_settings():
        v = getattr(args, name)
        if v is not None:
            cfg_dict[name] = list(reversed(v)) if meta.get("xyz") else v  # X Y Z on the command line, (D, H, W) inside
            given.add(name)
    if args.device != "auto" or "device" not in cfg_dict:
        if args.device != "auto":
            given.add("device")
        cfg_dict["device"] = args.device
    network_overrides = {k: cfg_dict[k] for k in network_keys("fixed") if k in cfg_dict}
    cfg = settings.TrainConfig.from_dict(cfg_dict).validate()  # every setting checked before any work
    default_sparse = args.annotated_slices or "all"
    labeled = [dict(c) for c in args.labeled]
    unlabeled = list(args.unlabeled)
    validation = [dict(c) for c in args.validation]
    for source in ([read_case_list(args.cases)] if args.cases else []) + ([decathlon_cases(args.dataset)] if args.dataset else []):
        labeled += source["labeled"]
        unlabeled += [u["image"] for u in source["unlabeled"]]
        validation += source["validation"]
    cache_settings(args)  # --work-dir and --cache-dir agree, --cache-limit is a size: checked before any work
    if not labeled:
        raise InputError("no labeled cases: give --labeled IMAGE SEGMENTATION (repeatable), --cases or --dataset")
    return TrainRequest(
        labeled=[LabeledInput(c["image"], c["segmentation"], c.get("annotated_slices") or default_sparse) for c in labeled],
        out=args.out,
        unlabeled=unlabeled,
        validation=[LabeledInput(c["image"], c["segmentation"]) for c in validation],
        segments=args.segments,
        segment_names=parse_segment_names(args.segment_names, args.color_table),
        config=cfg,
        options=settings.RunOptions(**{name: getattr(args, name) for name, _ in run_options("cli")}),
        network_overrides=network_overrides if args.init else None,
        settings_given=sorted(given),
        other_inputs=[(flag, path) for flag, path in (("--config file", args.config if args.config not in PRESETS else None),
                                                     ("--cases list", args.cases), ("--color-table", args.color_table)) if path],
    )
