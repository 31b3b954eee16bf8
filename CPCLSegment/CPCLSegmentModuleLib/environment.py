"""What the Slicer GUI process may know about the Python environment without importing torch.

Entering the module must not import torch nor touch ``torch.cuda`` in Slicer's process: a CUDA context made
there would hold GPU memory the training child needs for as long as Slicer runs, and the first import freezes
the panel for seconds. So:

- **Versions** come from package metadata (``importlib.metadata``: nothing is imported) and are compared with
  the ranges in ``Resources/requirements.txt``, the one list of what the module needs (PyTorch included:
  it is installed through the PyTorch extension with that range, the others with ``pip``).
- **Devices** come from a child process (``python -m CPCLSegmentLib.childinfo probe``, the same Python that runs
  training): the PyTorch build, CUDA / MPS devices and ``nvidia-smi``'s GPUs; ``describe_backend`` turns
  that into the panel's "Compute:" line.
- **Installing** (``ensure_dependencies``) asks before anything is downloaded and raises
  ``DependencyError`` when the user declines or an install fails, so no job starts without its packages.
  The Slicer-specific installers (PyTorchUtils, ``slicer.packaging.pip_ensure``, ``slicer.util.pip_install``)
  are passed in (``CPCLSegmentAppLib/installer.py``), so the decisions are tested without Slicer.

No ``slicer``, ``qt``, ``vtk`` or ``torch`` import here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from CPCLSegmentLib.errors import CPCLError
from CPCLSegmentLib.childinfo import installed_versions

REQUIREMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Resources", "requirements.txt")
TORCH = "torch"
# Never pip-installed as a side effect (torch comes from the PyTorch extension; Slicer owns its SimpleITK / numpy).
SKIP_PACKAGES = ["torch", "SimpleITK", "numpy"]


class DependencyError(CPCLError):
    """A package CPCLSegment needs is missing or too old and was not installed (declined or failed)."""


@dataclass
class Requirement:
    name: str  # distribution name, as pip knows it
    specifier: str  # e.g. ">=1.3,<2" ("" for any version)

    def __str__(self) -> str:
        return self.name + self.specifier


def load_requirements(path: str = REQUIREMENTS) -> List[Requirement]:
    """``name<spec>`` lines (comments, blank lines and pip options skipped), like ``slicer.packaging.load_requirements``."""
    with open(path, encoding="utf-8") as f:
        return load_requirements_from_lines(f, path)


def load_requirements_from_lines(lines: Sequence[str], where: str = "requirements") -> List[Requirement]:
    out = []
    for line in lines:
        line = line.split("#", 1)[0].split(";", 1)[0].strip()  # comments and environment markers
        if not line or line.startswith("-"):
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$", line)
        if not m:
            raise ValueError(f"{where}: cannot read requirement {line!r}")
        out.append(Requirement(m.group(1), m.group(2).replace(" ", "")))
    return out


def _release(version: str) -> Tuple[int, ...]:
    """The release numbers of a version ("2.5.1+cu121" -> (2, 5, 1); "1.4.0rc1" -> (1, 4, 0))."""
    nums = []
    for part in version.split("+", 1)[0].split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        nums.append(int(m.group(0)))
        if m.group(0) != part:
            break
    return tuple(nums)


def _cmp(a: Tuple[int, ...], b: Tuple[int, ...]) -> int:
    n = max(len(a), len(b))
    a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
    return (a > b) - (a < b)


def satisfies(version: str, specifier: str) -> bool:
    """Whether ``version`` meets every clause of ``specifier`` (``>=``, ``>``, ``<=``, ``<``, ``==``, ``!=``,
    ``~=``; release numbers only, which is all requirements.txt uses)."""
    have = _release(version)
    for clause in filter(None, specifier.split(",")):
        m = re.match(r"^(~=|==|!=|>=|<=|>|<)(.+)$", clause.strip())
        if not m:
            raise ValueError(f"cannot read version clause {clause!r}")
        op, want_text = m.groups()
        want = _release(want_text)
        c = _cmp(have, want)
        ok = {">=": c >= 0, ">": c > 0, "<=": c <= 0, "<": c < 0, "==": c == 0, "!=": c != 0}.get(op)
        if op == "~=":
            ok = c >= 0 and _cmp(have[: len(want) - 1], want[:-1]) == 0
        if not ok:
            return False
    return True


@dataclass
class Problem:
    requirement: Requirement
    installed: Optional[str]  # None: not installed

    def __str__(self) -> str:
        if self.installed is None:
            return f"{self.requirement.name} is not installed (needs {self.requirement})"
        return f"{self.requirement.name} {self.installed} is installed but CPCLSegment needs {self.requirement}"


def check_requirements(requirements: Optional[Sequence[Requirement]] = None,
                       versions: Optional[Dict[str, Optional[str]]] = None) -> List[Problem]:
    """Missing or out-of-range packages (from metadata: nothing is imported). ``versions``: installed
    versions by name (default: this Python's)."""
    requirements = list(requirements if requirements is not None else load_requirements())
    if versions is None:
        versions = installed_versions([r.name for r in requirements])
    problems = []
    for r in requirements:
        v = versions.get(r.name)
        if v is None or (r.specifier and not satisfies(v, r.specifier)):
            problems.append(Problem(r, v))
    return problems


def torch_requirement(requirements: Optional[Sequence[Requirement]] = None) -> Requirement:
    for r in requirements if requirements is not None else load_requirements():
        if r.name.lower() == TORCH:
            return r
    raise ValueError("Resources/requirements.txt lists no torch requirement")


# --------------------------------------------------------------------------------------- installing


class Installer:
    """What installing needs from Slicer (``CPCLSegment.SlicerInstaller`` implements it there)."""

    def confirm(self, text: str) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def install_torch(self, requirement: str) -> bool:  # pragma: no cover - interface
        """Installs PyTorch through the PyTorch extension; False when the user declined there."""
        raise NotImplementedError

    def install_packages(self, requirements: List[str], ask: bool) -> None:  # pragma: no cover - interface
        """pip-installs (torch never as a dependency); raises when declined or failed."""
        raise NotImplementedError


def ensure_dependencies(installer: Installer, ask: bool = True, requirements: Optional[Sequence[Requirement]] = None,
                        versions: Optional[Callable[[], Dict[str, Optional[str]]]] = None) -> None:
    """Installs what is missing or too old, asking first (``ask``). Raises ``DependencyError`` when the user
    declines, an installation fails, or PyTorch is too old (the PyTorch extension updates it, not us)."""
    requirements = list(requirements if requirements is not None else load_requirements())
    current = versions or (lambda: installed_versions([r.name for r in requirements]))
    problems = check_requirements(requirements, current())
    if not problems:
        return
    torch_problem = next((p for p in problems if p.requirement.name.lower() == TORCH), None)
    if torch_problem is not None:
        if torch_problem.installed is not None:
            raise DependencyError(f"{torch_problem}: update PyTorch in the 'PyTorch Util' module (Uninstall, restart Slicer, "
                                  "then Install), then restart Slicer")
        if ask and not installer.confirm(
                "CPCLSegment needs PyTorch, which is not installed yet. It is a large download (up to a few GB, with GPU support "
                "when an NVIDIA GPU is present) and takes several minutes.\n\nInstall PyTorch now?"):
            raise DependencyError("PyTorch is not installed (installation declined); CPCLSegment cannot train or segment without it")
        try:
            accepted = installer.install_torch(torch_problem.requirement.specifier)
        except DependencyError:
            raise
        except Exception as e:
            raise DependencyError(f"PyTorch could not be installed: {e}") from None
        if not accepted:
            raise DependencyError("PyTorch is not installed (installation declined); CPCLSegment cannot train or segment without it")
    others = [str(p.requirement) for p in problems if p.requirement.name.lower() != TORCH]
    if others:
        try:
            installer.install_packages(others, ask)
        except DependencyError:
            raise
        except Exception as e:  # slicer.packaging.pip_ensure raises RuntimeError when declined
            raise DependencyError(f"the Python packages {', '.join(others)} were not installed: {e}") from None
    left = check_requirements(requirements, current())
    if left:
        raise DependencyError("still missing after installing: " + "; ".join(str(p) for p in left)
                              + (" (restart Slicer if an installation asked for it)" if any(p.installed for p in left) else ""))


# ------------------------------------------------------------------------------------------ devices


def describe_backend(probe: Optional[Dict[str, Any]], problems: Sequence[Problem] = ()) -> Tuple[str, Optional[str]]:
    """(where training will run, a warning or None) from the child's ``probe`` (``childinfo.probe_environment``)
    and the requirement ``problems``. ``probe`` None: still asking."""
    missing = [p for p in problems]
    warning = "; ".join(str(p) for p in missing) or None
    if probe is None:
        return "checking…", warning
    if probe.get("error"):
        return "unknown", f"the environment check failed: {probe['error']}"
    torch_info = probe.get("torch") or {}
    nvidia = probe.get("nvidia") or []
    if torch_info.get("error"):
        return "PyTorch is not installed", warning or f"PyTorch cannot be imported ({torch_info['error']}): click 'Install dependencies…'"
    threads = torch_info.get("threads")
    cpu = f"CPU ({threads} threads)" if threads else "CPU"
    if torch_info.get("cuda"):
        gpus = ", ".join(f"{g['name']} ({g['memory_gb']:.0f} GB)" for g in torch_info["cuda"])
        return f"CUDA GPU: {gpus}", warning
    if torch_info.get("mps"):
        return "Apple GPU (MPS)", warning
    if torch_info.get("gpu_error"):
        return cpu, f"the GPU could not be queried: {torch_info['gpu_error']}"
    if nvidia:
        build = "a CPU-only build" if not torch_info.get("cuda_build") else f"built for CUDA {torch_info['cuda_build']}"
        gpu_names = ", ".join(g["name"] for g in nvidia)
        text = (f"an NVIDIA GPU ({gpu_names}) is present but PyTorch ({torch_info.get('version')}, {build}) cannot use it: reinstall "
                "PyTorch with CUDA support in the 'PyTorch Util' module (or update the NVIDIA driver)")
        return cpu, "; ".join(filter(None, [warning, text]))
    return cpu, warning
