"""The panel's package view, beside the Install button: what is installed in Slicer's Python and which versions the
module needs (``Resources/requirements.txt``), read from package metadata (nothing imported, torch included), with
the training process's Python and PyTorch build from the child's device report (``environment``'s facts)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import CPCLSegmentLib
from CPCLSegmentLib.childinfo import installed_versions

from .environment import TORCH, Requirement, load_requirements, satisfies

Row = Tuple[str, str, str, str]  # package, installed, needed, status


def package_rows(requirements: Sequence[Requirement], versions: Dict[str, Optional[str]],
                 probe: Optional[Dict[str, Any]]) -> List[Row]:
    """One row per requirement (installed version, the range needed, "ok" / "not installed" / "needs ..."), the
    PyTorch row with its build as the child sees it, then the training process's Python and the engine version."""
    torch_info = (probe or {}).get("torch") or {}
    rows: List[Row] = []
    for r in requirements:
        version = versions.get(r.name)
        if version is None:
            status = "not installed"
        else:
            status = "ok" if not r.specifier or satisfies(version, r.specifier) else f"needs {r.specifier}"
        shown = version or "—"
        if r.name.lower() == TORCH and version is not None and not torch_info.get("error") and probe is not None:
            build = f"CUDA {torch_info['cuda_build']}" if torch_info.get("cuda_build") else "CPU-only build"
            shown = f"{version} ({build})"
        rows.append((r.name, shown, r.specifier or "any", status))
    rows.append(("Python (training process)", str((probe or {}).get("python") or "checking…"), ">=3.9", ""))
    rows.append(("CPCLSegment engine", str(CPCLSegmentLib.__version__), "", ""))
    return rows


def summary(rows: Sequence[Row]) -> str:
    checked = [r for r in rows if r[3]]
    ok = sum(1 for r in checked if r[3] == "ok")
    return f"{ok} of {len(checked)} packages ready"


class PanelPackages:
    """The package view for ``panel.PanelController`` (uses ``probe``): shown on request; the versions are read
    again whenever a new device report arrives (after an install the panel probes again)."""

    probe: Optional[Dict[str, Any]]
    show_packages: bool = False
    _package_cache: Optional[Tuple[Any, List[Row]]] = None

    def toggle_packages(self, shown: Optional[bool] = None) -> None:
        self.show_packages = (not self.show_packages) if shown is None else bool(shown)
        self._package_cache = None

    def package_table(self) -> List[Row]:
        if self._package_cache is None or self._package_cache[0] is not self.probe:
            requirements = load_requirements()
            rows = package_rows(requirements, installed_versions([r.name for r in requirements]), self.probe)
            self._package_cache = (self.probe, rows)
        return list(self._package_cache[1])

    def packages_display(self) -> Dict[str, Any]:
        rows = self.package_table() if self.show_packages else []
        return {"visible": {"packagesTable": self.show_packages},
                "text": {"packagesButton": ("Hide packages" if self.show_packages else "Packages…")
                         + (f" ({summary(rows)})" if rows else "")},
                "package_rows": rows}
