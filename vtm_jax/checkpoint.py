"""Checkpoint directories: orbax parameters plus a JSON record of what the model is.

A directory holds ``params/`` (an orbax checkpoint) and ``model.json``: the architecture, the
model's constructor arguments, the input size, preprocessing, class labels and the stored
reduction settings, so a checkpoint alone says how to build and feed its model.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from vtm_jax.errors import UserError

RECORD_FILE = "model.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


def save_checkpoint(directory: str, params: Any, record: dict[str, Any]) -> None:
    """Write ``params`` and ``record`` to a new checkpoint directory."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    params_dir = os.path.join(directory, PARAMS_DIR)
    if os.path.exists(params_dir):
        raise UserError(f"{directory} already holds a checkpoint; choose a new --output")
    os.makedirs(directory, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_dir, params)
    checkpointer.wait_until_finished()
    with open(os.path.join(directory, RECORD_FILE), "w") as f:
        json.dump({"format_version": FORMAT_VERSION, **record}, f, indent=2)


def load_record(directory: str, *, scenic_record: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of a checkpoint directory.

    ``scenic_record``: ``directory`` is a bare Scenic msgpack checkpoint (a file, or a directory
    of ``checkpoint_<step>`` files), which holds no record; this one, from the Scenic config
    that names it, says what the model is (``vtm_jax.scenic_config.checkpoint_record``).
    """
    if scenic_record is not None:
        return {**scenic_record, "scenic_checkpoint": directory}
    path = os.path.join(directory, RECORD_FILE)
    if not os.path.isfile(path):
        raise UserError(
            f"{directory} is not a vtm-jax checkpoint (no {RECORD_FILE}); a Scenic msgpack "
            "checkpoint is read with a Scenic ViViT config, or converted with "
            "`vtm-jax convert --source scenic`"
        )
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    _check_record(record, path)
    return record


def _check_record(record: Any, path: str) -> None:
    """The fields every reader relies on, with the types they need."""
    if not isinstance(record, dict):
        raise UserError(f"{path} must hold a JSON object")
    expected = {"architecture": str, "model": dict, "input": dict}
    optional = {"preprocessing": dict, "token_merging": dict, "labels": list}
    for key, kind in [*expected.items(), *optional.items()]:
        if key not in record and key in expected:
            raise UserError(f"{path} has no {key!r} entry")
        if record.get(key) is not None and not isinstance(record[key], kind):
            raise UserError(f"{path}: {key!r} must be a JSON {kind.__name__}")
    for key in ("num_frames", "image_size"):
        if not isinstance(record["input"].get(key), int):
            raise UserError(f"{path}: input.{key} must be an integer")
    splits = record.get("class_splits")
    if splits is not None and (
        not isinstance(splits, list) or sum(splits) != record["model"].get("num_classes")
    ):
        raise UserError(f"{path}: class_splits must be a list adding up to num_classes")
    labels = record.get("labels")
    num_classes = record["model"].get("num_classes")
    if labels is not None and len(labels) != num_classes:
        raise UserError(f"{path}: {len(labels)} labels for {num_classes} classes")


def load_checkpoint(
    directory: str, *, scenic_record: dict[str, Any] | None = None
) -> tuple[Any, dict[str, Any]]:
    """Read ``(params, record)`` from a checkpoint directory; params are numpy arrays.

    ``scenic_record``: read a bare Scenic checkpoint as this record's model (see load_record).
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    if scenic_record is not None:
        return _load_scenic(directory, load_record(directory, scenic_record=scenic_record))
    record = load_record(directory)
    params_dir = os.path.join(directory, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise UserError(f"{directory} has no {PARAMS_DIR}/ directory")
    try:
        params = ocp.StandardCheckpointer().restore(params_dir)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot restore {params_dir}: {str(e).splitlines()[0]}") from None
    return _to_numpy(params), record


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def _load_scenic(path: str, record: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Params of a Scenic checkpoint, checked against the model its config describes."""
    from vtm_jax.convert.scenic import read_scenic_checkpoint
    from vtm_jax.models.registry import build_model, check_params_fit

    params = read_scenic_checkpoint(path)
    fields = ", ".join(f"{k}={v}" for k, v in record["model"].items())
    size = record["input"]
    try:
        check_params_fit(build_model(record), params, size)
    except UserError as e:
        raise UserError(
            f"{path} does not fit the config's model ({record['architecture']}: {fields}; "
            f"input {size['num_frames']}x{size['image_size']}x{size['image_size']}): {e}"
        ) from None
    return params, record
