"""Checkpoint directories: orbax parameters plus a JSON record of what the model is.

A directory holds ``params/`` (an orbax checkpoint) and ``model.json``: the architecture, the
model's constructor arguments, the input size, preprocessing, class labels and the stored
merging settings (a :class:`vtm_jax.checkpoints.record.ModelRecord`), so a checkpoint alone says how to
build and feed its model.

The directory may be local or remote (``gs://bucket/ckpt`` on a TPU pod): orbax and the
record go through epath (:mod:`vtm_jax.paths`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
from typing import Any

import numpy as np

from vtm_jax import paths
from vtm_jax.checkpoints import integrity
from vtm_jax.checkpoints.record import FORMAT_VERSION, ModelRecord, read_record, write_record
from vtm_jax.errors import UserError, one_line, writing

RECORD_FILE = "model.json"
PARAMS_DIR = "params"
STAGING_SUFFIX = ".tmp"  # a checkpoint being written, beside its directory


def save_checkpoint(
    directory: str, params: Any, record: ModelRecord, *, overwrite: bool = False
) -> None:
    """Write ``params`` and ``record`` to a new checkpoint directory.

    The record gets the parameters' content digest (``params_digest``) and a SHA-256 per file
    of ``params/`` (``params_files``), which :func:`load_checkpoint` verifies. Parameters
    holding NaN or infinities are refused: such a checkpoint could only predict NaN.
    ``overwrite`` replaces a checkpoint already there.

    The whole checkpoint is written beside ``directory`` as ``<directory>.tmp``, read back and
    verified, then moved into place: a write that fails (a full disk: one line naming the
    directory) or is killed leaves ``directory`` as it was, never parameters without their
    ``model.json``; the next write removes a killed one's ``.tmp``.
    """
    directory = paths.absolute(directory).rstrip("/")
    check_new_checkpoint(directory, what="checkpoint directory", overwrite=overwrite)
    params = _to_numpy(params)
    integrity.check_finite_params(params, where=f"parameters for {directory}")
    staging = directory + STAGING_SUFFIX
    try:
        with writing(directory):
            _remove(staging)  # a killed write's leftover
            _write_staged(staging, params, record)
    except BaseException as e:
        _quiet_closed_event_loop()  # orbax's writes still in flight report a closed loop
        with contextlib.suppress(Exception):  # the first failure is the one to tell
            _remove(staging)
        if isinstance(e, OSError) and str(e.filename or "").startswith(staging):
            raise OSError(e.errno, e.strerror, directory + e.filename[len(staging) :]) from None
        raise
    _move_into_place(staging, directory)


def _write_staged(staging: str, params: Any, record: ModelRecord) -> None:
    """The checkpoint of ``params`` and ``record`` in ``staging``, read back and verified."""
    import orbax.checkpoint as ocp

    digest = integrity.params_digest(params)
    paths.makedirs(staging)
    params_dir = paths.join(staging, PARAMS_DIR)
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(params_dir, params)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()
    record = dataclasses.replace(
        record,
        format_version=FORMAT_VERSION,
        params_digest=digest,
        params_files=integrity.file_digests(params_dir),
    )
    write_record(paths.join(staging, RECORD_FILE), record)
    load_checkpoint(staging)  # what was written loads, and its digests match


def _move_into_place(staging: str, directory: str) -> None:
    """Rename the verified checkpoint in ``staging`` to ``directory``.

    A new directory is one rename. Into an existing one (a checkpoint replaced, or a folder
    that holds other files), the old ``model.json`` goes first and the new one comes last: a
    kill in between leaves ``params/`` without ``model.json`` and the ``.tmp`` beside it,
    which loading calls an unfinished write and the next write replaces.
    """
    if not paths.exists(directory):
        paths.as_path(staging).rename(directory)
        return
    old_params = paths.join(directory, PARAMS_DIR + ".old")
    _remove(paths.join(directory, RECORD_FILE))
    _remove(old_params)
    if paths.exists(paths.join(directory, PARAMS_DIR)):
        paths.as_path(paths.join(directory, PARAMS_DIR)).rename(old_params)
    paths.as_path(paths.join(staging, PARAMS_DIR)).rename(paths.join(directory, PARAMS_DIR))
    paths.as_path(paths.join(staging, RECORD_FILE)).rename(paths.join(directory, RECORD_FILE))
    _remove(old_params)
    _remove(staging)


def _remove(path: str) -> None:
    """Remove a file or a directory tree, if there is one."""
    target = paths.as_path(path)
    if target.is_dir():
        target.rmtree()
    elif target.exists():
        target.unlink()


def check_new_checkpoint(directory: str, *, what: str, overwrite: bool = False) -> None:
    """``directory`` can take a new checkpoint: writable, and not holding one already (nor a
    ``model.json`` or ``params``), unless ``overwrite``."""
    from vtm_jax.outputs import check_output_dir, claim_outputs

    check_output_dir(directory, what=what)

    def owner(path: str) -> str | None:  # a checkpoint is never rewritten but on request
        if paths.exists(paths.join(path, PARAMS_DIR)):
            if paths.exists(paths.join(path, RECORD_FILE)):
                return "already holds a checkpoint"
            if paths.exists(path.rstrip("/") + STAGING_SUFFIX):
                return None  # a write killed while moving into place: this one finishes it
            return f"holds the {PARAMS_DIR}/ of an unfinished conversion or export"
        if paths.exists(paths.join(path, RECORD_FILE)):
            return f"holds a {RECORD_FILE} without a checkpoint's {PARAMS_DIR}"
        return None  # nothing there a checkpoint would replace

    claim_outputs({directory: owner}, what=what, overwrite=overwrite)


def checkpoint_inputs(directory: str | None) -> dict[str, str | None]:
    """A checkpoint a command reads, as the named inputs no output may be
    (``vtm_jax.outputs.claim_outputs``): the directory, its record and its parameters."""
    if not directory:
        return {}
    return {
        "the checkpoint": directory,
        f"the checkpoint's {RECORD_FILE}": paths.join(directory, RECORD_FILE),
        f"the checkpoint's {PARAMS_DIR}": paths.join(directory, PARAMS_DIR),
    }


def checkpoint_loads(directory: str) -> bool:
    """Whether ``directory`` holds a checkpoint that loads and verifies."""
    if not paths.exists(directory):
        return False
    try:
        load_checkpoint(directory)
    except UserError:
        return False
    return True


def load_record(directory: str, *, scenic_record: ModelRecord | None = None) -> ModelRecord:
    """The record of a checkpoint directory.

    ``scenic_record``: ``directory`` is a bare Scenic msgpack checkpoint (a file, or a directory
    of ``checkpoint_<step>`` files), which holds no record; this one, from the Scenic config
    that names it, says what the model is (``vtm_jax.config.scenic_checkpoint.checkpoint_record``).
    """
    if scenic_record is not None:
        return dataclasses.replace(scenic_record, scenic_checkpoint=directory)
    path = paths.join(directory, RECORD_FILE)
    if not paths.is_file(path) and paths.is_dir(paths.join(directory, PARAMS_DIR)):
        raise UserError(
            f"{directory} holds {PARAMS_DIR}/ but no {RECORD_FILE}: an unfinished conversion "
            "or export; rerun the command that wrote it"
        )
    if not paths.is_file(path):
        raise UserError(
            f"{directory} is not a vtm-jax checkpoint (no {RECORD_FILE}); a Scenic msgpack "
            "checkpoint is read with a Scenic ViViT config, or converted with "
            "`vtm-jax convert --source scenic`"
        )
    return read_record(path)


def load_checkpoint(
    directory: str, *, scenic_record: ModelRecord | None = None, verify: bool = True
) -> tuple[Any, ModelRecord]:
    """Read ``(params, record)`` from a checkpoint directory; params are numpy arrays.

    ``verify``: check the files of ``params/`` against the SHA-256s the record keeps (naming a
    damaged, missing or replaced file before anything parses it), the parameters against the
    record's ``params_digest``, and that every parameter is finite. Checkpoints written before
    digests existed are read without the digest checks. ``verify=False`` skips all of them.
    The returned record's ``params_digest`` identifies the parameters by content (computed
    when the record has none).

    ``scenic_record``: read a bare Scenic checkpoint as this record's model (see load_record).
    """
    directory = paths.absolute(directory)
    if scenic_record is not None:
        return _load_scenic(
            directory, load_record(directory, scenic_record=scenic_record), verify=verify
        )
    record = load_record(directory)
    params_dir = paths.join(directory, PARAMS_DIR)
    if not paths.is_dir(params_dir):
        raise UserError(f"{directory} has no {PARAMS_DIR}/ directory")
    record_path = paths.join(directory, RECORD_FILE)
    if verify and record.params_files:
        integrity.check_files(params_dir, record.params_files, label=params_dir, record=record_path)
    params = _to_numpy(_restore(params_dir))
    recorded = record.params_digest
    if verify:
        integrity.check_finite_params(params, where=params_dir)
        digest = integrity.params_digest(params)
        if recorded is not None and digest != recorded:
            raise UserError(
                f"the parameters in {params_dir} are not the ones {record_path} was written "
                f"with (params_digest {digest[:19]}... instead of {recorded[:19]}...): damaged, "
                "or model.json belongs to another checkpoint"
            )
        record = dataclasses.replace(record, params_digest=digest)
    elif recorded is None:
        record = dataclasses.replace(record, params_digest=integrity.params_digest(params))
    return params, record


def _restore(params_dir: str) -> Any:
    """Orbax's restore of ``params_dir``, its failures as one line naming the file."""
    import orbax.checkpoint as ocp

    try:
        return ocp.StandardCheckpointer().restore(params_dir)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        _quiet_closed_event_loop()
        text = str(e).split(" [tensorstore_spec=")[0]  # drop the pages of driver settings
        # The innermost file named is the one that failed to decode (the others are the
        # database directory it was read through).
        files = [f for f in re.findall(r'local file "([^"]+)"', text) if not f.endswith("/")]
        where = f" ({files[-1]} is damaged)" if files else ""
        raise UserError(f"cannot restore {params_dir}{where}: {one_line(text)}") from None


