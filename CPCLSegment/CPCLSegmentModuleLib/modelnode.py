"""Trained models in the scene, in nodes that Slicer's views never render as text.

A model is two ``vtkMRMLTextNode`` s:

- the **model node** (shown in the Data module, picked in the panel): its text is a short description (name,
  segments, size, checksum; ``describe``), which is what Slicer's Texts subject-hierarchy plugin puts in the
  tree's tooltip (``qSlicerSubjectHierarchyTextsPlugin::tooltip`` appends the node's whole text); the
  module's settings for it are attributes (``CPCLSegment.*``), none of them larger than a few kB;
- the **data node** (``PAYLOAD_ROLE`` reference from the model node): the model file base64-encoded, with a
  text storage node, so saving the scene saves it and loading the scene restores it. It is made with
  ``HideFromEditors`` set **before** it enters the scene, so Slicer never gives it a subject-hierarchy item
  (``qSlicerSubjectHierarchyPluginLogic`` skips hidden nodes when they are added and when a scene is
  imported): no tree row, no tooltip, no node selector lists it. Slicer 5.12 and later save such hidden
  storable nodes with every scene (``vtkMRMLScene::Commit`` writes them into ``<scene>_Private/``); Slicer 5.8
  and 5.10 save hidden nodes only into ``.mrb`` bundles, so there the data node stays visible to saving and
  is kept out of the subject-hierarchy tree by the ``SubjectHierarchy.ExcludeFromPotentialNodesList``
  attribute instead (``private_nodes_saved``).

Each store changes the model node once (``StartModify`` / ``EndModify``, or everything set before the node
enters the scene). The model file in the temporary folder is only a cache, matched by its SHA-256 and
written again from the data node when it is gone or differs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import slicer

from . import attributes
from .scene import OUTPUT_MODEL

OUTPUT_MODEL_DATA = "model data"
MODEL_NODE_CLASS = "vtkMRMLTextNode"
PAYLOAD_ROLE = "CPCLSegmentModelData"
EXCLUDE_FROM_TREE = "SubjectHierarchy.ExcludeFromPotentialNodesList"  # vtkMRMLSubjectHierarchyConstants (5.8-5.12)
DESCRIPTION_LIMIT = 2000  # characters of the model node's text: what a tooltip shows
CLASS_KEYS = ("name", "color", "label_value", "segment_id", "terminology")

def private_nodes_saved(scene: Any) -> bool:
    """Whether this Slicer saves hidden storable nodes with every scene (5.12+: ``<scene>_Private/``)."""
    return hasattr(scene, "GetPrivateStorableNodesModifiedSinceRead")


def is_model_node(node: Any) -> bool:
    return node is not None and node.IsA(MODEL_NODE_CLASS) and node.GetAttribute(attributes.OUTPUT) == OUTPUT_MODEL


def is_model_data_node(node: Any) -> bool:
    return node is not None and node.IsA(MODEL_NODE_CLASS) and node.GetAttribute(attributes.OUTPUT) == OUTPUT_MODEL_DATA


def plain_classes(classes: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [{k: v for k, v in c.items() if k in CLASS_KEYS} for c in classes]


def describe(name: str, size: int, sha256: str, classes: Optional[Sequence[Dict[str, Any]]],
             summary: Optional[Dict[str, Any]]) -> str:
    """The model node's text (what Slicer's tooltip shows): a few short lines, at most ``DESCRIPTION_LIMIT``."""
    lines = [f"CPCLSegment model '{name}', {size / 2**20:.1f} MB (SHA-256 {sha256[:16]})"]
    names = [c.get("name", "?") for c in (classes or [])[1:]]
    if names:
        lines.append(f"segments: {', '.join(names)}")
    summary = summary or {}
    run = [f"{k} {summary[k]}" for k in ("method", "iterations", "status") if summary.get(k) is not None]
    if run:
        lines.append("training: " + ", ".join(run))
    if summary.get("created"):
        lines.append(f"created {summary['created']}")
    text = "\n".join(lines)
    return text if len(text) <= DESCRIPTION_LIMIT else text[: DESCRIPTION_LIMIT - 1] + "…"


def _new_node(scene: Any, name: str, kind: str, hidden: bool = False) -> Any:
    node = scene.CreateNodeByClass(MODEL_NODE_CLASS)
    node.UnRegister(None)  # owned by the Python variable (as ScriptedLoadableModuleLogic.createParameterNode does)
    node.SetAttribute(attributes.OUTPUT, kind)
    node.SetName(scene.GenerateUniqueName(name))
    node.SetHideFromEditors(bool(hidden))
    return node


def _payload_node(scene: Any, model_name: str, text: str) -> Any:
    """A NEW data node holding ``text``, hidden (or kept out of the tree) before it enters the scene."""
    hidden = private_nodes_saved(scene)
    node = _new_node(scene, f"{model_name} data", OUTPUT_MODEL_DATA, hidden=hidden)
    if not hidden:
        node.SetAttribute(EXCLUDE_FROM_TREE, "1")
    node.SetForceCreateStorageNode(slicer.vtkMRMLTextNode.CreateStorageNodeAlways)
    node.SetText(text)
    scene.AddNode(node)
    node.AddDefaultStorageNode()
    return node


def payload_node(model: Any) -> Any:
    return model.GetNodeReference(PAYLOAD_ROLE) if model is not None else None


def store_model(scene: Any, path: str, name: str = "CPCLSegment model", classes: Optional[Sequence[Dict[str, Any]]] = None,
                nested: Optional[Dict[str, List[str]]] = None, summary: Optional[Dict[str, Any]] = None,
                run_dir: Optional[str] = None, node: Any = None) -> Any:
    """The model file ``path`` as a model node + data node (a NEW pair, or ``node`` updated with one Modified).
    ``path`` stays the node's cached file."""
    with open(path, "rb") as f:
        data = f.read()
    sha = hashlib.sha256(data).hexdigest()
    old_payload = payload_node(node)
    shown_name = node.GetName() if node is not None else name
    payload = _payload_node(scene, shown_name, base64.b64encode(data).decode("ascii"))
    new = node is None
    if new:
        node = _new_node(scene, name, OUTPUT_MODEL)
        node.SetAttribute(attributes.CREATED, time.strftime("%Y-%m-%d %H:%M:%S"))
        shown_name = node.GetName()
    about = dict(summary if summary is not None else _json(node, attributes.SUMMARY) or {},
                 created=node.GetAttribute(attributes.CREATED))
    was = node.StartModify()
    node.SetText(describe(shown_name, len(data), sha, classes if classes is not None else _json(node, attributes.CLASSES), about))
    node.SetAttribute(attributes.SHA256, sha)
    node.SetAttribute(attributes.BYTES, str(len(data)))
    node.SetAttribute(attributes.FILE, os.path.abspath(path))
    if classes is not None:
        node.SetAttribute(attributes.CLASSES, json.dumps(plain_classes(classes)))
    node.SetAttribute(attributes.NESTED, json.dumps(nested or {}))
    if summary is not None:
        node.SetAttribute(attributes.SUMMARY, json.dumps(summary, default=str))
    if run_dir:
        node.SetAttribute(attributes.RUN_DIR, run_dir)
    node.SetNodeReferenceID(PAYLOAD_ROLE, payload.GetID())
    node.EndModify(was)
    if new:
        scene.AddNode(node)
    if old_payload is not None:
        scene.RemoveNode(old_payload)
    return node


