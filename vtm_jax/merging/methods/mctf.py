"""MCTF (Lee, Choi, Kim, CVPR 2024): multi-criteria token fusion with one-step-ahead attention.

The authors' code (mlvlab/MCTF at 2004da0, ``utils/mctf.py``, ``models/modules/blocks.py``,
``models/SA/MHSA.py``) acts at the start of a block. The block's attention on the unmerged
tokens (with the size bias) is computed first; then, each step mirroring one of theirs:

1. :func:`criteria_scores`: on the L2-normalised block input ``x``, A = even and B = odd
   positions, ``W = W_sim W_info W_size``: ``((cos + 1) / 2) ** (1 / tau_sim)``;
   ``(a_i a_j) ** (1 / tau_info)`` with ``a`` the inverse of the attention a token receives
   (mean over heads and queries), max-normalised; ``(s_i s_j) ** (1 / tau_size)`` with ``s``
   the inverse size, max-normalised. A class token's row is ``-inf``.
2. :func:`bidirectional_match`: ``r // 2`` A tokens into their best B, then ``r - r // 2`` of
   the B tokens into their best remaining A (on the same scores); output
   ``[A with B merged in, remaining B]`` (``[unmerged A, B]`` one-directionally).
3. :func:`pool`: pooling type 1 (their default) weighs each token by the attention it receives
   times its relative size; 0 by size, 2 takes the maximum, 3 the plain mean.
4. With ``one_step_ahead`` 1 the attention matrix is merged too (key columns summed, query
   rows pooled like the tokens) and the block applies it to the merged tokens' values without a
   second softmax; with 2 the block recomputes attention on the merged tokens.

vtm-jax's common per-layer ``r`` is the count; the authors' fraction ``r < 1`` is not offered.
Their cap (half the unprotected tokens) and their rule that at least 10 tokens stay
(``r = t - 10`` when fewer would remain, before the cap) are kept (:func:`removed`;
``min_tokens`` sets the 10). ``one_step_ahead`` 0 (merging after the MLP) is not offered.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vtm_jax.errors import UserError
from vtm_jax.merging import matching as mg
from vtm_jax.merging.tokens import MergeContext, Rule, RuleOption, Tokens

# The authors' evaluation settings (run/eval_deit_*_mctf.sh: mctf_type [.., 1, 1, 20, 40, 1, 1]).
DEFAULTS: dict[str, Any] = {
    "tau_sim": 1.0,
    "tau_info": 20.0,
    "tau_size": 40.0,
    "bidirection": 1,
    "one_step_ahead": 1,
    "pooling_type": 1,
    "min_tokens": 10,
}
TEMPERATURES = ("tau_sim", "tau_info", "tau_size")


class BiMatch(NamedTuple):
    """One step's decision on ``n`` tokens (A = positions ``2 i``, B = ``2 j + 1``).

    ``unm_idx``/``src_idx``/``dst_idx``: the A -> B merges (unm in output order);
    ``unm_idx2``/``src_idx2``/``dst_idx2``: the B -> A merges, B tokens into positions of
    ``unm_idx``; None when one-directional.
    """

    unm_idx: jax.Array
    src_idx: jax.Array
    dst_idx: jax.Array
    unm_idx2: jax.Array | None = None
    src_idx2: jax.Array | None = None
    dst_idx2: jax.Array | None = None


def _rows(x: jax.Array) -> jax.Array:
    return jnp.arange(x.shape[0])[:, None]


def attention_received(attention: jax.Array) -> jax.Array:
    """``[B, N]``: the attention each token receives, averaged over heads and queries."""
    return attention.mean(axis=(1, 2))


def _pair_weight(per_token: jax.Array, tau: float) -> jax.Array:
    """``(v_i v_j) ** (1 / tau)`` for A ``i`` and B ``j`` of ``v = 1 / per_token``, max-normalised."""
    inv = 1 / per_token
    inv = inv / inv.max(axis=1, keepdims=True)
    return (inv[:, ::2, None] * inv[:, None, 1::2]) ** (1 / tau)


def criteria_scores(
    metric: jax.Array,
    attention: jax.Array,
    size: jax.Array | None,
    taus: tuple[float, float, float],
    *,
    class_token: bool,
) -> jax.Array:
    """``[B, nA, nB]``: similarity, informativeness and size criteria multiplied (float32)."""
    tau_sim, tau_info, tau_size = taus
    metric = metric.astype(jnp.float32)
    metric = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)
    cos = metric[:, ::2] @ jnp.swapaxes(metric[:, 1::2], -1, -2)
    scores = ((cos + 1) / 2) ** (1 / tau_sim)
    scores = scores * _pair_weight(attention_received(attention), tau_info)
    if size is not None:  # before the first merge every size is 1: no size criterion
        scores = scores * _pair_weight(size[..., 0].astype(jnp.float32), tau_size)
    if class_token:
        scores = scores.at[:, 0, :].set(-jnp.inf)
    return jax.lax.stop_gradient(scores)


def _best(scores: jax.Array, r: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rows ranked by their best score, descending (stable): kept, chosen, chosen's partner."""
    node_max, node_idx = scores.max(axis=-1), scores.argmax(axis=-1)
    edge_idx = jnp.argsort(-node_max, axis=-1, stable=True)
    src = edge_idx[:, :r]
    return edge_idx[:, r:], src, jnp.take_along_axis(node_idx, src, axis=-1)


