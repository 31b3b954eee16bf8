"""The MONAIAuto3DSeg models already on this computer, listed without torch (the Slicer panel's process never
imports it) and without downloading anything.

The MONAIAuto3DSeg extension (``MONAIAuto3DSegLib/model_database.py``) unpacks each model into
``~/.MONAIAuto3DSeg/models/<model id>/`` and uses the folder that holds ``labels.csv`` (columns ``LabelValue``,
``Name``, terminology codes) beside the Auto3DSeg checkpoint ``model.pt``. The modality is the checkpoint's
``config["modality"]``: it is found by scanning the opcodes of the checkpoint's pickle (``pickletools.genops``,
which reads and never executes), so listing never loads the weights.
"""

from __future__ import annotations

import csv
import os
import pickletools
import zipfile
from typing import Any, Dict, List, Optional, Tuple

from .errors import ModelFileError

AUTO3DSEG_HOME = os.path.join(os.path.expanduser("~"), ".MONAIAuto3DSeg", "models")
_STRINGS = ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8")


def find_auto3dseg_models(root: Optional[str] = None) -> List[Dict[str, Any]]:
    """``[{"name", "path", "modality", "segments"}]`` of the MONAIAuto3DSeg models under ``root`` (default
    ``~/.MONAIAuto3DSeg/models``), sorted by name: ``path`` is the folder to give ``--init``; ``modality`` is
    "CT", "MRI", ... or None when the checkpoint does not say; ``segments`` the names in ``labels.csv``. A model
    folder without ``labels.csv`` and ``model.pt`` (an interrupted download) is skipped."""
    root = AUTO3DSEG_HOME if root is None else str(root)
    found: List[Dict[str, Any]] = []
    if not os.path.isdir(root):
        return found
    for name in sorted(os.listdir(root)):
        checkpoint = auto3dseg_checkpoint(os.path.join(root, name), need_labels=True)
        if checkpoint is None:
            continue
        folder = os.path.dirname(checkpoint)
        try:
            segments = [n for _v, n in sorted(read_labels_csv(os.path.join(folder, "labels.csv")))]
        except ModelFileError:
            continue
        found.append({"name": name, "path": folder, "modality": checkpoint_modality(checkpoint), "segments": segments})
    return found


def auto3dseg_checkpoint(folder: str, need_labels: bool = False) -> Optional[str]:
    """The ``model.pt`` of a MONAIAuto3DSeg model folder: the first (in name order) beside a ``labels.csv``, as the
    extension finds it, else (unless ``need_labels``) the first ``model.pt``; None when there is none."""
    fallback = None
    for here, dirs, files in os.walk(folder):
        dirs.sort()
        if "model.pt" in files:
            if "labels.csv" in files:
                return os.path.join(here, "model.pt")
            fallback = fallback or os.path.join(here, "model.pt")
    return None if need_labels else fallback


def read_labels_csv(path: str) -> List[Tuple[int, str]]:
    """(label value, name) of a MONAIAuto3DSeg ``labels.csv`` (columns ``LabelValue``, ``Name``), background left out."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return [(int(r["LabelValue"]), r["Name"].strip()) for r in rows if (r.get("LabelValue") or "").strip() not in ("", "0")]
    except (OSError, KeyError, ValueError, AttributeError, UnicodeDecodeError, csv.Error) as e:
        raise ModelFileError(f"{path} is not a readable labels.csv (LabelValue, Name columns): {e}") from None


def checkpoint_modality(path: str) -> Optional[str]:
    """``config["modality"]`` of an Auto3DSeg checkpoint, upper-case, or None: the text that follows the key
    "modality" among the strings of the checkpoint's pickle (read as opcodes, never executed)."""
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl is None or z.getinfo(pkl).file_size > 64 * 2**20:
                return None
            data = z.read(pkl)
        strings = [arg for op, arg, _pos in pickletools.genops(data) if op.name in _STRINGS]
    except Exception:  # not a zip, a damaged pickle: listed without a modality
        return None
    for key, value in zip(strings, strings[1:]):
        if key == "modality" and value and len(value) < 20:
            return value.upper()
    return None
