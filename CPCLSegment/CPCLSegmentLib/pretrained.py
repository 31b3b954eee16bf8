"""Starting points for fine-tuning (``--init``): our model files, MONAI Auto3DSeg checkpoints, MONAI bundles.

``read_starting_point(path)`` turns any of them into a model-file record (``modelfile``'s layout; its
``starting_point`` field says what it was read from):

- a CPCLSegment model file (``modelfile.load_model``);
- an Auto3DSeg ``segresnet`` checkpoint (``torch.save({"state_dict", "config", "epoch", "best_metric"})`` of the
  algorithm template's ``segmenter.py``; ``config`` has ``network`` (``_target_`` + arguments), ``normalize_mode``,
  ``intensity_bounds``, ``resample_resolution``, ``roi_size``, ``sigmoid``, ``class_names``, ``orientation_ras``),
  alone or in a MONAIAuto3DSeg model folder (``model.pt`` beside ``labels.csv``: ``LabelValue``, ``Name``);
- a MONAI bundle folder: ``configs/inference.json`` (or ``.yaml``) whose ``network_def`` names the network,
  ``models/model.pt`` the weights, ``configs/metadata.json``'s ``channel_def`` the segments, the preprocessing's
  ``Spacingd`` / ``ScaleIntensityRanged`` / ``NormalizeIntensityd`` / ``Orientationd`` literal settings.

Every file is read with ``torch.load(weights_only=True)``; a network is built only from ``backbones.ALLOWED`` and
nothing in a configuration is evaluated (``backbones.BackboneError`` names the file otherwise).

``starting_state`` matches the starting model's segments to the run's and builds the weights to start from;
the MONAIAuto3DSeg models on this computer are listed, torch-free, by ``localmodels.find_auto3dseg_models``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .backbones import BackboneError, adapt_state, allowed_name, make_spec
from .errors import InputError, ModelFileError
from .localmodels import auto3dseg_checkpoint, read_labels_csv
from .modelfile import _load as read_weights_file
from .modelfile import load_model
from .network import build_network

Emit = Callable[[Dict[str, Any]], None]
BUNDLE_CONFIGS = ("inference.json", "inference.yaml", "inference.yml")


# ------------------------------------------------------------------------------------------- reading


def read_starting_point(path: str) -> Dict[str, Any]:
    """A model-file record from a CPCLSegment model file, an Auto3DSeg checkpoint (or its MONAIAuto3DSeg model
    folder) or a MONAI bundle folder; ``ModelFileError`` naming the file otherwise."""
    path = str(path)
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, "configs", c)) for c in BUNDLE_CONFIGS):
            return _bundle_record(path)
        checkpoint = auto3dseg_checkpoint(path)
        if checkpoint:
            return _auto3dseg_record(checkpoint)
        raise ModelFileError(f"{path} is a folder but neither a MONAI bundle (configs/inference.json and models/model.pt) "
                             "nor an Auto3DSeg model folder (model.pt, in it or in a subfolder beside labels.csv)")
    data = read_weights_file(path, "starting model")
    if isinstance(data, dict) and data.get("format") == "cpcl-segment-model":
        record = load_model(path)
        record["starting_point"] = {"kind": "cpcl-segment", "path": path}
        return record
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and "state_dict" in data:
        return _auto3dseg_record(path, data)
    raise ModelFileError(f"{path} is not a starting model CPCLSegment can read: a CPCLSegment model file, an Auto3DSeg "
                         "segresnet checkpoint (with 'state_dict' and 'config') or a MONAI bundle folder")


def _auto3dseg_record(path: str, data: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    data = read_weights_file(path, "Auto3DSeg checkpoint") if data is None else data
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict) or not isinstance(data.get("state_dict"), dict):
        raise ModelFileError(f"{path} is not an Auto3DSeg checkpoint (no 'state_dict' and 'config')")
    config = data["config"]
    net = config.get("network")
    if not isinstance(net, dict):
        raise ModelFileError(f"{path}: its config has no network section")
    allowed_name(net.get("_target_"), path)
    sigmoid = bool(config.get("sigmoid", False))
    layout = "ras" if config.get("orientation_ras", False) else "xyz"
    out_channels = net.get("out_channels", config.get("output_classes"))
    if not isinstance(out_channels, int) or isinstance(out_channels, bool) or out_channels < 1:
        raise ModelFileError(f"{path}: its network's out_channels is {out_channels!r}, not a whole number")
    rows = _auto3dseg_rows(path, config, out_channels, sigmoid)
    spec = make_spec(net.get("_target_"), net, max(out_channels, 2), net.get("in_channels", 1) or 1, 1, layout, path)
    spacing = config.get("resample_resolution")
    return _record(path, "auto3dseg", spec, rows, adapt_state(spec, data["state_dict"], path),
                   _auto3dseg_normalization(path, config),
                   [float(v) for v in spacing] if isinstance(spacing, (list, tuple)) and len(spacing) == 3 else None,
                   config.get("roi_size"), {"sigmoid": sigmoid, "modality": config.get("modality")})


def _auto3dseg_rows(path: str, config: Dict[str, Any], out_channels: int, sigmoid: bool) -> List[Dict[str, Any]]:
    """The model's segments and the output channel of each (softmax: channel = label value, 0 background;
    sigmoid: one channel per segment, no background)."""
    labels = os.path.join(os.path.dirname(os.path.abspath(path)), "labels.csv")
    if os.path.isfile(labels):
        named = read_labels_csv(labels)
    else:
        names = config.get("class_names") or []
        index = config.get("class_index") or []
        named = []
        for i, name in enumerate(names):
            value = index[i][0] if i < len(index) and isinstance(index[i], list) and index[i] else (
                index[i] if i < len(index) and isinstance(index[i], int) else i + 1)
            named.append((int(value), str(name)))
    rows = [] if sigmoid else [{"name": "background", "label_value": 0, "row": 0}]
    for i, (value, name) in enumerate(sorted(named)):
        row = i if sigmoid else (value if not config.get("class_index") else i + 1)
        if 0 <= row < out_channels and value != 0:
            rows.append({"name": name, "label_value": value, "row": row})
    if len(rows) < (1 if sigmoid else 2):
        rows += [{"name": f"Label {r}", "label_value": r, "row": r} for r in range(1, out_channels)]
    return rows


def _auto3dseg_normalization(path: str, config: Dict[str, Any]) -> Dict[str, Any]:
    """Auto3DSeg's ``normalize_mode`` as a normalisation dict (``intensity.normalize``)."""
    mode = config.get("normalize_mode") or ("range" if str(config.get("modality", "")).lower() == "ct" else "meanstd")
    if mode in ("range", "ct"):
        lo, hi = config.get("intensity_bounds") or [-250, 250]
        return {"scheme": "range", "low": float(lo), "high": float(hi), "out_low": -1.0, "out_high": 1.0, "clip": False,
                "sigmoid": True}
    if mode in ("meanstd", "mri"):
        return {"scheme": "zscore", "nonzero": True}
    if mode == "meanstdtanh":
        return {"scheme": "zscore", "nonzero": True, "tanh": 3.0}
    if mode == "pet":
        return {"scheme": "pet"}
    if mode == "none":
        return {"scheme": "none"}
    raise ModelFileError(f"{path}: unknown normalize_mode {mode!r}")


