"""Bipartite soft matching and the operations that apply a match to token tensors.

Matching looks at a metric ``[B, N, c]`` and a static ``r`` and returns a :class:`Match`, a
small pytree of index arrays. Applying a match to any ``[B, N, C]`` tensor (hidden states,
sizes, dense source rows) is a separate pure function, so one decision drives them all.

Token order follows the paper's code exactly (docs/method.md §1.1): the sequence is split into A
(even positions) and B (odd positions); the output is ``[unmerged A, every B]``. Unmerged A
tokens are put back in position order only when a class token is present; otherwise they stay
in descending order of their best similarity.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Match(NamedTuple):
    """The decision of one matching step, for a sequence of ``n`` tokens.

    A-token ``i`` is sequence position ``2 i``; B-token ``j`` is position ``2 j + 1``.
    """

    unm_idx: jax.Array  # [B, nA - r] A-tokens that stay, in output order
    src_idx: jax.Array  # [B, r] A-tokens removed (merged into, or dropped in favour of, a B-token)
    dst_idx: jax.Array  # [B, r] B-token each src goes to
    src_score: jax.Array  # [B, r] similarity of each src to its dst


def clamp_r(n: int, r: int, *, class_token: bool) -> int:
    """At most half of the unprotected tokens can go in one step (docs/method.md §1.1 step 2)."""
    return max(0, min(r, (n - int(class_token)) // 2))


def cosine_scores(metric: jax.Array) -> jax.Array:
    """Cosine similarity of every A token to every B token, ``[B, nA, nB]``.

    No epsilon in the normalisation, as in the paper's code: a zero key gives NaN there too.
    """
    metric = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)
    return metric[:, ::2] @ jnp.swapaxes(metric[:, 1::2], -1, -2)


def random_scores(key: jax.Array, metric: jax.Array) -> jax.Array:
    """Uniform scores on [0, 1) with the shape cosine_scores would have (random modes)."""
    b, n = metric.shape[:2]
    return jax.random.uniform(key, (b, (n + 1) // 2, n // 2), dtype=jnp.float32)


def bipartite_soft_matching(scores: jax.Array, r: int, *, class_token: bool) -> Match:
    """Pick the ``r`` A-tokens with the most similar B partner (docs/method.md §1.1 steps 4-6).

    ``scores`` is ``[B, nA, nB]`` (cosine or random); ``r`` must already be clamped.
    Each A token's partner is its row argmax, then one descending sort of the row maxima
    ranks the A tokens: no sort of the full score matrix.
    """
    scores = jax.lax.stop_gradient(scores)
    if class_token:
        scores = scores.at[:, 0, :].set(-jnp.inf)
    node_max = scores.max(axis=-1)
    node_idx = scores.argmax(axis=-1)
    # Stable, so exact ties go in position order (torch's argsort leaves them unspecified).
    edge_idx = jnp.argsort(-node_max, axis=-1, stable=True)
    src_idx = edge_idx[:, :r]
    unm_idx = edge_idx[:, r:]
    if class_token:
        # Back to position order, which also puts the class token (A-token 0) first.
        unm_idx = jnp.sort(unm_idx, axis=-1)
    return Match(
        unm_idx=unm_idx,
        src_idx=src_idx,
        dst_idx=jnp.take_along_axis(node_idx, src_idx, axis=-1),
        src_score=jnp.take_along_axis(node_max, src_idx, axis=-1),
    )


def _take_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, idx[..., None], axis=1)


def hybrid_dst_keep(match: Match, num_b: int, threshold: float) -> jax.Array:
    """``[B, nB, 1]``: 0 for a B token that receives any src scored below ``threshold``.

    The paper's hybrid mode discards such a destination (its value and its size) and keeps
    only the srcs merged into its slot (docs/method.md §1.5).
    """
    below = (match.src_score < threshold).astype(jnp.int32)
    hit = jnp.zeros(match.dst_idx.shape[:1] + (num_b,), jnp.int32)
    hit = hit.at[jnp.arange(hit.shape[0])[:, None], match.dst_idx].max(below)
    return (1 - hit)[..., None]


def merge(
    x: jax.Array, match: Match, *, reduce: str = "sum", dst_keep: jax.Array | None = None
) -> jax.Array:
    """Merge each src into its dst: ``[B, N, C] -> [B, N - r, C]``, order ``[unm A, B]``.

    ``reduce`` is ``sum``, ``mean`` or ``max``; the destination's own value takes part, as in
    torch's ``scatter_reduce(include_self=True)``. ``dst_keep`` (hybrid mode) zeroes
    destinations before the srcs are added.
    """
    a, b = x[:, ::2], x[:, 1::2]
    if dst_keep is not None:
        b = b * dst_keep.astype(b.dtype)
    src = _take_tokens(a, match.src_idx)
    rows = jnp.arange(x.shape[0])[:, None]
    if reduce == "sum":
        b = b.at[rows, match.dst_idx].add(src)
    elif reduce == "max":
        b = b.at[rows, match.dst_idx].max(src)
    elif reduce == "mean":
        count = jnp.ones(b.shape[:2] + (1,), b.dtype).at[rows, match.dst_idx].add(1.0)
        b = b.at[rows, match.dst_idx].add(src) / count
    else:
        raise ValueError(f"unknown reduce {reduce!r}; valid: sum, mean, max")
    return jnp.concatenate([_take_tokens(a, match.unm_idx), b], axis=1)


def merge_wavg(
    x: jax.Array, size: jax.Array | None, match: Match, *, dst_keep: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Size-weighted merge: each merged token is the size-weighted mean of its members."""
    if size is None:
        size = jnp.ones(x.shape[:2] + (1,), x.dtype)
    x = merge(x * size, match, dst_keep=dst_keep)
    size = merge(size, match, dst_keep=dst_keep)
    return x / size, size


