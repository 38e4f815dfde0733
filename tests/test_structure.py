"""The package's layering (STYLE §11): no import cycle anywhere — imports inside functions
included — and no module imports another's private (underscore) names; the version in one
place, equal to pyproject's."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import weightcond

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "weightcond"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """``(module, imported name, line)`` for every import of a weightcond module by
    ``name``, at any depth of the file (functions, classes, ``if`` blocks)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("weightcond"):
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.append((full if full in modules else target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("weightcond"):
                    found.append((alias.name, "", node.lineno))
    return found


def test_no_import_cycle() -> None:
    modules = _modules()
    graph = {name: {m for m, _, _ in _imports(name, path, modules) if m in modules and m != name}
             for name, path in modules.items()}
    # depth-first search for a back edge; report the cycle it closes
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for succ in sorted(graph[node]):
            if state.get(succ) == 1:
                cycles.append([*stack[stack.index(succ):], succ])
            elif succ not in state:
                visit(succ)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_test_sees_a_cycle(tmp_path, monkeypatch) -> None:
    """The search above finds a cycle made of imports inside functions."""
    modules = {"weightcond.a": tmp_path / "a.py", "weightcond.b": tmp_path / "b.py"}
    modules["weightcond.a"].write_text("def f():\n    from .b import g\n")
    modules["weightcond.b"].write_text("from . import a\n")
    edges = {n: [m for m, _, _ in _imports(n, p, {**modules, "weightcond": tmp_path})]
             for n, p in modules.items()}
    assert edges == {"weightcond.a": ["weightcond.b"], "weightcond.b": ["weightcond.a"]}


def test_no_module_imports_private_names() -> None:
    modules = _modules()
    found = [f"{path.relative_to(ROOT)}:{line}: {target}.{imported}"
             for name, path in modules.items()
             for target, imported, line in _imports(name, path, modules)
             if imported.startswith("_") and not imported.startswith("__")]
    assert found == []


def test_one_version() -> None:
    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(),
                         re.MULTILINE)
    assert declared is not None and declared.group(1) == weightcond.__version__