def _quiet_closed_event_loop() -> None:
    """Silence tensorstore's late callbacks after a failed restore.

    When one read fails, orbax closes its event loop while tensorstore's other reads are
    still in flight; each then reports ``RuntimeError: Event loop is closed`` as an
    unraisable exception, a screenful of tracebacks after the one-line error. Only that
    exception is dropped; every other unraisable one still reaches the previous hook.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_vtm_jax_quiet", False):
        return

    def hook(unraisable: Any) -> None:
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        previous(unraisable)

    hook._vtm_jax_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def _load_scenic(path: str, record: ModelRecord, *, verify: bool = True) -> tuple[Any, ModelRecord]:
    """Params of a Scenic checkpoint, checked against the model its config describes."""
    from vtm_jax.checkpoints.convert.scenic import read_scenic_checkpoint
    from vtm_jax.models.registry import build_model, check_params_fit

    params = read_scenic_checkpoint(path)
    fields = ", ".join(f"{k}={v}" for k, v in record.model.items())
    try:
        check_params_fit(build_model(record), params, record.input)
    except UserError as e:
        raise UserError(
            f"{path} does not fit the config's model ({record.architecture}: {fields}; "
            f"input {record.num_frames}x{record.image_size}x{record.image_size}): {e}"
        ) from None
    if verify:
        integrity.check_finite_params(params, where=path)
    # A bare Scenic file records no digest: its content is its identity (evaluation resume).
    return params, dataclasses.replace(record, params_digest=integrity.params_digest(params))
