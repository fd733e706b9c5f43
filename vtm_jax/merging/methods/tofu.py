"""ToFu, token fusion (Kim et al., WACV 2024), as the mode ``tofu``.

ToFu prunes where a model is sensitive to interpolated inputs (early layers) and merges where
it responds near-linearly (late layers), and merges with MLERP, which keeps the norms of the
features: the merged token has the direction of the mean and the largest norm of its members.
No official code exists; the reference is the reimplementation in hchautran/PiToMe
(``algo/tofu/merge.py`` and ``patch/``), whose steps the functions below follow: ToMe's
bipartite matching on the mean keys (class token never chosen, unmerged A tokens back in
position order when there is one); layers ``l <= L // 2`` drop the matched A tokens, later
layers merge them. Sizes are not tracked (the port never tracks them).

The port's MLERP divides the mean by the destination's norm *before* merging, not by the
mean's own norm as the paper's MLERP does; it defines the ToFu numbers published (as a
baseline) with that code, so it is the default (``late_merge="mlerp_port"``), and the paper's
formula is ``late_merge="mlerp"``. The port's MAE patch merges with a plain mean instead
(``late_merge="mean"``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from vtm_jax.merging import matching as mg
from vtm_jax.merging.tokens import MergeContext, Rule, RuleOption, Tokens

LATE_MERGES = ("mlerp_port", "mlerp", "mean")
DEFAULT_LATE_MERGE = "mlerp_port"  # the port's DeiT patch, quirk included (module docstring)


def prunes(layer: int, num_layers: int) -> bool:
    """Whether ``layer`` prunes (the port's ``i <= L // 2``) rather than merges."""
    return layer <= num_layers // 2


def match(metric: jax.Array, r: int, *, class_token: bool) -> mg.Match:
    """ToMe's bipartite soft matching on the metric, as the port's ``bipartite_soft_matching``."""
    return mg.bipartite_soft_matching(
        mg.cosine_scores(metric.astype(jnp.float32)), r, class_token=class_token
    )


def mlerp(x: jax.Array, m: mg.Match, *, port: bool) -> jax.Array:
    """Merge with MLERP: ``mean / divisor * max norm`` per destination, order ``[unm A, B]``.

    The mean includes the destination itself (``scatter_reduce(mean, include_self)``) and the
    max norm is over the destination and its srcs. ``port``: the divisor is the destination's
    norm before merging (the PiToMe repository's port); else the mean's own norm (the paper).
    """
    b = x[:, 1::2]
    src = jnp.take_along_axis(x[:, ::2], m.src_idx[..., None], axis=1)
    dst_norm = jnp.linalg.norm(b, axis=-1)
    batch = jnp.arange(x.shape[0])[:, None]
    max_norm = dst_norm.at[batch, m.dst_idx].max(jnp.linalg.norm(src, axis=-1))
    merged = mg.merge(x, m, reduce="mean")
    n_unm = m.unm_idx.shape[1]
    mean = merged[:, n_unm:]
    divisor = dst_norm if port else jnp.linalg.norm(mean, axis=-1)
    return jnp.concatenate([merged[:, :n_unm], mean / divisor[..., None] * max_norm[..., None]], 1)


def reduce(x: jax.Array, m: mg.Match, strategy: str) -> jax.Array:
    """One layer's reduction in float32: ``prune`` (drop the srcs), ``mean``, or MLERP."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if strategy == "prune":
        out = mg.drop(x, m)
    elif strategy == "mean":
        out = mg.merge(x, m, reduce="mean")
    else:
        out = mlerp(x, m, port=strategy == "mlerp_port")
    return out.astype(dtype)


def strategy(late_merge: str, layer: int, num_layers: int) -> str:
    """The reduction ``layer`` uses: ``prune`` early, ``late_merge`` after the middle."""
    return "prune" if prunes(layer, num_layers) else late_merge


def track_source(source: jax.Array | None, m: mg.Match, n: int, *, pruned: bool):
    """Source tracking: index form via destinations, dense form by max (the port's ``amax``)."""
    if source is None:
        return None
    if source.ndim == 2:
        return mg.track_groups(source, mg.destinations(m, n, dropped=pruned))
    return mg.drop(source, m) if pruned else mg.merge(source, m, reduce="max")


def removed(n: int, r: int, ctx: MergeContext) -> int:
    """Tokens a layer removes: ``keep_ratio``'s ``floor(N - N ratio)`` (the port's count, the
    class token included in N) when given, else the common budget ``r``; both clamped so the
    class token is never chosen (the port would take it at a ratio of exactly 0.5)."""
    ratio = ctx.settings.rule_options.get("keep_ratio")
    if ratio is None:
        count = r
    else:
        count = math.floor(n - n * ratio) if ratio < 1.0 else 0
    return mg.clamp_r(n, count, class_token=ctx.class_token) if count > 0 else 0


def tofu_merge(tokens: Tokens, metric: jax.Array, r: int, ctx: MergeContext) -> Tokens:
    """The ``tofu`` rule: match on the mean keys, prune early, merge late."""
    late = ctx.settings.rule_options.get("late_merge", DEFAULT_LATE_MERGE)
    how = strategy(late, ctx.layer, ctx.num_layers)
    m = match(metric, r, class_token=ctx.class_token)
    n = tokens.x.shape[1]
    # Sizes stay untracked (None: every token counts one), as in the port: proportional
    # attention and size-weighted pooling then see ones.
    return Tokens(
        reduce(tokens.x, m, how), None, track_source(tokens.source, m, n, pruned=how == "prune")
    )


RULE = Rule(
    tofu_merge,
    options=(
        RuleOption(
            "keep_ratio",
            minimum=0.5,
            maximum=1.0,
            hint="tokens kept per layer, replacing r; below 0.5 the bipartite split cannot remove them",
        ),
        RuleOption("late_merge", kind=str, choices=LATE_MERGES),
    ),
    reads=("keys",),
    place="attention",
    layouts=("joint", "frame"),
    removed=removed,
)
