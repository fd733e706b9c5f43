"""vid-TLDR (Choi et al., CVPR 2024): merging on hidden states weighted by attention sharpness.

The authors' code (mlvlab/vid-TLDR at a25051d, ``multi_modality/utils/vid_TLDR.py``, wired into
UMT's blocks in ``multi_modality/models/backbones/vit/vit.py``) acts after the attention
residual and before the MLP. Each step mirrors one of theirs:

1. :func:`attention_sharpness`: the softmax of the block's logits without the size bias,
   averaged over heads; ``sum_j A_ij log A_ij`` per query, minus its entropy.
2. :func:`foreground_weights`: min-max normalised; below its mean a token is background and
   weighs 0, above it weighs ``(s - mean) / max(s - mean)`` in (0, 1].
3. :func:`match_hidden`: ToMe's bipartite matching on the L2-normalised hidden states with
   ``(cos + 1) / 2`` scores; the kept A tokens go back to position order.
4. :func:`merge_weighted`: each merged A token adds ``w x size`` to its B partner, sizes too, so
   background tokens add nothing (in effect dropped); ``x = sum(w size x) / sum(w size)``.

UMT has no class token. On backbones with one, the class token is protected (never merged,
kept first) and left out of the saliency statistics (min, max, mean over the patch tokens):
a documented vtm-jax choice. ``0 log 0`` is 0 here (``xlogy``) where the authors' torch code
gives NaN; their fraction ``r < 1`` is vtm-jax's common per-layer ``r`` (a count).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vtm_jax.errors import UserError
from vtm_jax.merging import matching as mg
from vtm_jax.merging.tokens import MergeContext, Rule, Tokens


def attention_sharpness(attention_logits: jax.Array) -> jax.Array:
    """``[B, N, 1]``: ``sum_j A_ij log A_ij`` of the head-averaged softmax ``A`` (float32)."""
    probs = jax.nn.softmax(attention_logits.astype(jnp.float32), axis=-1).mean(axis=1)
    return jax.scipy.special.xlogy(probs, probs).sum(axis=-1)[..., None]


def foreground_weights(sharpness: jax.Array) -> jax.Array:
    """``[B, N, 1]``: 0 for background tokens (below the mean), else in (0, 1] (their steps)."""
    s = sharpness - sharpness.min(axis=1, keepdims=True)
    s = s / s.max(axis=1, keepdims=True)
    background = s < s.mean(axis=1, keepdims=True)
    s = s - s.mean(axis=1, keepdims=True)
    s = s / s.max(axis=1, keepdims=True)
    return jnp.where(background, 0.0, s)


def saliency(attention_logits: jax.Array, *, class_token: bool) -> jax.Array:
    """The merge weight of every token, ``[B, N, 1]``; a class token's is 0 and is not part of
    the statistics (it is never merged)."""
    sharpness = attention_sharpness(attention_logits)
    if not class_token:
        return foreground_weights(sharpness)
    patches = foreground_weights(sharpness[:, 1:])
    return jnp.concatenate([jnp.zeros_like(patches[:, :1]), patches], axis=1)


def match_hidden(x: jax.Array, r: int, *, class_token: bool) -> mg.Match:
    """Bipartite matching on hidden states, scores ``(cos + 1) / 2``; unmerged A tokens in
    position order (the authors always sort them back)."""
    metric = x.astype(jnp.float32)
    metric = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)
    scores = (metric[:, ::2] @ jnp.swapaxes(metric[:, 1::2], -1, -2) + 1) / 2
    match = mg.bipartite_soft_matching(scores, r, class_token=class_token)
    return match._replace(unm_idx=jnp.sort(match.unm_idx, axis=-1))


def _rows(x: jax.Array) -> jax.Array:
    return jnp.arange(x.shape[0])[:, None]


def src_weights(weights: jax.Array, match: mg.Match) -> jax.Array:
    """``[B, r, 1]``: the saliency weight of each merged A token."""
    return weights[:, ::2][_rows(weights), match.src_idx]


def merge_weighted(
    x: jax.Array, match: mg.Match, src_weight: jax.Array, *, reduce: str = "sum"
) -> jax.Array:
    """``[B, N, C] -> [B, N - r, C]``, order ``[unm A, B]``: each src times its weight goes into
    its dst (``sum``, or ``max`` for dense source tracking), the dst itself weighing 1."""
    rows = _rows(x)
    a, b = x[:, ::2], x[:, 1::2]
    src = a[rows, match.src_idx] * src_weight.astype(x.dtype)
    if reduce == "sum":
        b = b.at[rows, match.dst_idx].add(src)
    else:
        b = b.at[rows, match.dst_idx].max(src)
    return jnp.concatenate([a[rows, match.unm_idx], b], axis=1)


def merge_wavg(
    x: jax.Array, size: jax.Array | None, match: mg.Match, src_weight: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Saliency- and size-weighted mean, sizes merged with the same weights; float32 inside,
    sizes scaled by their maximum first as the authors do."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    size = jnp.ones(x.shape[:2] + (1,), jnp.float32) if size is None else size
    size = size.astype(jnp.float32)
    size_max = size.max(axis=1, keepdims=True)
    merged = merge_weighted(x * (size / size_max), match, src_weight)
    size = merge_weighted(size, match, src_weight)
    return (merged / (size / size_max)).astype(dtype), size


def track_source(
    source: jax.Array | None, match: mg.Match, n: int, src_weight: jax.Array
) -> jax.Array | None:
    """Source tracking: dense rows as the authors (weighted ``amax``); in index form a
    background (zero-weight) token counts as dropped, -1."""
    if source is None:
        return None
    if source.ndim == 3:
        return merge_weighted(source, match, src_weight, reduce="max")
    dest = mg.destinations(match, n)
    positions = 2 * match.src_idx
    rows = _rows(dest)
    gone = jnp.where(src_weight[..., 0] > 0, dest[rows, positions], -1)
    return mg.track_groups(source, dest.at[rows, positions].set(gone))


def vid_tldr(tokens: Tokens, metric: jax.Array, r: int, ctx: MergeContext) -> Tokens:
    """The rule: ``metric`` is the hidden states after the attention residual (``tokens.x``)."""
    if ctx.attention_logits is None:
        raise UserError("mode 'vid_tldr' reads the block's attention, which this step lacks")
    n = tokens.x.shape[1]
    weights = saliency(ctx.attention_logits, class_token=ctx.class_token)
    match = match_hidden(metric, r, class_token=ctx.class_token)
    src_weight = src_weights(weights, match)
    x, size = merge_wavg(tokens.x, tokens.size, match, src_weight)
    return Tokens(x, size, track_source(tokens.source, match, n, src_weight), None)


RULE = Rule(
    vid_tldr,
    reads=("attention", "hidden"),
    place="attention",
    layouts=("joint", "frame"),
)
