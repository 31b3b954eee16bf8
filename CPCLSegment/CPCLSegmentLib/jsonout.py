"""Strict JSON for everything the tool writes (progress lines, run records): a NaN or infinite number, which
Python's ``json`` would write as the bare words ``NaN`` / ``Infinity`` that strict parsers reject, is written as
``null`` ("no value"), and ``allow_nan=False`` guarantees nothing else slips through."""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (also numpy's and 0-d arrays') replaced by None, recursively through
    dicts, lists and tuples; numpy numbers become Python numbers; anything else unknown becomes its text."""
    if isinstance(value, dict):
        return {str(k): finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(value, "ndim", 0) == 0:
        return finite_or_none(item())
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return finite_or_none(tolist())
    return str(value)


def strict_json(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``finite_or_none(value)`` with ``allow_nan=False``: always strict JSON."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)
