"""The model file: one ``.pt`` file that carries everything needed to apply a model elsewhere.

Layout (a plain dict; only tensors, numbers, strings, lists and dicts, so ``torch.load(weights_only=True)``
reads it and a model file can never execute code)::

    format            "cpcl-segment-model"
    format_version    1
    engine_version    CPCLSegmentLib version that wrote it
    network           VNet config (in_channels, num_classes, width, depth, norm, feature_level, dropout), or an
                      allow-listed MONAI network (``backbones``: backbone, args, feature_level, layout; format 2)
    classes           [{name, color, label_value, terminology?, segment_id?}], index 0 = background
    spacing           target spacing [x, y, z] mm (None: each image's own)
    orientation       canonical voxel orientation applied before the network ("LPS")
    normalization     {"scheme": "ct", clip, mean, std}, {"scheme": "zscore", nonzero?, tanh?}, {"scheme": "range",
                      low, high, out_low, out_high, clip, sigmoid}, {"scheme": "pet"} or {"scheme": "none"}
    patch_size        [D, H, W] voxels of the sliding window
    weights           {"teacher": state_dict, "best": state_dict or None}, stored in fp16 (``save_model``)
    best              {"iteration", "mean_dice", "dice"} of the best-on-validation weights, or None
    prototypes        (K, C) teacher-feature class prototypes from the labeled cases; prototype_valid (K,)
    training          run summary: method, config, iterations, case names, supervised_only, ...

Inference uses the teacher's last weights unless asked for ``best`` (marked separately, chosen on the
validation cases only). A model file holds only what inference and fine-tuning need: the teacher's weights in
fp16 (``load_model`` returns them as float32), the best-on-validation weights only when they differ from the
last teacher's (``weights.best`` None with a ``best`` record means the last teacher is the best), and no
student or optimizer state: those live in the resume checkpoint. The default network (width 16) makes a
model file of about 18 MB. Older model files (student and teacher in float32) are still read.

Beside the model file: ``<model>.run.json``, the run record (versions, seed, config, plan, cases, losses,
validations: ``write_run_record``), and while training ``<model>.pt.checkpoint.pt`` for ``--resume`` (their names:
``companions``).
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import platform
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from . import MODEL_FORMAT, MODEL_FORMAT_VERSION, __version__
from .errors import ModelFileError
from .backbones import BackboneError, check_spec
from .companions import run_record_path
from .jsonout import strict_json
from .network import build_network
from .writers import atomic_path

REQUIRED_KEYS = ("format", "format_version", "network", "classes", "normalization", "patch_size", "weights")
WEIGHT_CHOICES = ("teacher", "student", "best")


def save_model(path: str, record: Dict[str, Any]) -> None:
    """Writes ``record`` atomically: a crash or a full disk leaves any previous file intact."""
    record = dict(record)
    record.setdefault("format", MODEL_FORMAT)
    # a VNet model stays readable by engines that know format 1; a MONAI backbone needs format 2
    record.setdefault("format_version", 2 if "backbone" in record.get("network", {}) else 1)
    record.setdefault("engine_version", __version__)
    weights = record.get("weights")
    if isinstance(weights, dict):
        record["weights"] = {k: (half_state(v) if isinstance(v, dict) else v) for k, v in weights.items()}
    with atomic_path(path, tensor_bytes(record), note="model file") as tmp:
        torch.save(record, tmp)


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a (nested) record: about the size of its file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def half_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """The storage form of a state dict in a model file: float32/float64 tensors as fp16 (half the bytes of
    float32; a network loads them back into its float32 parameters), except a tensor whose values do not fit
    fp16 (``|x| > 65504``), which stays as it is. Integer tensors are kept."""
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float16:
            h = v.detach().to("cpu", torch.float16)
            out[k] = h if bool(torch.isfinite(h).all()) or not bool(torch.isfinite(v).all()) else v
        else:
            out[k] = v
    return out


def float_state(state: Any) -> Any:
    """fp16 tensors of a stored state dict as float32 (what the networks and the trainer use)."""
    if not isinstance(state, dict):
        return state
    return {k: (v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.float16 else v) for k, v in state.items()}


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
    problems = record_problems(record)
    if problems:
        raise ModelFileError(f"{path} is not a valid CPCLSegment model file: " + "; ".join(problems[:6]))
    record["weights"] = {k: float_state(v) for k, v in record["weights"].items()}
    return record


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _state_dict(v: Any) -> bool:
    return isinstance(v, dict) and bool(v) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())


def record_problems(record: Dict[str, Any]) -> List[str]:
    """What is wrong with a model-file record's fields (types and ranges), so that a crafted or damaged file
    is refused with a ``ModelFileError`` instead of failing later."""
    out: List[str] = []
    net = record.get("network")
    if not isinstance(net, dict):
        return ["network settings are not a mapping"]
    if "backbone" in net:
        try:
            check_spec(net, "the network settings")
        except BackboneError as e:
            out.append(str(e))
        return out + _other_problems(record, net)
    for k in ("in_channels", "num_classes", "width", "depth", "feature_level"):
        if not _int(net.get(k)) or net[k] < (0 if k == "feature_level" else 1):
            out.append(f"network {k} must be a whole number >= {0 if k == 'feature_level' else 1}, not {net.get(k)!r}")
    if _int(net.get("depth")) and not 1 <= net["depth"] <= 6:
        out.append(f"network depth must be between 1 and 6, not {net['depth']}")
    if _int(net.get("width")) and net["width"] > 1024:
        out.append(f"network width {net['width']} is implausible")
    if "dropout" in net and not (_number(net["dropout"]) and 0 <= net["dropout"] < 1):
        out.append(f"network dropout must be in [0, 1), not {net['dropout']!r}")
    if not isinstance(net.get("norm", "instance"), str):
        out.append("network norm must be text")
    return out + _other_problems(record, net)


NORMALIZATION_KEYS = {"range": ("low", "high", "out_low", "out_high")}


def _other_problems(record: Dict[str, Any], net: Dict[str, Any]) -> List[str]:
    """``record_problems`` of the fields other than the network settings."""
    out: List[str] = []
    classes = record.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in classes):
        out.append("classes must be a list of at least two entries, each with a name")
    else:
        if net.get("num_classes") != len(classes):
            out.append(f"{len(classes)} classes listed but the network has {net.get('num_classes')}")
        for c in classes:
            color = c.get("color", [0, 0, 0])
            if not (isinstance(color, (list, tuple)) and len(color) >= 3 and all(_number(v) for v in color[:3])):
                out.append(f"class {c['name']!r} has an invalid colour {color!r}")
            if "label_value" in c and not _int(c["label_value"]):
                out.append(f"class {c['name']!r} has an invalid label value {c['label_value']!r}")
    norm = record.get("normalization")
    if not isinstance(norm, dict) or norm.get("scheme") not in ("ct", "zscore", "range", "pet", "none"):
        out.append(f"normalisation must be ct, zscore, range, pet or none, not {norm!r:.80}")
    elif norm["scheme"] == "range" and (not all(_number(norm.get(k)) for k in NORMALIZATION_KEYS["range"]) or norm["low"] == norm["high"]):
        out.append("range normalisation needs numbers low != high, out_low, out_high")
    elif norm["scheme"] == "ct":
        clip = norm.get("clip")
        if not (isinstance(clip, (list, tuple)) and len(clip) == 2 and all(_number(v) for v in clip)) or not _number(norm.get("mean")) \
                or not (_number(norm.get("std")) and norm["std"] > 0):
            out.append("CT normalisation needs a clip range [low, high], a mean and a std > 0")
    patch = record.get("patch_size")
    if not (isinstance(patch, (list, tuple)) and len(patch) == 3 and all(_int(p) and 1 <= p <= 4096 for p in patch)):
        out.append(f"patch_size must be three whole numbers, not {patch!r:.80}")
    spacing = record.get("spacing")
    if spacing is not None and not (isinstance(spacing, (list, tuple)) and len(spacing) == 3
                                    and all(_number(v) and 0 < v < 1e4 for v in spacing)):
        out.append(f"spacing must be three numbers > 0 (mm), not {spacing!r:.80}")
    weights = record.get("weights")
    if not isinstance(weights, dict) or not _state_dict(weights.get("teacher")):
        out.append("it holds no teacher weights")
    else:
        for k in ("student", "best"):
            if weights.get(k) is not None and not _state_dict(weights[k]):
                out.append(f"its {k} weights are not a set of tensors")
    for k in ("training", "best"):
        if record.get(k) is not None and not isinstance(record[k], dict):
            out.append(f"{k} must be a mapping")
    protos = record.get("prototypes")
    if protos is not None and not isinstance(protos, torch.Tensor):
        out.append("prototypes must be a tensor")
    return out


def _load(path: str, what: str) -> Any:
    path = str(path)
    if not path:
        raise ModelFileError(f"the {what} path is empty")
    if os.path.isdir(path):
        raise ModelFileError(f"{path} is a folder, not a {what}")
    if not os.path.isfile(path):
        raise ModelFileError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFileError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # torch.save's zip, or its legacy pickle
        raise ModelFileError(f"{path} is not a {what}: it is not a PyTorch file at all (a model file is the .pt file "
                             "that cpcl-segment train writes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelFileError(
            f"{path} contains objects other than weights and settings, so it was not loaded "
            f"(model files are read with weights_only=True and never run code): {str(e).splitlines()[0][:200]}"
        ) from None
    except MemoryError:
        raise ModelFileError(f"{path} cannot be read as a {what}: loading it ran out of memory (a damaged or crafted file?)") from None
    except Exception as e:  # RuntimeError, EOFError, BadZipFile, OSError, ValueError, ... from a damaged or crafted file
        raise ModelFileError(f"{path} is damaged or truncated and cannot be read as a {what} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


def _why_no_best(record: Dict[str, Any]) -> str:
    n = (record.get("training") or {}).get("validation_cases")
    if n:
        return (f"none of its {n} validation case(s) gave a Dice score: their labels hold none of the segments (empty), "
                "where Dice is undefined")
    if n is None:  # a model file from before validation cases were recorded
        return "it was trained without --validation cases, or their labels were empty"
    return "it was trained without --validation cases"


def build_from_record(record: Dict[str, Any], weights: str = "teacher") -> torch.nn.Module:
    """The network with the chosen weights (``teacher``, ``student`` or ``best``)."""
    if weights not in WEIGHT_CHOICES:
        raise ModelFileError(f"weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    state = record["weights"].get(weights)
    if state is None and weights == "best" and record.get("best") is not None:
        state = record["weights"].get("teacher")  # the best weights were the last teacher's: stored once
    if state is None:
        if weights == "best":
            raise ModelFileError(f"this model has no best-on-validation weights ({_why_no_best(record)}); use --weights teacher")
        if weights == "student":
            raise ModelFileError("this model file has no student weights: model files keep only the teacher's "
                                 "(the student is in the resume checkpoint of an unfinished run)")
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


@dataclass
class Snapshot:
    """A checkpoint held until the next loss confirms its weights (callbacks read ``.state()``, like a ``Trainer``)."""

    iteration: int
    saved: Dict[str, Any]

    def state(self) -> Dict[str, Any]:
        return self.saved


def state_dict_cpu(net: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A CPU copy of the state dict (unwrapping DDP / torch.compile wrappers)."""
    module = getattr(net, "module", net)
    module = getattr(module, "_orig_mod", module)
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


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
    with atomic_path(path, tensor_bytes(ckpt), note="resume checkpoint: --resume continues from it") as tmp:
        torch.save(ckpt, tmp)


