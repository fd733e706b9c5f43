"""Bare Scenic checkpoints named by a Scenic ViViT config: the record that describes them.

A Scenic msgpack checkpoint holds parameters only. When a Scenic ViViT config names one as
its ``checkpoint``, the config's model and data fields say what the model is and how it is
fed: :func:`checkpoint_record` builds that record, and ``vtm_jax.checkpoints.store.load_checkpoint``
(``scenic_record=``) reads the parameters against it.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.config.scenic import is_scenic_vivit, vivit_record
from vtm_jax.data.preprocessing import PREPROCESSING_FIELDS


def checkpoint_record(config: ml_collections.ConfigDict) -> ModelRecord | None:
    """The record of ``config.checkpoint`` when it is a bare Scenic checkpoint of a Scenic ViViT
    config (its model and data fields describe it), else None: pass it to
    ``load_record`` / ``load_checkpoint`` / ``evaluate`` as ``scenic_record``."""
    checkpoint = config.get("checkpoint")
    if not (checkpoint and is_scenic_vivit(config) and is_scenic_checkpoint(checkpoint)):
        return None
    return scenic_record(config)


def is_scenic_checkpoint(path: str) -> bool:
    """A legacy Flax msgpack file, or a directory of ``checkpoint_<step>`` files without a
    vtm-jax ``model.json``."""
    from vtm_jax import paths
    from vtm_jax.checkpoints.store import RECORD_FILE

    if paths.is_file(path):
        return True
    if not paths.is_dir(path) or paths.exists(paths.join(path, RECORD_FILE)):
        return False
    return any(
        name == "checkpoint" or (name.startswith("checkpoint_") and name[11:].isdigit())
        for name in paths.listdir(path)
    )


def scenic_record(config: ml_collections.ConfigDict) -> ModelRecord:
    """The checkpoint record a Scenic ViViT config describes: model, input, preprocessing."""
    from vtm_jax.checkpoints.convert.scenic import SCENIC_GELU_APPROXIMATE, SCENIC_LAYER_NORM_EPS

    record = vivit_record(config)
    data = config.dataset_configs
    splits = data.get("class_splits")
    return dataclasses.replace(
        record,
        model={
            **record.model,
            "layer_norm_eps": SCENIC_LAYER_NORM_EPS,
            "gelu_approximate": SCENIC_GELU_APPROXIMATE,
        },
        # The preprocessing fields the config holds once read (vtm_jax.config.scenic's
        # add_defaults and finish fill in what the file leaves out).
        preprocessing={key: data.get(key) for key in PREPROCESSING_FIELDS if key in data},
        class_splits=list(splits) if splits else None,
        token_merging={"mode": "none"},
    )
