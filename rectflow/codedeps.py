"""The project's import graph, read from the source (AST), never by importing it.

Every ``import`` and ``from … import`` counts, at module level or inside a function (a stage that
imports ``rectflow.fd`` only inside ``run`` still depends on it), and importing ``a.b.c`` also runs
``a/__init__.py`` and ``a/b/__init__.py``. :func:`closure` gives the files a module depends on,
which :mod:`rectflow.dvcyaml` lists as a stage's code deps; :func:`graph` and :func:`cycles` serve
the layering test.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

__all__ = ["PACKAGES", "closure", "cycles", "graph", "module_files"]

PACKAGES = ("rectflow", "tasks", "flows")


def module_files(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the top-level ``packages`` of ``root``."""
    out: dict[str, Path] = {}
    for pkg in packages:
        base = root / pkg
        if not base.is_dir():
            continue
        for f in sorted(base.rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = f
    return out


def _owner(name: str, mods: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` (a module or a name inside one) belongs to."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, mods: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_pkg else 0)
                base = ".".join(parts[:keep] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for n in names:
            owner = _owner(n, mods)
            if owner is not None:
                found.add(owner)
                parts = owner.split(".")  # parent packages' __init__ run first
                found.update(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in mods)
    found.discard(module)
    return found


def graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its body)."""
    return dict(_graph(Path(root).resolve(), packages))


@lru_cache(maxsize=8)
def _graph(root: Path, packages: tuple[str, ...]) -> tuple[tuple[str, frozenset[str]], ...]:
    mods = module_files(root, packages)
    return tuple((m, frozenset(_imports(m, f, mods))) for m, f in mods.items())


def closure(root: Path, modules: list[str], packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """The files (relative to ``root``, sorted) of ``modules`` and everything they import, transitively."""
    root = Path(root).resolve()
    g = graph(root, packages)
    mods = module_files(root, packages)
    seen: set[str] = set()
    todo = []
    for m in modules:
        if m not in g:
            raise KeyError(f"{m}: no such module under {root}")
        parts = m.split(".")
        todo += [m] + [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in g]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(g[m] - seen)
    return sorted(mods[m].relative_to(root).as_posix() for m in seen)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of ``g`` with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(g):
        if start in index:
            continue
        work = [(start, iter(sorted(g[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in g:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(g[w]))))
                    advanced = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out
