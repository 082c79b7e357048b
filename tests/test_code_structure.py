"""The package's structure, checked from its source with the AST (no model, no native build): imports form no cycle
(function-level imports included), the runtime imports nothing above it, no module reaches into another module's
private names, and no module of runtime/, cli/, export/ or models/ is over 450 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[1]
# folder -> package, as pyproject.toml installs them
PACKAGES = {"ecso": "ecso", "runtime": "ecso.runtime", "cli": "ecso.cli", "server": "ecso.server",
            "eval": "ecso.eval", "export": "ecso.export", "models": "ecso.models"}
MAX_LINES = 450
SIZE_CHECKED = ("ecso", "runtime", "cli", "export", "models", "eval", "server")
# Cycles and oversized modules tolerated while being taken apart (none now); an entry that no longer applies fails
# the test, so the lists cannot go stale.
PENDING_CYCLES: set[frozenset] = set()
PENDING_SIZE: set[str] = set()


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package's __init__ under the package's own name)."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports(tree: ast.Module, name: str, known: set[str]) -> set[str]:
    """Modules of the package that `name` imports when it runs: module level and inside functions, not the
    `if TYPE_CHECKING:` blocks (never executed)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            for child in getattr(node, "orelse", []):
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = name.split(".")[: -node.level] if not name.endswith("__init__") else name.split(".")
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(ast.parse(path.read_text()), name, known) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    a = ast.parse("import ecso.b\n")
    b = ast.parse("def f():\n    from ecso import a\n")
    known = {"ecso.a", "ecso.b"}
    graph = {"ecso.a": imports(a, "ecso.a", known), "ecso.b": imports(b, "ecso.b", known)}
    assert cycles(graph) == [["ecso.a", "ecso.b"]]
    typed = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ecso.a\n")
    assert imports(typed, "ecso.b", known) == set()


def test_the_package_imports_form_no_cycle():
    found = [set(c) for c in cycles(import_graph())]
    unexpected = [sorted(c) for c in found if frozenset(c) not in PENDING_CYCLES]
    assert unexpected == [], f"import cycles (function-level imports count): {unexpected}"
    stale = [sorted(c) for c in PENDING_CYCLES if set(c) not in found]
    assert stale == [], f"these cycles are gone: remove them from PENDING_CYCLES: {stale}"


def test_the_runtime_imports_nothing_of_the_layers_above_it():
    above = ("ecso.models", "ecso.export", "ecso.eval", "ecso.cli", "ecso.server")
    graph = import_graph()
    bad = {m: sorted(d for d in deps if d.startswith(above))
           for m, deps in graph.items() if m.startswith("ecso.runtime")}
    assert {m: d for m, d in bad.items() if d} == {}


def private_reaches(tree: ast.Module) -> list[tuple[int, str]]:
    """`obj._name` where `obj` is not self / cls and `_name` is not defined in this module (as an attribute set on
    self, a function, class or module-level name), plus `from ecso... import _name`."""
    own: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            own.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            own.add(node.target.id)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if node.attr not in own:
                out.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ecso"):
            out.extend((node.lineno, f"from {node.module} import {a.name}") for a in node.names
                       if a.name.startswith("_") and not a.name.startswith("__"))
    return out


def test_the_private_access_check_flags_a_reach_into_another_object():
    tree = ast.parse("class A:\n    def f(self, e):\n        self._x = 1\n        return e._ctx, self._x, e._x\n"
                     "from ecso.runtime.engine import _public\n")
    assert sorted(text for _, text in private_reaches(tree)) == ["e._ctx", "from ecso.runtime.engine import _public"]


def test_no_module_reaches_into_another_modules_private_names():
    found = {f"{path.relative_to(REPO)}:{line}": text for path in modules().values()
             for line, text in private_reaches(ast.parse(path.read_text()))}
    assert found == {}


def test_no_module_of_the_package_is_over_450_lines():
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines())
             for folder in SIZE_CHECKED for p in (REPO / folder).glob("*.py")}
    assert {p: n for p, n in sizes.items() if n > MAX_LINES and p not in PENDING_SIZE} == {}
    assert [p for p in PENDING_SIZE if sizes.get(p, 0) <= MAX_LINES] == [], "remove it from PENDING_SIZE"
