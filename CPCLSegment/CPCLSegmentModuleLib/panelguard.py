"""What the panel holds back or asks first, without Qt or Slicer (the widget carries the answers out):

- **Typing is never overwritten** (``write_into_widget``): a refresh writes a setting into a widget only when the
  user is not editing it (it has no keyboard focus) and it does not show that value already, so typing 0.155 into a
  spin box or a path into the path field is never rewritten under the cursor.
"""

from __future__ import annotations

import math
from typing import Any


def same_value(shown: Any, wanted: Any) -> bool:
    """Whether a widget showing ``shown`` already shows ``wanted`` (numbers to 1e-9 relative: a spin box rounds)."""
    if isinstance(shown, bool) or isinstance(wanted, bool):
        return bool(shown) == bool(wanted)
    if isinstance(shown, (int, float)) and isinstance(wanted, (int, float)):
        return math.isclose(float(shown), float(wanted), rel_tol=1e-9, abs_tol=1e-12)
    return str(shown if shown is not None else "") == str(wanted if wanted is not None else "")


def write_into_widget(editing: bool, shown: Any, wanted: Any) -> bool:
    """Whether a refresh writes ``wanted`` into a setting widget that shows ``shown``: never into the widget the user
    is editing (``editing``: it or its line edit has keyboard focus), never when it shows that value already (writing
    the same value reformats a spin box's text and moves the cursor)."""
    return not editing and not same_value(shown, wanted)


def widget_value(value: Any, index: int, numeric: bool) -> Any:
    """The value one widget shows of a setting: the ``index``-th of a per-axis list; 0 / "" for an unset setting."""
    if isinstance(value, (list, tuple)):
        value = value[index] if index < len(value) else 0
    elif value is None:
        value = 0 if numeric else ""
    return value
