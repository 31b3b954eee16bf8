"""What the panel holds back or asks first, without Qt or Slicer (the widget carries the answers out):

- **Typing is never overwritten** (``write_into_widget``): a refresh writes a setting into a widget only when the
  user is not editing it (it has no keyboard focus) and it does not show that value already, so typing 0.155 into a
  spin box or a path into the path field is never rewritten under the cursor.
- **Leaving with jobs running** (``leave_question``): Reload and application exit cancel the running training,
  segmentation or ranking; the panel asks first, and a "No" keeps the jobs and Slicer as they are.
- **Where "Save model..." opens** (``model_save_path``): the folder a model was last saved to or loaded from, else
  Slicer's default scene folder, else the user's documents, else the home folder; never the working directory.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

# Jobs that Reload / exit would end and that the user may want to keep (the device probe and a model-file check
# are short and restart by themselves).
LEAVE_KINDS = {"train": "a training", "segment": "a segmentation", "rank": "a ranking"}


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


@dataclass(frozen=True)
class LeaveQuestion:
    """A Yes / No question: ``yes`` goes on (the module's cleanup cancels the jobs), ``no`` keeps them and stays."""

    text: str
    yes: str
    no: str


def leave_question(running: Iterable[str], action: str) -> Optional[LeaveQuestion]:
    """The question to ask before ``action`` ("reload" or "exit") with the jobs of kinds ``running`` (e.g. from
    ``PanelController.jobs``), or None when nothing the user would lose runs."""
    kinds = [k for k in LEAVE_KINDS if k in set(running)]
    if not kinds:
        return None
    if action not in ("reload", "exit"):
        raise ValueError(f"action must be 'reload' or 'exit', not {action!r}")
    names = [LEAVE_KINDS[k] for k in kinds]
    what = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    lost = ("the model trained so far is lost (Stop keeps it)" if "train" in kinds
            else "its results are lost" if len(kinds) == 1 else "their results are lost")
    go = "Reloading the module" if action == "reload" else "Exiting Slicer"
    text = (f"{what[0].upper()}{what[1:]} {'is' if len(kinds) == 1 else 'are'} running. {go} cancels "
            f"{'it' if len(kinds) == 1 else 'them'}: {lost}.\n\nCancel and {action} now?")
    return LeaveQuestion(text, yes=f"cancel the jobs and {action}", no=f"keep the jobs running, do not {action}")


def model_save_path(model_name: str, folders: Sequence[Optional[str]]) -> str:
    """The path "Save model..." proposes: ``<model name>.pt`` in the first existing folder of ``folders`` (the last
    model folder, Slicer's default scene folder, the documents folder, in that order), else the home folder."""
    stem = re.sub(r"[^\w.+-]+", "-", model_name or "").strip("-.") or "cpcl-model"
    for folder in folders:
        if folder and os.path.isdir(os.path.expanduser(folder)):
            return os.path.join(os.path.abspath(os.path.expanduser(folder)), f"{stem}.pt")
    return os.path.join(os.path.expanduser("~"), f"{stem}.pt")
