"""Where results go: every output location checked before work starts, and written atomically.

Each command names the files and directories it will write (``--output``, ``--save-logits``,
``--workdir``, ``--out``, ``results_path``, a dataset's ``data_dir`` ...) to
:func:`check_output_file` / :func:`check_output_dir` before it loads a model, builds a dataset
or compiles anything, so an unwritable location is a one-line error at once, not a traceback
after the work. The checks follow the paths as the writers will: a file's directory must
exist, a directory may still be created (with its parents), and whatever exists must be of the
right kind and writable.

:func:`atomic_file` writes through a temporary file beside the target, replaced into place
when complete: a reader, or a resumed run, never sees half a file, and an interrupted write
leaves no temporary file behind (a killed one leaves ``<path>.tmp``, which the next write
reuses).

Remote locations (``gs://bucket/...``, :mod:`vtm_jax.paths`) get the same checks of kind and
existence through epath; whether the bucket lets this account write is only known when it does.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import IO, Any

from vtm_jax import paths
from vtm_jax.errors import UserError

TMP_SUFFIX = ".tmp"


def _writable(directory: str) -> bool:
    # W_OK | X_OK on the effective ids: root passes on a read-only mode, as it can write there;
    # a read-only file system fails for everyone.
    mode = os.W_OK | os.X_OK
    if os.access in os.supports_effective_ids:
        return os.access(directory, mode, effective_ids=True)
    return os.access(directory, mode)


def _existing_ancestor(path: str) -> str:
    """The nearest existing path at or above ``path`` (absolute)."""
    current = os.path.abspath(path)
    while not os.path.lexists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def _check_creatable(path: str, what: str, shown: str) -> None:
    """``path`` does not exist: its nearest existing ancestor must be a writable directory."""
    ancestor = _existing_ancestor(path)
    if not os.path.isdir(ancestor):
        raise UserError(f"cannot write {what} {shown}: {ancestor} is a file, not a directory")
    if not _writable(ancestor):
        raise UserError(f"cannot write {what} {shown}: {ancestor} is not writable")


def _check_remote_dir(path: str, what: str) -> None:
    # No directory on an object store is created ahead: only a file in the way is an error.
    if paths.is_file(path):
        raise UserError(f"{what} {path} is a file, not a directory")


def _check_remote_file(path: str, what: str) -> None:
    """A remote file: not a directory, and its directory exists (a mistyped path is caught)."""
    if paths.is_dir(path):
        raise UserError(f"{what} {path} is a directory; give a file path")
    parent = paths.parent(path)
    if not paths.is_dir(parent):
        raise UserError(f"cannot write {what} {path}: no directory {parent}")


def check_output_dir(path: str | os.PathLike, *, what: str) -> str:
    """Check that directory ``path`` exists and is writable, or can be created; returns it.

    ``what`` names the setting in the messages, e.g. ``'--workdir'`` or ``'data_dir'``.
    """
    shown = os.fspath(path)
    if not shown:
        raise UserError(f"{what} is empty; give a directory")
    if paths.is_remote(shown):
        _check_remote_dir(shown, what)
    elif os.path.isdir(shown):
        if not _writable(shown):
            raise UserError(f"cannot write {what} {shown}: the directory is not writable")
    elif os.path.lexists(shown):
        raise UserError(f"{what} {shown} is a file, not a directory")
    else:
        _check_creatable(shown, what, shown)
    return shown


def check_output_file(path: str | os.PathLike, *, what: str) -> str:
    """Check that file ``path`` can be written (replaced if it exists); returns it.

    Its directory must exist: a file's parent is not created, so a mistyped path is caught.
    """
    shown = os.fspath(path)
    if not shown:
        raise UserError(f"{what} is empty; give a file path")
    if paths.is_remote(shown):
        _check_remote_file(shown, what)
        return shown
    if os.path.isdir(shown):
        raise UserError(f"{what} {shown} is a directory; give a file path")
    if os.path.lexists(shown) and not os.path.isfile(shown):
        # Replacing a device or socket (e.g. /dev/null) would destroy it.
        raise UserError(f"{what} {shown} exists and is not a regular file")
    parent = os.path.dirname(os.path.abspath(shown))
    if not os.path.isdir(parent):
        ancestor = _existing_ancestor(parent)
        if os.path.isdir(ancestor):
            raise UserError(f"cannot write {what} {shown}: no directory {parent}")
        raise UserError(f"cannot write {what} {shown}: {ancestor} is a file, not a directory")
    # Written beside the target and replaced into place, so the directory must be writable.
    if not _writable(parent):
        raise UserError(f"cannot write {what} {shown}: {parent} is not writable")
    return shown


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file to write ``path`` with; it replaces ``path`` when the block ends.

    An exception (or Ctrl-C) in the block removes the temporary file and leaves ``path`` as it
    was. ``mode`` is ``'w'`` or ``'wb'``; ``kwargs`` go to ``open`` (text mode defaults to
    UTF-8).
    """
    path = os.fspath(path)
    tmp = path + TMP_SUFFIX  # a fixed name: a killed writer's leftover is reused, not piled up
    if paths.is_remote(path):
        with _remote_atomic_file(path, tmp, mode) as f:
            yield f
        return
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def _remote_atomic_file(path: str, tmp: str, mode: str) -> Iterator[IO]:
    """:func:`atomic_file` through epath: written to ``tmp``, then renamed over ``path``.

    An object store's upload appears only when complete, but writing beside the target keeps
    a half-written result out of ``path`` when the block raises, as for a local file.
    """
    remote_tmp = paths.as_path(tmp)
    try:
        with paths.open_file(tmp, mode) as f:
            yield f
        with paths.named_errors(path):
            remote_tmp.replace(path)
    except BaseException:
        with contextlib.suppress(Exception):  # tf.errors too: the first failure is the one to tell
            remote_tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Any, *, indent: int = 1, **kwargs: Any) -> None:
    """Write ``data`` as JSON atomically (:func:`atomic_file`)."""
    import json

    with atomic_file(path) as f:
        json.dump(data, f, indent=indent, **kwargs)
