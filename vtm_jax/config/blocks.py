"""The config blocks every experiment config shares: token_merging, eval, bench and training.

Config files (``configs/``), the paper's configs (:mod:`vtm_jax.config.paper`) and the Scenic config
reader (:mod:`vtm_jax.config.scenic`) all build these blocks here, so each field has one
default. This module imports nothing of vtm_jax above the merging settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
from ml_collections import config_dict

from vtm_jax.merging import RULES, MergingSettings

# The model's compute dtype in the eval, bench, training (and demo) blocks: a name of
# vtm_jax.models.layers.DTYPES (float32, bfloat16), checked where a model is built. float32
# by default, on every platform: bfloat16 is asked for by name.
DEFAULT_DTYPE = "float32"


def token_merging_config(**values: Any) -> ml_collections.ConfigDict:
    """A ``token_merging`` block holding every MergingSettings field.

    Fields not given take the settings' defaults; optional ones (duplicate) are typed
    placeholders. The options of the registered rules (hybrid's ``threshold``) sit at the top
    level as typed placeholders too, the Scenic-style config key, so
    ``--config.token_merging.threshold=0.4`` works from the command line; settings read them
    into ``rule_options`` (:meth:`MergingSettings.from_dict`). A block may hold a preset for
    another mode than its own (the paper's configs carry hybrid's threshold for ``merge``).
    """
    given = {k: v for k, v in values.items() if k in _rule_option_kinds()}
    settings = MergingSettings.from_dict(values).to_dict()  # validates the values
    block = ml_collections.ConfigDict()
    for field in dataclasses.fields(MergingSettings):
        value = settings[field.name]
        if field.name == "rule_options":
            continue  # written flat below
        if value is None and field.name == "duplicate":
            value = config_dict.placeholder(tuple)
        elif field.name == "r":
            # r is an int, the paper's (r, inflection) or a per-layer list: an untyped field
            # takes all three, in a config file and as --config.token_merging.r=[0, 8, 8].
            value = config_dict.FieldReference(value, field_type=object)
        block[field.name] = value
    options = {**settings["rule_options"], **{k: v for k, v in given.items() if v is not None}}
    for name, kind in _rule_option_kinds().items():
        value = options.get(name)
        block[name] = config_dict.placeholder(kind) if value is None else value
    return block


def _rule_option_kinds() -> dict[str, type]:
    """Each option a registered rule declares, with its type (``{"threshold": float}``)."""
    return {option.name: option.kind for rule in RULES.values() if rule for option in rule.options}


def training_config(**values: Any) -> ml_collections.ConfigDict:
    """A ``training`` block (``vtm-jax train``): the attention backend, the model's compute
    dtype, the merging applied while training (none by default) and the input workers
    (default: up to 8 threads, one per CPU)."""
    block = ml_collections.ConfigDict(
        {
            "attention": "auto",
            "dtype": DEFAULT_DTYPE,
            "token_merging": token_merging_config(),
            "workers": config_dict.placeholder(int),
            "worker_kind": "threads",  # or "processes": grain's worker processes
        }
    )
    block.update(values)
    return block


def evaluation_config(**values: Any) -> ml_collections.ConfigDict:
    """An ``eval`` block: attention backend, compute dtype, example limit, what to keep beside
    the metrics, how views combine, decoding workers and what a changed frame count does to
    positions."""
    block = ml_collections.ConfigDict(
        {
            "attention": "auto",
            "dtype": DEFAULT_DTYPE,
            "limit": config_dict.placeholder(int),
            "overwrite": False,
            "confusion_matrix": False,
            "predictions": False,
            "ensemble": "sum",  # SlowFast's DATA.ENSEMBLE_METHOD over views: sum or max
            "save_scores": False,  # per-video scores beside the results, as .scores.npz
            "workers": config_dict.placeholder(int),
            "worker_kind": "threads",  # or "processes": grain's worker processes
            # Clips run at a time within a device batch (None: all at once); on a CPU a step
            # of one clip keeps activations in cache (vtm_jax.models.base.apply_in_steps).
            "clips_per_step": config_dict.placeholder(int),
            # A frame count other than the checkpoint's: what becomes of the learned temporal
            # positions, "paper" (zeros) or "interpolate" (vtm_jax.checkpoints.frame_count).
            "position_embeddings": "paper",
        }
    )
    block.update(values)
    return block


def bench_config(**values: Any) -> ml_collections.ConfigDict:
    """A ``bench`` block: batch per device, warm-up and timed passes, attention backend,
    compute dtype, clips run at a time within a batch (None: all), whether to replace a
    results file that is not bench's own, and sweeps over modes, r values and schedules
    (None: just the token_merging block)."""
    block = ml_collections.ConfigDict(
        {
            "batch_size": 1,
            "warmup": 1,
            "iterations": 3,
            "attention": "auto",
            "dtype": DEFAULT_DTYPE,
            "clips_per_step": config_dict.placeholder(int),
            # Replace an existing results file that is not bench's own (as --overwrite).
            "overwrite": False,
        }
    )
    for name in ("modes", "r_values", "schedules"):
        block[name] = config_dict.placeholder(tuple)
    block.update(values)
    return block