def bidirectional_match(
    scores: jax.Array, r: int, *, bidirection: bool, class_token: bool
) -> BiMatch:
    """``r // 2`` A -> B merges then ``r - r // 2`` B -> A (all ``r`` A -> B one-directionally).

    Unmerged A tokens return to position order only with a class token; the remaining B
    tokens stay in descending score order (both as the authors' code).
    """
    r1 = r // 2 if bidirection else r
    unm, src, dst = _best(scores, r1)
    if class_token:
        unm = jnp.sort(unm, axis=-1)
    if not bidirection:
        return BiMatch(unm, src, dst)
    second = jnp.swapaxes(jnp.take_along_axis(scores, unm[..., None], axis=1), 1, 2)
    unm2, src2, dst2 = _best(second, r - r1)
    return BiMatch(unm, src, dst, unm2, src2, dst2)


def _scatter(into: jax.Array, idx: jax.Array, values: jax.Array, reduce: str) -> jax.Array:
    rows = _rows(into)
    if reduce == "sum":
        return into.at[rows, idx].add(values)
    return into.at[rows, idx].max(values)


def apply_match(x: jax.Array, match: BiMatch, reduce: str = "sum") -> jax.Array:
    """Merge along axis 1 of ``x [B, N, ...]`` (``sum`` or ``max``, the dst included)."""
    rows = _rows(x)
    a, b = x[:, ::2], x[:, 1::2]
    unm = a[rows, match.unm_idx]
    dst = _scatter(b, match.dst_idx, a[rows, match.src_idx], reduce)
    if match.src_idx2 is None:
        return jnp.concatenate([unm, dst], axis=1)
    dst2 = _scatter(unm, match.dst_idx2, dst[rows, match.src_idx2], reduce)
    return jnp.concatenate([dst2, dst[rows, match.unm_idx2]], axis=1)


def merge_keys(attention: jax.Array, match: BiMatch) -> jax.Array:
    """``[B, H, Nq, N] -> [B, H, Nq, N - r]``: key columns summed."""
    return jnp.moveaxis(apply_match(jnp.moveaxis(attention, 3, 1), match), 1, 3)


def merge_queries(attention: jax.Array, match: BiMatch, reduce: str = "sum") -> jax.Array:
    """``[B, H, N, Nk] -> [B, H, N - r, Nk]``: query rows merged (``sum`` or ``max``)."""
    return jnp.moveaxis(apply_match(jnp.moveaxis(attention, 2, 1), match, reduce), 1, 2)


