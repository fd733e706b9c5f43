"""Digests of parameters and files, and finiteness checks: one helper for every checkpoint
writer and reader.

* :func:`params_digest` is the identity of a model's parameters by content: a SHA-256 over
  every leaf's path, dtype, shape and bytes, whatever file format held them. Checkpoint
  writers record it in ``model.json`` (``params_digest``), readers compare it, and evaluation
  results name the parameters they were computed with by it, so a resumed run cannot mix two
  models that happen to share a path.
* :func:`file_digests` / :func:`check_files`: a SHA-256 per file of a checkpoint's ``params/``
  directory, checked before the files are parsed, so a damaged or replaced file is named
  instead of failing somewhere inside the storage library, or worse, loading.
* :func:`check_finite_params` / :func:`check_finite`: NaN or infinite values, which would
  make every prediction NaN, are refused where they enter.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from vtm_jax import paths
from vtm_jax.errors import UserError

DIGEST_PREFIX = "sha256:"
_CHUNK = 1 << 20


def _leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` of a nested mapping, in sorted key order (independent of insertion)."""
    if hasattr(tree, "items"):
        for key in sorted(tree, key=str):
            yield from _leaves(tree[key], f"{prefix}{key}/")
    else:
        yield prefix.rstrip("/"), tree


def params_digest(params: Any) -> str:
    """``'sha256:<hex>'`` of a parameter tree's content: paths, dtypes, shapes and values."""
    digest = hashlib.sha256()
    for path, leaf in _leaves(params):
        array = np.asarray(leaf)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        array = np.ascontiguousarray(array)
        digest.update(f"{path}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.reshape(-1).view(np.uint8))
    return DIGEST_PREFIX + digest.hexdigest()


def file_digests(directory: str) -> dict[str, str]:
    """SHA-256 of every regular file below ``directory``, keyed by its relative path.

    ``directory`` may be remote (``gs://...``): the files are read through epath.
    """
    if paths.is_remote(directory):
        return _remote_digests(directory)
    digests = {}
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            digests[os.path.relpath(path, directory).replace(os.sep, "/")] = _file_sha256(path)
    return digests


def _remote_digests(directory: str) -> dict[str, str]:
    base = paths.as_path(directory)
    digests = {}
    for root, dirs, files in base.walk():
        dirs.sort()
        for name in sorted(files):
            path = root / name
            digests[path.relative_to(base).as_posix()] = _file_sha256(path)
    return digests


def _file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with paths.open_file(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_files(directory: str, recorded: Mapping[str, str], *, label: str, record: str) -> None:
    """A UserError naming each file of ``directory`` that differs from ``recorded``.

    ``label`` is how the directory is shown (e.g. ``ckpt/params``), ``record`` the file that
    holds ``recorded`` (e.g. ``ckpt/model.json``).
    """
    found = file_digests(directory) if paths.is_dir(directory) else {}
    missing = [name for name in recorded if name not in found]
    changed = [name for name in recorded if name in found and found[name] != recorded[name]]
    extra = [name for name in found if name not in recorded]
    if not (missing or changed):
        return  # extra files (a backup, an editor's) cannot change what is restored
    if missing and extra:
        raise UserError(
            f"{label} does not hold the files {record} was written with (missing "
            f"{_names(missing)}; unexpected {_names(extra)}): another checkpoint's parameters? "
            "Restore the checkpoint or convert it again"
        )
    problems = []
    if changed:
        names = _names([f"{label}/{n}" for n in changed])
        problems.append(f"{names} damaged: sha256 differs from what {record} records")
    if missing:
        problems.append(f"{_names([f'{label}/{n}' for n in missing])} missing")
    raise UserError(f"{'; '.join(problems)}; restore the checkpoint or convert it again")


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def nonfinite_leaves(params: Any) -> list[str]:
    """Paths of the floating-point leaves holding a NaN or an infinity."""
    bad = []
    for path, leaf in _leaves(params):
        array = np.asarray(leaf)
        if np.issubdtype(array.dtype, np.inexact) or array.dtype.name == "bfloat16":
            if not np.isfinite(array.astype(np.float32, copy=False)).all():
                bad.append(path)
    return bad


def check_finite_params(params: Any, *, where: str) -> None:
    """A UserError when any parameter is NaN or infinite (``where`` names their file)."""
    bad = nonfinite_leaves(params)
    if bad:
        raise UserError(
            f"{where}: parameter(s) {_names(bad)} hold NaN or infinite values; the file is "
            "damaged or the model diverged"
        )


def check_finite(array: np.ndarray, *, what: str) -> None:
    """A UserError when ``array`` holds NaN or infinite values (``what`` names it)."""
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.inexact):
        finite = np.isfinite(array)
        if not finite.all():
            count = int(finite.size - finite.sum())
            raise UserError(f"{what} holds {count} NaN or infinite value(s)")
