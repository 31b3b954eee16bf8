"""Static checks: the engine and the module run on Python 3.9 (Slicer 5.8); the engine never imports Slicer, Qt,
VTK or CTK; the module folder has the layout Slicer's scripted-module loader expects; the Slicer GUI process
never imports torch."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "CPCLSegment" / "CPCLSegmentLib"
MODULE_LIB = ROOT / "CPCLSegment" / "CPCLSegmentModuleLib"
APP_LIB = ROOT / "CPCLSegment" / "CPCLSegmentAppLib"
TOP_LEVEL = sorted((ROOT / "CPCLSegment").glob("*.py"))
MODULE_FILES = TOP_LEVEL + sorted(MODULE_LIB.glob("*.py")) + sorted(APP_LIB.glob("*.py"))


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


def test_every_top_level_python_file_of_the_module_folder_defines_its_module_class():
    """Slicer's scripted-module factory takes every top-level .py of a module folder as a module
    (Base/QTGUI/qSlicerScriptedLoadableModuleFactory.cxx:196) and fails at each start with "class X was not
    found in file X.py" (Base/QTGUI/qSlicerScriptedLoadableModule.cxx:163) when it has no class named after
    the file, so helpers must live in packages."""
    assert TOP_LEVEL, "no module file"
    for path in TOP_LEVEL:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
        assert path.stem in classes, f"{path.name} defines no class {path.stem}: Slicer reports an error at every start"
        bases = {getattr(b, "id", getattr(b, "attr", "")) for b in classes[path.stem].bases}
        assert "ScriptedLoadableModule" in bases, f"class {path.stem} must derive from ScriptedLoadableModule"
    for package in (ENGINE, MODULE_LIB, APP_LIB):
        assert (package / "__init__.py").is_file(), f"{package.name} must be a package"


def test_the_slicer_gui_side_never_imports_torch():
    """The module file and its packages never import torch nor touch torch.cuda (the child process
    answers those questions), so no CUDA context lives in Slicer's process."""
    for path in MODULE_FILES:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module.split(".")[0]]
            assert "torch" not in names, f"{path.name} imports torch"
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "CPCLSegmentLib":
                engine = [node.module.split(".")[1]] if "." in node.module else [a.name for a in node.names]
                for name in engine:
                    assert name in TORCH_FREE_ENGINE_MODULES, f"{path.name} imports CPCLSegmentLib.{name}, which imports torch"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                assert not (node.attr == "cuda" and isinstance(node.value, ast.Name) and node.value.id == "torch"), \
                    f"{path.name}:{node.lineno} uses torch.cuda"
                assert node.attr != "mem_get_info", f"{path.name}:{node.lineno} calls mem_get_info"


# Engine modules the Slicer GUI process may import (no torch at import time).
# childinfo imports torch only inside its child-side functions; localmodels reads checkpoints as pickle opcodes
# (test_pretrained checks it imports no torch); test_the_engine_modules_the_slicer_side_imports_are_torch_free checks all
TORCH_FREE_ENGINE_MODULES = {"childinfo", "companions", "durations", "errors", "jobs", "localmodels", "settings", "writers"}


def test_module_actions_do_not_use_try_with_error_display():
    """slicer.util.tryWithErrorDisplay shows a dialog and re-raises, so an error in a Qt slot shows twice;
    the widget shows each action's error once (CPCLSegmentWidget._act)."""
    for path in TOP_LEVEL + sorted(APP_LIB.glob("*.py")):
        assert "tryWithErrorDisplay" not in path.read_text(encoding="utf-8"), path.name


def test_every_module_python_file_is_listed_in_cmake():
    cmake = (ROOT / "CPCLSegment" / "CMakeLists.txt").read_text(encoding="utf-8")
    for path in list(ENGINE.glob("*.py")) + MODULE_FILES:
        assert path.name != "CPCLSegmentLogicCore.py"
        rel = path.relative_to(ROOT / "CPCLSegment").as_posix()
        assert rel in cmake, f"{rel} is not listed in CPCLSegment/CMakeLists.txt"


def test_the_files_beside_a_model_are_named_in_companions_only():
    """The resume checkpoint, the run record and the output lock are named by ``CPCLSegmentLib/companions.py``;
    no other engine or Slicer-side file spells their suffixes out."""
    from CPCLSegmentLib import companions

    suffixes = {companions.CHECKPOINT_SUFFIX, companions.RUN_RECORD_SUFFIX, companions.LOCK_SUFFIX}
    for path in sorted(ENGINE.glob("*.py")) + MODULE_FILES:
        if path.name == "companions.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not any(node.value == s or node.value.endswith(s) and "/" not in node.value and " " not in node.value
                               for s in suffixes), f"{path.name}:{node.lineno} spells out {node.value!r}: use companions"


def test_the_engine_modules_the_slicer_side_imports_are_torch_free():
    """What ``TORCH_FREE_ENGINE_MODULES`` names really imports no torch (nor MONAI) when imported on its own."""
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, sys.argv[1]); import importlib\n"
            "for m in sys.argv[2:]: importlib.import_module('CPCLSegmentLib.' + m)\n"
            "print(sorted(k for k in ('torch', 'monai') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "CPCLSegment"), *sorted(TORCH_FREE_ENGINE_MODULES)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_node_attributes_are_named_in_one_place():
    """The ``CPCLSegment.*`` node attributes (and reference role) are constants of ``CPCLSegmentModuleLib/attributes.py``;
    no other file of the module spells one out."""
    import re

    for path in MODULE_FILES:
        if path.name == "attributes.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not re.fullmatch(r"CPCLSegment\.[A-Z]\w*", node.value), \
                    f"{path.name}:{node.lineno} spells out {node.value!r}: use attributes"