# ------------------------------------------------------------------------------------------- records


def plain(obj: Any, nan_as_none: bool = False) -> Any:
    """JSON-able copy: dicts (string keys), lists (from tuples), numpy scalars as Python numbers, and with
    ``nan_as_none`` NaN floats as None."""
    if isinstance(obj, dict):
        return {str(k): plain(v, nan_as_none) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v, nan_as_none) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if nan_as_none and isinstance(obj, float) and obj != obj:
        return None
    return obj


def versions() -> Dict[str, str]:
    """Versions of the engine, Python, the platform and the main packages (for the run record)."""
    out = {"cpcl-segment": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for mod in ("torch", "numpy", "monai", "SimpleITK", "slicerio"):
        with contextlib.suppress(Exception):
            out[mod] = __import__(mod).__version__
    return out


def make_record(cfg, result, classes, plan, request, infos, n_unlabeled: int, start_eval=None, comparison=None) -> Dict[str, Any]:
    """The model-file record of a finished run (``save_model`` adds the format fields).

    ``cfg``: the run's ``TrainConfig``; ``result``: its ``trainer.TrainResult``; ``request``: the
    ``preparation.TrainRequest``; ``infos``: the ``preparation.CaseInfo`` of the labeled cases."""
    return {
        "network": cfg.network_config(len(classes)),
        "classes": plain(classes),
        "spacing": plain(plan["spacing"]),
        "orientation": plan["orientation"],
        "normalization": plain(plan["normalization"]),
        "patch_size": [int(p) for p in cfg.patch_size],
        "weights": model_weights(result),
        "best": plain(result.best),
        "prototypes": result.prototypes,
        "prototype_valid": result.prototype_valid,
        "training": {
            "method": result.method,
            "status": result.status,
            "iterations": result.iterations_done,
            "config": cfg.to_dict(),
            "labeled_cases": [i.name for i in infos],
            "unlabeled_cases": n_unlabeled,
            "validation_cases": len(request.validation),
            "supervised_only": result.method == "supervised",
            "starting_model": request.options.init,
            "starting_model_validation": plain(start_eval),
            "comparison": plain(comparison),
        },
    }


def model_weights(result) -> Dict[str, Any]:
    """The weights a model file keeps: the teacher's, and the best-on-validation weights only when they differ
    from it (``build_from_record(..., "best")`` then uses the teacher). The student and the optimizer stay in the
    resume checkpoint: inference and fine-tuning (``--init``, ``starting_state``) need only the teacher."""
    teacher = state_dict_cpu(result.teacher)
    best = result.best_state
    if best is not None and set(best) == set(teacher) and all(torch.equal(best[k], teacher[k]) for k in teacher):
        best = None
    return {"teacher": teacher, "best": best}


def write_run_record(out: str, request, cfg, result, plan, classes, t_start: float, comparison=None, start_eval=None) -> None:
    """Writes ``<model>.run.json`` atomically: what was run, on what, with which versions, and how it went."""
    record = {
        "model": out,
        "engine_version": __version__,
        "versions": versions(),
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "method": result.method,
        "status": result.status,
        "plan": plain(plan),
        "classes": [c["name"] for c in classes],
        "labeled": [{"image": i.image, "segmentation": i.segmentation, "annotated_slices": i.annotated_slices} for i in request.labeled],
        "unlabeled": list(request.unlabeled),
        "validation": [{"image": i.image, "segmentation": i.segmentation} for i in request.validation],
        "starting_model": request.options.init,
        "starting_model_validation": plain(start_eval),
        "comparison": plain(comparison),
        "best": plain(result.best),
        "validations": plain(result.validation),
        "losses": result.history,
        "seconds": round(time.time() - t_start, 1),
    }
    with atomic_path(run_record_path(out), note="run record") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(strict_json(record, indent=1))
