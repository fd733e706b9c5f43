"""STA: Semantic-aware Temporal Accumulation (Ding et al., ICCV 2023), as the ``sta`` mode.

STA prunes (it never merges) at three stages, after blocks ``0``, ``depth // 3`` and
``2 depth // 3``, on the block's output and that block's keys averaged over heads. At each
stage the tokens are cut into temporal groups of equal size, in frame-major order. In the first
group walked, the ``r`` A tokens (even positions) most similar to a B token (odd positions) go,
as in ToMe's bipartite split. In each later group a token's score is how much of it the earlier
groups already hold (its keys' softmax attention to the previous group, accumulated group by
group) times one minus its activation (the L1 norm of its hidden state, min-max normalised in
the group); the ``r`` highest scores go. The middle stage walks the groups backwards.

The functions below mirror the steps of the authors' ``VisionTransformer.merge`` (Mark12Ding/STA
at faf10be5, ``model_vit.py``) one by one, kept order included: within a group the kept tokens
come out in the order the authors' code leaves them (``[B tokens, A by ascending similarity]``
in the first group, ascending score in the others), and later stages split that order.

Groups (the authors hard-code 8, 4 and 2 for 16 frames with tubelet 2): stage ``k`` groups
``min(2 ** k, t)`` consecutive temporal slices of the ``(t, h, w)`` patch grid, so the clip has
``t / 2 ** k`` groups (8, 4, 2 for ``t = 8``; one group once a span covers the clip). Grids
whose ``t`` that span does not divide (``t`` not a multiple of 4, nor 1 or 2) are refused.

Budget: ``r`` (``MergingSettings.r`` through its schedule, at the stage layers) is the tokens
pruned per group per stage, the authors' ``r``; at most half a group's tokens (so the first
group only ever loses A tokens, as in the authors' design). A class token (ViViT) stays first
and untouched: the authors' VideoMAE has none.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vtm_jax.errors import UserError
from vtm_jax.merging import matching as mg
from vtm_jax.merging.tokens import MergeContext, Rule, Tokens

STAGES = 3


def stage_index(layer: int, num_layers: int) -> int | None:
    """Which stage runs after ``layer`` (0, 1, 2), or None.

    The authors' branch order: layer 0 is always the first stage, so with fewer than three
    layers the stages that coincide with it are skipped.
    """
    if layer == 0:
        return 0
    if layer == num_layers // 3:
        return 1
    if layer == 2 * num_layers // 3:
        return 2
    return None


def stage_groups(grid: tuple[int, int, int] | None, stage: int) -> int:
    """How many temporal groups stage ``stage`` cuts the clip into: ``t / min(2 ** stage, t)``.

    A grid is refused unless every stage's span divides its ``t``, whichever stages a model of
    this depth runs, so that whether a clip fits does not depend on the depth.
    """
    if grid is None:
        raise UserError(
            "mode 'sta' needs the (t, h, w) patch grid, which this backbone does not give"
        )
    t = int(grid[0])
    if any(t % min(2**k, t) for k in range(STAGES)):
        raise UserError(
            f"mode 'sta' cannot group {t} temporal patch slices: its stages take 1, 2 and 4 "
            "consecutive slices per group (8, 4, 2 groups for 16 frames, tubelet 2), so the "
            "grid's t must be a multiple of 4, or 1 or 2"
        )
    return t // min(2**stage, t)


def group_order(groups: int, stage: int) -> list[int]:
    """The order the stage walks its groups: backwards at the middle stage, as the authors'."""
    order = list(range(groups))
    return order[::-1] if stage == 1 else order


def normalise_keys(metric: jax.Array) -> jax.Array:
    """Keys over their L2 norm, in float32 (no epsilon, as the authors')."""
    metric = metric.astype(jnp.float32)
    return metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)


def activation_score(x: jax.Array) -> jax.Array:
    """``[B, G, n, C] -> [B, G, n]``: each token's L1 norm, min-max normalised in its group."""
    act = jnp.abs(x.astype(jnp.float32)).sum(-1)
    low = act.min(axis=-1, keepdims=True)
    high = act.max(axis=-1, keepdims=True)
    return (act - low) / (high - low)


