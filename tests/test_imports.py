"""No import cycle inside ``vtm_jax``.

Every ``import vtm_jax...`` and ``from vtm_jax... import ...`` in a module is an edge, whether
it runs at import time or inside a function: a function-level import only moves a cycle to
the first call, it does not remove it. Imports under ``if TYPE_CHECKING:`` are not edges,
since they never run. ``from vtm_jax.pkg import name`` points at the submodule
``vtm_jax.pkg.name`` when there is one, else at ``vtm_jax.pkg``. Importing a submodule also
runs its packages' ``__init__``, which is not counted: those hold no ``vtm_jax`` imports
that lead back (``vtm_jax/__init__.py`` imports ``vtm_jax.api`` only inside its module
``__getattr__``, when one of the API's names is first used; that edge is counted).
"""

from __future__ import annotations

import ast
import pathlib

import vtm_jax

PACKAGE = pathlib.Path(vtm_jax.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The ``vtm_jax`` modules ``tree`` imports (at any depth, except TYPE_CHECKING blocks)."""
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "vtm_jax")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package
                package = module if is_package else module.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    package = package.rsplit(".", 1)[0]
                base = f"{package}.{base}" if base else package
            if base.split(".")[0] == "vtm_jax":
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in known else base)
        stack.extend(ast.iter_child_nodes(node))
    return {name for name in found if name in known and name != module}


def import_graph() -> dict[str, set[str]]:
    """Module -> the ``vtm_jax`` modules it imports."""
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = _imports(tree, name, path.name == "__init__.py", known)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_walker_sees_function_level_imports_and_cycles():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "import vtm_jax.b\n"
        "if TYPE_CHECKING:\n"
        "    from vtm_jax import c\n"
        "def f():\n"
        "    from vtm_jax.d import thing\n"
    )
    known = {"vtm_jax.a", "vtm_jax.b", "vtm_jax.c", "vtm_jax.d"}
    assert _imports(tree, "vtm_jax.a", False, known) == {"vtm_jax.b", "vtm_jax.d"}
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


# Modules that must sit on no cycle at all: the config front end, the shared config blocks,
# the Scenic package, and the record with its readers.
CHECKED = (
    "vtm_jax.config.loading",
    "vtm_jax.config.blocks",
    "vtm_jax.scenic",
    "vtm_jax.checkpoints.record",
    "vtm_jax.checkpoints.store",
    "vtm_jax.jobs.evaluation.evaluate",
    "vtm_jax.jobs.predict",
)


def test_no_import_cycle_through_config_scenic_and_the_record():
    graph = import_graph()
    assert (
        "vtm_jax.config.loading" in graph and graph["vtm_jax.config.loading"]
    )  # the walk found imports
    found = [c for c in cycles(graph) if any(m.startswith(CHECKED) for m in c)]
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)
    # Evaluation reads heads and preprocessing from the record, not from predict.
    assert "vtm_jax.jobs.predict" not in graph["vtm_jax.jobs.evaluation.evaluate"]


def test_nothing_in_vtm_jax_imports_the_scenic_package():
    """The Scenic package sits on the side: it builds on the core, and nothing imports it."""
    graph = import_graph()
    assert graph["vtm_jax.scenic.model"], "the walk found the Scenic model's imports"
    importers = {
        module
        for module, targets in graph.items()
        if any(t.startswith("vtm_jax.scenic.") or t == "vtm_jax.scenic" for t in targets)
        and not module.startswith("vtm_jax.scenic")
    }
    assert not importers, importers


def test_the_config_blocks_import_nothing_above_the_merging_settings():
    assert import_graph()["vtm_jax.config.blocks"] <= {"vtm_jax.merging"}


def test_no_import_cycle_in_vtm_jax():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


# The layers of docs/architecture.md, bottom first. A module may import its own layer and the
# layers below it; two layers of the same rank (models and data) may not import each other.
LAYERS = {
    "base": (0, ("vtm_jax.errors", "vtm_jax.paths", "vtm_jax.plugins", "vtm_jax.outputs")),
    "merging": (1, ("vtm_jax.merging",)),
    "models": (2, ("vtm_jax.models",)),
    "data": (2, ("vtm_jax.data",)),
    "checkpoints": (3, ("vtm_jax.checkpoints",)),
    "config": (4, ("vtm_jax.config", "vtm_jax.configs")),
    "runtime": (5, ("vtm_jax.runtime",)),
    "jobs": (6, ("vtm_jax.jobs",)),
    "scenic": (7, ("vtm_jax.scenic",)),
    "front": (8, ("vtm_jax", "vtm_jax.api", "vtm_jax.cli", "vtm_jax.__main__")),
}


def layer_of(module: str) -> str:
    """The layer holding ``module``: the longest prefix listed (``vtm_jax`` itself is front)."""
    best, length = None, -1
    for name, (_, prefixes) in LAYERS.items():
        for prefix in prefixes:
            fits = module == prefix or module.startswith(prefix + ".")
            if fits and len(prefix) > length and (prefix != "vtm_jax" or module == "vtm_jax"):
                best, length = name, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer of docs/architecture.md")
    return best


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    edges = []
    for module, targets in sorted(graph.items()):
        here = layer_of(module)
        for target in sorted(targets):
            there = layer_of(target)
            if there != here and LAYERS[there][0] >= LAYERS[here][0]:
                edges.append(f"{module} ({here}) -> {target} ({there})")
    return edges


def test_every_module_sits_in_a_layer_and_imports_only_lower_ones():
    graph = import_graph()
    assert len(graph) > 80, "the walk found the package's modules"
    assert not upward_edges(graph), "imports against the layers:\n" + "\n".join(upward_edges(graph))


def test_the_layering_check_catches_an_upward_and_a_sideways_edge():
    graph = {
        "vtm_jax.merging.rules": {"vtm_jax.errors"},  # down: fine
        "vtm_jax.models.vivit": {"vtm_jax.jobs.bench"},  # up
        "vtm_jax.data.spatial": {"vtm_jax.models.layers"},  # sideways, same rank
    }
    assert upward_edges(graph) == [
        "vtm_jax.data.spatial (data) -> vtm_jax.models.layers (models)",
        "vtm_jax.models.vivit (models) -> vtm_jax.jobs.bench (jobs)",
    ]


def test_at_most_eight_modules_at_the_top_and_none_over_450_lines():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top
    lines = {
        str(p.relative_to(PACKAGE)): len(p.read_text(encoding="utf-8").splitlines())
        for p in PACKAGE.rglob("*.py")
    }
    long = {name: n for name, n in lines.items() if n > 450}
    assert not long, long
