"""``vtm-jax convert``: weights of another library into a vtm-jax checkpoint directory."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from vtm_jax import paths
from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.errors import UserError


def convert(
    source: str,
    input_path: str,
    output: str,
    *,
    num_frames: int | None = None,
    image_size: int | None = None,
    num_heads: int | None = None,
    class_splits: Sequence[int] | None = None,
    overwrite: bool = False,
) -> ModelRecord:
    """Convert ``input_path`` (a ``source`` format: ``hf``, ``scenic``, ``motionformer``,
    ``slowfast``) into the new checkpoint directory ``output``; returns its record.

    A checkpoint already in ``output`` is refused unless ``overwrite`` (then replaced);
    ``output`` (or its ``model.json`` or ``params``) being ``input_path`` is refused always.

    ``class_splits``: the sizes of the heads in one concatenated classifier (EPIC-KITCHENS'
    ``[97, 300]``); they must add up to the classifier's classes.
    """
    from vtm_jax.checkpoints.convert.sources import load_source
    from vtm_jax.checkpoints.store import check_new_checkpoint, checkpoint_inputs, save_checkpoint
    from vtm_jax.outputs import check_not_inputs

    # Before the weights are read.
    written = [v for v in checkpoint_inputs(output).values() if v]
    check_not_inputs(written, what="--output", inputs={"--input": input_path})
    check_new_checkpoint(output, what="--output", overwrite=overwrite)
    params, record = load_source(
        source, input_path, num_frames=num_frames, image_size=image_size, num_heads=num_heads
    )
    splits = record.class_splits
    if class_splits:
        splits = [int(v) for v in class_splits]
        if sum(splits) != record.num_classes:
            raise UserError(
                f"--class-splits add up to {sum(splits)}, the classifier has "
                f"{record.num_classes} classes"
            )
    converted_from = {"source": source, "path": paths.absolute(input_path)}
    if source == "hf" and not paths.exists(input_path):  # a Hub id, read from the cache
        from vtm_jax.checkpoints.convert.hub import cached_snapshot

        converted_from = {
            "source": "hf",
            "repo_id": input_path,
            "path": cached_snapshot(input_path),
        }
    record = dataclasses.replace(record, class_splits=splits, converted_from=converted_from)
    save_checkpoint(output, params, record, overwrite=overwrite)
    return record
