"""The engine's module map (``CPCLSegmentLib/__init__.py``'s docstring) is true: every module is listed, each
imports exactly the engine modules its entry names and only modules listed above it, and every public name
an entry names lives in that module."""

import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "CPCLSegment" / "CPCLSegmentLib"
_PACKAGE_CONSTANTS = {"__version__", "MODEL_FORMAT", "MODEL_FORMAT_VERSION"}


def module_map():
    """[(module, public names, listed imports)] in the docstring's order."""
    doc = ast.get_docstring(ast.parse((ENGINE / "__init__.py").read_text(encoding="utf-8")))
    out = []
    for entry in re.split(r"\n- ", doc)[1:]:
        entry = " ".join(entry.split())
        name = re.match(r"``(\w+)``:", entry).group(1)
        body, imports = entry.split("imports:")
        listed = set() if imports.strip() == "none." else {m.strip(" .") for m in imports.split(",")}
        names = [n for n in re.findall(r"``(\w+)``", body) if n != name]
        out.append((name, names, listed))
    return out


def engine_imports(path: Path):
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                deps.add(node.module.split(".")[0])
            else:
                deps.update(a.name for a in node.names if a.name not in _PACKAGE_CONSTANTS)
    return deps


def test_every_engine_module_is_in_the_map_once():
    listed = [m for m, _, _ in module_map()]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(p.stem for p in ENGINE.glob("*.py") if p.stem != "__init__")


def test_each_module_imports_what_its_entry_says_and_only_modules_above_it():
    above = set()
    for module, _, listed in module_map():
        actual = engine_imports(ENGINE / f"{module}.py")
        assert actual == listed, f"{module} imports {sorted(actual)}; the map in __init__.py says {sorted(listed)}"
        assert actual <= above, f"{module} imports {sorted(actual - above)}, listed below it"
        above.add(module)


def test_every_public_name_in_the_map_lives_in_its_module():
    for module, names, _ in module_map():
        mod = importlib.import_module(f"CPCLSegmentLib.{module}")
        missing = [n for n in names if not hasattr(mod, n)]
        assert not missing, f"__init__.py says {missing} live in {module}"
