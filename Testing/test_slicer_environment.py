"""What the Slicer GUI process knows about its Python without importing torch (issue 15, item 6): package versions
from metadata checked against ``Resources/requirements.txt``, devices from a child process, and the install
decisions (a declined or failed install is an error, never ignored)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CPCLSegment"))

from CPCLSegmentModuleLib import environment  # noqa: E402  (no slicer needed: environment imports neither slicer nor torch)
from CPCLSegmentModuleLib.environment import DependencyError, Requirement  # noqa: E402

from conftest import child_env  # noqa: E402


def test_entering_the_module_does_not_import_torch_and_the_child_reports_the_device(tmp_path):
    """What the panel does on entry (``start_probe`` and the first views), in a fresh process: torch is never
    imported there, yet the Compute line names the child's PyTorch build."""
    pytest.importorskip("slicer", reason="slicer-core is not installed (Python >= 3.10)")
    code = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import slicer
slicer.mrmlScene = slicer.vtkMRMLScene()
from CPCLSegmentModuleLib import panel
from CPCLSegmentModuleLib.logic import LogicCore
c = panel.PanelController(LogicCore(slicer.mrmlScene, work_root=sys.argv[2]))
c.start_probe()
first = c.view().text["backendLabel"]
deadline = time.time() + 120
while c.busy("probe") and time.time() < deadline:
    c.poll()
    c.view()
    time.sleep(0.05)
print(json.dumps({"torch_imported": "torch" in sys.modules, "first": first, "backend": c.view().text["backendLabel"], "probe": c.probe,
                  "problems": [str(p) for p in c.problems]}))
