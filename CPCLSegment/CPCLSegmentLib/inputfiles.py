"""The files the CLI reads besides images: case lists (CSV / JSON), Decathlon-layout folders, Slicer colour
tables and ``--config`` settings files (JSON / YAML, or a named recipe)."""

from __future__ import annotations

import csv
import json
import os
import re
from typing import Any, Dict, List, Optional, Sequence

from .errors import InputError
from .io import IMAGE_EXTENSIONS, has_extension
from .settings import ANNOTATED_SLICES, PRESETS


def parse_segment_names(pairs: Optional[Sequence[str]], color_table: Optional[str]) -> Optional[Dict[int, str]]:
    """Label value → name from ``--color-table`` and ``--segment-names VALUE=NAME`` pairs (None if neither)."""
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


def _check_file(path: str, what: str) -> None:
    if not str(path):
        raise InputError(f"{what} path is empty")
    if os.path.isdir(path):
        raise InputError(f"{what} {path} is a folder; give a file")
    if not os.path.isfile(path):
        raise InputError(f"{what} not found: {path}")


def _read_text(path: str, what: str) -> str:
    """A text file's content (UTF-8, with or without a byte-order mark), with a clear error otherwise."""
    _check_file(path, what)
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8") from None
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}") from None


def read_color_table(path: str) -> Dict[int, str]:
    """Slicer colour table: lines ``value name r g b a`` (``#`` comments)."""
    _check_file(path, "colour table")
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
    paths are relative to the list's folder. Every entry is checked (text where a path or a word is
    expected); a bad one is an ``InputError`` naming the list and the entry."""
    text = _read_text(path, "case list")
    base = os.path.dirname(os.path.abspath(path))
    rows: List[Any] = []
    try:
        if path.lower().endswith(".json"):
            data = json.loads(text)
            if isinstance(data, dict):
                unknown = sorted(str(k) for k in data if k not in ("labeled", "unlabeled", "validation"))
                if unknown:
                    raise InputError(f"case list {path}: unknown key(s) {unknown}; use labeled, unlabeled, validation")
                for role in ("labeled", "unlabeled", "validation"):
                    items = data.get(role) or []
                    if not isinstance(items, list):
                        raise InputError(f"case list {path}: {role!r} must be a list of cases, not {type(items).__name__}")
                    for item in items:
                        item = {"image": item} if isinstance(item, str) else item
                        if isinstance(item, dict):
                            item = dict(item)
                            item.setdefault("role", role)
                        rows.append(item)
            elif isinstance(data, list):
                rows = list(data)
            else:
                raise InputError(f"case list {path} must hold a list of cases or {{labeled, unlabeled, validation}}")
        else:
            rows = list(csv.DictReader(text.splitlines()))
    except (json.JSONDecodeError, csv.Error) as e:
        raise InputError(f"cannot read case list {path}: {e}") from None
    out: Dict[str, List[Dict[str, Any]]] = {"labeled": [], "unlabeled": [], "validation": []}
    for n, r in enumerate(rows, start=1):
        where = f"case list {path}, entry {n}"
        if not isinstance(r, dict):
            raise InputError(f"{where}: expected a case (image, segmentation, role), not {r!r:.60}")
        if None in r:  # a CSV row with more fields than the header
            raise InputError(f"{where}: more columns than the header names")
        for key in ("image", "segmentation", "role", "annotated_slices"):
            if r.get(key) is not None and not isinstance(r[key], str):
                raise InputError(f"{where}: {key} must be text, not {r[key]!r:.60}")
        if not (r.get("image") or "").strip():
            raise InputError(f"{where}: no image")
        img = os.path.join(base, r["image"].strip())
        seg = os.path.join(base, r["segmentation"].strip()) if (r.get("segmentation") or "").strip() else None
        role = (r.get("role") or ("labeled" if seg else "unlabeled")).strip().lower()
        if role not in out:
            raise InputError(f"{where}: unknown role {role!r} (labeled, unlabeled or validation)")
        if role != "unlabeled" and not seg:
            raise InputError(f"{where}: a {role} case needs a segmentation")
        sparse = (r.get("annotated_slices") or "").strip() or None
        if sparse is not None and sparse not in ANNOTATED_SLICES:
            raise InputError(f"{where}: annotated_slices must be one of {', '.join(ANNOTATED_SLICES)}, not {sparse!r}")
        out[role].append({"image": img, "segmentation": seg, "annotated_slices": sparse})
    return out


def decathlon_cases(folder: str) -> Dict[str, List[Dict[str, Any]]]:
    """imagesTr/X + labelsTr/X → labeled; imagesTr without a label and imagesTs/ → unlabeled."""
    if not os.path.isdir(folder):
        raise InputError(f"dataset folder {folder} " + ("is a file, not a folder" if os.path.exists(folder) else "not found"))
    try:
        return _decathlon_cases(folder)
    except OSError as e:
        raise InputError(f"cannot read dataset folder {folder}: {e.strerror or e} ({e.filename or folder})") from None


_CHANNEL = re.compile(r"^(.*)_(\d{4})$")  # nnU-Net's channel suffix: case_0000 (first channel), case_0001, ...


def _decathlon_cases(folder: str) -> Dict[str, List[Dict[str, Any]]]:
    tr = os.path.join(folder, "imagesTr")
    lb = os.path.join(folder, "labelsTr")
    if not os.path.isdir(tr):
        raise InputError(f"{folder} is not in the Decathlon layout: no imagesTr/ folder")
    _check_one_channel(folder)
    labels = {_stem(n): os.path.join(lb, n) for n in (sorted(os.listdir(lb)) if os.path.isdir(lb) else [])
              if has_extension(n, IMAGE_EXTENSIONS)}
    images = [n for n in sorted(os.listdir(tr)) if not n.startswith(".") and has_extension(n, IMAGE_EXTENSIONS)]
    out: Dict[str, List[Dict[str, Any]]] = {"labeled": [], "unlabeled": [], "validation": []}
    channels: Dict[str, List[str]] = {}  # case -> its image files, when they carry a channel suffix
    for name in images:
        stem = _stem(name)
        m = _CHANNEL.match(stem)
        case = stem if stem in labels or not m else m.group(1)
        if case != stem:
            channels.setdefault(case, []).append(name)
        if case in labels:
            out["labeled"].append({"image": os.path.join(tr, name), "segmentation": labels[case], "annotated_slices": None})
        else:
            out["unlabeled"].append({"image": os.path.join(tr, name)})
    ts = os.path.join(folder, "imagesTs")
    if os.path.isdir(ts):
        for name in sorted(os.listdir(ts)):
            if has_extension(name, IMAGE_EXTENSIONS) and not name.startswith("."):
                out["unlabeled"].append({"image": os.path.join(ts, name)})
                m = _CHANNEL.match(_stem(name))
                if m:
                    channels.setdefault("imagesTs/" + m.group(1), []).append(name)
    if not any(case in labels for case in channels):  # no labeled case uses the suffix: _NNNN is part of the case names
        channels = {}
    several = {case: files for case, files in channels.items() if len(files) > 1}
    if several:
        case, files = next(iter(several.items()))
        raise InputError(f"dataset folder {folder} holds several image channels per case ({case}: {', '.join(files)}; "
                         f"{len(several)} case(s) like this). " + _ONE_CHANNEL)
    return out


_ONE_CHANNEL = ("CPCLSegment trains on one image channel: to train on one of them, list the cases with --cases "
                "(CSV columns image,segmentation,role) naming that channel's files, e.g. the _0000 ones")


def _stem(name: str) -> str:
    for ext in IMAGE_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _check_one_channel(folder: str) -> None:
    """Refuses a dataset whose ``dataset.json`` declares several channels (``channel_names`` of nnU-Net v2,
    ``modality`` of the Medical Segmentation Decathlon)."""
    path = os.path.join(folder, "dataset.json")
    if not os.path.isfile(path):
        return
    try:
        meta = json.loads(_read_text(path, "dataset description"))
    except json.JSONDecodeError as e:
        raise InputError(f"cannot read {path}: {e}") from None
    names = meta.get("channel_names", meta.get("modality")) if isinstance(meta, dict) else None
    if isinstance(names, dict) and len(names) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in sorted(names.items(), key=lambda kv: str(kv[0])))
        raise InputError(f"dataset folder {folder} has {len(names)} image channels ({listed}, in {path}). " + _ONE_CHANNEL)


def load_config_file(path: str) -> Dict[str, Any]:
    """A ``--config`` value: a named recipe (``settings.PRESETS``) or a JSON / YAML file of settings."""
    if path in PRESETS:
        return dict(PRESETS[path])
    if not os.path.exists(path):
        raise InputError(f"config file not found: {path} (or name a recipe: {', '.join(PRESETS)})")
    text = _read_text(path, "config file")
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
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise InputError(f"config file {path}: setting names must be text, not {bad[:3]}")
    return data
