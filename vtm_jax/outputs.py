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

:func:`claim_outputs` is the one rule about what a command may replace, applied to every file
it will write before any work: an output that does not exist is written; one the command
recognises as its own (a rerun, a resume) is rewritten as before; anything else (a user's file,
another command's output) is refused in one line naming it, unless ``overwrite`` (``--overwrite``);
and an output that is one of the command's inputs is refused even then. Outputs recognise
themselves: a JSON result by its ``format`` marker (:func:`results_owner`), a file derived from
it (a table, a plot, scores) by the JSON beside it (:func:`beside_owner`), a picture by the
marker in its metadata (``jobs.pictures``), a checkpoint by its ``model.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import IO, Any

from vtm_jax import paths
from vtm_jax.errors import UserError, storage_failure

TMP_SUFFIX = ".tmp"
OVERWRITE_HINT = "pass --overwrite to replace it"

Owner = Callable[[str], "str | None"]
"""Says of an existing output path whether it is the command's own: None, or what it is instead
(``'exists and is not bench results'``), which the refusal names."""


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
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        failure = storage_failure(e, path)  # a full disk: one line naming the file
        if failure is not None:
            raise failure from None
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
    with atomic_file(path) as f:
        json.dump(data, f, indent=indent, **kwargs)


# ----------------------------------------------------------------- what may be replaced


def claim_outputs(
    targets: Mapping[str, Owner],
    *,
    what: str,
    overwrite: bool = False,
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
) -> None:
    """Refuse, before any work, outputs that would replace what is not the command's own.

    ``targets``: each path the command will write (file or directory), with the :data:`Owner`
    that recognises an existing one as the command's own output. ``inputs``: what the command
    reads, named for the message (``{"--video": path}``); an output that is one of them is
    refused even with ``overwrite``. ``what`` names the setting in the messages.
    """
    check_not_inputs(targets, what=what, inputs=inputs)
    if overwrite:
        return
    for path, owner in targets.items():
        if paths.exists(path):
            found = owner(path)
            if found is not None:
                raise UserError(f"{what} {path} {found}; {OVERWRITE_HINT}")


def check_not_inputs(
    targets: Collection[str],
    *,
    what: str,
    inputs: Mapping[str, str | os.PathLike | None] | None,
) -> None:
    """No output in ``targets`` is one of ``inputs`` (named paths the command reads), whatever
    ``overwrite`` says: a command never writes onto its own input."""
    for path in targets:
        for name, source in (inputs or {}).items():
            if source is not None and same_path(path, os.fspath(source)):
                raise UserError(
                    f"{what} {path} is {name}, an input of this command; a command never "
                    f"writes onto its own input: choose another {what}"
                )


def same_path(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` name one file or directory (links followed where they exist)."""
    if paths.is_remote(a) or paths.is_remote(b):
        return a.rstrip("/") == b.rstrip("/")
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def read_json_object(path: str) -> dict[str, Any] | None:
    """The JSON object in file ``path``; None when it holds anything else (or cannot be read)."""
    try:
        with paths.open_file(path, "rb") as f:
            if f.read(4096).lstrip()[:1] != b"{":  # not JSON: a big binary file is not read
                return None
            f.seek(0)
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):  # a directory, unreadable, not UTF-8, not JSON
        return None
    return data if isinstance(data, dict) else None


def results_owner(marker: str, label: str, *, legacy: Collection[str] = ()) -> Owner:
    """The owner of a JSON result whose ``format`` is ``marker``; ``label`` names it in the
    messages (``'bench results'``). ``legacy``: the keys a result written before it carried
    the marker has (all of them, and no ``format``), so an earlier version's file is one too."""

    def owner(path: str) -> str | None:
        data = read_json_object(path)
        if data is not None and data.get("format") == marker:
            return None
        if data is not None and legacy and "format" not in data and set(legacy) <= set(data):
            return None
        found = data.get("format") if data is not None else None
        if isinstance(found, str) and found.startswith("vtm-jax"):
            return f"holds another vtm-jax output (format {found!r}), not {label}"
        return f"exists and is not {label}"

    return owner


def beside_owner(results: str, marker: str, label: str, *, legacy: Collection[str] = ()) -> Owner:
    """The owner of a file derived from the JSON result ``results`` (its table, plot or
    scores): the command's own when that JSON is (:func:`results_owner`)."""
    own = results_owner(marker, label, legacy=legacy)

    def owner(path: str) -> str | None:
        if not paths.exists(results):
            return f"exists and is not part of {label} (there is no {results} beside it)"
        if own(results) is not None:
            return f"exists and is not part of {label} ({results} beside it is not)"
        return None

    return owner


def results_targets(
    results: str,
    derived: Collection[str],
    marker: str,
    label: str,
    *,
    legacy: Collection[str] = (),
) -> dict[str, Owner]:
    """:func:`claim_outputs` targets of a JSON result and the files derived from it."""
    targets = {results: results_owner(marker, label, legacy=legacy)}
    for path in derived:
        targets[path] = beside_owner(results, marker, label, legacy=legacy)
    return targets


def not_ours(label: str) -> Owner:
    """The owner of an output nothing marks: whatever exists there is refused."""
    return lambda path: f"exists and is not {label}"