def _json(node: Any, attribute: str) -> Any:
    text = node.GetAttribute(attribute) if node is not None else None
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def model_bytes(model: Any) -> bytes:
    """The model file held by ``model``'s data node (or, in scenes saved by older versions of the module, by
    the model node's own text), checked against the stored size and SHA-256. Raises ValueError."""
    holder = payload_node(model)
    text = holder.GetText() if holder is not None else (model.GetText() or "")
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True) if text else b""
    except ValueError:
        data = b""
    size = int(model.GetAttribute(attributes.BYTES) or -1)
    if not data:
        why = "its data node is missing or empty" if holder is not None or not text else "its data is not a model file"
        raise ValueError(f"model node '{model.GetName()}' holds no model ({why}; a scene saved by Slicer before 5.12 keeps "
                         "a model's data only when saved as a .mrb bundle)")
    if len(data) != size or hashlib.sha256(data).hexdigest() != model.GetAttribute(attributes.SHA256):
        raise ValueError(f"model node '{model.GetName()}' holds a damaged model (its size or SHA-256 differ from the stored ones)")
    return data


def file_matches(path: str, model: Any) -> bool:
    """Whether ``path`` is exactly the model file the node holds (SHA-256, not only the size)."""
    if not path or not os.path.isfile(path) or os.path.getsize(path) != int(model.GetAttribute(attributes.BYTES) or -1):
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == model.GetAttribute(attributes.SHA256)


def upgrade_model_node(scene: Any, model: Any) -> Any:
    """A model node from an older scene (the base64 model file as its own text) gets a data node and a short
    text; other nodes are returned unchanged."""
    if not is_model_node(model) or payload_node(model) is not None or len(model.GetText() or "") <= DESCRIPTION_LIMIT:
        return model
    data = model_bytes(model)
    sha = model.GetAttribute(attributes.SHA256)
    payload = _payload_node(scene, model.GetName(), model.GetText())
    was = model.StartModify()
    model.SetText(describe(model.GetName(), len(data), sha, _json(model, attributes.CLASSES), _json(model, attributes.SUMMARY)))
    model.SetNodeReferenceID(PAYLOAD_ROLE, payload.GetID())
    model.EndModify(was)
    return model


def remove_model(scene: Any, model: Any) -> None:
    """Removes a model node and its data node from the scene."""
    payload = payload_node(model)
    scene.RemoveNode(model)
    if payload is not None:
        scene.RemoveNode(payload)
