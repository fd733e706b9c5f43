"""Building blocks shared by the backbones, with Scenic's parameter names and shapes."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vtm_jax.errors import UserError
from vtm_jax.models.attention import AttentionFn, xla_attention


class MlpBlock(nn.Module):
    """``Dense_0 -> GELU -> Dense_1``, as Scenic's ``attention_layers.MlpBlock``."""

    mlp_dim: int
    gelu_approximate: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = dict(
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
        )
        y = nn.Dense(self.mlp_dim, name="Dense_0", **dense)(x)
        y = nn.gelu(y, approximate=self.gelu_approximate)
        return nn.Dense(x.shape[-1], name="Dense_1", **dense)(y)


class SelfAttention(nn.Module):
    """Multi-head self-attention that also returns its keys (the merge metric).

    Parameters match ``flax.linen.MultiHeadDotProductAttention``: ``query``, ``key``, ``value``
    kernels ``(D, H, d)`` and ``out`` kernel ``(H, d, D)``. Flax's own module does not expose the
    keys, which token merging needs.
    """

    num_heads: int
    attention_fn: AttentionFn = xla_attention
    key_bias: bool = True  # VideoMAE's keys have no bias

    @nn.compact
    def __call__(
        self, x: jax.Array, *, bias: jax.Array | None = None, keys_only: bool = False
    ) -> tuple[jax.Array, jax.Array] | jax.Array:
        """``(output, keys)``, or only the keys ``[B, N, H, d]`` when ``keys_only``."""
        width = x.shape[-1]
        if width % self.num_heads:
            raise UserError(f"hidden size {width} is not divisible by {self.num_heads} heads")
        proj = dict(
            features=(self.num_heads, width // self.num_heads),
            kernel_init=nn.initializers.xavier_uniform(),
        )
        k = nn.DenseGeneral(name="key", use_bias=self.key_bias, **proj)(x)
        if keys_only:
            return k
        q = nn.DenseGeneral(name="query", **proj)(x)
        v = nn.DenseGeneral(name="value", **proj)(x)
        y = self.attention_fn(q, k, v, bias=bias)
        out = nn.DenseGeneral(
            width, axis=(-2, -1), kernel_init=nn.initializers.xavier_uniform(), name="out"
        )(y)
        return out, k


class AddPositionEmbs(nn.Module):
    """Learned 1-D position embeddings ``pos_embedding (1, N, D)``, as Scenic's."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1,) + x.shape[1:])
        return x + pos.astype(x.dtype)


def size_bias(size: jax.Array | None, prop_attn: bool) -> jax.Array | None:
    """Proportional attention: ``log(size)`` of each key, as a ``[B, 1, 1, N]`` logit bias."""
    if not prop_attn or size is None:
        return None
    return jnp.log(size[..., 0])[:, None, None, :]
