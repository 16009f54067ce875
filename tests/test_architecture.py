"""The package's shape: layers that point one way, no import cycle between our modules, no oversized file.

The import graph is read with ``ast`` from gptoss_hpc/**/*.py, so a module that is never imported by a test is
checked too. Two graphs: module-level imports (what runs at import time), and module-level plus function-level
imports (a cycle there still ties two modules into one unit, even when Python tolerates it at run time).
Between packages, every edge counts (``__init__`` imports and function-level imports included): a lower layer
never imports a higher one, and no two packages import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "gptoss_hpc"
MAX_LINES = 400
# file -> why it may stay over MAX_LINES (empty: none is)
OVERSIZED_OK: dict[str, str] = {}
# Cycles that exist only through imports inside functions (Python resolves them at call time), with the reason
# they stay. Module-level cycles have no exceptions.
FUNCTION_LEVEL_CYCLES_OK: dict[tuple[str, ...], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}

# The layers, bottom first (docs/ARCHITECTURE.md draws them). A package may import its own layer and those
# below, never one above. Top-level modules are packages of their own. The report stage reads run directories
# through monitor.state, so monitor (that reader and the status/logs/cancel CLIs built on it) sits below stages.
LAYERS: list[tuple[str, set[str]]] = [
    (
        "base",
        {
            "gptoss_hpc",
            "errors",
            "paths",
            "fileio",
            "secrets",
            "stage_warnings",
            "provenance",
            "resources",
            "slurm",
            "slurm_states",
        },
    ),
    ("config", {"config"}),
    ("data", {"data"}),
    ("modeling", {"modeling"}),
    ("serving", {"serving"}),
    ("submission", {"submission"}),
    ("monitor", {"monitor"}),
    ("stages", {"stages"}),
    (
        "entry points",
        {"launch", "cli", "plan", "status", "logs", "cancel", "report", "serve", "synth_checkpoint", "bench"},
    ),
]
# A package's own command line (`python -m gptoss_hpc.<pkg>`) is an entry point: it sits at the top, so it may
# load what the package itself must not depend on (the data CLI loads the tokenizer to count tokens).
ENTRY_POINT_MODULES = {"gptoss_hpc.data.cli", "gptoss_hpc.data.__main__"}


def _resolve(module: str, node: ast.ImportFrom | ast.Import, alias: ast.alias) -> list[str]:
    """The modules of ours an import statement binds: `from a.b import c` is a.b.c when that is a module."""
    if isinstance(node, ast.Import):
        name = alias.name
        found = [m for m in MODULES if name == m or name.startswith(m + ".")]
        return [max(found, key=len)] if found else []
    base = node.module or ""
    if node.level:
        pkg = module.split(".")
        if MODULES[module].name != "__init__.py":
            pkg = pkg[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join([*pkg, base] if base else pkg)
    if f"{base}.{alias.name}" in MODULES:
        return [f"{base}.{alias.name}"]
    return [base] if base in MODULES else []


def import_graph(*, function_level: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        nodes = ast.walk(tree) if function_level else _module_level(tree.body)
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom):
                for alias in node.names:
                    graph[module].update(t for t in _resolve(module, node, alias) if t != module)
    return graph


def _module_level(body: list[ast.stmt]):
    """Statements that run at import: the top level, and inside if/try blocks (not functions or classes)."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, ast.If | ast.Try):
            for block in (
                stmt.body,
                stmt.orelse,
                getattr(stmt, "finalbody", []),
                *[h.body for h in getattr(stmt, "handlers", [])],
            ):
                yield from _module_level(block)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """`from gptoss_hpc.config import X` in a submodule of config/ goes through config/__init__, which imports
    the submodules back: the usual re-export, not a design cycle. Edges *into* a package's own __init__ from
    inside the package are dropped; everything else stays."""
    pruned: dict[str, set[str]] = {}
    for module, targets in graph.items():
        pruned[module] = {t for t in targets if not (MODULES[t].name == "__init__.py" and module.startswith(t + "."))}
    return pruned


