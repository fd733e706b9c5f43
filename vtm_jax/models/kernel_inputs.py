"""Attention inputs rewritten for fused kernels, so that the kernels run as they are.

Fused kernels take less than :func:`~vtm_jax.models.attention.xla_attention` does: cuDNN's
bias is a whole ``Nq x Nk`` array and its training rule refuses odd token counts, the Pallas
TPU kernel's bias is a whole ``Nq x Nk`` block too. These rewrite the inputs exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def fold_key_bias(
    q: jax.Array, k: jax.Array, v: jax.Array, key_bias: jax.Array, *, multiple: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A key bias folded into one more head-dim column, for fused kernels without a bias.

    ``s q.k + b_k = [s q, 1] . [k, b_k]``: given queries already scaled by ``s`` (the kernel
    then runs with scale 1), returns ``q' = [q, 1]``, ``k' = [k, key_bias]``, ``v' = [v, 0]``,
    the head dim ``d + 1`` zero-padded to a multiple of ``multiple`` (the kernel's alignment);
    the zeros add nothing to any logit, and the output's first ``d`` columns are the biased
    attention's. Any layout with the head dim last; ``key_bias`` has ``k``'s shape without it.
    The bias then has ``k``'s dtype inside the kernel.
    """
    width = round_up(q.shape[-1] + 1, multiple)

    def widened(x: jax.Array, column: jax.Array | None) -> jax.Array:
        if column is not None:
            x = jnp.concatenate([x, column[..., None].astype(x.dtype)], axis=-1)
        return jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, width - x.shape[-1]),))

    return widened(q, jnp.ones(q.shape[:-1], q.dtype)), widened(k, key_bias), widened(v, None)


def even_tokens(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    """Queries and keys padded to even counts, and the real key count per clip (or None).

    JAX 0.10's cuDNN training rule checks for even token counts as if a bias were always given
    (its bias placeholder is never None), so ViViT-B's 3137 tokens could not be differentiated.
    A padded query row is sliced off afterwards; a padded key is masked by cuDNN's padding mask
    (``key_value_seq_lengths``), which builds no ``Nq x Nk`` array.
    """
    nq, nk = q.shape[1], k.shape[1]
    pad_q, pad_k = nq % 2, nk % 2
    if not (pad_q or pad_k):
        return q, k, v, bias, None

    def rows(x: jax.Array, n: int) -> jax.Array:
        return jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))

    if bias is not None:
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, pad_q), (0, pad_k)))
    lengths = jnp.full((q.shape[0],), nk, jnp.int32) if pad_k else None
    return rows(q, pad_q), rows(k, pad_k), rows(v, pad_k), bias, lengths
