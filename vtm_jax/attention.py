"""Dot-product attention with an optional additive key bias, behind one signature.

Every backend takes ``q, k, v`` as ``[B, N, H, d]`` (Flax's layout) and an optional ``bias``
broadcastable to ``[B, H, Nq, Nk]``; proportional attention passes ``log(size)`` of the keys as
``[B, 1, 1, Nk]``. Models receive the function, so a new backend never touches a model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from vtm_jax.errors import UserError

AttentionFn = Callable[..., jax.Array]


def xla_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None = None
) -> jax.Array:
    """Plain attention: materialises the ``[B, H, N, N]`` logits."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q / jnp.sqrt(q.shape[-1]).astype(q.dtype), k)
    if bias is not None:
        logits = logits + bias
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    chunk_size: int = 128,
) -> jax.Array:
    """Attention computed for ``chunk_size`` queries at a time, in heads-major layout.

    Each chunk sees every key, so its softmax is exact; only a ``[B, H, chunk, N]`` slice of
    logits exists at once. On a CPU this is several times faster than :func:`xla_attention`
    at thousands of tokens (reference/environment.md: 264 vs 863 ms at 3137 tokens).
    """
    b, n, h, d = q.shape
    if n <= chunk_size:
        return xla_attention(q, k, v, bias=bias)
    num_chunks = -(-n // chunk_size)
    pad = num_chunks * chunk_size - n
    scale = 1.0 / jnp.sqrt(d).astype(q.dtype)
    qh = jnp.pad(jnp.transpose(q * scale, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, pad), (0, 0)))
    kh = jnp.transpose(k, (0, 2, 1, 3))
    vh = jnp.transpose(v, (0, 2, 1, 3))
    if bias is None:
        key_bias = None
    else:
        bias = jnp.broadcast_to(bias, (b, h) + bias.shape[2:3] + (n,))
        if bias.shape[2] == 1:
            key_bias = bias  # one row for every query: no need to chunk it
        else:
            key_bias = jnp.pad(bias, ((0, 0), (0, 0), (0, pad), (0, 0)))
    chunks = jnp.moveaxis(qh.reshape(b, h, num_chunks, chunk_size, d), 2, 0)

    def one_chunk(args):
        index, q_chunk = args
        logits = jnp.einsum("bhqd,bhkd->bhqk", q_chunk, kh)
        if key_bias is not None:
            if key_bias.shape[2] == 1:
                logits = logits + key_bias
            else:
                start = index * chunk_size
                logits = logits + jax.lax.dynamic_slice_in_dim(key_bias, start, chunk_size, 2)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(logits, axis=-1), vh)

    out = jax.lax.map(one_chunk, (jnp.arange(num_chunks), chunks))
    out = jnp.moveaxis(out, 0, 2).reshape(b, h, num_chunks * chunk_size, d)[:, :, :n]
    return jnp.transpose(out, (0, 2, 1, 3))


BACKENDS: dict[str, AttentionFn] = {
    "xla": xla_attention,
    "blockwise": blockwise_attention,
}


def get_attention(name: str = "auto", *, chunk_size: int | None = None) -> AttentionFn:
    """The attention function for a backend name (``auto`` picks per platform)."""
    if name == "auto":
        name = "blockwise" if jax.default_backend() == "cpu" else "xla"
    if name not in BACKENDS:
        raise UserError(f"unknown attention backend {name!r}; valid: auto, {', '.join(BACKENDS)}")
    fn = BACKENDS[name]
    if chunk_size is not None and name == "blockwise":
        fn = functools.partial(fn, chunk_size=chunk_size)
    return fn