def redundancy_order(m: jax.Array) -> jax.Array:
    """``[B, n]`` positions of one group as the authors' ``tome_drop`` orders them.

    Every B token (odd positions) first, then the A tokens (even positions) by ascending
    best-match cosine similarity to a B token; the last ``r`` are the ones dropped.
    """
    scores = m[:, ::2] @ jnp.swapaxes(m[:, 1::2], -1, -2)
    edge = jnp.argsort(scores.max(axis=-1), axis=-1, stable=True)
    b_positions = 2 * jnp.arange(m.shape[1] // 2, dtype=edge.dtype) + 1
    b_positions = jnp.broadcast_to(b_positions, (m.shape[0], m.shape[1] // 2))
    return jnp.concatenate([b_positions, 2 * edge], axis=1)


def first_accumulation(m_t: jax.Array, m_prev: jax.Array) -> jax.Array:
    """``[B, n]``: the second group walked, against every token of the first (each weighs 1).

    The softmax runs over the current group's tokens (the authors' ``dim=1``).
    """
    return jax.nn.softmax(m_t @ jnp.swapaxes(m_prev, -1, -2), axis=1).sum(-1)


def next_accumulation(m_t: jax.Array, m_kept: jax.Array, s_prev: jax.Array) -> jax.Array:
    """``[B, n]``: a later group, against the previous group's kept tokens weighted by their
    accumulated scores ``s_prev`` (which sum to 1)."""
    attention = jax.nn.softmax(m_t @ jnp.swapaxes(m_kept, -1, -2), axis=1)
    return (attention @ s_prev[..., None])[..., 0]


def lowest(score: jax.Array, keep: int) -> jax.Array:
    """Indices of the ``keep`` lowest scores, ascending (torch ``topk(largest=False)``)."""
    return jnp.argsort(score, axis=-1, stable=True)[:, :keep]


def _take(a: jax.Array, idx: jax.Array) -> jax.Array:
    """Gather along axis 1 (``a`` is ``[B, n]`` or ``[B, n, c]``)."""
    return jnp.take_along_axis(a, idx if a.ndim == 2 else idx[..., None], axis=1)


def stage_keep(x: jax.Array, metric: jax.Array, groups: int, r: int, stage: int) -> jax.Array:
    """``[B, groups (n - r)]``: the positions one stage keeps, in the authors' output order.

    ``x`` ``[B, groups n, C]`` and ``metric`` ``[B, groups n, c]`` are frame-major; ``r`` is
    per group. Groups come out in temporal order, each in its kept order.
    """
    bsz, length = x.shape[:2]
    n, keep = length // groups, length // groups - r
    m = normalise_keys(metric).reshape(bsz, groups, n, -1)
    act = activation_score(x.reshape(bsz, groups, n, -1))
    order = group_order(groups, stage)
    first = redundancy_order(m[:, order[0]])
    kept = {order[0]: first[:, :keep]}
    s_prev = idx = None
    for i, g in enumerate(order[1:], start=1):
        if i == 1:
            s_agg = first_accumulation(m[:, g], _take(m[:, order[0]], first))
        else:
            s_agg = next_accumulation(m[:, g], _take(m[:, order[i - 1]], idx), s_prev)
        idx = lowest(s_agg * (1.0 - act[:, g]), keep)
        kept[g] = idx
        s_prev = _take(s_agg, idx)
        s_prev = s_prev / s_prev.sum(axis=-1, keepdims=True)
    return jnp.concatenate([kept[g] + g * n for g in range(groups)], axis=1)


def keep_tokens(tokens: Tokens, kept: jax.Array) -> Tokens:
    """The tokens at ``kept`` ``[B, M]``, in that order, with sizes, source and positions."""
    source = tokens.source
    if source is not None and source.ndim == 2:  # index form: each original's new slot
        rows = jnp.arange(kept.shape[0])[:, None]
        dest = jnp.full(tokens.x.shape[:2], -1, jnp.int32)
        dest = dest.at[rows, kept].set(jnp.arange(kept.shape[1], dtype=jnp.int32))
        source = mg.track_groups(source, dest)
    elif source is not None:
        source = _take(source, kept)
    size = None if tokens.size is None else _take(tokens.size, kept)
    pos = None if tokens.pos is None else _take(tokens.pos, kept)
    return Tokens(_take(tokens.x, kept), size, source, pos)


def _stage(ctx: MergeContext) -> tuple[int, int]:
    stage = stage_index(ctx.layer, ctx.num_layers)
    if stage is None:
        raise UserError(f"mode 'sta' has no stage after block {ctx.layer} of {ctx.num_layers}")
    return stage, stage_groups(ctx.grid, stage)


def removed(n: int, r: int, ctx: MergeContext) -> int:
    """Tokens a block removes: ``groups * min(r, group // 2)`` at a stage, else 0."""
    if r <= 0 or stage_index(ctx.layer, ctx.num_layers) is None:
        return 0
    stage, groups = _stage(ctx)
    tokens = n - int(ctx.class_token)
    if tokens % groups:
        raise UserError(
            f"mode 'sta' cannot cut {tokens} tokens into {groups} equal temporal groups at "
            f"block {ctx.layer}: another reduction changed the count"
        )
    return groups * min(r, tokens // groups // 2)


def apply_sta(tokens: Tokens, metric: jax.Array, r: int, ctx: MergeContext) -> Tokens:
    """One STA stage: ``r`` (from :func:`removed`) tokens go, ``r / groups`` per group."""
    stage, groups = _stage(ctx)
    cls = int(ctx.class_token)
    kept = stage_keep(tokens.x[:, cls:], metric[:, cls:], groups, r // groups, stage) + cls
    if cls:  # class-token protection: first and untouched
        kept = jnp.concatenate([jnp.zeros_like(kept[:, :1]), kept], axis=1)
    return keep_tokens(tokens, kept)


RULE = Rule(
    apply_sta,
    reads=("keys", "hidden"),
    place="block_end",
    layouts=("joint",),
    removed=removed,
)
