"""Imports run one way: no cycle among qtuning's modules (imports inside functions and under TYPE_CHECKING counted),
and the data layer imports nothing from the pruning layer."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "qtuning"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(name: str, path: Path) -> set[str]:
    """Every qtuning module ``name`` imports anywhere in its file, with the packages whose ``__init__`` that runs."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a relative import
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & MODULES.keys()
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return found - {name} - ancestors  # a package's own __init__ has run before any of its modules


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(GRAPH[name]):
            assert state.get(target) != 1, "import cycle: " + " -> ".join([*path[path.index(target) :], target])
            if target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_the_data_layer_imports_nothing_from_the_pruning_layer():
    for name, targets in GRAPH.items():
        if name.startswith("qtuning.data"):
            assert not {t for t in targets if t.startswith("qtuning.pruning")}, name


def test_imports_inside_functions_and_under_type_checking_count(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from qtuning.module import SFTModule\n"
        "def f():\n    from qtuning.pruning import base\n    from . import combo\n"
    )
    assert imported("qtuning.pruning.probe", source) == {
        "qtuning.module",
        "qtuning.pruning.base",
        "qtuning.pruning.combo",
    }
