"""The panel's settings, stored in the parameter node by name: TrainConfig fields and the run options that apply
to the panel (both in ``CPCLSegmentLib/settings.py``). The widget binds any widget whose ``cpclSetting`` property
names one, so a new TrainConfig field or panel run option reaches the engine by adding a widget, with no code here."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from CPCLSegmentLib import settings
from CPCLSegmentLib.errors import InputError

from .options import DEFAULT_MINUTES

# Where the panel's default differs from the engine's (the engine's minutes is None: iterations decide).
PANEL_DEFAULTS = {"minutes": DEFAULT_MINUTES}


def panel_options() -> Dict[str, Dict[str, Any]]:
    """The run options the panel has (``settings.RunOptions`` fields that apply to ``"panel"``): name -> metadata."""
    return dict(settings.run_options("panel"))


def setting_names() -> List[str]:
    """Every setting the panel stores: its run options, then the TrainConfig fields."""
    return list(panel_options()) + settings.setting_names()


class PanelSettings:
    """Setting access for ``panel.PanelController`` (uses ``node``, ``_json`` and ``_set_json`` of ``PanelState``)."""

    node: Any

    @staticmethod
    def is_setting(name: str) -> bool:
        return name in panel_options() or name in settings.setting_names()

    @staticmethod
    def default(name: str) -> Any:
        if name in panel_options():
            return settings.run_option_defaults("panel")[name]
        if name in PANEL_DEFAULTS:
            return PANEL_DEFAULTS[name]
        value = settings.default_settings()[name]
        if name in _xyz_settings() and value is not None:
            return list(reversed(value))
        return value

    @staticmethod
    def choices(name: str) -> Optional[Sequence[str]]:
        options = panel_options()
        meta = options[name] if name in options else settings.TrainConfig.__dataclass_fields__[name].metadata
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
        return {n: self.setting(n) for n in setting_names() if node.GetParameter(f"Setting.{n}")}

    def train_values(self) -> Dict[str, Any]:
        """The keyword settings ``LogicCore.train`` gets from the panel: the run options the module has too (an
        empty text: None), the training length (minutes or iterations) and every TrainConfig setting the user changed."""
        stored = self.stored_settings()
        values: Dict[str, Any] = {k: v for k, v in stored.items() if k in settings.setting_names() and k not in ("minutes", "iterations")}
        for name, meta in panel_options().items():
            if "module" in meta["applies"]:
                value = self.setting(name)
                values[name] = None if value == "" else value
        if self.setting("length_mode") == "iterations":
            values["iterations"] = int(self.setting("iterations"))
        else:
            values["minutes"] = float(self.setting("minutes"))
        return values


def _xyz_settings() -> List[str]:
    return [name for name, meta in settings.cli_settings() if meta.get("xyz")]
