"""The panel's settings, stored in the parameter node by name: TrainConfig fields (``CPCLSegmentLib/settings.py``)
plus the panel's own (``PANEL_SETTINGS``). The widget binds any widget whose ``cpclSetting`` property names one,
so a new TrainConfig field reaches the engine by adding a widget, with no code here."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from CPCLSegmentLib import settings
from CPCLSegmentLib.errors import InputError

from .options import DEFAULT_MINUTES, DEVICES

LENGTH_MODES = ("minutes", "iterations")
# The panel's own settings (not TrainConfig fields): name -> (default, choices or None).
PANEL_SETTINGS: Dict[str, Tuple[Any, Optional[Sequence[str]]]] = {
    "device": ("auto", DEVICES),
    "init": ("", None),
    "length_mode": ("minutes", LENGTH_MODES),
    "partial_segments": (False, None),
    "hold_out_last": (False, None),
    "compare_supervised": (True, None),
    "later_wins": (False, None),
    "prefill": (False, None),
}
# Where the panel's default differs from the engine's (the engine's minutes is None: iterations decide).
PANEL_DEFAULTS = {"minutes": DEFAULT_MINUTES}


class PanelSettings:
    """Setting access for ``panel.PanelController`` (uses ``node``, ``_json`` and ``_set_json`` of ``PanelState``)."""

    node: Any

    @staticmethod
    def is_setting(name: str) -> bool:
        return name in PANEL_SETTINGS or name in settings.setting_names()

    @staticmethod
    def default(name: str) -> Any:
        if name in PANEL_SETTINGS:
            return PANEL_SETTINGS[name][0]
        if name in PANEL_DEFAULTS:
            return PANEL_DEFAULTS[name]
        value = settings.default_settings()[name]
        if name in _xyz_settings() and value is not None:
            return list(reversed(value))
        return value

    @staticmethod
    def choices(name: str) -> Optional[Sequence[str]]:
        if name in PANEL_SETTINGS:
            return PANEL_SETTINGS[name][1]
        meta = settings.TrainConfig.__dataclass_fields__[name].metadata
        return meta.get("choices")

    def setting(self, name: str) -> Any:
        if not self.is_setting(name):
            raise InputError(f"unknown setting {name!r}")
        return self._json(f"Setting.{name}", self.default(name))

    def set_setting(self, name: str, value: Any) -> None:
        if not self.is_setting(name):
            raise InputError(f"unknown setting {name!r}")
        choices = self.choices(name)
        if choices and value not in choices:
            raise InputError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
        self._set_json(f"Setting.{name}", value)

    def stored_settings(self) -> Dict[str, Any]:
        node = self.node
        names = list(PANEL_SETTINGS) + settings.setting_names()
        return {n: self.setting(n) for n in names if node.GetParameter(f"Setting.{n}")}

    def train_values(self) -> Dict[str, Any]:
        """The keyword settings ``LogicCore.train`` gets from the panel: module settings, the training length
        (minutes or iterations) and every TrainConfig setting the user changed."""
        stored = self.stored_settings()
        values: Dict[str, Any] = {k: v for k, v in stored.items() if k in settings.setting_names() and k not in ("minutes", "iterations")}
        for name in ("device", "partial_segments", "hold_out_last", "compare_supervised", "later_wins"):
            values[name] = self.setting(name)
        values["init"] = self.setting("init") or None
        if self.setting("length_mode") == "iterations":
            values["iterations"] = int(self.setting("iterations"))
        else:
            values["minutes"] = float(self.setting("minutes"))
        return values


def _xyz_settings() -> List[str]:
    return [name for name, meta in settings.cli_settings() if meta.get("xyz")]
