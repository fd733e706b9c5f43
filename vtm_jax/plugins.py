"""Name lookup shared by the rule and schedule registries: a registered name, or a lazy path.

A config names an extension either by the name it was registered under or by a
``"package.module:attribute"`` path, which is imported when first looked up, so an extension
works from a config or the command line without anything importing it beforehand.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from vtm_jax.errors import UserError

T = TypeVar("T")


def is_path(name: str) -> bool:
    """Whether ``name`` is a ``module:attribute`` path rather than a registered name."""
    return ":" in name


def load_object(path: str, *, what: str) -> Any:
    """The attribute a ``"package.module:attribute"`` path names, importing the module.

    ``attribute`` may be dotted (``module:Class.attr``). Errors are one-line UserErrors
    naming ``what`` (e.g. ``mode``) and the path.
    """
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise UserError(f"{what} path {path!r} must look like 'package.module:attribute'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"cannot import {module_name!r} for {what} {path!r}: {e}") from None
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UserError(
                f"{what} {path!r}: {module_name!r} has no attribute {attribute!r}"
            ) from None
    return obj


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
