"""Run a checkpoint at another frame count than it was trained for (docs/method.md §6, family 34).

The token count of a video model follows its frame count, and so does the shape of its learned
temporal position table. Everything else (patch embedding, blocks, head) fits any frame count
that is a multiple of the tubelet length. What happens to the table that no longer fits is a
named choice:

* ``paper``: the table becomes zeros. The paper's checkpoint loader skips every tensor whose
  shape differs from the model's, so the HF ViViT it builds for 16 frames keeps its freshly
  initialised position embeddings, which transformers 4.46 makes zeros (class token entry
  included, as HF keeps one table). This reproduces family 34. The same rule is applied to the
  other backbones' learned temporal tables, where the paper ran no such experiment.
* ``interpolate``: the learned temporal positions are resampled linearly (half-pixel centres,
  edges clamped) to the new number of temporal slots; spatial positions and a class token's
  entry are kept. This is the fix.

VideoMAE's positions are a fixed sinusoid table regenerated from the token count, so nothing is
lost there under either choice.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.errors import UserError
from vtm_jax.models.base import TemporalTable
from vtm_jax.models.registry import ARCHITECTURES, build_model

POSITION_CHOICES = ("paper", "interpolate")


def temporal_tables(record: ModelRecord) -> list[TemporalTable]:
    """The learned tables of a record's model that depend on its frame count (the backbone
    says where they are: ``Backbone.temporal_tables``)."""
    if record.architecture not in ARCHITECTURES:
        raise UserError(
            f"{record.architecture} cannot change its frame count (unknown architecture; "
            f"valid: {', '.join(ARCHITECTURES)})"
        )
    return build_model(record).temporal_tables(record.image_size)


def tubelet(record: ModelRecord) -> int:
    """Frames per temporal slot (the tubelet length; 1 for per-frame patches)."""
    patch = record.model.get("patch_size", (2, 16, 16))
    return int(patch[0]) if len(patch) == 3 else 1


def change_frames(
    params: dict[str, Any], record: ModelRecord, num_frames: int, positions: str = "paper"
) -> tuple[dict[str, Any], ModelRecord]:
    """``(params, record)`` for running the model on ``num_frames``-frame clips.

    Only the learned temporal tables change (see the module docstring for ``positions``);
    ``params`` is not modified in place. A frame count the tubelets cannot cut, or an unknown
    choice, is a UserError.
    """
    if positions not in POSITION_CHOICES:
        raise UserError(
            f"unknown position_embeddings {positions!r}; valid: {', '.join(POSITION_CHOICES)}"
        )
    old = record.num_frames
    t = tubelet(record)
    if not isinstance(num_frames, int) or num_frames < t or num_frames % t:
        raise UserError(
            f"{record.architecture} cannot run {num_frames} frames: not a positive multiple "
            f"of its tubelet length {t}"
        )
    tables = temporal_tables(record)
    new_record = dataclasses.replace(record, num_frames=num_frames)
    if num_frames == old:
        return params, new_record
    params = _copy_path_dicts(params, [table.path for table in tables])
    for table in tables:
        parent = params
        for key in table.path[:-1]:
            if key not in parent:
                raise UserError(f"the checkpoint has no {'/'.join(table.path)}")
            parent = parent[key]
        if table.path[-1] not in parent:
            raise UserError(f"the checkpoint has no {'/'.join(table.path)}")
        value = np.asarray(parent[table.path[-1]])
        expected = table.class_entries + (old // t) * table.per_slot
        if value.ndim != 3 or value.shape[1] != expected:
            raise UserError(
                f"{'/'.join(table.path)} has shape {value.shape}, not the (1, {expected}, D) "
                f"of {old} frames"
            )
        parent[table.path[-1]] = resize_table(value, table, num_frames // t, positions)
    return params, new_record


def resize_table(value: np.ndarray, table: TemporalTable, slots: int, positions: str) -> np.ndarray:
    """One table for ``slots`` temporal slots: zeros (``paper``) or resampled (``interpolate``)."""
    batch, _, width = value.shape
    length = table.class_entries + slots * table.per_slot
    if positions == "paper":
        return np.zeros((batch, length, width), value.dtype)
    head = value[:, : table.class_entries]
    grid = value[:, table.class_entries :].reshape(batch, -1, table.per_slot, width)
    resampled = resample_linear(grid, slots, axis=1).reshape(batch, -1, width)
    return np.concatenate([head, resampled], axis=1).astype(value.dtype)


def resample_linear(x: np.ndarray, length: int, *, axis: int) -> np.ndarray:
    """Linear resampling of ``axis`` to ``length`` samples, half-pixel centres, edges clamped.

    Halving averages neighbouring pairs; the same length returns ``x`` unchanged.
    """
    old = x.shape[axis]
    centres = (np.arange(length) + 0.5) * old / length - 0.5
    centres = np.clip(centres, 0, old - 1)
    low = np.floor(centres).astype(int)
    high = np.minimum(low + 1, old - 1)
    frac = (centres - low).reshape([-1 if i == axis else 1 for i in range(x.ndim)])
    x = x.astype(np.float64)
    out = np.take(x, low, axis=axis) * (1 - frac) + np.take(x, high, axis=axis) * frac
    return out


def _copy_path_dicts(tree: dict[str, Any], paths: list[tuple[str, ...]]) -> dict[str, Any]:
    """A copy of ``tree`` with new dicts along ``paths``, so the caller's tree is untouched."""
    tree = dict(tree)
    for path in paths:
        node = tree
        for key in path[:-1]:
            if key not in node or not hasattr(node[key], "items"):
                break
            node[key] = dict(node[key])
            node = node[key]
    return tree