def _record(path, kind, spec, rows, state, normalization, spacing, roi, extra) -> Dict[str, Any]:
    multiple = build_network(dict(spec, num_classes=max(spec["num_classes"], 2))).size_multiple
    patch = None
    if isinstance(roi, (list, tuple)) and len(roi) == 3 and all(isinstance(v, int) for v in roi):
        zyx = list(roi)[::-1] if spec["layout"] != "zyx" else list(roi)
        patch = [max(multiple, int(v) // multiple * multiple) for v in zyx]
    return {"format": "cpcl-segment-model", "network": spec, "classes": rows, "spacing": spacing, "orientation": "LPS",
            "normalization": normalization, "patch_size": patch, "weights": {"teacher": state, "student": state},
            "training": {"iterations": 0}, "starting_point": dict(kind=kind, path=path, **extra)}


def _bundle_record(folder: str) -> Dict[str, Any]:
    conf_path = next(os.path.join(folder, "configs", c) for c in BUNDLE_CONFIGS if os.path.isfile(os.path.join(folder, "configs", c)))
    config = _read_config(conf_path)
    net = config.get("network_def")
    if not isinstance(net, dict):
        raise ModelFileError(f"{conf_path} has no network_def section")
    allowed_name(net.get("_target_"), conf_path)  # before anything else is read from it
    net = {k: _literal(v, config, conf_path, f"network_def.{k}") if k != "_target_" else v for k, v in net.items()}
    weights = os.path.join(folder, "models", "model.pt")
    state = read_weights_file(weights, "bundle weights")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ModelFileError(f"{weights} holds no state dict")
    pre = _transforms(config.get("preprocessing"))
    layout = "ras" if any(_name(t) == "Orientationd" and str(t.get("axcodes", "")).upper() == "RAS" for t in pre) else "xyz"
    out_channels = net.get("out_channels")
    if not isinstance(out_channels, int) or out_channels < 2:
        raise ModelFileError(f"{conf_path}: network_def's out_channels must be a whole number >= 2 (softmax segmentation)")
    spec = make_spec(net.get("_target_"), net, out_channels, net.get("in_channels", 1) or 1, 1, layout, conf_path)
    rows = _bundle_rows(folder, out_channels)
    spacing, normalization = _bundle_preprocessing(pre, config, conf_path)
    roi = _literal(config.get("inferer", {}).get("roi_size") if isinstance(config.get("inferer"), dict) else None,
                   config, conf_path, "inferer.roi_size")
    return _record(folder, "bundle", spec, rows, adapt_state(spec, state, weights), normalization, spacing, roi, {})


def _read_config(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith(".json"):
            data = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} is not valid JSON")))
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # OSError, JSON / YAML syntax
        raise ModelFileError(f"{path} cannot be read: {e}") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path} is not a mapping of settings")
    return data


def _literal(value: Any, config: Dict[str, Any], source: str, where: str, depth: int = 0) -> Any:
    """A configuration value with plain ``@name`` references to top-level values replaced (never evaluated)."""
    if isinstance(value, str) and re.fullmatch(r"@[A-Za-z_][A-Za-z0-9_]*", value) and depth < 5:
        if value[1:] not in config:
            raise BackboneError(f"{source}: {where} refers to {value}, which the file does not define")
        return _literal(config[value[1:]], config, source, where, depth + 1)
    if isinstance(value, list):
        return [_literal(v, config, source, where, depth) for v in value]
    return value


def _transforms(pre: Any) -> List[Dict[str, Any]]:
    if isinstance(pre, dict):
        pre = pre.get("transforms", [])
    return [t for t in pre if isinstance(t, dict)] if isinstance(pre, list) else []


def _name(transform: Dict[str, Any]) -> str:
    return str(transform.get("_target_", "")).rsplit(".", 1)[-1]


def _bundle_preprocessing(pre: List[Dict[str, Any]], config, source: str) -> Tuple[Optional[List[float]], Dict[str, Any]]:
    """Target spacing and intensity normalisation from a bundle's literal transform settings."""
    spacing, norm = None, None
    for t in pre:
        values = {k: _literal(v, config, source, f"{_name(t)}.{k}") for k, v in t.items()}
        if _name(t) == "Spacingd" and isinstance(values.get("pixdim"), list) and len(values["pixdim"]) == 3:
            spacing = [float(v) for v in values["pixdim"]]
        elif _name(t) == "ScaleIntensityRanged":
            try:
                norm = {"scheme": "range", "low": float(values["a_min"]), "high": float(values["a_max"]),
                        "out_low": float(values.get("b_min", 0.0)), "out_high": float(values.get("b_max", 1.0)),
                        "clip": bool(values.get("clip", False)), "sigmoid": False}
            except (KeyError, TypeError, ValueError):
                raise ModelFileError(f"{source}: ScaleIntensityRanged's a_min / a_max are not plain numbers") from None
        elif _name(t) == "NormalizeIntensityd":
            norm = {"scheme": "zscore", "nonzero": bool(values.get("nonzero", False))}
    return spacing, norm or {"scheme": "zscore"}


def _bundle_rows(folder: str, out_channels: int) -> List[Dict[str, Any]]:
    meta = os.path.join(folder, "configs", "metadata.json")
    channels: Dict[str, Any] = {}
    if os.path.isfile(meta):
        data = _read_config(meta)
        channels = (((data.get("network_data_format") or {}).get("outputs") or {}).get("pred") or {}).get("channel_def") or {}
    rows = []
    for r in range(out_channels):
        name = channels.get(str(r), "background" if r == 0 else f"Label {r}")
        rows.append({"name": "background" if r == 0 else str(name), "label_value": r, "row": r})
    return rows


# ------------------------------------------------------------------------------------ segments and weights

PALETTE = ([0.9, 0.6, 0.2], [0.3, 0.7, 0.9], [0.6, 0.9, 0.3], [0.9, 0.3, 0.6], [0.6, 0.4, 0.9], [0.9, 0.9, 0.4])


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def model_segments(record: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The starting model's segments with the output channel (``row``) of each; background first when it has one."""
    return [dict(c, row=c.get("row", i)) for i, c in enumerate(record["classes"])]


def match_segments(rows: List[Dict[str, Any]], classes: List[Dict[str, Any]]) -> List[Optional[int]]:
    """For each of the run's classes, the starting model's output channel for it, or None (a new segment).

    Segments match by name (case, spaces and punctuation ignored: "Left Kidney" = "left_kidney"); a segment named
    only by its label value (a label map's "Label 3") matches the model's segment with that label value."""
    by_name = {_key(r["name"]): r["row"] for r in rows}
    by_value = {r.get("label_value"): r["row"] for r in rows if _key(r["name"]) != "background"}
    out: List[Optional[int]] = []
    for i, c in enumerate(classes):
        row = by_name.get("background" if i == 0 else _key(c["name"]))
        if row is None and i > 0 and re.fullmatch(r"label\d+", _key(c["name"])):
            row = by_value.get(c.get("label_value"))
        out.append(row)
    return out


def _adopt_network(record: Dict[str, Any], init_path: str, cfg, overrides: Optional[Dict[str, Any]]) -> None:
    """The starting model's network settings into ``cfg`` (``overrides``: what the user asked for explicitly)."""
    net_cfg = record["network"]
    if net_cfg.get("in_channels", 1) != 1:
        raise InputError(f"starting model {init_path} expects {net_cfg.get('in_channels')} input channels; CPCLSegment trains on 1")
    if "backbone" in net_cfg:
        asked = {k: v for k, v in (overrides or {}).items() if k in ("width", "depth", "norm")}
        if asked:
            raise InputError(f"starting model {init_path} is a {net_cfg['backbone']}: its network is fixed, so "
                             f"{', '.join('--' + k for k in asked)} cannot be changed")
        net = build_network(dict(net_cfg))
        cfg.backbone = {k: v for k, v in net_cfg.items() if k not in ("num_classes", "in_channels")}
        cfg.depth, cfg.feature_level = net.depth, net.feature_level
        cfg.width = max(1, net.feature_channels >> net.feature_level)
        return
    diffs = [f"{k}: model {net_cfg.get(k)} vs requested {v}" for k, v in (overrides or {}).items() if k in net_cfg and net_cfg[k] != v]
    if diffs:
        raise InputError(f"starting model {init_path} does not match the requested network: " + "; ".join(diffs))
    for k in ("width", "depth", "norm", "feature_level"):
        setattr(cfg, k, net_cfg[k])
    cfg.dropout = net_cfg.get("dropout", cfg.dropout)
    cfg.backbone = None


def kept_segments(rows: List[Dict[str, Any]], matched: List[Optional[int]], classes: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The starting model's segments the run does not have, as extra classes (new label values after the run's)."""
    used = {r for r in matched if r is not None}
    next_value = max(int(c.get("label_value", i)) for i, c in enumerate(classes)) + 1
    extra = []
    for r in rows:
        if r["row"] in used or _key(r["name"]) == "background":
            continue
        extra.append({"name": r["name"], "color": list(r.get("color") or PALETTE[len(extra) % len(PALETTE)]),
                      "label_value": next_value, "model_row": r["row"]})
        next_value += 1
    return extra


def starting_state(record: Dict[str, Any], init_path: str, classes: List[Dict[str, Any]], cfg,
                   overrides: Optional[Dict[str, Any]], emit: Emit) -> Dict[str, Any]:
    """Checks a starting model (``--init``) against the run and returns the weights to start from:
    ``{"student", "teacher" (None: a new EMA), "iterations", "classes", "summary"}`` (``summary``: what is kept, for
    the run's summary). Its network settings are copied into
    ``cfg``; its segments are matched to ``classes`` by name (``match_segments``): matched ones keep their output
    channel, new ones get a freshly initialised one, and with ``cfg.keep_model_segments`` its other segments are
    kept as extra classes (``classes`` in the result is then longer than the run's)."""
    _adopt_network(record, init_path, cfg, overrides)
    _say_preprocessing(record, init_path, emit)
    rows = model_segments(record)
    matched = match_segments(rows, classes)
    extra = kept_segments(rows, matched, classes) if cfg.keep_model_segments else []
    all_classes = list(classes) + [{k: v for k, v in c.items() if k != "model_row"} for c in extra]
    matched = matched + [c["model_row"] for c in extra]
    teacher = record["weights"]["teacher"]
    student = record["weights"].get("student") or teacher
    same = matched == list(range(len(rows))) and len(rows) == len(all_classes)
    if same:
        summary = f"{init_path}: same segments, continuing from its weights"
        emit({"event": "info", "message": f"fine-tuning {summary}"})
        return {"student": student, "teacher": teacher, "classes": all_classes, "summary": summary,
                "iterations": int((record.get("training") or {}).get("iterations") or 0)}
    torch.manual_seed(cfg.seed)
    fresh = build_network(cfg.network_config(len(all_classes)))
    state = fresh.state_dict()
    head = set(fresh.head_parameters())
    for k, v in student.items():
        if k in state and k not in head:
            if state[k].shape != v.shape:
                raise ModelFileError(f"{init_path}: its weight {k} has shape {tuple(v.shape)}, the network expects {tuple(state[k].shape)}")
            state[k] = v
    for k in head:
        for i, row in enumerate(matched):
            if row is not None and k in student and row < student[k].shape[0]:
                state[k][i] = student[k][row]
    summary = _say_segments(init_path, rows, all_classes, matched, len(classes), emit)
    return {"student": state, "teacher": None, "classes": all_classes, "iterations": 0, "summary": summary}


def _say_segments(init_path: str, rows, classes, matched, n_run: int, emit: Emit) -> str:
    """Says which segments come from the model and which are new; returns it for the run's summary."""
    names = [c["name"] for c in classes]
    kept = [n for n, r in zip(names[1:], matched[1:]) if r is not None]
    new = [n for n, r in zip(names[1:n_run], matched[1:n_run]) if r is None]
    dropped = [r["name"] for r in rows if r["row"] not in set(matched) and _key(r["name"]) != "background"]
    parts = [f"segments from the model: {kept or 'none'}", f"new segments (new output channels): {new or 'none'}"]
    if len(classes) > n_run:
        parts.append(f"kept from the model besides yours: {names[n_run:]}")
    if dropped:
        parts.append(f"the model's other segments, not kept: {dropped[:20]}{' ...' if len(dropped) > 20 else ''} "
                     "(--keep-model-segments keeps them)")
    emit({"event": "warning" if new else "info", "message": f"fine-tuning {init_path}: " + "; ".join(parts)})
    return f"{init_path}: " + "; ".join(parts)


def _say_preprocessing(record: Dict[str, Any], init_path: str, emit: Emit) -> None:
    point = record.get("starting_point") or {}
    if point.get("kind") in (None, "cpcl-segment"):
        return
    spacing = record.get("spacing")
    emit({"event": "info", "message": f"starting model {init_path} ({point['kind']}, {record['network']['backbone']}): "
          f"its preprocessing is adopted: spacing {spacing if spacing else 'each image its own'} mm, "
          f"intensity normalisation {describe_normalization(record['normalization'])}"})


def describe_normalization(norm: Dict[str, Any]) -> str:
    """One line saying what a normalisation dict does."""
    s = norm.get("scheme")
    if s == "range":
        out = (f"[{norm['low']:g}, {norm['high']:g}] -> [{norm['out_low']:g}, {norm['out_high']:g}]"
               + (" clipped" if norm.get("clip") else "") + (" then sigmoid" if norm.get("sigmoid") else ""))
        return out
    if s == "zscore":
        return "z-score" + (" of the non-zero voxels" if norm.get("nonzero") else "") + (" then 3·tanh(x/3)" if norm.get("tanh") else "")
    if s == "ct":
        return f"CT clip {norm['clip']} then z-score"
    return str(s)
