"""Models kept in the scene: a trained or loaded model is a ``vtkMRMLTextNode`` ("CPCLSegment model", the model
file base64-encoded, with a text storage node), so saving the scene (``.mrml`` + data, or ``.mrb``) saves the
model and loading the scene restores it; the file in the temporary folder is only a cache, re-created from the
node when it is gone."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from typing import Any, Dict, List, Optional, Sequence

import slicer
from CPCLSegmentLib.errors import InputError

from .nodes import node_name
from .scene import OUTPUT_ATTRIBUTE, OUTPUT_MODEL, new_output_node


MODEL_NODE_CLASS = "vtkMRMLTextNode"


MODEL_ATTRIBUTES = ("CPCLSegment.SHA256", "CPCLSegment.Bytes", "CPCLSegment.Classes", "CPCLSegment.Nested",
                    "CPCLSegment.Summary", "CPCLSegment.RunDir", "CPCLSegment.File")


def is_model_node(node: Any) -> bool:
    return node is not None and node.IsA(MODEL_NODE_CLASS) and node.GetAttribute(OUTPUT_ATTRIBUTE) == OUTPUT_MODEL


def _json_attribute(node: Any, name: str, default: Any) -> Any:
    text = node.GetAttribute(name) if node is not None else None
    try:
        return json.loads(text) if text else default
    except ValueError:
        return default


def model_classes_of(node: Any) -> Optional[List[Dict[str, Any]]]:
    return _json_attribute(node, "CPCLSegment.Classes", None)


def model_nested(node: Any) -> Dict[str, List[str]]:
    return _json_attribute(node, "CPCLSegment.Nested", {}) if is_model_node(node) else {}


def model_summary(node: Any) -> Dict[str, Any]:
    return _json_attribute(node, "CPCLSegment.Summary", {}) if is_model_node(node) else {}


def store_model(scene: Any, path: str, name: str = "CPCLSegment model", classes: Optional[Sequence[Dict[str, Any]]] = None,
                nested: Optional[Dict[str, List[str]]] = None, summary: Optional[Dict[str, Any]] = None,
                run_dir: Optional[str] = None, node: Any = None) -> Any:
    """The model file as a scene node: a text node holding the file base64-encoded, with a text storage node,
    so saving the scene (or an .mrb) saves the model and loading the scene restores it. ``path`` stays the
    node's cached file. ``node``: update that model node instead of making a new one."""
    with open(path, "rb") as f:
        data = f.read()
    if node is None:
        node = new_output_node(scene, MODEL_NODE_CLASS, name, OUTPUT_MODEL)
    node.SetForceCreateStorageNode(slicer.vtkMRMLTextNode.CreateStorageNodeAlways)
    node.SetText(base64.b64encode(data).decode("ascii"))
    node.SetAttribute("CPCLSegment.SHA256", hashlib.sha256(data).hexdigest())
    node.SetAttribute("CPCLSegment.Bytes", str(len(data)))
    node.SetAttribute("CPCLSegment.File", os.path.abspath(path))
    if classes is not None:
        set_model_classes(node, classes)
    node.SetAttribute("CPCLSegment.Nested", json.dumps(nested or {}))
    if summary is not None:
        node.SetAttribute("CPCLSegment.Summary", json.dumps(summary, default=str))
    if run_dir:
        node.SetAttribute("CPCLSegment.RunDir", run_dir)
    if node.GetStorageNode() is None:
        node.AddDefaultStorageNode()
    return node


def set_model_classes(node: Any, classes: Sequence[Dict[str, Any]]) -> None:
    """Keeps the model's classes (name, colour, label value, segment ID, terminology) on its node."""
    plain = [{k: v for k, v in c.items() if k in ("name", "color", "label_value", "segment_id", "terminology")} for c in classes]
    node.SetAttribute("CPCLSegment.Classes", json.dumps(plain))


def model_file_of(model: Any, work_root: str) -> str:
    """The model node's cached file, written again (from the node's base64 text, checksum verified) into
    ``work_root/models`` when the temporary folder lost it."""
    if not is_model_node(model):
        raise InputError(f"'{node_name(model)}' is not a CPCLSegment model node")
    cached = model.GetAttribute("CPCLSegment.File") or ""
    size = int(model.GetAttribute("CPCLSegment.Bytes") or -1)
    if cached and os.path.isfile(cached) and os.path.getsize(cached) == size:
        return cached
    data = base64.b64decode((model.GetText() or "").encode("ascii"))
    if not data or len(data) != size or hashlib.sha256(data).hexdigest() != model.GetAttribute("CPCLSegment.SHA256"):
        raise InputError(f"model node '{node_name(model)}' holds no intact model (size or checksum differ)")
    folder = os.path.join(work_root, "models")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{model.GetAttribute('CPCLSegment.SHA256')[:16]}.pt")
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)
    model.SetAttribute("CPCLSegment.File", path)
    return path


def model_node_from_file(scene: Any, path: str, info: Dict[str, Any], name: Optional[str] = None) -> Any:
    """A NEW model node from a model file and what the child process read from it (``info``); the overlap
    nesting comes from the run record beside it (the panel's "Save model…" keeps it there)."""
    summary = {"segments": [c["name"] for c in info["classes"][1:]], "status": info.get("status"),
               "iterations": info.get("iterations"), "method": info.get("method"), "file": path}
    nested = {}
    sidecar = os.path.splitext(path)[0] + ".run.json"
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
    shutil.copyfile(source, target + ".tmp")
    os.replace(target + ".tmp", target)
    record: Dict[str, Any] = {}
    run = os.path.splitext(source)[0] + ".run.json"
    if os.path.isfile(run):
        try:
            with open(run, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            record = {}
    if is_model_node(model):
        record["slicer"] = {"nested": model_nested(model), "summary": model_summary(model)}
    if record:
        with open(os.path.splitext(target)[0] + ".run.json", "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
    return target
