"""User paths, local or remote (``gs://`` on a TPU pod, ``s3://``...), where they touch storage.

Paths stay strings everywhere else: records, results and messages show them as the user gave
them. A path with a scheme (``gs://bucket/dir``) is read and written through
:mod:`etils.epath` (``tf.io.gfile`` when TensorFlow is installed, else fsspec), the library
orbax reads checkpoints with. A local path keeps the ``os`` calls it always had: made
absolute, symlinks followed in walks, files handed to readers by name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
from collections.abc import Iterator
from typing import IO, Any

from etils import epath

from vtm_jax.errors import UserError

PathLike = str | os.PathLike
_PLAIN = re.compile(r"[A-Za-z0-9._-]+")

# epath's backends re-raise tf.io.gfile's failures as these, with a message and no errno
# (tf's NotFoundError on a missing object has an empty one); some pass tf.errors through.
_ERRNOS = {
    FileNotFoundError: errno.ENOENT,
    PermissionError: errno.EACCES,
    FileExistsError: errno.EEXIST,
    IsADirectoryError: errno.EISDIR,
    NotADirectoryError: errno.ENOTDIR,
}
_TF_ERRORS = {
    "NotFoundError": FileNotFoundError,
    "PermissionDeniedError": PermissionError,
    "UnauthenticatedError": PermissionError,
    "AlreadyExistsError": FileExistsError,
}


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


def plain_name(name: Any, what: str) -> str:
    """``name`` if it is a plain name that can be one part of a path (letters, digits and
    ``._-``, not ``.`` or ``..``); else a one-line UserError naming ``what``. A name taken from
    data (a runs file's keys) that becomes a file or folder never leads outside its folder."""
    if not isinstance(name, str) or not _PLAIN.fullmatch(name) or name in (".", ".."):
        raise UserError(
            f"{what}: {name!r} is not a plain name (letters, digits and ._- only, not . or ..): "
            "it becomes part of an output path"
        )
    return name


def parent(path: PathLike) -> str:
    """The directory holding ``path`` (absolute for a local path)."""
    path = os.fspath(path)
    if is_remote(path):
        return str(as_path(path).parent)
    return os.path.dirname(os.path.abspath(path))


@contextlib.contextmanager
def named_errors(path: PathLike) -> Iterator[None]:
    """Remote storage failures as the ``OSError`` a local file would raise, naming ``path``.

    So they read ``gs://bucket/x: No such file or directory`` and end the command line in one
    line (``vtm_jax.errors``), whichever epath backend raised them and however.
    """
    try:
        yield
    except OSError as e:
        if e.filename is not None or type(e) not in _ERRNOS:
            raise
        code = _ERRNOS[type(e)]
        raise type(e)(code, _reason(str(e), path, code), os.fspath(path)) from None
    except Exception as e:
        kind = _TF_ERRORS.get(type(e).__name__)
        if kind is None or not (type(e).__module__ or "").startswith("tensorflow"):
            raise
        code = _ERRNOS[kind]
        raise kind(code, _reason(getattr(e, "message", ""), path, code), os.fspath(path)) from None


def _reason(message: str, path: PathLike, code: int) -> str:
    """The failure without the path (the error's filename says it), or the errno's words."""
    message = message.removeprefix(f"{os.fspath(path)}: ").strip()
    return message or os.strerror(code)


def exists(path: PathLike) -> bool:
    if is_remote(path):
        with named_errors(path):
            return as_path(path).exists()
    return os.path.exists(path)


def is_dir(path: PathLike) -> bool:
    if is_remote(path):
        with named_errors(path):
            return as_path(path).is_dir()
    return os.path.isdir(path)


def is_file(path: PathLike) -> bool:
    if is_remote(path):
        remote = as_path(path)
        with named_errors(path):
            return remote.exists() and not remote.is_dir()
    return os.path.isfile(path)


def listdir(path: PathLike) -> list[str]:
    """The names in directory ``path``."""
    if is_remote(path):
        with named_errors(path):
            return [p.name for p in as_path(path).iterdir()]
    return os.listdir(path)


def walk(root: PathLike) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` (top down, following symlinks), for local and remote trees alike.

    Sorting the yielded ``subdirs`` in place orders the walk, as with ``os.walk``.
    """
    if not is_remote(root):
        yield from os.walk(root, followlinks=True)
        return
    with named_errors(root):
        for directory, subdirs, files in as_path(root).walk():
            yield str(directory), subdirs, files


def makedirs(path: PathLike) -> None:
    """Create directory ``path`` and its parents; nothing to do where it exists."""
    if is_remote(path):
        with named_errors(path):
            as_path(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def open_file(
    path: PathLike, mode: str = "r", **kwargs: Any
) -> contextlib.AbstractContextManager[IO]:
    """``open`` for local and remote files (text is UTF-8), for a ``with`` statement."""
    if is_remote(path):
        # epath takes no newline= or errors=; a remote file is opened as it is stored.
        return _open_remote(path, mode)
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    return open(path, mode, **kwargs)


@contextlib.contextmanager
def _open_remote(path: PathLike, mode: str) -> Iterator[IO]:
    # tf.io.gfile opens lazily: a missing object fails at the first read, inside the block.
    with named_errors(path), as_path(path).open(mode) as f:
        yield f


def read_bytes(path: PathLike) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def read_text(path: PathLike) -> str:
    with open_file(path) as f:
        return f.read()
