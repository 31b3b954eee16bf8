""""Start from": what a training run fine-tunes (the engine's ``--init``), chosen in the panel.

The choices (``PanelStart.start_choices``): nothing (random weights), a model in the scene, a file (a CPCLSegment
model file or an Auto3DSeg checkpoint), a folder (a MONAI bundle or an Auto3DSeg model folder), or one of the
MONAIAuto3DSeg models found on this computer (``CPCLSegmentLib.localmodels.find_auto3dseg_models``: name,
modality, segments; listed torch-free, looked for once, nothing downloaded). The choice is kept in the parameter
node (``START_KEY``; a scene model as the ``START_MODEL_ROLE`` reference) and becomes the run's ``init``
(``start_init``): the model node, or the file / folder path, which ``LogicCore`` hands to ``--init``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

from CPCLSegmentLib.errors import InputError
from CPCLSegmentLib.localmodels import find_auto3dseg_models

from .modellist import model_rows

START_KEY, START_MODEL_ROLE = "StartFrom", "StartModel"
NONE, FILE, FOLDER, NODE, AUTO3DSEG = "none", "file", "folder", "node", "auto3dseg"
# ctkPathLineEdit::Filter (CTK Libs/Widgets/ctkPathLineEdit.h): Dirs 0x001, Files 0x002, Readable 0x010
PATH_FILTERS = {FILE: 0x002 | 0x010, FOLDER: 0x001 | 0x010}
SHOWN_SEGMENTS = 8


def _segments_text(names: List[str]) -> str:
    shown = ", ".join(names[:SHOWN_SEGMENTS])
    return shown + (f" and {len(names) - SHOWN_SEGMENTS} more" if len(names) > SHOWN_SEGMENTS else "")


def choice_rows(models: List[Dict[str, Any]], local: List[Dict[str, Any]]) -> List[Tuple[str, str]]:
    """(key, label) of every starting point: nothing, each scene model (``model_rows``), each local MONAIAuto3DSeg
    model (``find_auto3dseg_models``), a file, a folder. Keys: ``none``, ``node:<ID>``, ``auto3dseg:<folder>``,
    ``file``, ``folder``."""
    rows = [(NONE, "Nothing (random weights)")]
    rows += [(f"{NODE}:{m['node'].GetID()}", f"Model in the scene: {m['name']}") for m in models]
    rows += [(f"{AUTO3DSEG}:{m['path']}", f"MONAIAuto3DSeg: {m['name']} ({m.get('modality') or 'modality not given'}, "
              f"{len(m.get('segments') or [])} segments)") for m in local]
    rows += [(FILE, "A model file (CPCLSegment, Auto3DSeg checkpoint)…"), (FOLDER, "A model folder (MONAI bundle, Auto3DSeg)…")]
    return rows


class PanelStart:
    """The "Start from" choice for ``panel.PanelController`` (uses ``scene``, ``node``, ``setting`` and
    ``set_setting``). ``auto3dseg_root``: where MONAIAuto3DSeg keeps its models (None: its default folder)."""

    scene: Any
    node: Any
    auto3dseg_root: Optional[str] = None
    _local_models: Optional[List[Dict[str, Any]]] = None

    def local_models(self) -> List[Dict[str, Any]]:
        """The MONAIAuto3DSeg models on this computer (looked for once; ``find_local_models`` looks again)."""
        if self._local_models is None:
            self.find_local_models()
        return list(self._local_models or [])

    def find_local_models(self) -> List[Dict[str, Any]]:
        self._local_models = find_auto3dseg_models(self.auto3dseg_root)
        return list(self._local_models)

    def start_choices(self) -> List[Tuple[str, str]]:
        return choice_rows(model_rows(self.scene), self.local_models())

    def start_from(self) -> str:
        """The chosen key (one of ``start_choices``); a scene model that was deleted falls back to nothing. A panel
        saved before this choice existed starts from its file setting when that is set."""
        key = self.node.GetParameter(START_KEY) or (FILE if self.setting("init") else NONE)  # type: ignore[attr-defined]
        if key == NODE:
            model = self.node.GetNodeReference(START_MODEL_ROLE)
            return f"{NODE}:{model.GetID()}" if model is not None else NONE
        return key

    def set_start_from(self, key: str) -> None:
        if key not in [k for k, _ in self.start_choices()]:
            raise InputError(f"'{key}' is not a starting point the panel offers")
        node = self.node
        was = node.StartModify()
        kind = key.split(":", 1)[0]
        node.SetParameter(START_KEY, NODE if kind == NODE else key)
        node.SetNodeReferenceID(START_MODEL_ROLE, key.split(":", 1)[1] if kind == NODE else None)
        node.EndModify(was)

    def start_init(self) -> Any:
        """The run's ``init``: None, the scene's model node, or the file / folder path (checked now)."""
        key = self.start_from()
        kind, _, rest = key.partition(":")
        if kind == NONE:
            return None
        if kind == NODE:
            return self.node.GetNodeReference(START_MODEL_ROLE)
        if kind == AUTO3DSEG:
            if not os.path.isdir(rest):
                raise InputError(f"the MONAIAuto3DSeg model folder {rest} is gone: choose another starting point")
            return rest
        path = str(self.setting("init") or "")  # type: ignore[attr-defined]
        exists = os.path.isdir(path) if kind == FOLDER else os.path.isfile(path)
        if not exists:
            what = "folder" if kind == FOLDER else "file"
            raise InputError(f"Start from: choose the starting model's {what}" + (f" ({path} is not one)" if path else ""))
        return path

    def start_display(self) -> Dict[str, Dict[str, Any]]:
        """What the panel shows for the choice: the path field (for a file or folder), its filter, the
        description of the chosen model, and whether the model's other segments can be kept."""
        key = self.start_from()
        kind, _, rest = key.partition(":")
        info = ""
        if kind == AUTO3DSEG:
            model = next((m for m in self.local_models() if m["path"] == rest), None)
            if model is not None:
                info = f"{model.get('modality') or 'modality not given'}; segments: {_segments_text(model.get('segments') or [])}"
        elif kind == NODE:
            row = next((r for r in model_rows(self.scene) if r["node"].GetID() == rest), None)
            info = f"segments: {_segments_text(row['segments'])}" if row is not None else ""
        elif kind == NONE:
            info = "random weights"
        return {"visible": {"initModelPathLineEdit": kind in (FILE, FOLDER)},
                "enabled": {"keepModelSegmentsCheckBox": kind != NONE},
                "text": {"startFromInfoLabel": info},
                "filters": {"initModelPathLineEdit": PATH_FILTERS.get(kind, PATH_FILTERS[FILE])},
                "start_rows": self.start_choices(), "start_from": key}
