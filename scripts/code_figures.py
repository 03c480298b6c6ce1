"""The figures the loop-core redesign is measured by (issue 19): run from the repository root.

    python scripts/code_figures.py          # trainer size, longest functions, import layers and cycles

Prints the lines of the module that holds ``Trainer``, the longest functions under ``src/trainval``, the
module-level import graph of the core (``trainval.lint`` apart): its layers, its cycles and the imports
made inside functions.
"""

from __future__ import annotations

import ast
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1] / "src"


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def main() -> None:
    files = sorted((ROOT / "trainval").rglob("*.py"))
    modules = {module_name(p): p for p in files if ".lint" not in module_name(p) and not module_name(p).endswith("lint")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    all_edges: dict[str, set[str]] = {m: set() for m in modules}  # with the imports made inside functions
    inner_imports, functions = 0, []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        targets = _targets(inner, package)
                        inner_imports += sum(1 for t in targets if t.startswith("trainval"))
                        for target in targets:
                            hit = _resolve(target, modules)
                            if hit and hit != name:
                                all_edges[name].add(hit)
        for node in tree.body:
            stmts = [node]
            if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks are not run: no edge
                test = ast.unparse(node.test)
                stmts = [] if "TYPE_CHECKING" in test else node.body
            for stmt in stmts:
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    for target in _targets(stmt, package):
                        hit = _resolve(target, modules)
                        if hit and hit != name:
                            edges[name].add(hit)
                            all_edges[name].add(hit)
    # package __init__ re-exports are not layers of their own
    cycles = _cycles(edges)
    layers = _layers(edges) if not cycles else None
    trainer = next(p for p in files if re.search(r"^class Trainer\b", p.read_text(), re.M))
    print(f"module holding Trainer: {trainer.relative_to(ROOT.parent)}, {len(trainer.read_text().splitlines())} lines")
    cls = next(n for n in ast.parse(trainer.read_text()).body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    methods = [n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    stored = {t.attr for n in ast.walk(cls) for t in ([n] if isinstance(n, ast.Attribute) else [])
              if isinstance(t.value, ast.Name) and t.value.id == "self" and isinstance(t.ctx, ast.Store)}
    init = next(m for m in methods if m.name == "__init__")
    params = len(init.args.args) - 1 + len(init.args.kwonlyargs)
    longest = max(methods, key=lambda m: m.end_lineno - m.lineno)
    print(f"Trainer: {len(methods)} methods, {len(stored)} attributes set on self, {params} named constructor "
          f"parameters{' + **options' if init.args.kwarg else ''}, longest method {longest.name} "
          f"({longest.end_lineno - longest.lineno + 1} lines)")
    print("longest functions:", ", ".join(f"{n} ({k} lines)" for k, n in sorted(functions, reverse=True)[:5]))
    print(f"core modules: {len(modules)}, import edges: {sum(len(v) for v in edges.values())}, "
          f"imports inside functions: {inner_imports}")
    hidden = _cycles(all_edges)
    print(f"cycles counting the imports inside functions: {len(hidden)}")
    for group in hidden:
        print("   ", " <-> ".join(sorted(group)))
    if cycles:
        print(f"import cycles (strongly connected groups): {len(cycles)}")
        for group in cycles:
            print("   ", " <-> ".join(sorted(group)))
    else:
        print(f"import layers: {max(layers.values()) + 1}, cycles: 0")
        for depth in range(max(layers.values()) + 1):
            print(f"    {depth}: {', '.join(sorted(m for m, d in layers.items() if d == depth))}")
    sys.exit(0)


def _targets(node: ast.AST, package: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parent = package.split(".")
        parent = parent[: len(parent) - node.level + 1]
        base = ".".join(parent + ([base] if base else []))
    return [f"{base}.{a.name}" for a in node.names]  # a submodule, or else (see _resolve) the module itself


def _resolve(target: str, modules: dict) -> str | None:
    while target:
        if target in modules:
            return target
        target = target.rpartition(".")[0]
    return None


def _cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(group)

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            visit(v)
    return out


def _layers(edges: dict[str, set[str]]) -> dict[str, int]:
    depth: dict[str, int] = {}

    def d(v: str) -> int:
        if v not in depth:
            depth[v] = 1 + max((d(w) for w in edges[v]), default=-1)
        return depth[v]

    for v in edges:
        d(v)
    return depth


if __name__ == "__main__":
    main()
