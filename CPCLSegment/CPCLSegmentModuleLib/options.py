"""The module's run options and the ``--config`` mapping it gives the engine.

Run options the module owns (not TrainConfig fields) are ``MODULE_SETTINGS``; everything else a caller passes
must be a TrainConfig field (``CPCLSegmentLib/settings.py``) and goes to the engine as ``--config``."""

from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

from CPCLSegmentLib import settings
from CPCLSegmentLib.errors import InputError


# Settings the module owns (not TrainConfig fields): which device, which starting model, the target spacing,
# the meaning of a missing segment, hold-out validation, the supervised-only comparison, the overlap order and
# the preprocessing cache folder (``cache_dir``; default: the engine's per-user folder or $CPCL_SEGMENT_CACHE_DIR).
# Everything else a caller passes must be a TrainConfig field (``CPCLSegmentLib/settings.py``) and goes to the
# engine as ``--config``. ``compare_supervised`` (on unless turned off) acts only with a held-out case and
# unlabeled volumes: the engine then also trains supervised-only and keeps the model that scores better on the
# held-out case, saying which, so a run where the unlabeled volumes do not help never silently keeps the worse
# model (BENCHMARKS.md: they do not help at every budget).
MODULE_SETTINGS: Dict[str, Any] = {"device": "auto", "init": None, "spacing": None, "partial_segments": False,
                                   "hold_out_last": False, "compare_supervised": True, "later_wins": False, "cache_dir": None}


DEVICES = ("auto", "cpu", "cuda", "mps")


# "Train for N minutes" is what the panel and the console do unless iterations are asked for.
DEFAULT_MINUTES = 10.0


def split_settings(values: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(module settings, TrainConfig settings)`` of a caller's keyword settings; any other name is an
    ``InputError`` listing the known ones. Module settings win where a name is both (``device``)."""
    names = set(settings.setting_names())
    unknown = sorted(k for k in values if k not in MODULE_SETTINGS and k not in names)
    if unknown:
        raise InputError(f"unknown training setting(s): {', '.join(unknown)} (module settings: {', '.join(MODULE_SETTINGS)}; "
                         f"engine settings: {', '.join(settings.setting_names())})")
    module = dict(MODULE_SETTINGS)
    module.update({k: v for k, v in values.items() if k in MODULE_SETTINGS})
    return module, {k: v for k, v in values.items() if k not in MODULE_SETTINGS}


def compares_supervised(module: Dict[str, Any], config: Dict[str, Any], unlabeled: Sequence[Any]) -> bool:
    """Whether a training run also trains supervised-only and keeps the better model (``--compare-supervised``):
    asked for (the default), a case held out to compare on, unlabeled volumes, and a semi-supervised method."""
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
