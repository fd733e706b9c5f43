"""The factorised-attention blocks of ViViT models 3 and 4 and their encoder, with merging.

Model 3 (Scenic's ``EncoderFactorizedSelfAttentionBlock``): attention over time at each spatial
slot and attention over space within each frame, one after the other (``attention_order``
``time_space`` or ``space_time``), each with its own LayerNorm and projections, then the MLP.
Model 4 (Scenic's ``EncoderBlock`` with ``factorized_dot_product_attention``): one attention
whose first half of the heads attends over time and second half over space. Parameter names are
Scenic's: ``LayerNorm_time``, ``MultiHeadDotProductAttention_time``, ``LayerNorm_space``, ...,
``LayerNorm_mlp``, ``MlpBlock`` (model 3); model 1's ``LayerNorm_0``,
``MultiHeadDotProductAttention_0``, ``LayerNorm_1``, ``MlpBlock_0`` (model 4).

Tokens stay a ``[B, T, S, D]`` grid (:mod:`vtm_jax.models.grid_merging`); each block reduces
after its attention and before its MLP, as the paper's blocks do, on the keys of its spatial
attention (model 3) or of all its heads (model 4).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vtm_jax.merging import MergingSettings
from vtm_jax.models.attention import AttentionFn, xla_attention
from vtm_jax.models.encoder import encoder_blocks, encoder_steps
from vtm_jax.models.grid_merging import (
    Grid,
    from_time_rows,
    grid_metric,
    initial_grid,
    reduce_grid,
    space_bias,
    space_rows,
    time_bias,
    time_rows,
)
from vtm_jax.models.layers import AddPositionEmbs, MlpBlock, SelfAttention
from vtm_jax.models.macs import GridStep

ATTENTION_ORDERS = ("time_space", "space_time")


def factorised_dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: tuple[jax.Array | None, jax.Array | None] | None = None,
    frames: int,
    base: AttentionFn = xla_attention,
) -> jax.Array:
    """Model 4's attention on ``[B, T S, H, d]``: heads ``[:H/2]`` attend over the ``frames``
    at each slot, heads ``[H/2:]`` over the slots of each frame, both with the backend ``base``.

    ``bias`` is ``(time, space)`` key biases (proportional attention), each None or shaped as
    :func:`~vtm_jax.models.grid_merging.time_bias` / ``space_bias`` give them.
    """
    b, n, h, d = q.shape
    half = h // 2
    grid_shape = (b, frames, n // frames)
    time_key_bias, space_key_bias = bias if bias is not None else (None, None)

    def over_time(a: jax.Array) -> jax.Array:
        return time_rows(a[:, :, :half].reshape(grid_shape + (half, d)))

    def over_space(a: jax.Array) -> jax.Array:
        return space_rows(a[:, :, half:].reshape(grid_shape + (h - half, d)))

    in_time = base(over_time(q), over_time(k), over_time(v), bias=time_key_bias)
    in_space = base(over_space(q), over_space(k), over_space(v), bias=space_key_bias)
    in_time = from_time_rows(in_time, b).reshape(b, n, half, d)
    return jnp.concatenate([in_time, in_space.reshape(b, n, h - half, d)], axis=2)


class _GridBlock(nn.Module):
    """What both blocks share: the fields, the reduction and the MLP."""

    num_heads: int
    mlp_dim: int
    merging: MergingSettings
    layer_norm_eps: float = 1e-6
    gelu_approximate: bool = True
    attention_fn: AttentionFn = xla_attention
    dtype: Any = jnp.float32

    def _norm(self, name: str) -> nn.LayerNorm:
        return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)

    def _reduce(self, grid: Grid, keys: jax.Array, key: jax.Array | None, step: GridStep) -> Grid:
        if (step.frames_out, step.space_out) == (step.frames_in, step.space_in):
            return grid
        metric = grid_metric(keys, self.merging.head_aggregation).astype(jnp.float32)
        # The merge arithmetic in float32 whatever the model's dtype (encoder.merge_float32).
        dtype, grid = grid.x.dtype, grid._replace(x=grid.x.astype(jnp.float32))
        grid = reduce_grid(grid, metric, step, merging=self.merging, key=key)
        return grid._replace(x=grid.x.astype(dtype))

    def _mlp(self, grid: Grid, norm: str, mlp: str) -> Grid:
        y = MlpBlock(self.mlp_dim, self.gelu_approximate, self.dtype, name=mlp)(
            self._norm(norm)(grid.x)
        )
        return grid._replace(x=grid.x + y)


class FactorisedSelfAttentionBlock(_GridBlock):
    """Model 3's block: attention over time and over space in ``attention_order``, reduction,
    MLP. A reduce-only step (a duplicated layer's extra run) projects the spatial keys only."""

    attention_order: str = "time_space"

    def _attention(self, axis: str) -> SelfAttention:
        return SelfAttention(
            self.num_heads,
            self.attention_fn,
            dtype=self.dtype,
            name=f"MultiHeadDotProductAttention_{axis}",
        )

    def _attend(self, grid: Grid, axis: str) -> tuple[Grid, jax.Array]:
        """One axis's pre-LN attention and residual; the grid and its keys ``[B, T, S, H, d]``."""
        b, t, s = grid.x.shape[:3]
        prop = self.merging.prop_attn
        if axis == "time":
            rows, bias = time_rows(grid.x), time_bias(grid, prop)
        else:
            rows, bias = space_rows(grid.x), space_bias(grid, prop)
        y, keys = self._attention(axis)(self._norm(f"LayerNorm_{axis}")(rows), bias=bias)
        rows = rows + y
        if axis == "time":
            return grid._replace(x=from_time_rows(rows, b)), from_time_rows(keys, b)
        return grid._replace(x=rows.reshape(grid.x.shape)), keys.reshape((b, t, s) + keys.shape[2:])

    @nn.compact
    def __call__(self, grid: Grid, key: jax.Array | None, *, step: GridStep) -> Grid:
        if step.reduce_only:
            b, t, s = grid.x.shape[:3]
            rows = self._norm("LayerNorm_space")(space_rows(grid.x))
            keys = self._attention("space")(rows, keys_only=True)
            return self._reduce(grid, keys.reshape((b, t, s) + keys.shape[2:]), key, step)
        spatial_keys = None
        for axis in self.attention_order.split("_"):
            grid, keys = self._attend(grid, axis)
            if axis == "space":
                spatial_keys = keys
        grid = self._reduce(grid, spatial_keys, key, step)
        return self._mlp(grid, "LayerNorm_mlp", "MlpBlock")


class FactorisedDotProductBlock(_GridBlock):
    """Model 4's block: one attention, half its heads over time and half over space, the
    reduction, then the MLP (model 1's block and names otherwise)."""

    @nn.compact
    def __call__(self, grid: Grid, key: jax.Array | None, *, step: GridStep) -> Grid:
        b, t, s, d = grid.x.shape
        attention_fn = functools.partial(
            factorised_dot_product_attention, frames=t, base=self.attention_fn
        )
        attention = SelfAttention(
            self.num_heads, attention_fn, dtype=self.dtype, name="MultiHeadDotProductAttention_0"
        )
        y = self._norm("LayerNorm_0")(grid.x).reshape(b, t * s, d)
        if step.reduce_only:
            keys = attention(y, keys_only=True)
        else:
            prop = self.merging.prop_attn
            y, keys = attention(y, bias=(time_bias(grid, prop), space_bias(grid, prop)))
            grid = grid._replace(x=grid.x + y.reshape(grid.x.shape))
        grid = self._reduce(grid, keys.reshape((b, t, s) + keys.shape[2:]), key, step)
        if step.reduce_only:
            return grid
        return self._mlp(grid, "LayerNorm_1", "MlpBlock_0")


BLOCKS: dict[str, type[_GridBlock]] = {
    "self_attention": FactorisedSelfAttentionBlock,
    "dot_product": FactorisedDotProductBlock,
}


class GridEncoder(nn.Module):
    """Scenic's ``Transformer`` for models 3 and 4: learned positions over the ``(t h w)``
    tokens, the blocks run over the merging steps (``plan``, static), the final LayerNorm."""

    num_layers: int
    num_heads: int
    mlp_dim: int
    attention: str  # a key of BLOCKS
    merging: MergingSettings
    attention_order: str = "time_space"
    layer_norm_eps: float = 1e-6
    gelu_approximate: bool = True
    attention_fn: AttentionFn = xla_attention
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, merge_rng: jax.Array | None, plan: tuple[GridStep, ...]
    ) -> Grid:
        """``x`` is ``[B, T, S, D]``; the grid after the last block, normalised."""
        b, t, s, d = x.shape
        x = AddPositionEmbs(name="posembed_input")(x.reshape(b, t * s, d)).reshape(x.shape)
        grid = initial_grid(x, self.merging.trace_source)
        extra = (
            {"attention_order": self.attention_order} if self.attention == "self_attention" else {}
        )
        blocks = encoder_blocks(
            lambda name: BLOCKS[self.attention](
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                merging=self.merging,
                layer_norm_eps=self.layer_norm_eps,
                gelu_approximate=self.gelu_approximate,
                attention_fn=self.attention_fn,
                dtype=self.dtype,
                name=name,
                **extra,
            ),
            self.num_layers,
        )
        for step, counts in zip(
            encoder_steps(self.merging, self.num_layers, merge_rng), plan, strict=True
        ):
            grid = blocks[step.layer](grid, step.key, step=counts)
        norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="encoder_norm")
        return grid._replace(x=norm(grid.x))
