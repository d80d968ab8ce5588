"""The package's layout rules (DESIGN.md §6), read from the source: every import statement of every module —
those inside functions too — forms a graph that has no cycle and never points up the layers
front ends → batch → session → tracer → families → processors → kernels; no source file passes ~500 lines."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "daam_fast"
MAX_LINES = 500

#: Layers from the top down; a module may import its own layer (without a cycle) and the layers below it.
#: Every module of the package must be in one (a new module is placed on purpose).
LAYERS = [
    ("front ends", ["daam_fast.cli", "daam_fast.ui"]),
    ("dataset runs", ["daam_fast.batch"]),  # many items, each through the session (locally or on Ray)
    ("session", ["daam_fast.session", "daam_fast.loading"]),
    ("outputs of a session", ["daam_fast.report", "daam_fast.demo"]),
    ("traced generations", ["daam_fast.generation"]),
    ("analysis of maps", ["daam_fast.analysis", "daam_fast.figures"]),
    ("tracer", ["daam_fast", "daam_fast.trace"]),  # the package facade re-exports the tracer's API
    ("model families", ["daam_fast.families"]),
    ("accumulation", ["daam_fast.accumulate"]),
    ("processors", ["daam_fast.processors"]),
    (
        "heat maps, tokens, experiment folders",
        [
            "daam_fast.heatmap",
            "daam_fast.heatmap_file",
            "daam_fast.tokens",
            "daam_fast.tokens_slow",
            "daam_fast.experiment",
        ],
    ),
    ("kernels", ["daam_fast.kernels"]),
    ("version", ["daam_fast.version"]),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    base = base if _is_package(importer) else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _edges(name: str) -> set[str]:
    """Package modules that module ``name`` imports anywhere in its source (lazy imports included)."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(name, node)
            # `from pkg import mod` imports the submodule; `from mod import name` the module.
            subs = {f"{source}.{alias.name}" for alias in node.names} & MODULES.keys()
            targets |= subs or {source}
    edges = set()
    for target in targets:
        while target and target not in MODULES:  # `import a.b.c` of a non-module name: its module
            target = target.rpartition(".")[0]
        if target and target != name:
            edges.add(target)
    return edges


GRAPH = {name: _edges(name) for name in MODULES}


def _layer(name: str) -> int:
    best, best_len = None, -1
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            exact = prefix == "daam_fast"
            if (name == prefix or (not exact and name.startswith(prefix + "."))) and len(prefix) > best_len:
                best, best_len = rank, len(prefix)
    assert best is not None, f"{name} is in no layer of tests/test_layout.py's LAYERS: place it"
    return best


def test_the_graph_is_read():
    # The parse sees lazy imports and both import forms (guards against an always-empty graph).
    assert "daam_fast.kernels.triton_backend" in GRAPH["daam_fast.kernels.dispatch"]  # inside a function
    assert "daam_fast.families" in GRAPH["daam_fast.trace"]
    assert "daam_fast.generation" in GRAPH["daam_fast.demo"]  # `from ..generation import` in run_demo
    assert GRAPH["daam_fast.kernels.registry"] == set()


def test_no_import_cycles():
    # Depth-first search; a back edge closes a cycle, reported as the module chain.
    state, stack, cycles = {}, [], []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_never_point_up_the_layers():
    upward = [
        f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
        for a, deps in sorted(GRAPH.items())
        for b in sorted(deps)
        if _layer(b) < _layer(a)
    ]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_source_files_stay_small(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[name]} has {n} lines (> {MAX_LINES}): split it by concept"
