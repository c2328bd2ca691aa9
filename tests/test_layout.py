"""The package's architecture rules, checked on the source: no import circle among dps_fast's
modules (imports inside functions are the deliberate lazy ones), and no module importing or
calling another module's private (``_name``) name through the module (``from m import _f``,
``m._f()``; a private method called on another class's instance is not seen here). A module
whose own name is private (``dps_fast._help``, ``_cuda``, ``_build``) is a package-internal module:
importing its public names is allowed."""

from __future__ import annotations

import ast
from pathlib import Path

import dps_fast

ROOT = Path(dps_fast.__file__).resolve().parent


#: The compiled CUDA extension: a module (built from csrc/), imported by name by its loader.
EXTENSION = "dps_fast._C"


def _private(name: str) -> bool:
    """``_name`` but not ``__dunder__`` (``__version__`` is public)."""
    return name.startswith("_") and not name.startswith("__")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mods: dict[str, Path]):
    """Per module: module-level import edges, and every (target module, private name) it uses."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private: dict[str, set[tuple[str, str]]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        is_pkg = path.name == "__init__.py"
        aliases: dict[str, str] = {}
        top = set(id(n) for n in tree.body)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                src = _resolve(mod, is_pkg, node)
                if not src.startswith("dps_fast"):
                    continue
                for a in node.names:
                    full = f"{src}.{a.name}"
                    target = full if full in mods else src
                    if id(node) in top and target in mods:
                        edges[mod].add(target)
                    if full in mods:
                        aliases[a.asname or a.name] = full
                    elif _private(a.name) and src != mod and f"{src}.{a.name}" != EXTENSION:
                        private[mod].add((src, a.name))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods:
                        if id(node) in top:
                            edges[mod].add(a.name)
                        if a.asname:
                            aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and _private(node.attr)):
                private[mod].add((aliases[node.value.id], node.attr))
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    edges, _ = _imports(_modules())
    assert not _cycles(edges), f"module-level import circles: {_cycles(edges)}"


def test_no_module_uses_another_modules_private_names():
    _, private = _imports(_modules())
    crossing = sorted((mod, f"{src}.{name}") for mod, uses in private.items() for src, name in uses)
    assert not crossing, f"private names used across modules: {crossing}"


def test_the_checks_find_a_circle_and_a_private_import():
    """The detectors themselves: a two-module circle and a private import are reported."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    tree = ast.parse("from dps_fast.noise import _mulhilo")
    node = tree.body[0]
    assert node.names[0].name.startswith("_") and _resolve("dps_fast.x", False, node) == "dps_fast.noise"


def test_reconstruct_is_lazy_and_callable_in_any_import_order():
    import subprocess
    import sys

    code = """
import sys, dps_fast
assert 'dps_fast.reconstruct' not in sys.modules, 'import dps_fast loaded reconstruct'
import dps_fast.reconstruct.cli
from dps_fast import reconstruct
assert callable(reconstruct) and callable(dps_fast.reconstruct)
import inspect
from dps_fast.reconstruct import reconstruct as fn
assert inspect.isfunction(fn) and 'method' in inspect.signature(fn).parameters
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
