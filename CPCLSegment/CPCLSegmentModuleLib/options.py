"""The module's run options and the ``--config`` mapping it gives the engine.

The module's run options are the ``settings.RunOptions`` fields that apply to ``"module"`` (``module_settings``);
everything else a caller passes must be a TrainConfig field (``CPCLSegmentLib/settings.py``) and goes to the
engine as ``--config``. The child gets each run option the command line also has by its flag (``option_args``)."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from CPCLSegmentLib import settings
from CPCLSegmentLib.errors import InputError


def module_settings() -> Dict[str, Any]:
    """The module's run options and their defaults (``settings.RunOptions`` fields that apply to ``"module"``):
    the device, the starting model, the target spacing, the meaning of a missing segment, hold-out validation,
    the supervised-only comparison, the overlap order and the preprocessing cache folder."""
    return settings.run_option_defaults("module")


# "Train for N minutes" is what the panel and the console do unless iterations are asked for.
DEFAULT_MINUTES = 10.0


def split_settings(values: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(module settings, TrainConfig settings)`` of a caller's keyword settings; any other name is an
    ``InputError`` listing the known ones. Module settings win where a name is both (``device``)."""
    names, module = set(settings.setting_names()), module_settings()
    unknown = sorted(k for k in values if k not in module and k not in names)
    if unknown:
        raise InputError(f"unknown training setting(s): {', '.join(unknown)} (module settings: {', '.join(module)}; "
                         f"engine settings: {', '.join(settings.setting_names())})")
    config = {k: v for k, v in values.items() if k not in module}
    module.update({k: v for k, v in values.items() if k in module})
    return module, config


def option_args(module: Dict[str, Any]) -> List[str]:
    """The ``cpcl-segment train`` flags of the module's run options that the command line has too: a true option
    gives its flag, a value its flag and value(s) (floats exact); False, None and the default are left out."""
    defaults = settings.run_option_defaults("module")
    args: List[str] = []
    for name, meta in settings.run_options("module"):
        value = module.get(name)
        if "cli" not in meta["applies"] or value is None or value is False or value == defaults[name]:
            continue
        args.append(meta["flag"])
        if value is not True:
            args += [_arg_text(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return args


def _arg_text(value: Any) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def compares_supervised(module: Dict[str, Any], config: Dict[str, Any], unlabeled: Sequence[Any]) -> bool:
    """Whether a training run also trains supervised-only and keeps the better model (``--compare-supervised``):
    asked for, a case held out to compare on, unlabeled volumes, and a semi-supervised method."""
    method = config.get("method", settings.default_settings().get("method"))
    return bool(module.get("compare_supervised") and module.get("hold_out_last") and list(unlabeled) and method != "supervised")


def train_config(values: Dict[str, Any]) -> Dict[str, Any]:
    """The ``--config`` mapping for the engine from TrainConfig settings given by name (console keywords, the
    panel's widgets): values equal to the default are left out, fields whose CLI flag takes X Y Z (``xyz``
    metadata) are given as X Y Z here (all zero or None: planned) and stored (D, H, W). Without
    ``iterations`` the run is planned in minutes (``DEFAULT_MINUTES`` unless ``minutes`` is given).
    Validated with ``TrainConfig.from_dict(...).validate()``: an invalid value is an ``InputError`` naming it."""
    fields = {name: meta for name, meta in ((f, settings.TrainConfig.__dataclass_fields__[f].metadata) for f in settings.setting_names())}
    defaults = settings.default_settings()
    out: Dict[str, Any] = {}
    for name, value in values.items():
        if name not in fields:
            raise InputError(f"unknown training setting {name!r} (known: {', '.join(fields)})")
        if fields[name].get("xyz"):
            if value is None or not any(value):
                continue
            value = [int(v) for v in reversed(list(value))]
        if isinstance(value, tuple):
            value = list(value)
        default = defaults.get(name)
        if value == default and type(value) is type(default):
            continue
        out[name] = value
    if out.get("minutes") is None and "iterations" not in out and values.get("iterations") is None:
        out["minutes"] = DEFAULT_MINUTES
    if out.get("minutes") is None:
        out.pop("minutes", None)
    settings.TrainConfig.from_dict(out).validate()
    return out
