"""Building blocks shared by the backbones, with Scenic's parameter names and shapes."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vtm_jax.errors import UserError
from vtm_jax.models.attention import AttentionFn, xla_attention

# The dtypes a model computes in (its ``dtype``: activations and matmul inputs). Parameters
# stay float32 (Flax's ``param_dtype``), so checkpoints are the same whatever runs them; the
# softmax, the merge arithmetic and the logits stay float32 too.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(dtype: Any = None) -> Any:
    """The dtype a name (``float32``, ``bfloat16``) or a dtype stands for; None: float32.

    Anything else is a one-line UserError naming the valid names.
    """
    if dtype is None:
        return jnp.float32
    for name, value in DTYPES.items():
        if dtype == name or (not isinstance(dtype, str) and _same_dtype(dtype, value)):
            return value
    shown = dtype if isinstance(dtype, str) else getattr(dtype, "__name__", str(dtype))
    raise UserError(f"unknown dtype {shown!r}; valid: {', '.join(DTYPES)}")


def dtype_name(dtype: Any = None) -> str:
    """The name of a model dtype (``float32``, ``bfloat16``), as configs and results write it."""
    value = compute_dtype(dtype)
    return next(name for name, known in DTYPES.items() if known is value)


def _same_dtype(dtype: Any, known: Any) -> bool:
    try:
        return jnp.dtype(dtype) == jnp.dtype(known)
    except (TypeError, ValueError):
        return False


class MlpBlock(nn.Module):
    """``Dense_0 -> GELU -> Dense_1``, as Scenic's ``attention_layers.MlpBlock``."""

    mlp_dim: int
    gelu_approximate: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = dict(
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
            dtype=self.dtype,
        )
        y = nn.Dense(self.mlp_dim, name="Dense_0", **dense)(x)
        y = nn.gelu(y, approximate=self.gelu_approximate)
        return nn.Dense(x.shape[-1], name="Dense_1", **dense)(y)


class SelfAttention(nn.Module):
    """Multi-head self-attention that also returns its keys (the merge metric).

    Parameters match ``flax.linen.MultiHeadDotProductAttention``: ``query``, ``key``, ``value``
    kernels ``(D, H, d)`` and ``out`` kernel ``(H, d, D)``. Flax's own module does not expose the
    keys, which token merging needs, nor the attention probabilities, which some methods read.
    """

    num_heads: int
    attention_fn: AttentionFn = xla_attention
    key_bias: bool = True  # VideoMAE's keys have no bias
    dtype: Any = jnp.float32

    def _project(self, x: jax.Array, name: str, use_bias: bool = True) -> jax.Array:
        width = x.shape[-1]
        return nn.DenseGeneral(
            features=(self.num_heads, width // self.num_heads),
            kernel_init=nn.initializers.xavier_uniform(),
            use_bias=use_bias,
            dtype=self.dtype,
            name=name,
        )(x)

    def _out(self, y: jax.Array, width: int) -> jax.Array:
        return nn.DenseGeneral(
            width,
            axis=(-2, -1),
            kernel_init=nn.initializers.xavier_uniform(),
            dtype=self.dtype,
            name="out",
        )(y)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        bias: jax.Array | None = None,
        keys_only: bool = False,
        with_attention: bool = False,
        scores_only: bool = False,
        probabilities: jax.Array | None = None,
    ) -> Any:
        """``(output, keys)`` by default; only the keys ``[B, N, H, d]`` when ``keys_only``.

        For methods that read the attention: ``with_attention`` returns ``(output, keys,
        probabilities, logits)`` (computed explicitly, whatever the backend); ``scores_only``
        returns ``(probabilities, logits, keys)`` without values; given ``probabilities``
        ``[B, H, N, N]``, returns the output of applying them to this ``x``'s values.
        """
        width = x.shape[-1]
        if width % self.num_heads:
            raise UserError(f"hidden size {width} is not divisible by {self.num_heads} heads")
        if probabilities is not None:
            v = self._project(x, "value")
            y = jnp.einsum("bhqk,bkhd->bqhd", probabilities.astype(v.dtype), v)
            return self._out(y, width)
        k = self._project(x, "key", self.key_bias)
        if keys_only:
            return k
        q = self._project(x, "query")
        if scores_only or with_attention:
            logits = attention_logits(q, k)
            probs = jax.nn.softmax(logits if bias is None else logits + bias, axis=-1)
            if scores_only:
                return probs, logits, k
            v = self._project(x, "value")
            y = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
            return self._out(y, width), k, probs, logits
        v = self._project(x, "value")
        y = self.attention_fn(q, k, v, bias=bias)
        return self._out(y, width), k


def attention_logits(q: jax.Array, k: jax.Array) -> jax.Array:
    """The scaled ``q.k`` logits ``[B, H, Nq, Nk]`` in float32, before any bias."""
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    return jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32) * scale, k.astype(jnp.float32))


class AddPositionEmbs(nn.Module):
    """Learned 1-D position embeddings ``pos_embedding (1, N, D)``, as Scenic's."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1,) + x.shape[1:])
        return x + pos.astype(x.dtype)


def size_bias(
    size: jax.Array | None, prop_attn: bool, *, mask_empty: bool = False
) -> jax.Array | None:
    """Proportional attention: ``log(size)`` of each key, as a ``[B, 1, 1, N]`` logit bias.

    ``mask_empty``: without proportional attention, still give keys of size 0 (padding, as
    run-length tokenization leaves) a ``-inf`` bias, so nothing attends to them.
    """
    if size is None or not (prop_attn or mask_empty):
        return None
    if prop_attn:
        return jnp.log(size[..., 0])[:, None, None, :]
    return jnp.where(size[..., 0] > 0, 0.0, -jnp.inf).astype(size.dtype)[:, None, None, :]
