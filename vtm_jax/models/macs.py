"""The analytic multiply-add counts behind each backbone's ``analytic_macs``.

Static bookkeeping from the token plan (:class:`~vtm_jax.merging.schedule.LayerPlan`) and the
model sizes, with no arrays: :func:`step_macs` for the steps of a pre-LN encoder that reduces
between attention and MLP (a duplicated layer's extra runs only project keys),
:func:`embedding_macs` for the patch embedding, :func:`head_macs` for the classifier head and
:func:`macs_total` for the dict ``analytic_macs`` returns (see
:class:`vtm_jax.models.base.Backbone`); :func:`grid_step_macs` for the factorised-attention
blocks of ViViT models 3 and 4, whose tokens stay a ``[time, space]`` grid (:class:`GridStep`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

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
            macs.append(
                block_macs(p.tokens_in, p.tokens_out, hidden=hidden, mlp_dim=mlp_dim, place=p.place)
            )
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


class GridStep(NamedTuple):
    """One step of an encoder whose tokens stay a ``[time, space]`` grid (ViViT models 3 and 4):
    frames and tokens per frame entering and leaving it. ``reduce_only``: a duplicated layer's
    extra run, which only projects keys and reduces."""

    frames_in: int
    space_in: int
    frames_out: int
    space_out: int
    reduce_only: bool = False


GRID_ATTENTIONS = ("self_attention", "dot_product")


def grid_step_macs(plan: list[GridStep], *, hidden: int, mlp_dim: int, attention: str) -> list[int]:
    """Multiply-adds of each step of a factorised-attention encoder.

    With ``T`` frames of ``S`` tokens (``N = T S``), attention over time costs ``2 S T^2 D``
    in its two products and over space ``2 T S^2 D``. ``self_attention`` (model 3) runs two
    attentions, each with its own q, k, v, out projections (``2 x 4 N D^2``), and both products
    in full; ``dot_product`` (model 4) projects once (``4 N D^2``) and gives half the channels
    to each axis. Both see the tokens entering the block; the MLP (``2 N D M``) sees those left
    after the reduction. A reduce-only step costs its key projection, ``N D^2``.
    """
    if attention not in GRID_ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; valid: {', '.join(GRID_ATTENTIONS)}")
    macs = []
    for p in plan:
        n, d = p.frames_in * p.space_in, hidden
        if p.reduce_only:
            macs.append(n * d**2)
            continue
        products = 2 * p.space_in * p.frames_in**2 * d + 2 * p.frames_in * p.space_in**2 * d
        if attention == "self_attention":
            attention_macs = 8 * n * d**2 + products
        else:
            attention_macs = 4 * n * d**2 + products // 2
        macs.append(attention_macs + 2 * p.frames_out * p.space_out * d * mlp_dim)
    return macs
