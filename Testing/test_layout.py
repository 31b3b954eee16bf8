"""The module maps of the engine (``CPCLSegmentLib/__init__.py``'s docstring) and of the Slicer module's packages
(``CPCLSegmentModuleLib/__init__.py``, ``CPCLSegmentAppLib/__init__.py``) are true: every module is listed, each
imports exactly the package modules its entry names and only modules listed above it (so there are no cycles),
and every public name an entry names lives in that module. Every module of the packages stays within the size rules: at most 450 lines in the engine,
300 in the Slicer packages, no function over 70 lines; the module file itself is thin."""

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "CPCLSegment" / "CPCLSegmentLib"
MODULE_LIB = ROOT / "CPCLSegment" / "CPCLSegmentModuleLib"
APP_LIB = ROOT / "CPCLSegment" / "CPCLSegmentAppLib"
MODULE_FILE = ROOT / "CPCLSegment" / "CPCLSegment.py"
PACKAGES = [pytest.param(ENGINE, id="engine"), pytest.param(MODULE_LIB, id="slicer-package"),
            pytest.param(APP_LIB, id="slicer-app-package")]
MAX_LINES = {ENGINE: 450, MODULE_LIB: 300, APP_LIB: 300}
MAX_FUNCTION_LINES = 70
_PACKAGE_CONSTANTS = {"__version__", "MODEL_FORMAT", "MODEL_FORMAT_VERSION"}


def module_map(package=ENGINE):
    """[(module, public names, listed imports)] in the docstring's order."""
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text(encoding="utf-8")))
    out = []
    for entry in re.split(r"\n- ", doc)[1:]:
        entry = " ".join(entry.split())
        name = re.match(r"``(\w+)``:", entry).group(1)
        body, imports = entry.split("imports:")
        listed = set() if imports.strip() == "none." else {m.strip(" .") for m in imports.split(",")}
        names = [n for n in re.findall(r"``(\w+)``", body) if n != name]
        out.append((name, names, listed))
    return out


def package_imports(path: Path):
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                deps.add(node.module.split(".")[0])
            else:
                deps.update(a.name for a in node.names if a.name not in _PACKAGE_CONSTANTS)
    return deps


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_is_in_the_map_once(package):
    listed = [m for m, _, _ in module_map(package)]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(p.stem for p in package.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("package", PACKAGES)
def test_each_module_imports_what_its_entry_says_and_only_modules_above_it(package):
    above = set()
    for module, _, listed in module_map(package):
        actual = package_imports(package / f"{module}.py")
        assert actual == listed, f"{module} imports {sorted(actual)}; the map in __init__.py says {sorted(listed)}"
        assert actual <= above, f"{module} imports {sorted(actual - above)}, listed below it"
        above.add(module)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_in_the_map_lives_in_its_module(package):
    for module, names, _ in module_map(package):
        if package == APP_LIB:  # needs Slicer's application (qt): read its top-level definitions instead
            tree = ast.parse((package / f"{module}.py").read_text(encoding="utf-8"))
            defined = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
            missing = [n for n in names if n not in defined]
        else:
            mod = importlib.import_module(f"{package.name}.{module}")
            missing = [n for n in names if not hasattr(mod, n)]
        assert not missing, f"__init__.py says {missing} live in {module}"


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_and_functions_stay_small(package):
    """One concept per module: no module over its package's line limit, no function over 70 lines."""
    too_long = []
    for path in sorted(package.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_LINES[package]:
            too_long.append(f"{path.name}: {len(text.splitlines())} lines (limit {MAX_LINES[package]})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - min([node.lineno] + [d.lineno for d in node.decorator_list]) + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.name}:{node.lineno} {node.name}: {n} lines (limit {MAX_FUNCTION_LINES})")
    assert not too_long, "\n".join(too_long)


def test_the_module_file_is_thin():
    """``CPCLSegment.py`` holds the module class only; the logic, widget and self-test Slicer looks up by the module's
    name are imported from ``CPCLSegmentAppLib``, and its ``__all__`` names them."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    assert [n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))] == ["CPCLSegment"]
    assert len(MODULE_FILE.read_text(encoding="utf-8").splitlines()) <= 80
    imported = {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) and n.module
                and n.module.startswith("CPCLSegmentAppLib") for a in n.names}
    assert imported == {"CPCLSegmentLogic", "CPCLSegmentWidget", "CPCLSegmentTest"}
    exported = next(n.value for n in tree.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "__all__")
    assert sorted(ast.literal_eval(exported)) == sorted(imported | {"CPCLSegment"})
