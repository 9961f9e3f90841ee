"""The package's import graph, read from the source (AST): which subpackage imports which, module cycles, and
function-local imports of the package's own modules (each must carry a comment saying why it is deferred).

    python -m tools.import_graph            # the table, the cycles and the local imports; exit 1 on a violation

tests/test_layering.py checks the same facts in CI. Imports under `if TYPE_CHECKING:` are annotations only and
no edge; a module's imports count wherever they are in it.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "protopo_ray"
ROOT = Path(__file__).resolve().parents[1]
#: Subpackages from the bottom up: a subpackage imports only those before it (the entry points, at the top level,
#: import anything). `reporting` reads what `search` writes; `inference` runs what `training` saves; `monitoring` (live
#: metrics, Ray side) is what `cluster` and `search` emit through.
LAYERS = ("data", "config", "model", "training", "inference", "monitoring", "cluster", "search", "reporting")
#: Subpackages whose modules must import without Ray installed (a bare GPU box runs them).
RAY_FREE = ("data", "config", "model", "training", "inference", "reporting")


@dataclass(frozen=True)
class LocalImport:
    module: str
    target: str
    line: int
    commented: bool
    """Whether a comment on the lines just above (or on the line) says why it is deferred."""


@dataclass
class Graph:
    modules: dict[str, Path]
    edges: dict[str, set[str]] = field(default_factory=dict)
    local: list[LocalImport] = field(default_factory=list)

    def subpackage(self, module: str) -> str:
        """The subpackage a module belongs to ("" for the package's top-level modules)."""
        parts = module.split(".")
        return parts[1] if len(parts) > 2 or (len(parts) == 2 and self.modules[module].name == "__init__.py") else ""

    def subpackage_edges(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for source, targets in self.edges.items():
            for target in targets:
                a, b = self.subpackage(source), self.subpackage(target)
                if a != b:
                    out.setdefault(a, set()).add(b)
        return out

    def cycles(self) -> list[list[str]]:
        """Strongly connected components of more than one module (Tarjan)."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        found: list[list[str]] = []

        def visit(v: str) -> None:
            index[v] = low[v] = len(index)
            stack.append(v)
            on_stack.add(v)
            for w in self.edges.get(v, ()):
                if w not in index:
                    visit(w)
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
                    found.append(sorted(component))

        sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
        for module in self.modules:
            if module not in index:
                visit(module)
        return found

    def layering_violations(self) -> list[str]:
        rank = {name: i for i, name in enumerate(LAYERS)}
        out = []
        for source, targets in sorted(self.subpackage_edges().items()):
            for target in sorted(targets):
                if source == "" or target == "":  # entry points on top; no subpackage may import one
                    if target == "":
                        out.append(f"{source} imports a top-level entry point")
                    continue
                if source not in rank or target not in rank:
                    out.append(f"{source} -> {target}: a subpackage not in LAYERS")
                elif rank[target] > rank[source] or (source, target) == ("inference", "cluster"):
                    out.append(f"{source} -> {target} points up the layers {LAYERS}")
        return out


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def _targets(node: ast.Import | ast.ImportFrom, module: str, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".")
            if modules[module].name != "__init__.py":
                base = base[:-1]
            base = base[: len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{alias.name}" for alias in node.names] or [prefix]
        names = [n if n in modules else prefix for n in names]
    else:
        names = [alias.name for alias in node.names]
    out = []
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.append(name)
    return out


def build(root: Path = ROOT, package: str = PACKAGE) -> Graph:
    modules = {_module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    graph = Graph(modules=modules, edges={m: set() for m in modules})
    for module, path in modules.items():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = _targets(node, module, modules)
            if not targets:
                continue
            in_function = type_only = False
            parent = parents.get(node)
            while parent is not None:
                in_function |= isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef))
                type_only |= isinstance(parent, ast.If) and "TYPE_CHECKING" in ast.unparse(parent.test)
                parent = parents.get(parent)
            if type_only:
                continue
            graph.edges[module].update(targets)
            if in_function:
                above = lines[max(0, node.lineno - 3): node.lineno]
                commented = any("#" in line for line in above)
                graph.local += [LocalImport(module, target, node.lineno, commented) for target in targets]
    return graph


def main() -> int:
    graph = build()
    top = [m for m in graph.modules if graph.subpackage(m) == "" and m != PACKAGE]
    subpackages = sorted({graph.subpackage(m) for m in graph.modules} - {""})
    cycles, violations = graph.cycles(), graph.layering_violations()
    uncommented = [i for i in graph.local if not i.commented]
    print(f"modules {len(graph.modules)}; top-level modules {len(top)} ({', '.join(m.split('.')[-1] for m in top)}); "
          f"subpackages {len(subpackages)}")
    print(f"module cycles: {len(cycles)}" + "".join(f"\n  {' <-> '.join(c)}" for c in cycles))
    print(f"function-local imports of {PACKAGE} modules: {len(graph.local)} ({len(uncommented)} without a comment why)")
    for item in graph.local:
        print(f"  {item.module}:{item.line} -> {item.target}" + ("" if item.commented else "   <- no comment"))
    print("subpackage imports (bottom up):")
    edges = graph.subpackage_edges()
    for name in [*LAYERS, ""]:
        print(f"  {name or '(entry points)'} -> {', '.join(sorted(t or '(top)' for t in edges.get(name, ()))) or '-'}")
    for violation in violations:
        print(f"layering: {violation}")
    return 1 if cycles or violations or uncommented else 0


if __name__ == "__main__":
    sys.exit(main())
