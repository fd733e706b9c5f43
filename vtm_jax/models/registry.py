"""Build a model from a checkpoint record (architecture name plus constructor arguments)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from vtm_jax.attention import AttentionFn, get_attention
from vtm_jax.errors import UserError
from vtm_jax.models.vivit import ViViT
from vtm_jax.reduction import ReductionSettings

ARCHITECTURES: dict[str, type[nn.Module]] = {"vivit": ViViT}


def build_model(
    record: dict[str, Any],
    merging: ReductionSettings | None = None,
    attention_fn: AttentionFn | None = None,
) -> nn.Module:
    """The Flax module a record describes, with the given reduction settings and attention."""
    name = record["architecture"]
    if name not in ARCHITECTURES:
        raise UserError(f"unknown architecture {name!r}; valid: {', '.join(ARCHITECTURES)}")
    kwargs = dict(record["model"])
    if "patch_size" in kwargs:
        kwargs["patch_size"] = tuple(kwargs["patch_size"])
    try:
        return ARCHITECTURES[name](
            **kwargs,
            merging=merging or ReductionSettings(),
            attention_fn=attention_fn or get_attention("auto"),
        )
    except TypeError as e:
        raise UserError(f"checkpoint model config does not fit {name}: {e}") from None
