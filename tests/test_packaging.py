"""pyproject.toml declares what vtm_jax imports, and imports what it declares."""

from __future__ import annotations

import ast
import pathlib
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

import vtm_jax

PACKAGE = pathlib.Path(vtm_jax.__file__).parent
PYPROJECT = PACKAGE.parent / "pyproject.toml"
# Distributions declared for what they do at run time, not for an import in vtm_jax/.
USED_WITHOUT_IMPORT = {
    "array-record": "datasets are written and read in its format (file_format='array_record')",
    "tensorboard": "clu's summary writer imports it (the tensorboard extra)",
}
# Import names of distributions that may be absent here (extras not installed), and of
# alternatives (the tensorboard extra takes TensorFlow's CPU build where there is one).
KNOWN = {
    "scenic": {"scenic"},
    "av": {"av"},
    "torch": {"torch"},
    "clu": {"clu"},
    "tensorflow": {"tensorflow", "tensorflow-cpu"},
}
# Extras whose packages are for the tests and tools, not imported by vtm_jax/.
NOT_RUNTIME = {"test"}


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (PEP 503)."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, set[str]]:
    """``'core'`` and each extra -> the distributions it declares (self-references left out)."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    groups = {"core": project["dependencies"], **project["optional-dependencies"]}
    return {
        group: {_name(r) for r in requirements} - {"vtm-jax"}
        for group, requirements in groups.items()
    }


def imports() -> dict[str, dict[str, bool]]:
    """Third-party import name -> {module file: imported at module level}."""
    found: dict[str, dict[str, bool]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "vtm_jax":
                    continue
                where = str(path.relative_to(PACKAGE.parent))
                found.setdefault(top, {})
                found[top][where] = found[top].get(where, False) or id(node) in top_level
    return found


def distributions(module: str) -> set[str]:
    names = set(packages_distributions().get(module) or ()) | KNOWN.get(module, set())
    return {re.sub(r"[-_.]+", "-", n).lower() for n in names}


def test_every_import_is_declared_and_every_declaration_is_used():
    groups = declared()
    runtime = set().union(*(deps for group, deps in groups.items() if group not in NOT_RUNTIME))
    found = imports()
    assert {"jax", "flax", "numpy", "PIL", "yaml"} <= set(found)  # the walk sees imports
    undeclared = {m: sorted(files) for m, files in found.items() if not distributions(m) & runtime}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    imported = set().union(*(distributions(m) for m in found))
    unused = runtime - imported - set(USED_WITHOUT_IMPORT)
    assert not unused, f"declared in pyproject.toml but imported nowhere in vtm_jax/: {unused}"


def test_module_level_imports_need_only_the_core_dependencies():
    """An extra's package is imported inside the functions that need it (or in the modules
    that exist for it: converters, the Scenic package, the TensorBoard writer), so every
    command starts without the extras and says which one a feature needs."""
    core = declared()["core"]
    for module, files in imports().items():
        if distributions(module) & core:
            continue
        eager = [f for f, top in files.items() if top and not f.startswith("vtm_jax/scenic/")]
        assert not eager, f"{module} (an extra's package) is imported at module level in {eager}"
