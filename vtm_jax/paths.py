"""User paths, local or remote (``gs://`` on a TPU pod, ``s3://``...), where they touch storage.

Paths stay strings everywhere else: records, results and messages show them as the user gave
them. A path with a scheme (``gs://bucket/dir``) is read and written through
:mod:`etils.epath` (``tf.io.gfile`` when TensorFlow is installed, else fsspec), the library
orbax reads checkpoints with. A local path keeps the ``os`` calls it always had: made
absolute, symlinks followed in walks, files handed to readers by name.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from typing import IO, Any

from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """True for a path with a scheme (``gs://``, ``s3://``...), read through epath."""
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    return epath.Path(os.fspath(path))


def absolute(path: PathLike) -> str:
    """A local path made absolute; a remote one as given (it is absolute already)."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(path)


def join(base: PathLike, *names: str) -> str:
    # posixpath for remote paths: `os.path` would use backslashes on Windows.
    base = os.fspath(base)
    return posixpath.join(base, *names) if is_remote(base) else os.path.join(base, *names)


def parent(path: PathLike) -> str:
    """The directory holding ``path`` (absolute for a local path)."""
    path = os.fspath(path)
    if is_remote(path):
        return str(as_path(path).parent)
    return os.path.dirname(os.path.abspath(path))


def exists(path: PathLike) -> bool:
    return as_path(path).exists() if is_remote(path) else os.path.exists(path)


def is_dir(path: PathLike) -> bool:
    return as_path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def is_file(path: PathLike) -> bool:
    if is_remote(path):
        remote = as_path(path)
        return remote.exists() and not remote.is_dir()
    return os.path.isfile(path)


def listdir(path: PathLike) -> list[str]:
    """The names in directory ``path``."""
    return [p.name for p in as_path(path).iterdir()] if is_remote(path) else os.listdir(path)


def walk(root: PathLike) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` (top down, following symlinks), for local and remote trees alike.

    Sorting the yielded ``subdirs`` in place orders the walk, as with ``os.walk``.
    """
    if not is_remote(root):
        yield from os.walk(root, followlinks=True)
        return
    for directory, subdirs, files in as_path(root).walk():
        yield str(directory), subdirs, files


def makedirs(path: PathLike) -> None:
    """Create directory ``path`` and its parents; nothing to do where it exists."""
    if is_remote(path):
        as_path(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def open_file(path: PathLike, mode: str = "r", **kwargs: Any) -> IO:
    """``open`` for local and remote files (text is UTF-8)."""
    if is_remote(path):
        # epath takes no newline= or errors=; a remote file is opened as it is stored.
        return as_path(path).open(mode)
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    return open(path, mode, **kwargs)


def read_bytes(path: PathLike) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def read_text(path: PathLike) -> str:
    with open_file(path) as f:
        return f.read()
