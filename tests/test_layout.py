"""The layout rules of docs/architecture.md, checked on the source: no import circle (imports
inside functions included), dependencies pointing down the flow, small modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ensembles", "backbones", "data_pipeline", "experiments", "benchmarks")
# inside ensembles, top to bottom: a room may import only rooms below it
ROOMS = ("research", "api", "inference", "training", "report", "evaluate", "bundle", "combine",
         "config")
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """Project modules `path` imports anywhere in its body (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from pkg import sub` depends on the submodule; `from mod import name` on mod
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known
                     else node.module for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found - {module_name(path)}


GRAPH = {name: imports(path, set(modules())) for name, path in modules().items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path of modules, or None (a package's __init__ importing its own
    submodules is not a circle unless a submodule imports the package back)."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if node.startswith(dep + "."):       # a submodule importing its package's name
                continue
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep] if dep in path else path + [dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "ensembles" or len(parts) < 2:
        return None
    return parts[1]


def test_no_import_circle():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


def test_find_cycle_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_packages_depend_down_the_flow():
    order = ["experiments", "ensembles", "backbones", "data_pipeline"]
    bad = [(m, d) for m, deps in GRAPH.items() for d in deps
           if m.split(".")[0] in order and d.split(".")[0] in order
           and order.index(d.split(".")[0]) < order.index(m.split(".")[0])]
    assert not bad, bad


def test_nothing_imports_experiments():
    bad = [(m, d) for m, deps in GRAPH.items() for d in deps
           if d.startswith("experiments") and not m.startswith("experiments")]
    assert not bad, bad


@pytest.mark.parametrize("name", ["combine", "evaluate", "report"])
def test_combination_evaluation_and_report_never_import_the_engine(name):
    bad = [(m, d) for m, deps in GRAPH.items() if room(m) == name for d in deps
           if d.startswith("backbones.training")]
    assert not bad, bad


def test_rooms_of_ensembles_import_only_rooms_below():
    bad = []
    for m, deps in GRAPH.items():
        here = room(m)
        for d in deps:
            there = room(d)
            if here in ROOMS and there in ROOMS and ROOMS.index(there) < ROOMS.index(here):
                bad.append((m, d))
    assert not bad, bad


def test_no_module_is_over_the_line_limit():
    long = {str(p.relative_to(ROOT)): n for pkg in ("ensembles", "backbones", "data_pipeline")
            for p in (ROOT / pkg).rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