"""
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "CPCLSegment"), str(tmp_path)], capture_output=True, text=True,
                         env=child_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["torch_imported"] is False
    assert "checking" in result["first"]
    import torch

    assert result["probe"]["torch"]["version"] == torch.__version__
    if not torch.cuda.is_available():
        assert result["backend"].startswith("Compute: CPU (")
    assert result["problems"] == []  # this environment meets requirements.txt


def test_requirements_txt_is_the_one_list_and_agrees_with_pyproject():
    reqs = {r.name.lower(): r.specifier for r in environment.load_requirements()}
    assert reqs["torch"].startswith(">=") and set(reqs) >= {"torch", "monai", "slicerio", "pynrrd", "psutil", "pyyaml", "tqdm"}
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml")
    with open(ROOT / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    engine = {}
    for d in deps:
        r = environment.load_requirements_from_lines([d])[0]
        engine[r.name.lower()] = r.specifier
    for name, spec in reqs.items():
        assert engine.get(name) == spec, f"{name}: requirements.txt says {spec!r}, pyproject.toml {engine.get(name)!r}"


@pytest.mark.parametrize("version, spec, ok", [
    ("2.5.1+cu121", ">=2.1", True), ("2.0.1", ">=2.1", False), ("2.1", ">=2.1", True), ("1.4.0", ">=1.3,<2", True),
    ("2.0.0", ">=1.3,<2", False), ("1.3.0rc1", ">=1.3", True), ("5.9.8", ">=5.8", True), ("0.9", "", True),
    ("1.4.2", "~=1.4.0", True), ("1.5.0", "~=1.4.0", False), ("3.0", "!=3.0", False), ("6.0.1", "==6.0.1", True),
])
def test_versions_are_compared_with_the_ranges(version, spec, ok):
    assert environment.satisfies(version, spec) is ok


def test_missing_and_too_old_packages_are_named():
    reqs = [Requirement("torch", ">=2.1"), Requirement("monai", ">=1.3,<2"), Requirement("tqdm", ">=4.60")]
    problems = environment.check_requirements(reqs, {"torch": "2.0.1", "monai": None, "tqdm": "4.66.1"})
    assert [str(p) for p in problems] == ["torch 2.0.1 is installed but CPCLSegment needs torch>=2.1",
                                          "monai is not installed (needs monai>=1.3,<2)"]


class FakeInstaller(environment.Installer):
    def __init__(self, versions, confirm=True, torch_ok=True, pip_error=None, installs=True):
        self.versions, self.answer, self.torch_ok, self.pip_error, self.installs = versions, confirm, torch_ok, pip_error, installs
        self.calls = []

    def confirm(self, text):
        self.calls.append(("confirm", text.split("\n")[0]))
        return self.answer

    def install_torch(self, requirement):
        self.calls.append(("torch", requirement))
        if self.torch_ok and self.installs:
            self.versions["torch"] = "2.5.0"
        return self.torch_ok

    def install_packages(self, requirements, ask):
        self.calls.append(("pip", requirements, ask))
        if self.pip_error:
            raise self.pip_error
        if self.installs:
            for r in requirements:
                self.versions[r.split(">")[0].split("<")[0].split("=")[0]] = "9.9"


REQS = [Requirement("torch", ">=2.1"), Requirement("monai", ">=1.3,<20")]


def ensure(installer, ask=True):
    environment.ensure_dependencies(installer, ask=ask, requirements=REQS, versions=lambda: dict(installer.versions))


def test_install_decisions():
    ok = FakeInstaller({"torch": "2.3.0", "monai": "1.4.0"})
    ensure(ok)
    assert ok.calls == []  # nothing to do, nothing asked

    declined = FakeInstaller({"torch": None, "monai": "1.4.0"}, confirm=False)
    with pytest.raises(DependencyError, match="PyTorch is not installed \\(installation declined\\)"):
        ensure(declined)
    assert [c[0] for c in declined.calls] == ["confirm"]  # asked, and nothing was installed

    declined_in_pytorchutils = FakeInstaller({"torch": None, "monai": "1.4.0"}, torch_ok=False)
    with pytest.raises(DependencyError, match="declined"):
        ensure(declined_in_pytorchutils)

    old = FakeInstaller({"torch": "2.0.1", "monai": "1.4.0"})
    with pytest.raises(DependencyError, match="torch 2.0.1 is installed but CPCLSegment needs torch>=2.1.*PyTorch Util"):
        ensure(old)
    assert old.calls == []  # an old torch is not replaced behind the user's back

    pip_declined = FakeInstaller({"torch": "2.3.0", "monai": None}, pip_error=RuntimeError("User declined installation"))
    with pytest.raises(DependencyError, match="monai>=1.3,<20 were not installed: User declined"):
        ensure(pip_declined)  # slicer.packaging.pip_ensure raises RuntimeError when declined (Slicer >= 5.12)

    fresh = FakeInstaller({"torch": None, "monai": None})
    ensure(fresh, ask=False)
    assert fresh.calls == [("torch", ">=2.1"), ("pip", ["monai>=1.3,<20"], False)]  # the range from requirements.txt

    broken = FakeInstaller({"torch": None, "monai": None}, installs=False)
    with pytest.raises(DependencyError, match="still missing after installing"):
        ensure(broken)


def test_the_compute_line_comes_from_the_child_s_report():
    describe = environment.describe_backend
    assert describe(None) == ("checking…", None)
    assert describe({"torch": {"version": "2.5.0", "cuda_build": "12.4", "threads": 8, "cuda": [{"name": "RTX 3070", "memory_gb": 8.0}]},
                     "nvidia": []})[0] == "CUDA GPU: RTX 3070 (8 GB)"
    assert describe({"torch": {"version": "2.5.0", "threads": 8, "cuda": [], "mps": True}})[0] == "Apple GPU (MPS)"
    text, warning = describe({"torch": {"version": "2.5.0+cpu", "cuda_build": None, "threads": 4, "cuda": [], "mps": False},
                              "nvidia": [{"name": "RTX 4090", "memory_gb": 24.0}]})
    assert text == "CPU (4 threads)" and "RTX 4090" in warning and "CPU-only build" in warning and "PyTorch Util" in warning
    text, warning = describe({"torch": {"error": "ModuleNotFoundError: No module named 'torch'"}, "nvidia": None})
    assert text == "PyTorch is not installed" and "Install dependencies" in warning
    problem = environment.Problem(Requirement("monai", ">=1.3,<2"), None)
    assert describe({"torch": {"version": "2.5.0", "threads": 2, "cuda": []}}, [problem]) == \
        ("CPU (2 threads)", "monai is not installed (needs monai>=1.3,<2)")
