"""The package's shape: modules use one another's public names only, and import no cycle.

Both read the source with :mod:`ast` (nothing is imported): every ``import`` and ``from ... import``
of a ``fedlora_jax`` module counts, at module level or inside a function (a lazy import is an
edge of the graph like any other). An edge goes to the module named (``from fedlora_jax import
config`` and ``from fedlora_jax.config import X`` both to ``fedlora_jax.config``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fedlora_jax"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> list[tuple[str, str | None, int]]:
    """``(module, imported name or None, line)`` for every import of a package module in
    ``name``; ``from fedlora_jax import config`` is an import of the module ``fedlora_jax.config``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, None, node.lineno) if sub in MODULES else
                             (base, alias.name, node.lineno))
    return [(m, n, line) for m, n, line in found if m in MODULES]


def _edges() -> dict[str, set[str]]:
    return {name: {m for m, _, _ in _imports(name) if m != name} for name in MODULES}


def test_the_import_graph_is_read():
    """The graph the next tests check is the real one (it cannot pass by reading nothing)."""
    edges = _edges()
    assert "fedlora_jax.engine" in edges["fedlora_jax.train"]
    assert "fedlora_jax.client" in edges["fedlora_jax.engine"]
    assert "fedlora_jax.fields" in edges["fedlora_jax.config"]


def _private_uses(name: str) -> list[tuple[str, str, int]]:
    """``(module, name, line)`` for each private name of another package module that ``name``
    imports (``from x import _y``) or reads off an imported module (``x._y``)."""
    path = MODULES[name]
    used = [(m, n, line) for m, n, line in _imports(name) if n is not None]
    aliases = {}  # local name -> package module, for `from fedlora_jax import x (as y)`
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            base = node.module if isinstance(node, ast.ImportFrom) and not node.level else None
            for alias in node.names:
                module = f"{base}.{alias.name}" if base else alias.name
                if module in MODULES and (alias.asname or base):
                    aliases[alias.asname or alias.name] = module
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases):
            used.append((aliases[node.value.id], node.attr, node.lineno))
    return [(m, n, line) for m, n, line in used
            if n.startswith("_") and not n.startswith("__") and m != name]


def test_private_uses_are_found(tmp_path, monkeypatch):
    """The check below can fail: a made-up module's private uses are all found, and a public
    one or its own private name is not."""
    fake = tmp_path / "fake.py"
    fake.write_text("from fedlora_jax import wireless as w\nfrom fedlora_jax.config import _x, y\n"
                    "def f():\n    import fedlora_jax.solver\n    return w._require(_own), w.__name__\n"
                    "_own = 1\n")
    monkeypatch.setitem(MODULES, "fedlora_jax.fake", fake)
    assert sorted(_private_uses("fedlora_jax.fake")) == [
        ("fedlora_jax.config", "_x", 2), ("fedlora_jax.wireless", "_require", 5)]
    assert "fedlora_jax.solver" in {m for m, _, _ in _imports("fedlora_jax.fake")}  # lazy import


def test_no_module_imports_a_private_name_of_another():
    private = [f"{MODULES[name].relative_to(PACKAGE.parent)}:{line} uses {module}.{used}"
               for name in MODULES for module, used, line in _private_uses(name)]
    assert not private, "\n".join(private)


def _reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: each set of modules that reach one another (a strongly connected
    component of more than one module, or a module importing itself), sorted."""
    reach = {name: _reachable(edges, name) for name in edges}
    groups = {tuple(sorted(m for m in reach[name] if name in reach[m]))
              for name in edges if name in reach[name]}
    return sorted(list(g) for g in groups)


def test_cycle_finder_finds_cycles():
    """The check below can fail: the cycles of a made-up graph are found, and none where there
    are none."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e", "d"}}
    assert _cycles(edges) == [["a", "b", "c"], ["e"]]
    assert _cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


@pytest.mark.parametrize("leaf", ["fedlora_jax.fields"])
def test_leaf_modules_import_nothing_of_the_project(leaf):
    assert not _edges()[leaf]


def test_the_package_has_no_import_cycle():
    cycles = _cycles(_edges())
    assert not cycles, "import cycles among: " + "; ".join(", ".join(c) for c in cycles)
