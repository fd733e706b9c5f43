"""The analytic multiply-add counts behind each backbone's ``analytic_macs``.

Static bookkeeping from the token plan (:class:`~vtm_jax.merging.schedule.LayerPlan`) and the
model sizes, with no arrays: :func:`step_macs` for the steps of a pre-LN encoder that reduces
between attention and MLP (a duplicated layer's extra runs only project keys),
:func:`embedding_macs` for the patch embedding, :func:`head_macs` for the classifier head and
:func:`macs_total` for the dict ``analytic_macs`` returns (see
:class:`vtm_jax.models.base.Backbone`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vtm_jax.merging.schedule import LayerPlan, block_macs


def step_macs(
    plan: list[LayerPlan], steps: list[tuple[int, int]], *, hidden: int, mlp_dim: int
) -> list[int]:
    """Multiply-adds of each step of a pre-LN encoder that reduces between attention and MLP.

    A full step is :func:`block_macs`; the extra runs of a duplicated layer (all but its last)
    only project keys and reduce, so they cost ``N D^2``.
    """
    macs = []
    for i, p in enumerate(plan):
        if i + 1 < len(steps) and steps[i + 1][0] == steps[i][0]:
            macs.append(p.tokens_in * hidden**2)
        else:
            macs.append(block_macs(p.tokens_in, p.tokens_out, hidden=hidden, mlp_dim=mlp_dim))
    return macs


def embedding_macs(num_frames: int, image_size: int, patch_size: Sequence[int], hidden: int) -> int:
    """The patch embedding: one ``t h w 3 x D`` product per patch (``(h, w)``: per frame)."""
    t, h, w = (1, *patch_size) if len(patch_size) == 2 else tuple(patch_size)
    patches = (num_frames // t) * (image_size // h) * (image_size // w)
    return patches * t * h * w * 3 * hidden


def head_macs(hidden: int, num_classes: int, representation_size: int | None = None) -> int:
    """``pre_logits`` (when there is one) and ``output_projection``."""
    rep = representation_size
    return hidden * (rep or 0) + (rep or hidden) * num_classes


def macs_total(embedding: int, layers: list[int], head: int) -> dict[str, Any]:
    """``analytic_macs``' dict: the parts and their total."""
    return {
        "embedding": embedding,
        "layers": layers,
        "head": head,
        "total": embedding + sum(layers) + head,
    }
