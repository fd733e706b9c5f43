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
    """Attention computed one head and ``chunk_size`` queries at a time.

    Each chunk sees every key, so its softmax is exact; only a ``[B, chunk, N]`` slice of
    logits exists at once, small enough to stay in cache while the softmax runs. On a CPU this
    is several times faster than :func:`xla_attention` at thousands of tokens
    (``scripts/bench_attention.py``, BENCHMARKS.md).
    """
    b, n, h, d = q.shape
    if n <= chunk_size:
        return xla_attention(q, k, v, bias=bias)
    num_chunks = -(-n // chunk_size)
    pad = num_chunks * chunk_size - n
    scale = 1.0 / jnp.sqrt(d).astype(q.dtype)
    # (head, chunk) pairs become one sequential map; the batch stays inside each step.
    qh = jnp.pad(jnp.transpose(q * scale, (2, 0, 1, 3)), ((0, 0), (0, 0), (0, pad), (0, 0)))
    qh = qh.reshape(h, b, num_chunks, chunk_size, d).transpose(0, 2, 1, 3, 4)
    qh = qh.reshape(h * num_chunks, b, chunk_size, d)
    kh, vh = jnp.transpose(k, (2, 0, 1, 3)), jnp.transpose(v, (2, 0, 1, 3))  # [H, B, N, d]
    key_bias = full_bias = None
    if bias is not None:
        bias = jnp.broadcast_to(bias, (b,) + bias.shape[1:])
        if bias.shape[1] == 1 and bias.shape[2] == 1:
            key_bias = bias[:, 0]  # [B, 1, N]: the same row for every head and query
        else:
            full = jnp.broadcast_to(bias, (b, h, n, n))
            full_bias = jnp.pad(
                jnp.transpose(full, (1, 0, 2, 3)), ((0, 0), (0, 0), (0, pad), (0, 0))
            )
    heads = jnp.repeat(jnp.arange(h), num_chunks)
    starts = jnp.tile(jnp.arange(num_chunks) * chunk_size, h)

    def one_chunk(args):
        head, start, q_chunk = args
        logits = jnp.einsum("bqd,bkd->bqk", q_chunk, kh[head])
        if key_bias is not None:
            logits = logits + key_bias
        elif full_bias is not None:
            logits = logits + jax.lax.dynamic_slice_in_dim(full_bias[head], start, chunk_size, 1)
        return jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(logits, axis=-1), vh[head])

    out = jax.lax.map(one_chunk, (heads, starts, qh))  # [H * chunks, B, chunk, d]
    out = out.reshape(h, num_chunks, b, chunk_size, d).transpose(2, 1, 3, 0, 4)
    return out.reshape(b, num_chunks * chunk_size, h, d)[:, :n]


def jax_nn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """``jax.nn.dot_product_attention``: cuDNN's fused kernel on GPUs where it applies."""
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation)


BACKENDS: dict[str, AttentionFn] = {
    "xla": xla_attention,
    "blockwise": blockwise_attention,
    "jax_nn": jax_nn_attention,  # XLA picks the implementation
    "cudnn": functools.partial(jax_nn_attention, implementation="cudnn"),
}
GPU_ONLY = ("cudnn",)


def get_attention(name: str = "auto", *, chunk_size: int | None = None) -> AttentionFn:
    """The attention function for a backend name.

    ``auto``: ``blockwise`` on CPUs (materialising the logits is the bottleneck there),
    ``jax_nn`` on GPUs (cuDNN's fused attention where it applies), ``xla`` elsewhere.
    """
    platform = jax.default_backend()
    if name == "auto":
        name = {"cpu": "blockwise", "gpu": "jax_nn"}.get(platform, "xla")
    if name not in BACKENDS:
        raise UserError(f"unknown attention backend {name!r}; valid: auto, {', '.join(BACKENDS)}")
    if name in GPU_ONLY and platform != "gpu":
        raise UserError(f"attention backend {name!r} needs a GPU; this is {platform}")
    fn = BACKENDS[name]
    if chunk_size is not None and name == "blockwise":
        fn = functools.partial(fn, chunk_size=chunk_size)
    return fn
