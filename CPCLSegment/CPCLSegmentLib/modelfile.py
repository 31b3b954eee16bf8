"""The model file: one ``.pt`` file that carries everything needed to apply a model elsewhere.

Layout (a plain dict; only tensors, numbers, strings, lists and dicts, so ``torch.load(weights_only=True)``
reads it and a model file can never execute code)::

    format            "cpcl-segment-model"
    format_version    1
    engine_version    CPCLSegmentLib version that wrote it
    network           VNet config (in_channels, num_classes, width, depth, norm, feature_level, dropout)
    classes           [{name, color, label_value, terminology?, segment_id?}], index 0 = background
    spacing           target spacing [x, y, z] mm (None: each image's own)
    orientation       canonical voxel orientation applied before the network ("LPS")
    normalization     {"scheme": "ct", clip, mean, std} or {"scheme": "zscore"}
    patch_size        [D, H, W] voxels of the sliding window
    weights           {"teacher": state_dict, "student": state_dict, "best": state_dict or None}
    best              {"iteration", "mean_dice", "dice"} of the best-on-validation weights, or None
    prototypes        (K, C) teacher-feature class prototypes from the labeled cases; prototype_valid (K,)
    training          run summary: method, config, iterations, case names, supervised_only, ...

Inference uses the teacher's last weights unless asked for ``best`` (marked separately, chosen on the
validation cases only) or ``student``.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any, Dict, List

import torch

from . import MODEL_FORMAT, MODEL_FORMAT_VERSION, __version__
from .errors import ModelFileError
from .io import atomic_path
from .network import VNet, build_network

REQUIRED_KEYS = ("format", "format_version", "network", "classes", "normalization", "patch_size", "weights")
WEIGHT_CHOICES = ("teacher", "student", "best")


def save_model(path: str, record: Dict[str, Any]) -> None:
    """Writes ``record`` atomically: a crash or a full disk leaves any previous file intact."""
    record = dict(record)
    record.setdefault("format", MODEL_FORMAT)
    record.setdefault("format_version", MODEL_FORMAT_VERSION)
    record.setdefault("engine_version", __version__)
    with atomic_path(path) as tmp:
        torch.save(record, tmp)


def load_model(path: str) -> Dict[str, Any]:
    """Reads and checks a model file with ``weights_only=True``; every failure is a ModelFileError."""
    record = _load(path, "model file")
    if not isinstance(record, dict) or record.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path} is not a CPCLSegment model file (a resume checkpoint or another tool's file?)")
    version = record.get("format_version")
    if not isinstance(version, int) or version > MODEL_FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was written by a newer CPCLSegment (model format {version}, engine "
            f"{record.get('engine_version')}); this version ({__version__}) reads format {MODEL_FORMAT_VERSION}: update CPCLSegment"
        )
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ModelFileError(f"{path} is incomplete: missing {', '.join(missing)}")
    weights = record["weights"]
    if not isinstance(weights, dict) or not isinstance(weights.get("teacher"), dict):
        raise ModelFileError(f"{path} holds no teacher weights")
    if len(record["classes"]) != record["network"].get("num_classes"):
        raise ModelFileError(f"{path}: {len(record['classes'])} classes listed but the network has {record['network'].get('num_classes')}")
    return record


def _load(path: str, what: str) -> Any:
    path = str(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelFileError(
            f"{path} contains objects other than weights and settings, so it was not loaded "
            f"(model files are read with weights_only=True and never run code): {str(e).splitlines()[0][:200]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise ModelFileError(f"{path} is damaged or truncated and cannot be read as a {what} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


def build_from_record(record: Dict[str, Any], weights: str = "teacher") -> VNet:
    """The network with the chosen weights (``teacher``, ``student`` or ``best``)."""
    if weights not in WEIGHT_CHOICES:
        raise ModelFileError(f"weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    state = record["weights"].get(weights)
    if state is None:
        if weights == "best":
            raise ModelFileError("this model has no best-on-validation weights (it was trained without --validation cases)")
        raise ModelFileError(f"this model file has no {weights} weights")
    try:
        net = build_network(dict(record["network"]))
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"the model file's network settings are invalid: {e}") from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelFileError(f"the model file's {weights} weights do not fit its network settings: {str(e)[:500]}") from None
    net.eval()
    return net


def state_dict_cpu(net: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A CPU copy of the state dict (unwrapping DDP / torch.compile wrappers)."""
    module = getattr(net, "module", net)
    module = getattr(module, "_orig_mod", module)
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def compare_networks(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    """Differences between two network configs that prevent reusing the trunk (ignores num_classes)."""
    keys = ("in_channels", "width", "depth", "norm", "feature_level")
    return [f"{k}: {a.get(k)} vs {b.get(k)}" for k in keys if a.get(k) != b.get(k)]


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Reads a resume checkpoint (written by the trainer) with ``weights_only=True``."""
    ckpt = _load(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != MODEL_FORMAT + "-checkpoint":
        raise ModelFileError(f"{path} is not a CPCLSegment resume checkpoint")
    return ckpt


def save_checkpoint(path: str, ckpt: Dict[str, Any]) -> None:
    ckpt = dict(ckpt)
    ckpt["format"] = MODEL_FORMAT + "-checkpoint"
    ckpt["format_version"] = MODEL_FORMAT_VERSION
    ckpt["engine_version"] = __version__
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
