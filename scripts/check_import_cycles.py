#!/usr/bin/env python3
"""Print the import cycles inside the ``hapo_verl`` package; exit 1 when there is any.

Static (``ast``, nothing is imported). Every ``import`` / ``from ... import`` statement counts as an edge, wherever
it stands: at module level, inside a function or method, under ``if TYPE_CHECKING:`` or in a ``try:``. An import
inside a function is a dependency all the same; writing it there only hides the cycle from Python's loader.

Edges, for a module M of the package:
- ``import a.b.c`` -> the deepest of ``a.b.c``, ``a.b``, ``a`` that is a module of the package;
- ``from a.b import x`` -> ``a.b.x`` when that is a module of the package (a submodule), else ``a.b``;
- relative imports are resolved against M's package.
Importing a submodule also runs its parents' ``__init__``; those implicit parent edges are not counted (a package
importing its own submodules is the normal shape, not a cycle).

Usage: ``python scripts/check_import_cycles.py [--root hapo_verl] [--package hapo_verl] [--only PREFIX ...]``;
``--only`` reports just the cycles that touch a module whose name starts with one of the prefixes (the exit code
then follows those cycles alone).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

# patches/ is installed as hapo_verl.patches (setup.py package_dir)
EXTRA_ROOTS = {"hapo_verl.patches": "patches"}


def module_files(root: Path, package: str, extra: dict[str, str] | None = None) -> dict[str, Path]:
    """Module name -> file, for every .py under ``root`` (a package named ``package``), plus ``extra`` packages
    (name -> folder relative to root's parent)."""
    out: dict[str, Path] = {}
    trees = [(root, package)] + [(root.parent / folder, name) for name, folder in (extra or {}).items()]
    for base, name in trees:
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [name, *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def import_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> set of package modules it imports (module level and function level alike)."""

    def owner(name: str) -> str | None:
        parts = name.split(".")
        while parts:
            cand = ".".join(parts)
            if cand in modules:
                return cand
            parts.pop()
        return None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = _resolve_relative(mod, is_package, node.level, node.module)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for t in targets:
                dep = owner(t)
                if dep is not None and dep != mod:
                    graph[mod].add(dep)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components of more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))
    return sorted(comps)


def shortest_cycle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """One shortest cycle through the component's first module (breadth-first), for the report."""
    members = set(comp)
    start = comp[0]
    prev: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    path = [node]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if nxt not in prev:
                    prev[nxt] = node
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    return comp


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=str(here / "hapo_verl"), help="folder of the package")
    ap.add_argument("--package", default="hapo_verl")
    ap.add_argument("--only", nargs="*", default=None, help="report only cycles touching these module prefixes")
    args = ap.parse_args(argv)
    modules = module_files(Path(args.root), args.package, EXTRA_ROOTS if args.package == "hapo_verl" else None)
    graph = import_edges(modules)
    comps = strongly_connected(graph)
    if args.only:
        comps = [c for c in comps if any(m == p or m.startswith(p + ".") for m in c for p in args.only)]
    for comp in comps:
        cycle = shortest_cycle(graph, comp)
        print(f"cycle among {len(comp)} modules: {' -> '.join(cycle)}")
        if len(comp) > len(cycle) - 1:
            print(f"  (component: {', '.join(comp)})")
    if comps:
        print(f"{len(comps)} import cycle(s) in {args.package} ({len(modules)} modules)")
        return 1
    print(f"no import cycles in {args.package} ({len(modules)} modules)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
