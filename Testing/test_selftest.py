"""The in-Slicer self-tests install the module's packages before anything imports them, in testing mode too: Slicer
5.12's ``slicer.packaging.pip_ensure`` skips every install while ``slicer.app.testingEnabled()`` unless told not to,
and a fresh Slicer has none of them. Checked on the source (the self-tests run only inside Slicer)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "CPCLSegment" / "CPCLSegmentAppLib"
SELFTEST, INSTALLER = APP / "selftest.py", APP / "installer.py"
GLUE_TEST = ROOT / "CPCLSegment" / "Testing" / "Python" / "CPCLSegmentGlueTest.py"


def required_packages():
    """Import names of what ``requirements.txt`` lists (the packages a fresh Slicer lacks)."""
    names = set()
    for line in (ROOT / "CPCLSegment" / "Resources" / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[<>=!~\[; ]", line)[0].strip().lower().replace("-", "_"))
    return names | {"nrrd", "yaml"}  # import names of pynrrd, pyyaml


def top_level_imports(tree):
    out = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0].lower() for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0].lower())
    return out


def test_the_self_tests_ensure_dependencies_first_and_import_no_package_at_module_level():
    heavy = required_packages()
    assert {"slicerio", "monai", "torch"} <= heavy
    for path, cls in ((SELFTEST, "CPCLSegmentTest"), (GLUE_TEST, "CPCLSegmentGlueTest")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert not top_level_imports(tree) & heavy, (path.name, top_level_imports(tree) & heavy)
        klass = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
        set_up = next(n for n in klass.body if isinstance(n, ast.FunctionDef) and n.name == "setUp")
        first = set_up.body[0]
        assert isinstance(first, ast.Expr) and isinstance(first.value, ast.Call), f"{cls}.setUp must first ensure the packages"
        assert getattr(first.value.func, "attr", "") == "ensureDependencies", f"{cls}.setUp starts with {ast.unparse(first)}"
        assert any(k.arg == "ask" for k in first.value.keywords)  # no dialog in a test run


def test_pip_ensure_installs_in_testing_mode_too():
    tree = ast.parse(INSTALLER.read_text(encoding="utf-8"))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "pip_ensure"]
    assert calls, "the installer uses slicer.packaging.pip_ensure on Slicer >= 5.12"
    for call in calls:
        skip = [k for k in call.keywords if k.arg == "skip_in_testing"]
        assert skip and isinstance(skip[0].value, ast.Constant) and skip[0].value.value is False


def test_the_docs_say_exactly_when_torch_enters_slicer_s_process():
    """The module never imports torch; the PyTorch extension's installer does, once it has installed it."""
    doc = (ROOT / "docs" / "slicer.md").read_text(encoding="utf-8")
    source = (ROOT / "CPCLSegment" / "CPCLSegment.py").read_text(encoding="utf-8")
    assert "never imports torch" not in source.lower() and "never imports pytorch into" not in doc.lower()
    assert "installTorch" in doc and "`import torch` in Slicer's process" in doc
    assert "installTorch`` imports it here" in source
