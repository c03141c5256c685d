"""The import graph of mor-bench's own packages, and the layering rule it must follow.

    python tests/import_graph.py            # modules, edges, cycles, upward edges
    python tests/import_graph.py --json

Every `import` / `from ... import` statement counts, wherever it stands (module level,
inside a function, under `if TYPE_CHECKING:`), because an import hidden in a function is
still a dependency. `tests/test_layering.py` asserts the rule; docs/architecture.md
explains it.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mor", "baselines", "evals", "reports")

# Layers, lowest first. A module may import modules of its own layer or of lower layers
# only; the most specific (longest) prefix decides a module's layer.
LAYERS: dict[str, int] = {
    "evals.suite.record": 0,   # the run-record schema: a leaf, torch-free
    "mor": 1,                  # the model library
    "baselines": 2,
    "evals.data": 3,
    "evals.training": 4,
    "evals.suite.spec": 5,     # suite files and every settings type
    "evals.lmeval": 6,
    "evals.perf": 6,
    "evals.hf": 6,             # Hugging Face export
    "evals.suite": 7,          # the runner and its phases
    "reports": 8,
    "evals.cli": 9,
    "evals": 9,                # the namespace package itself
}
# Packages that may import only the listed modules of the project (besides themselves).
ONLY: dict[str, tuple[str, ...]] = {
    "reports": ("evals.suite.record",),
    "evals.suite.record": (),
}


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            mods[module_name(path, root)] = path
    return mods


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported dotted name refers to (longest existing prefix)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in modules:
            return cand
    return None


def imports_of(mod: str, path: Path, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            subs = [f"{prefix}.{a.name}" for a in node.names]
            # `from pkg import submodule` depends on the submodule (pkg/__init__ runs for
            # any import of a submodule, so it is not an edge of its own); `from pkg import
            # name` depends on pkg.
            names = subs + ([prefix] if not all(s in modules for s in subs) else [])
        for name in names:
            target = _resolve(name, modules)
            if target and target != mod:
                out.add(target)
    return out


def deferred_imports(root: Path = ROOT) -> int:
    """Imports of the project's own modules made inside a function body: each one a
    dependency the module-level imports do not show."""
    modules = project_modules(root)
    count = 0

    def visit(node: ast.AST, in_function: bool) -> None:
        nonlocal count
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom) and in_function:
                name = (child.names[0].name if isinstance(child, ast.Import)
                        else child.module or "")
                if getattr(child, "level", 0) or _resolve(name, modules):
                    count += 1
            visit(child, in_function or isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    for path in modules.values():
        visit(ast.parse(path.read_text(), filename=str(path)), False)
    return count


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def layer_of(mod: str) -> tuple[str, int]:
    best = max((p for p in LAYERS if mod == p or mod.startswith(p + ".")), key=len)
    return best, LAYERS[best]


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(out)


def violations(g: dict[str, set[str]]) -> list[tuple[str, str, str]]:
    """(importer, imported, why) for every edge against the layering rule."""
    bad = []
    for a, targets in sorted(g.items()):
        pa, la = layer_of(a)
        only = next((ONLY[p] for p in sorted(ONLY, key=len, reverse=True)
                     if a == p or a.startswith(p + ".")), None)
        for b in sorted(targets):
            pb, lb = layer_of(b)
            if pb == pa:
                continue
            if only is not None and not any(b == o or b.startswith(o + ".") for o in only):
                bad.append((a, b, f"{pa} may import only {', '.join(only) or 'nothing'}"))
            elif lb > la:
                bad.append((a, b, f"upward: {pa} (layer {la}) -> {pb} (layer {lb})"))
    return bad


def summary(root: Path = ROOT) -> dict:
    g = graph(root)
    return {"modules": len(g), "edges": sum(len(v) for v in g.values()),
            "deferred_imports": deferred_imports(root),
            "cycles": cycles(g), "violations": [list(v) for v in violations(g)]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--edges", action="store_true", help="also list every edge")
    p.add_argument("--root", type=Path, default=ROOT,
                   help="the repository to read (default: this one), e.g. an old checkout")
    args = p.parse_args(argv)
    s = summary(args.root)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"{s['modules']} modules, {s['edges']} import edges ({s['deferred_imports']} "
          f"project imports inside functions), {len(s['cycles'])} cycles, "
          f"{len(s['violations'])} edges against the layering rule")
    for c in s["cycles"]:
        print("cycle:", " <-> ".join(c))
    for a, b, why in s["violations"]:
        print(f"against the rule: {a} -> {b} ({why})")
    if args.edges:
        for a, targets in sorted(graph(args.root).items()):
            for b in sorted(targets):
                print(f"edge: {a} -> {b}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
