"""Name lookup shared by the rule and schedule registries: a registered name, or a lazy path.

A config names an extension either by the name it was registered under or by a
``"package.module:attribute"`` path, which is imported when first looked up, so an extension
works from a config or the command line without anything importing it beforehand.

A path that a config file holds (set in the file or by a ``--config.x=y`` override) whose
module is not importable from ``sys.path`` is also looked for in that config file's folder and
then in the current folder, as ``python my_script.py`` would find it, although the ``vtm-jax``
console script does not put the current folder on ``sys.path``. The folders are on ``sys.path``
only while that module is imported. A name that only a data file holds (a ``model.json``'s
stored merging settings, a results file) gets no such search: data files never import code
from the folders they sit in or are run from.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

from vtm_jax.errors import UserError

T = TypeVar("T")

# Configs loaded from files (weakly: a sweep loads hundreds), each with its file's folder. A
# path one of them holds is the config's or the command line's, so it may name a module beside
# the config file or in the current folder.
_CONFIGS: list[tuple[weakref.ref, str]] = []


def is_path(name: str) -> bool:
    """Whether ``name`` is a ``module:attribute`` path rather than a registered name."""
    return ":" in name


def load_object(path: str, *, what: str) -> Any:
    """The attribute a ``"package.module:attribute"`` path names, importing the module.

    ``attribute`` may be dotted (``module:Class.attr``). A module that ``sys.path`` lacks is
    looked for beside the config file holding ``path``, then in the current folder (the
    module docstring). Errors are one-line UserErrors naming ``what`` (e.g. ``mode``) and the
    path.
    """
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise UserError(f"{what} path {path!r} must look like 'package.module:attribute'")
    obj: Any = _import(module_name, path, what)
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UserError(
                f"{what} {path!r}: {module_name!r} has no attribute {attribute!r}"
            ) from None
    return obj


def config_loaded(config: Any, file_path: str) -> None:
    """Note a config read from ``file_path``: the paths it holds, now or after its overrides,
    may name modules in the file's folder or the current folder (``load_object``)."""
    try:
        ref = weakref.ref(config)
    except TypeError:  # not a config (None, or a bad get_config()): the loader refuses it
        return
    _CONFIGS[:] = [(r, folder) for r, folder in _CONFIGS if r() is not None]
    _CONFIGS.append((ref, os.path.dirname(os.path.abspath(file_path))))


def _strings(value: Any) -> Iterator[str]:
    """Every string in a config (ConfigDicts, dicts, lists and tuples, at any depth)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)
    elif hasattr(value, "items"):
        for _, item in value.items():
            yield from _strings(item)


def local_folders(path: str) -> list[str]:
    """Where a module of ``path`` may be besides ``sys.path``: the folders of the loaded
    config files holding ``path``, then the current folder; none for a path no config holds."""
    folders = [
        folder
        for ref, folder in _CONFIGS
        if (config := ref()) is not None and path in set(_strings(config))
    ]
    if folders:
        folders.append(os.getcwd())
    return list(dict.fromkeys(folders))


def _import(module_name: str, path: str, what: str) -> Any:
    """The module, from ``sys.path`` or else from ``local_folders(path)``, which are on
    ``sys.path`` only during this import (appended: they never shadow an installed module)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Only a module that is not there at all; one that fails inside is the user's error.
        folders = local_folders(path) if e.name == module_name.split(".")[0] else []
        if not folders:
            raise UserError(f"cannot import {module_name!r} for {what} {path!r}: {e}") from None
    except ImportError as e:
        raise UserError(f"cannot import {module_name!r} for {what} {path!r}: {e}") from None
    added = [folder for folder in folders if folder not in sys.path]
    sys.path.extend(added)
    importlib.invalidate_caches()  # a module written since the folder was last listed
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        where = ", ".join(folders)
        raise UserError(
            f"cannot import {module_name!r} for {what} {path!r} (looked in sys.path and "
            f"{where}): {e}"
        ) from None
    finally:
        for folder in added:
            sys.path.remove(folder)


def check_function(obj: Any, path: str, *, what: str, arguments: Sequence[str]) -> None:
    """Refuse what a path names unless it is a function taking ``arguments``, before any call.

    A path can name anything importable (``os:system``); only a Python function (or another
    callable object that is not a class or a builtin) whose signature accepts the arguments
    vtm-jax will pass is called.
    """
    shown = ", ".join(arguments)
    if inspect.isclass(obj) or inspect.ismodule(obj) or not callable(obj):
        kind = "module" if inspect.ismodule(obj) else type(obj).__name__
        if inspect.isclass(obj):
            kind = f"class {obj.__name__}"
        raise UserError(f"{what} {path!r} names a {kind}, not a function ({shown})")
    if inspect.isbuiltin(obj):
        raise UserError(f"{what} {path!r} names a builtin, not a {what} function ({shown})")
    try:
        inspect.signature(obj).bind(*arguments)
    except (TypeError, ValueError):
        raise UserError(
            f"{what} {path!r} does not take the arguments ({shown}) a {what} function gets"
        ) from None


def check_name(registry: Mapping[str, Any], name: str, value: Any, *, replace: bool) -> None:
    """Refuse a name that cannot be looked up, or one taken by something else."""
    if not isinstance(name, str) or not name or is_path(name) or name != name.strip():
        raise ValueError(f"a registered name must be a non-empty string without ':', not {name!r}")
    if name in registry and registry[name] != value and not replace:
        raise ValueError(f"{name!r} is already registered; pass replace=True to override it")


def valid_names(registry: Mapping[str, T]) -> str:
    """The one-line list of choices an unknown-name error shows."""
    return ", ".join(registry) + ", or a 'package.module:attribute' path"