@pytest.mark.parametrize("function_level", [False, True], ids=["module-level", "with-function-level"])
def test_no_import_cycles(function_level: bool) -> None:
    graph = _without_package_inits(import_graph(function_level=function_level))
    cycles = find_cycles(graph)
    if function_level:
        assert set(FUNCTION_LEVEL_CYCLES_OK) <= {tuple(c) for c in cycles}, "stale FUNCTION_LEVEL_CYCLES_OK entry"
        cycles = [c for c in cycles if tuple(c) not in FUNCTION_LEVEL_CYCLES_OK]
    assert not cycles, "import cycles between our modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_graph_sees_imports() -> None:
    """The checker itself: known edges are found, and a planted cycle is reported."""
    graph = import_graph(function_level=False)
    assert "gptoss_hpc.monitor.run_files" in graph["gptoss_hpc.stages.report"]
    assert "gptoss_hpc.slurm" in graph["gptoss_hpc.monitor.state"]
    planted = {k: set(v) for k, v in graph.items()}
    planted["gptoss_hpc.monitor.run_files"].add("gptoss_hpc.stages.report")
    assert any({"gptoss_hpc.monitor.run_files", "gptoss_hpc.stages.report"} <= set(c) for c in find_cycles(planted))


def package_of(module: str) -> str:
    """The unit a layer holds: gptoss_hpc.config.io -> config, gptoss_hpc.launch -> launch, an entry point
    module -> its own name."""
    if module in ENTRY_POINT_MODULES:
        return module
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_of(package: str) -> int:
    if package in ENTRY_POINT_MODULES:
        return len(LAYERS) - 1
    ranks = [i for i, (_, members) in enumerate(LAYERS) if package in members]
    assert ranks, f"{package} is in no layer: add it to LAYERS in tests/test_architecture.py"
    return ranks[0]


def package_edges(graph: dict[str, set[str]]) -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> the module imports that make the edge."""
    edges: dict[tuple[str, str], list[str]] = {}
    for module, targets in graph.items():
        for target in targets:
            a, b = package_of(module), package_of(target)
            if a != b:
                edges.setdefault((a, b), []).append(f"{module} -> {target}")
    return edges


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for (a, b), imports in sorted(package_edges(graph).items()):
        if layer_of(a) < layer_of(b):
            found.append(f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]}): {imports}")
    return found


def package_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    packages: dict[str, set[str]] = {package_of(m): set() for m in graph}
    for a, b in package_edges(graph):
        packages[a].add(b)
    return find_cycles(packages)


def test_every_package_has_a_layer() -> None:
    for module in MODULES:
        layer_of(package_of(module))


def test_layers_point_one_way() -> None:
    """Function-level imports included: a lazy import still makes the lower layer depend on the higher."""
    graph = import_graph(function_level=True)
    violations = layer_violations(graph)
    assert not violations, "imports from a lower layer into a higher one:\n" + "\n".join(violations)
    cycles = package_cycles(graph)
    assert not cycles, "packages that import each other:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_layer_check_sees_imports() -> None:
    """The checker itself: an upward import (even inside a function, even from an __init__) and a cycle inside
    one layer are reported."""
    graph = import_graph(function_level=True)
    assert ("stages", "modeling") in package_edges(graph)
    planted = {k: set(v) for k, v in graph.items()}
    planted["gptoss_hpc.modeling"].add("gptoss_hpc.submission.backends")
    assert any(v.startswith("modeling (modeling) imports submission") for v in layer_violations(planted))
    planted = {k: set(v) for k, v in graph.items()}
    planted["gptoss_hpc.errors"].add("gptoss_hpc.paths")
    planted["gptoss_hpc.paths"].add("gptoss_hpc.errors")
    assert ["errors", "paths"] in package_cycles(planted)


def test_no_file_is_oversized() -> None:
    big = {
        str(p.relative_to(PKG.parent)): n
        for p in MODULES.values()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    unexplained = {f: n for f, n in big.items() if f not in OVERSIZED_OK}
    assert not unexplained, f"files over {MAX_LINES} lines (split by responsibility): {unexplained}"
    stale = set(OVERSIZED_OK) - set(big)
    assert not stale, f"OVERSIZED_OK lists files that are no longer over the limit: {stale}"
