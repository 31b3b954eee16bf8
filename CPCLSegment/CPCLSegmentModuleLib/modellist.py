"""Model and run-folder management: the models in the scene as a list (name, size, date, segments) with
rename, delete and "keep only the latest", and the run folders in the module's work folder (exported inputs,
model files, checkpoints of stopped runs) listed with their sizes and removable.

Qt-free; the model rows come from the model nodes' attributes (``modelnode``), nothing is decoded."""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Dict, List, Sequence

from CPCLSegmentLib.companions import is_checkpoint

from . import attributes, modelnode

RUN_KINDS = ("train", "segment", "rank")


def _nodes(scene: Any) -> List[Any]:
    collection = scene.GetNodesByClass(modelnode.MODEL_NODE_CLASS)
    nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
    return [n for n in nodes if modelnode.is_model_node(n)]


def model_rows(scene: Any) -> List[Dict[str, Any]]:
    """One row per model node, oldest first: ``{"node", "name", "megabytes", "created", "segments"}``."""
    rows = []
    for node in _nodes(scene):
        try:
            classes = json.loads(node.GetAttribute(attributes.CLASSES) or "[]")
        except ValueError:
            classes = []
        rows.append({"node": node, "name": node.GetName(), "megabytes": round(int(node.GetAttribute(attributes.BYTES) or 0) / 2**20, 1),
                     "created": node.GetAttribute(attributes.CREATED) or "", "segments": [c.get("name") for c in classes[1:]]})
    return sorted(rows, key=lambda r: r["created"])


def rename_model(node: Any, name: str) -> None:
    """Renames a model node (and its data node, so the Save dialog's file names follow)."""
    name = (name or "").strip()
    if not name:
        raise ValueError("a model needs a name")
    node.SetName(name)
    payload = modelnode.payload_node(node)
    if payload is not None:
        payload.SetName(f"{name} data")


def keep_latest(scene: Any, keep: Any = None) -> List[str]:
    """Removes every model but the newest (or ``keep``, e.g. the panel's current model); returns the names removed."""
    rows = model_rows(scene)
    if not rows:
        return []
    kept = keep if keep is not None else rows[-1]["node"]
    removed = []
    for row in rows:
        if row["node"] is not kept:
            removed.append(row["name"])
            modelnode.remove_model(scene, row["node"])
    return removed


def _folder_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def run_folders(work_root: str, in_use: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """The run folders under ``work_root`` (``train-…``, ``segment-…``, ``rank-…``), newest first, each with its
    size, date, whether a job or a model node still uses it (``in_use``: never removed) and whether it holds a
    resume checkpoint (a stopped run that Resume continues)."""
    if not os.path.isdir(work_root):
        return []
    busy = {os.path.realpath(p) for p in in_use if p}
    rows = []
    for name in os.listdir(work_root):
        path = os.path.join(work_root, name)
        if not os.path.isdir(path) or name.split("-")[0] not in RUN_KINDS:
            continue
        resumable = any(is_checkpoint(f) for f in os.listdir(path))
        rows.append({"path": path, "name": name, "kind": name.split("-")[0], "bytes": _folder_bytes(path),
                     "modified": time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(path))),
                     "in_use": os.path.realpath(path) in busy, "resumable": resumable})
    return sorted(rows, key=lambda r: r["modified"], reverse=True)


def remove_run_folders(rows: Sequence[Dict[str, Any]], work_root: str) -> List[str]:
    """Removes the given run folders (never one in use, never outside ``work_root``); returns the removed paths."""
    root = os.path.realpath(work_root)
    removed = []
    for row in rows:
        path = os.path.realpath(row["path"])
        if row.get("in_use") or os.path.dirname(path) != root:
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            removed.append(row["path"])
    return removed


def model_run_dirs(scene: Any) -> List[str]:
    """The run folders the scene's models still come from (their cached files live there)."""
    return [d for d in (n.GetAttribute(attributes.RUN_DIR) for n in _nodes(scene)) if d]

