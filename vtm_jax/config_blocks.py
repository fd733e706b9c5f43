"""The config blocks every experiment config shares: ``token_merging``, ``eval`` and ``bench``.

Config files (``configs/``), the paper's configs (:mod:`vtm_jax.paper`) and the Scenic config
reader (:mod:`vtm_jax.scenic.config`) all build these blocks here, so each field has one
default. This module imports nothing of vtm_jax above the reduction settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
from ml_collections import config_dict

from vtm_jax.reduction import ReductionSettings


def token_merging_config(**values: Any) -> ml_collections.ConfigDict:
    """A ``token_merging`` block holding every ReductionSettings field.

    Fields not given take the settings' defaults; optional ones (threshold, duplicate) are typed
    placeholders, so ``--config.token_merging.threshold=0.4`` works from the command line.
    """
    settings = ReductionSettings(**values).to_dict()  # validates the values
    placeholders = {"threshold": float, "duplicate": tuple}
    block = ml_collections.ConfigDict()
    for field in dataclasses.fields(ReductionSettings):
        value = settings[field.name]
        if value is None and field.name in placeholders:
            value = config_dict.placeholder(placeholders[field.name])
        elif field.name == "r":
            # r is an int, the paper's (r, inflection) or a per-layer list: an untyped field
            # takes all three, in a config file and as --config.token_merging.r=[0, 8, 8].
            value = config_dict.FieldReference(value, field_type=object)
        block[field.name] = value
    return block


def evaluation_config(**values: Any) -> ml_collections.ConfigDict:
    """An ``eval`` block: attention backend, example limit, what to keep beside the metrics,
    how views combine, decoding threads and what a changed frame count does to positions."""
    block = ml_collections.ConfigDict(
        {
            "attention": "auto",
            "limit": config_dict.placeholder(int),
            "overwrite": False,
            "confusion_matrix": False,
            "predictions": False,
            "ensemble": "sum",  # SlowFast's DATA.ENSEMBLE_METHOD over views: sum or max
            "save_scores": False,  # per-video scores beside the results, as .scores.npz
            "workers": config_dict.placeholder(int),
            # A frame count other than the checkpoint's: what becomes of the learned temporal
            # positions, "paper" (zeros) or "interpolate" (vtm_jax.frames).
            "position_embeddings": "paper",
        }
    )
    block.update(values)
    return block


def bench_config(**values: Any) -> ml_collections.ConfigDict:
    """A ``bench`` block: batch per device, warm-up and timed passes, attention backend, and
    sweeps over modes, r values and schedules (None: just the token_merging block)."""
    block = ml_collections.ConfigDict(
        {"batch_size": 1, "warmup": 1, "iterations": 3, "attention": "auto"}
    )
    for name in ("modes", "r_values", "schedules"):
        block[name] = config_dict.placeholder(tuple)
    block.update(values)
    return block
