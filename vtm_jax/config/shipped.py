"""The configs shipped with the package (``vtm_jax/configs``), found by name from anywhere.

``--config=vivit_tiny`` (or ``vivit_tiny.py``) names a shipped config; a path to a file works as
always and wins when both exist. ``vtm-jax configs`` lists the shipped ones with the first line
of each file's docstring, read without running the file.
"""

from __future__ import annotations

import ast
import importlib.resources
import os

from vtm_jax.errors import UserError


def shipped_dir() -> str:
    """The folder holding the shipped config files."""
    return os.fspath(importlib.resources.files("vtm_jax.configs"))


def shipped_configs() -> dict[str, str]:
    """Name -> file of every shipped config, sorted by name."""
    folder = shipped_dir()
    names = sorted(
        f[: -len(".py")] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_")
    )
    return {name: os.path.join(folder, f"{name}.py") for name in names}


def describe(path: str) -> str:
    """The first line of a config file's docstring ('' when it has none)."""
    with open(path, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read(), filename=path)) or ""
    return doc.strip().split("\n", 1)[0].strip()


def config_file(name_or_path: str) -> str:
    """The file ``--config=`` names: a path that exists, else a shipped config's name.

    Anything else is a one-line error listing the shipped names.
    """
    if os.path.isfile(name_or_path):
        return name_or_path
    stem = name_or_path[: -len(".py")] if name_or_path.endswith(".py") else name_or_path
    shipped = shipped_configs()
    if stem in shipped:
        return shipped[stem]
    raise UserError(
        f"no config file {name_or_path}, and no shipped config of that name "
        f"(shipped: {', '.join(shipped)}; vtm-jax configs describes them)"
    )


def listing() -> str:
    """``vtm-jax configs``: one line per shipped config, its name and what it is."""
    shipped = shipped_configs()
    width = max(map(len, shipped), default=0)
    return "\n".join(f"{name:<{width}}  {describe(path)}" for name, path in shipped.items())
