"""The files the CLI reads besides images: case lists (CSV / JSON), Decathlon-layout folders, Slicer colour
tables and ``--config`` settings files (JSON / YAML, or a named recipe)."""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, List, Optional, Sequence

from .errors import InputError
from .io import IMAGE_EXTENSIONS, has_extension
from .settings import PRESETS


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
