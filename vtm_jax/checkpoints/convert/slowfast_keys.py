"""The keys of the paper's torch checkpoint files, and helpers that read sizes off them.

TimeSformer and VideoMAE files (the original releases, MCG-NJU's and the paper's wrappers)
name their tensors as the original code does; :data:`TIMESFORMER_KEYS` and
:data:`VIDEOMAE_KEYS` rename them to HF's keys, so that the HF converters
(:mod:`vtm_jax.checkpoints.convert.hf_timesformer`, :mod:`vtm_jax.checkpoints.convert.hf_videomae`)
serve them too, and :func:`with_hf_errors` names this file's keys in those converters' errors.
VideoMAE's fused ``qkv`` weight is split in three first (:func:`split_qkv`). Also here: a
required tensor of a given rank (:func:`require_tensor`), the number of transformer blocks
(:func:`count_layers`) and two EPIC-KITCHENS heads joined as one (:func:`join_heads`).
:mod:`vtm_jax.checkpoints.convert.slowfast` tells the architectures apart and converts them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from vtm_jax.checkpoints.convert.common import KeyMap, concat_heads
from vtm_jax.errors import UserError

_LAYER = re.compile(r"(?:blocks|vivit\.encoder\.layer|vivit\.layers)\.(\d+)\.")


def _hf_layer(path: str) -> str:
    return f"{path}.encoder.layer.{{n}}."


_TS = _hf_layer("timesformer")
TIMESFORMER_KEYS = KeyMap(
    [
        ("cls_token", "timesformer.embeddings.cls_token"),
        ("pos_embed", "timesformer.embeddings.position_embeddings"),
        ("time_embed", "timesformer.embeddings.time_embeddings"),
        ("patch_embed.proj.", "timesformer.embeddings.patch_embeddings.projection."),
        ("blocks.{n}.norm1.", f"{_TS}layernorm_before."),
        ("blocks.{n}.attn.qkv.", f"{_TS}attention.attention.qkv."),
        ("blocks.{n}.attn.proj.", f"{_TS}attention.output.dense."),
        ("blocks.{n}.temporal_norm1.", f"{_TS}temporal_layernorm."),
        ("blocks.{n}.temporal_attn.qkv.", f"{_TS}temporal_attention.attention.qkv."),
        ("blocks.{n}.temporal_attn.proj.", f"{_TS}temporal_attention.output.dense."),
        ("blocks.{n}.temporal_fc.", f"{_TS}temporal_dense."),
        ("blocks.{n}.norm2.", f"{_TS}layernorm_after."),
        ("blocks.{n}.mlp.fc1.", f"{_TS}intermediate.dense."),
        ("blocks.{n}.mlp.fc2.", f"{_TS}output.dense."),
        ("norm.", "timesformer.layernorm."),
        ("head.", "classifier."),
    ]
)

_MAE = _hf_layer("videomae")
_QKV_PARTS = ("query", "key", "value")
VIDEOMAE_KEYS = KeyMap(
    [
        ("patch_embed.proj.", "videomae.embeddings.patch_embeddings.projection."),
        ("blocks.{n}.norm1.", f"{_MAE}layernorm_before."),
        ("blocks.{n}.attn.q_bias", f"{_MAE}attention.attention.q_bias"),
        ("blocks.{n}.attn.v_bias", f"{_MAE}attention.attention.v_bias"),
        ("blocks.{n}.attn.proj.", f"{_MAE}attention.output.dense."),
        ("blocks.{n}.norm2.", f"{_MAE}layernorm_after."),
        ("blocks.{n}.mlp.fc1.", f"{_MAE}intermediate.dense."),
        ("blocks.{n}.mlp.fc2.", f"{_MAE}output.dense."),
        ("fc_norm.", "fc_norm."),
        ("head.", "classifier."),
    ],
    # The fused qkv is split in three before renaming (see split_qkv).
    reverse_only=[
        ("blocks.{n}.attn.qkv.weight", f"{_MAE}attention.attention.{part}.weight")
        for part in _QKV_PARTS
    ],
)
_FUSED_QKV = re.compile(r"blocks\.(\d+)\.attn\.qkv\.weight")


# ---------------------------------------------------------------------------------------------
# State dict helpers


def require_tensor(state: Mapping[str, np.ndarray], key: str, ndim: int, what: str) -> np.ndarray:
    if key not in state:
        raise UserError(f"{what} checkpoint keys do not match: missing {key}")
    array = state[key]
    if array.ndim != ndim:
        raise UserError(f"{what} checkpoint has mis-shaped tensors: {key} {array.shape}")
    return array


def count_layers(keys: Sequence[str], what: str) -> int:
    found = [int(m.group(1)) for k in keys if (m := _LAYER.match(k))]
    if not found:
        raise UserError(f"{what} checkpoint has no transformer blocks")
    return 1 + max(found)


def join_heads(
    state: Mapping[str, np.ndarray], names: tuple[str, ...], target: str
) -> tuple[dict[str, np.ndarray], list[int] | None]:
    """Two-head (EPIC-KITCHENS) models as one ``target`` head; one-head models unchanged."""
    if not any(k.startswith(tuple(f"{n}." for n in names)) for k in state):
        return dict(state), None
    return concat_heads(state, names, target)


def with_hf_errors(convert: Callable[[], Any], keys: KeyMap, what: str) -> Any:
    """Run an HF converter; its errors name this file's keys."""
    try:
        return convert()
    except UserError as error:
        raise keys.explain(error, what) from None


def split_qkv(
    state: Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """VideoMAE's fused ``attn.qkv.weight`` ``[3D, D]`` as HF's query, key and value weights.

    Returns ``(HF-named q/k/v weights, every other key as it was)``.
    """
    split, rest = {}, {}
    for key, value in state.items():
        found = _FUSED_QKV.fullmatch(key)
        if found is None:
            rest[key] = value
            continue
        if value.ndim != 2 or value.shape[0] != 3 * value.shape[1]:
            raise UserError(
                f"VideoMAE checkpoint has mis-shaped tensors: {key} {value.shape} "
                "(expected [3 D, D])"
            )
        for part, rows in zip(_QKV_PARTS, np.split(value, 3), strict=True):
            split[f"{_MAE.format(n=found.group(1))}attention.attention.{part}.weight"] = rows
    return split, rest