def drop(x: jax.Array, match: Match) -> jax.Array:
    """Delete the srcs: ``[B, N, C] -> [B, N - r, C]``, order ``[kept A, B]``."""
    return jnp.concatenate([_take_tokens(x[:, ::2], match.unm_idx), x[:, 1::2]], axis=1)


def destinations(
    match: Match, n: int, *, dropped: bool = False, dst_keep: jax.Array | None = None
) -> jax.Array:
    """``[B, n]``: the output index each input token goes to, or -1 if it is removed.

    Srcs go to their dst's slot (or -1 when ``dropped``); a hybrid-discarded dst goes to -1
    (its srcs still fill its slot). This one map drives unmerge and index source tracking.
    """
    bsz, n_unm = match.unm_idx.shape
    num_a, num_b = (n + 1) // 2, n // 2
    rows = jnp.arange(bsz)[:, None]
    dst_slot = n_unm + match.dst_idx
    to_a = jnp.zeros((bsz, num_a), jnp.int32)
    to_a = to_a.at[rows, match.unm_idx].set(jnp.arange(n_unm, dtype=jnp.int32))
    to_a = to_a.at[rows, match.src_idx].set(-1 if dropped else dst_slot.astype(jnp.int32))
    to_b = jnp.broadcast_to(n_unm + jnp.arange(num_b, dtype=jnp.int32), (bsz, num_b))
    if dst_keep is not None:
        to_b = jnp.where(dst_keep[..., 0] > 0, to_b, -1)
    out = jnp.zeros((bsz, n), jnp.int32)
    return out.at[:, ::2].set(to_a).at[:, 1::2].set(to_b)


def unmerge(x: jax.Array, match: Match) -> jax.Array:
    """Undo a merge: ``[B, N - r, C] -> [B, N, C]``, each src gets a copy of its dst."""
    return _take_tokens(x, destinations(match, x.shape[1] + match.src_idx.shape[1]))


def track_groups(groups: jax.Array, dest: jax.Array) -> jax.Array:
    """Index form of source tracking: ``[B, N0]`` current token of each original, -1 if gone.

    O(N0) memory, against O(N x N0) for the dense matrix of the paper's code.
    """
    moved = jnp.take_along_axis(dest, jnp.maximum(groups, 0), axis=-1)
    return jnp.where(groups >= 0, moved, -1)


def groups_to_source(groups: jax.Array, n: int) -> jax.Array:
    """The dense source matrix ``[B, n, N0]`` that the index form stands for."""
    return (groups[:, None, :] == jnp.arange(n)[None, :, None]).astype(jnp.float32)
