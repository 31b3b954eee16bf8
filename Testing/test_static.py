"""Static checks: the engine runs on Python 3.9 (Slicer 5.8) and never imports Slicer, Qt, VTK or CTK."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "CPCLSegment" / "CPCLSegmentLib"
MODULE_FILES = sorted((ROOT / "CPCLSegment").glob("*.py"))


def _vermin():
    exe = shutil.which("vermin") or str(Path(sys.executable).with_name("vermin"))
    return exe if Path(exe).exists() else None


@pytest.mark.skipif(_vermin() is None, reason="vermin is not installed (pip install -c constraints.txt -e .[test])")
def test_engine_and_module_need_at_most_python_3_9():
    files = [str(p) for p in sorted(ENGINE.glob("*.py"))] + [str(p) for p in MODULE_FILES]
    out = subprocess.run(
        [_vermin(), "--target=3.9-", "--violations", "--no-tips", "--eval-annotations", "--backport", "dataclasses", *files],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_engine_never_imports_slicer_qt_vtk_ctk():
    banned = {"slicer", "qt", "vtk", "ctk", "PythonQt"}
    for path in ENGINE.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module.split(".")[0]]
            assert not banned.intersection(names), f"{path.name} imports {names}"


def test_every_module_python_file_is_listed_in_cmake():
    cmake = (ROOT / "CPCLSegment" / "CMakeLists.txt").read_text(encoding="utf-8")
    for path in list(ENGINE.glob("*.py")) + MODULE_FILES:
        rel = path.relative_to(ROOT / "CPCLSegment").as_posix()
        assert rel in cmake, f"{rel} is not listed in CPCLSegment/CMakeLists.txt"