def pool(
    x: jax.Array,
    size: jax.Array | None,
    attention: jax.Array,
    match: BiMatch,
    *,
    pooling_type: int,
    merge_attention: bool,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The merged ``x``, sizes and (``merge_attention``) attention: the authors' ``merge_wavg``."""
    size = jnp.ones(x.shape[:2] + (1,), x.dtype) if size is None else size
    new_size = apply_match(size, match)
    cols = merge_keys(attention, match) if merge_attention else None
    out = None
    if pooling_type == 1:
        relative = size / size.max(axis=1, keepdims=True)
        received = attention_received(attention)[..., None]
        norm = apply_match(received * relative, match)
        if merge_attention:
            weighted = cols * received[:, None] * relative[:, None]
            out = merge_queries(weighted, match) / norm[:, None]
        return apply_match(x * received * relative, match) / norm, new_size, out
    if pooling_type == 2:
        if merge_attention:
            out = merge_queries(cols, match, "max")
        return apply_match(x, match, "max"), new_size, out
    if pooling_type == 3:
        count = apply_match(jnp.ones_like(size), match)
        if merge_attention:
            out = merge_queries(cols, match) / count[:, None]
        return apply_match(x, match) / count, new_size, out
    if merge_attention:
        out = merge_queries(cols * size[:, None], match) / new_size[:, None]
    return apply_match(x * size, match) / new_size, new_size, out


def destinations(match: BiMatch, n: int) -> jax.Array:
    """``[B, n]``: the output index each input token goes to (index source tracking)."""
    rows = _rows(match.unm_idx)
    bsz, n_unm = match.unm_idx.shape
    num_a, num_b = (n + 1) // 2, n // 2
    if match.src_idx2 is None:
        to_b = jnp.broadcast_to(n_unm + jnp.arange(num_b), (bsz, num_b))
    else:
        kept = match.unm_idx2.shape[1]
        to_b = jnp.zeros((bsz, num_b), jnp.int32).at[rows, match.src_idx2].set(match.dst_idx2)
        to_b = to_b.at[rows, match.unm_idx2].set(n_unm + jnp.arange(kept))
    to_a = jnp.zeros((bsz, num_a), jnp.int32).at[rows, match.unm_idx].set(jnp.arange(n_unm))
    to_a = to_a.at[rows, match.src_idx].set(to_b[rows, match.dst_idx])
    out = jnp.zeros((bsz, n), jnp.int32)
    return out.at[:, ::2].set(to_a).at[:, 1::2].set(to_b.astype(jnp.int32))


def options(ctx: MergeContext) -> dict[str, Any]:
    return DEFAULTS | dict(ctx.settings.rule_options)


def mctf(
    tokens: Tokens, metric: jax.Array, r: int, ctx: MergeContext
) -> Tokens | tuple[Tokens, jax.Array]:
    """The rule: ``metric`` is the block input (``tokens.x``), ``ctx.attention`` the block's
    attention on it. Returns the merged attention too with ``one_step_ahead`` 1."""
    if ctx.attention is None:
        raise UserError("mode 'mctf' reads the block's attention, which this step lacks")
    opts = options(ctx)
    taus = tuple(float(opts[name]) for name in TEMPERATURES)
    attention = ctx.attention.astype(jnp.float32)
    scores = criteria_scores(metric, attention, tokens.size, taus, class_token=ctx.class_token)
    match = bidirectional_match(
        scores, r, bidirection=bool(opts["bidirection"]), class_token=ctx.class_token
    )
    ahead = opts["one_step_ahead"] == 1
    size = None if tokens.size is None else tokens.size.astype(jnp.float32)
    x, size, merged = pool(
        tokens.x.astype(jnp.float32),
        size,
        attention,
        match,
        pooling_type=int(opts["pooling_type"]),
        merge_attention=ahead,
    )
    source = tokens.source
    if source is not None:
        n = tokens.x.shape[1]
        source = (
            apply_match(source, match, "max")
            if source.ndim == 3
            else mg.track_groups(source, destinations(match, n))
        )
    out = Tokens(x.astype(tokens.x.dtype), size, source, None)
    return (out, merged) if ahead else out


def removed(n: int, r: int, ctx: MergeContext) -> int:
    """The authors' count: at least ``min_tokens`` stay (``r = n - min_tokens`` when fewer
    would), then at most half the unprotected tokens go; 0 when the schedule gives 0."""
    if r <= 0:
        return 0
    floor = int(options(ctx)["min_tokens"])
    if n - r < floor:
        r = n - floor
    return max(0, mg.clamp_r(n, r, class_token=ctx.class_token))


def check(values: Any) -> None:
    """The temperatures are exponents ``1 / tau``: they must be positive."""
    for name in TEMPERATURES:
        if name in values and not values[name] > 0:
            raise UserError(f"{name} must be in (0, inf), not {values[name]!r}")


RULE = Rule(
    mctf,
    options=(
        RuleOption("tau_sim", float, hint="similarity temperature > 0 (authors: 1)"),
        RuleOption("tau_info", float, hint="informativeness temperature > 0 (authors: 20)"),
        RuleOption("tau_size", float, hint="size temperature > 0 (authors: 40)"),
        RuleOption("bidirection", int, choices=(0, 1)),
        RuleOption("one_step_ahead", int, choices=(1, 2)),
        RuleOption("pooling_type", int, choices=(0, 1, 2, 3)),
        RuleOption("min_tokens", int, minimum=0),
    ),
    reads=("attention", "hidden"),
    place="block_start",
    layouts=("joint", "frame"),
    removed=removed,
    check=check,
    # one_step_ahead=2 recomputes attention on the merged tokens: it costs more.
    mac_place=lambda settings: (
        "block_start_recompute"
        if settings.rule_options.get("one_step_ahead", 1) == 2
        else "block_start"
    ),
)
