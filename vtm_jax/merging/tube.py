"""Temporal tube merging (``mode="tube_merge"``): tokens merge only along time, per location.

docs/method.md §10 notes that merging freely across space and time loses spatial correspondence.
Here a token may only merge with the token at the same spatial location ``(y, x)`` in the
neighbouring frame, so every merged token is a *tube*: one patch location over consecutive
frames. Which tubes grow is chosen by key cosine similarity; values are size-weighted means as
in ``merge`` and sizes count the patches, so proportional attention works as for ``merge``.

How (static shapes, no loop over tokens): each token carries its size-weighted centroid
``(t, y, x)`` (``Tokens.pos``, merged like the hidden states). A tube at one location covering
frames ``[t0, t0 + size)`` has its centroid at ``t0 + (size - 1) / 2``, which gives ``t0`` back.
Sorting by ``(location, t0)`` puts each location's tubes next to each other in time order, so
the candidate pairs are neighbours in that order with the same location. The ``r`` most similar
pairs join; runs of joined neighbours form one group (a chain can join several tubes in one
step), and as the pairs form a path, joining ``r`` of them removes exactly ``r`` tokens.

Fewer than ``r`` tube pairs: with ``L = h * w`` locations and ``N`` patch tokens there are
exactly ``N - L`` pairs (every location keeps at least one tube), known before tracing. When a
step's ``r`` exceeds them, every pair joins (one full-length tube per location) and the rest of
the ``r`` falls back to ordinary bipartite ``merge`` on the tubes' size-weighted keys, so the
token count always follows ``schedule.plan_tokens``; from then on groups span several
locations. The class token is never merged and stays first.

It is written against the rule types of :mod:`vtm_jax.merging.tokens` only, as an outside package's
rule would be; :mod:`vtm_jax.merging` registers it as ``tube_merge`` when it is imported
(the name is always listed). It needs the patch grid, so it works in the global-merging ViViT
and VideoMAE; other backbones raise a UserError.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vtm_jax.errors import UserError
from vtm_jax.merging import matching as mg
from vtm_jax.merging.tokens import MergeContext, Rule, Tokens


def tube_merge_rule(tokens: Tokens, metric: jax.Array, r: int, ctx: MergeContext) -> Tokens:
    """Remove ``r`` tokens by joining temporally adjacent tubes (see the module docstring)."""
    if ctx.grid is None or tokens.pos is None:
        raise UserError(
            "mode 'tube_merge' needs the patch grid and token positions, which only the "
            "global-merging backbones provide (vivit, videomae)"
        )
    t, h, w = ctx.grid
    lead = int(ctx.class_token)
    n = tokens.x.shape[1] - lead
    if n > t * h * w:
        raise ValueError(f"{n} patch tokens do not fit the grid {ctx.grid}")
    if tokens.size is None:
        tokens = tokens._replace(size=jnp.ones(tokens.x.shape[:2] + (1,), tokens.x.dtype))
    # Static: n > h * w tokens means no fallback merge happened yet, so all are tubes.
    r_tube = min(r, max(0, n - h * w))
    if r_tube > 0:
        tokens, metric = _join_tubes(tokens, metric, r_tube, lead, ctx.grid)
    if r > r_tube:
        tokens = _bipartite_merge(tokens, metric, r - r_tube, ctx.class_token)
    return tokens


def _join_tubes(
    tokens: Tokens, metric: jax.Array, r: int, lead: int, grid: tuple[int, int, int]
) -> tuple[Tokens, jax.Array]:
    """Join the ``r`` most similar (same location, adjacent frames) tube pairs."""
    t, _, w = grid
    x, size, pos, source = (
        tokens.x[:, lead:],
        tokens.size[:, lead:],
        tokens.pos[:, lead:],
        tokens.source,
    )
    body_metric = metric[:, lead:]
    b, n = x.shape[:2]
    rows = jnp.arange(b)[:, None]

    size32 = size[..., 0].astype(jnp.float32)
    start = jnp.round(pos[..., 0] - (size32 - 1) / 2).astype(jnp.int32)
    location = jnp.round(pos[..., 1]).astype(jnp.int32) * w + jnp.round(pos[..., 2]).astype(
        jnp.int32
    )
    # Unique keys: tubes at one location are disjoint in time.
    order = jnp.argsort(location * t + start, axis=-1)
    loc_sorted = jnp.take_along_axis(location, order, axis=-1)
    m = jnp.take_along_axis(body_metric, order[..., None], axis=1)
    m = m / jnp.linalg.norm(m, axis=-1, keepdims=True)
    sim = (m[:, :-1] * m[:, 1:]).sum(-1)
    # A NaN similarity (zero key) still ranks above every non-pair, so pairs always win.
    sim = jnp.where(
        loc_sorted[:, 1:] == loc_sorted[:, :-1], jnp.nan_to_num(sim, nan=-2.0), -jnp.inf
    )
    sim = jax.lax.stop_gradient(sim)
    joined_idx = jnp.argsort(-sim, axis=-1, stable=True)[:, :r]
    joined = jnp.zeros((b, n - 1), jnp.int32).at[rows, joined_idx].set(1)
    # A new group starts at every sorted position not joined to its predecessor.
    starts = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), 1 - joined], axis=-1)
    group = jnp.zeros((b, n), jnp.int32).at[rows, order].set(jnp.cumsum(starts, axis=-1))
    num_out = n - r

    def total(v: jax.Array) -> jax.Array:
        return jnp.zeros((b, num_out) + v.shape[2:], v.dtype).at[rows, group].add(v)

    new_size = total(size)
    new_x = total(x * size) / new_size
    new_metric = total(body_metric * size.astype(body_metric.dtype)) / new_size.astype(
        body_metric.dtype
    )
    new_pos = total(pos * size32[..., None]) / total(size32[..., None])
    if source is not None:
        dest = jnp.concatenate([jnp.zeros((b, lead), jnp.int32), group + lead], axis=-1)
        if source.ndim == 2:  # index form
            source = mg.track_groups(source, dest)
        else:  # dense rows of distinct tokens are disjoint: their max is their union
            body = jnp.zeros((b, num_out, source.shape[2]), source.dtype)
            body = body.at[rows, group].max(source[:, lead:])
            source = jnp.concatenate([source[:, :lead], body], axis=1)

    def glue(head: jax.Array, body: jax.Array) -> jax.Array:
        return jnp.concatenate([head[:, :lead], body], axis=1)

    reduced = Tokens(
        glue(tokens.x, new_x), glue(tokens.size, new_size), source, glue(tokens.pos, new_pos)
    )
    return reduced, glue(metric, new_metric)


def _bipartite_merge(tokens: Tokens, metric: jax.Array, r: int, class_token: bool) -> Tokens:
    """The fallback: ordinary bipartite merging (mode ``merge``), positions merged too."""
    n = tokens.x.shape[1]
    match = mg.bipartite_soft_matching(mg.cosine_scores(metric), r, class_token=class_token)
    size32 = tokens.size.astype(jnp.float32)
    pos = mg.merge(tokens.pos * size32, match) / mg.merge(size32, match)
    x, size = mg.merge_wavg(tokens.x, tokens.size, match)
    source = tokens.source
    if source is not None:
        if source.ndim == 2:
            source = mg.track_groups(source, mg.destinations(match, n))
        else:
            source = mg.merge(source, match, reduce="max")
    return Tokens(x, size, source, pos)


# What the registry lists as ``tube_merge`` (and "vtm_jax.merging.tube:tube_merge" names).
tube_merge = Rule(tube_merge_rule, needs_positions=True)
