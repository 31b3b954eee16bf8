"""Models kept in the scene: a trained or loaded model is a "CPCLSegment model" node whose text is a short
description, with the model file in a hidden data node (``modelnode``), so saving the scene (``.mrml`` + data,
or ``.mrb``) saves the model and loading the scene restores it; the file in the temporary folder is only a
cache, used when its SHA-256 is the node's and re-created from the node otherwise."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

from CPCLSegmentLib.companions import run_record_path
from CPCLSegmentLib.errors import InputError
from CPCLSegmentLib.writers import copy_file, write_bytes, write_json

from . import attributes, modelnode
from .nodes import node_name
from .scene import OUTPUT_MODEL


MODEL_NODE_CLASS = modelnode.MODEL_NODE_CLASS


def is_model_node(node: Any) -> bool:
    """A model node of this module (a model file path, as the console API also takes, is not one)."""
    return hasattr(node, "IsA") and node.IsA(MODEL_NODE_CLASS) and node.GetAttribute(attributes.OUTPUT) == OUTPUT_MODEL


def _json_attribute(node: Any, name: str, default: Any) -> Any:
    text = node.GetAttribute(name) if node is not None else None
    try:
        return json.loads(text) if text else default
    except ValueError:
        return default


def model_classes_of(node: Any) -> Optional[List[Dict[str, Any]]]:
    return _json_attribute(node, attributes.CLASSES, None)


def model_nested(node: Any) -> Dict[str, List[str]]:
    return _json_attribute(node, attributes.NESTED, {}) if is_model_node(node) else {}


def model_summary(node: Any) -> Dict[str, Any]:
    return _json_attribute(node, attributes.SUMMARY, {}) if is_model_node(node) else {}


def store_model(scene: Any, path: str, name: str = "CPCLSegment model", classes: Optional[Sequence[Dict[str, Any]]] = None,
                nested: Optional[Dict[str, List[str]]] = None, summary: Optional[Dict[str, Any]] = None,
                run_dir: Optional[str] = None, node: Any = None) -> Any:
    """The model file as a model node (short text: what Slicer's views show) and a hidden data node holding the
    file (``modelnode``), so saving the scene saves the model and loading the scene restores it. ``path`` stays
    the node's cached file. ``node``: update that model node (one Modified) instead of making a new one."""
    return modelnode.store_model(scene, path, name, classes=classes, nested=nested, summary=summary, run_dir=run_dir, node=node)


def set_model_classes(node: Any, classes: Sequence[Dict[str, Any]]) -> None:
    """Keeps the model's classes (name, colour, label value, segment ID, terminology) on its node."""
    plain = [{k: v for k, v in c.items() if k in ("name", "color", "label_value", "segment_id", "terminology")} for c in classes]
    node.SetAttribute(attributes.CLASSES, json.dumps(plain))


def model_file_of(model: Any, work_root: str) -> str:
    """The model node's cached file when its SHA-256 is the node's, else the node's data written again (checksum
    verified) into ``work_root/models``. A model node of an older scene (the file as its own text) is upgraded
    to a short text + data node first."""
    if not is_model_node(model):
        raise InputError(f"'{node_name(model)}' is not a CPCLSegment model node")
    cached = model.GetAttribute(attributes.FILE) or ""
    if modelnode.file_matches(cached, model):
        return cached
    try:
        modelnode.upgrade_model_node(model.GetScene(), model)
        data = modelnode.model_bytes(model)
    except ValueError as e:
        raise InputError(f"{e}: no intact model") from None
    folder = os.path.join(work_root, "models")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{model.GetAttribute(attributes.SHA256)[:16]}.pt")
    write_bytes(path, data)
    model.SetAttribute(attributes.FILE, path)
    return path


def model_node_from_file(scene: Any, path: str, info: Dict[str, Any], name: Optional[str] = None) -> Any:
    """A NEW model node from a model file and what the child process read from it (``info``); the overlap
    nesting comes from the run record beside it (the panel's "Save model…" keeps it there)."""
    summary = {"segments": [c["name"] for c in info["classes"][1:]], "status": info.get("status"),
               "iterations": info.get("iterations"), "method": info.get("method"), "file": path}
    nested = {}
    sidecar = run_record_path(path)
    if os.path.isfile(sidecar):
        try:
            with open(sidecar, encoding="utf-8") as f:
                nested = (json.load(f).get("slicer") or {}).get("nested") or {}
        except (OSError, ValueError):
            nested = {}
    return store_model(scene, path, name or os.path.splitext(os.path.basename(path))[0], classes=info["classes"],
                       nested=nested, summary=summary)


def save_model_file(model: Any, source: str, target: str) -> str:
    """Writes the model file ``source`` to ``target`` (atomically) with its run record beside it; the run record
    also keeps the model node's overlap nesting (``slicer.nested``) for ``model_node_from_file``."""
    copy_file(source, target)
    record: Dict[str, Any] = {}
    run = run_record_path(source)
    if os.path.isfile(run):
        try:
            with open(run, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            record = {}
    if is_model_node(model):
        record["slicer"] = {"nested": model_nested(model), "summary": model_summary(model)}
    if record:
        write_json(run_record_path(target), record)
    return target
