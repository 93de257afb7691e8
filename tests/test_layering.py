"""Imports point one way: ops -> processor -> data/models -> analysis -> report -> cli (bench beside the CLI).

Every ``import`` and ``from ... import`` in ``diffcirc/**/*.py`` (also those inside functions; relative
ones resolved) is checked against the layer table below, and nothing imports a private (``_name``)
module or name of another layer; scripts under ``benchmarks/`` import nothing private of diffcirc.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# layer -> the layers it may import (its own included). "root" is the package itself (its version,
# and ``import diffcirc`` giving the op); "base" the shared writer, error types and memory measure.
ALLOWED = {
    "base": {"base"},
    "root": {"base", "root", "ops"},
    "ops": {"base", "root", "ops"},
    "processor": {"base", "root", "ops", "processor"},
    "data": {"base", "root", "data"},
    "models": {"base", "root", "data", "models"},
    "analysis": {"base", "root", "processor", "data", "models", "analysis"},
    "report": {"base", "root", "data", "analysis", "report"},
    "bench": {"base", "root", "ops", "processor", "data", "models", "analysis", "bench"},
    "cli": {"base", "root", "ops", "processor", "data", "models", "analysis", "report", "bench", "cli"},
}
TOP_LEVEL = {"errors": "base", "files": "base", "memory": "base", "_C": "ops", "info": "cli", "__main__": "cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name: str) -> str:
    parts = name.split(".")
    top = ROOT / "diffcirc" / parts[1] if len(parts) > 1 else None
    if top is None or not (top.is_dir() or top.with_suffix(".py").exists() or parts[1] == "_C"):
        return "root"  # the package itself or a name it defines (__version__)
    layer = TOP_LEVEL.get(parts[1], parts[1])
    assert layer in ALLOWED, f"{name}: no layer for diffcirc.{parts[1]} (add it to this test's table)"
    return layer


def imported_names(path: Path):
    """(line, dotted name) of every module or name the file imports, relative imports resolved."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            yield from ((node.lineno, f"{base}.{a.name}") for a in node.names)


def is_private(name: str) -> bool:
    return any(p.startswith("_") and not p.startswith("__") for p in name.split(".")[1:])


def test_imports_point_one_way_and_nothing_private_crosses_a_layer():
    wrong = []
    for path in sorted((ROOT / "diffcirc").rglob("*.py")):
        here = layer_of(module_name(path))
        for line, name in imported_names(path):
            if name.split(".")[0] != "diffcirc":
                continue
            there = layer_of(name)
            if there not in ALLOWED[here] or (is_private(name) and there != here):
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({here}) imports {name} ({there})")
    assert not wrong, "\n".join(wrong)


def test_benchmark_scripts_import_nothing_private():
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {name}"
             for path in sorted((ROOT / "benchmarks").rglob("*.py"))
             for line, name in imported_names(path) if name.split(".")[0] == "diffcirc" and is_private(name)]
    assert not wrong, "\n".join(wrong)
