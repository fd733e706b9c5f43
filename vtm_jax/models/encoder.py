"""The shared merging encoder: the steps of an encoder and the pre-LN joint space-time blocks.

:func:`encoder_steps` turns ``merging`` into the steps an encoder runs (layer, r, PRNG key,
whether the step only reduces, for a duplicated layer); :func:`encoder_blocks` names a
backbone's blocks as Scenic does. :class:`EncoderBlock` and :class:`Encoder` are the pre-LN
joint space-time encoder of ViViT, VideoMAE and the factorised encoder (attention, reduction
of ``r`` tokens, MLP); TimeSformer and Motionformer bring their own blocks but run them over
these steps. :func:`sow_source` sows the final source tracking for pictures. The backbone
contract and the input and output pieces stay in :mod:`vtm_jax.models.base`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax

from vtm_jax.errors import UserError
from vtm_jax.merging import (
    MergingSettings,
    Tokens,
    initial_positions,
    initial_source,
    key_metric,
    layer_key,
    merge_tokens,
    needs_positions,
)
from vtm_jax.merging.matching import clamp_r
from vtm_jax.models.attention import AttentionFn, xla_attention
from vtm_jax.models.layers import AddPositionEmbs, MlpBlock, SelfAttention, size_bias


class Step(NamedTuple):
    """One step of an encoder: which layer runs, its r, its PRNG key, and ``repeats``: the same
    layer runs again next (a duplicated layer, docs/method.md §3.6)."""

    layer: int
    r: int
    key: jax.Array
    repeats: bool


def encoder_steps(
    merging: MergingSettings, num_layers: int, merge_rng: jax.Array | None
) -> list[Step]:
    """The steps of ``num_layers`` layers under ``merging``, in execution order.

    Step ``i`` draws from ``layer_key(merging, i, merge_rng)``. What a repeat computes is the
    backbone's choice (ViViT and VideoMAE reduce only; TimeSformer and Motionformer rerun the
    whole block with tied weights).
    """
    steps = merging.layer_steps(num_layers)
    return [
        Step(
            layer,
            r,
            layer_key(merging, i, merge_rng),
            i + 1 < len(steps) and steps[i + 1][0] == layer,
        )
        for i, (layer, r) in enumerate(steps)
    ]


def encoder_blocks(make: Callable[..., nn.Module], num_layers: int) -> list[nn.Module]:
    """``make(name="encoderblock_i")`` for each layer: Scenic's block names."""
    return [make(name=f"encoderblock_{layer}") for layer in range(num_layers)]


class EncoderBlock(nn.Module):
    """Pre-LN block: attention, residual, reduction of ``r`` tokens, then MLP and residual."""

    num_heads: int
    mlp_dim: int
    class_token: bool
    merging: MergingSettings
    layer_norm_eps: float = 1e-6
    gelu_approximate: bool = True
    attention_fn: AttentionFn = xla_attention
    key_bias: bool = True

    @nn.compact
    def __call__(
        self,
        tokens: Tokens,
        key: jax.Array | None,
        *,
        r: int,
        reduce_only: bool = False,
        grid: tuple[int, int, int] | None = None,
    ) -> Tokens:
        """``reduce_only``: a duplicated layer's extra step (docs/method.md §3.6): this layer's keys
        choose the merge, applied to the block's input; no attention residual, no MLP.
        ``grid``: the ``(t, h, w)`` patch grid, for rules that read token positions."""
        y = nn.LayerNorm(epsilon=self.layer_norm_eps, name="LayerNorm_0")(tokens.x)
        attention = SelfAttention(
            self.num_heads,
            self.attention_fn,
            key_bias=self.key_bias,
            name="MultiHeadDotProductAttention_0",
        )
        if reduce_only:
            keys = attention(y, keys_only=True)
        else:
            y, keys = attention(y, bias=size_bias(tokens.size, self.merging.prop_attn))
            tokens = tokens._replace(x=tokens.x + y)
        r = clamp_r(tokens.x.shape[1], r, class_token=self.class_token)
        if r > 0:
            metric = key_metric(keys, self.merging.head_aggregation)
            tokens = merge_tokens(
                tokens,
                metric,
                r,
                settings=self.merging,
                class_token=self.class_token,
                key=key,
                grid=grid,
            )
        if reduce_only:
            return tokens
        y = nn.LayerNorm(epsilon=self.layer_norm_eps, name="LayerNorm_1")(tokens.x)
        y = MlpBlock(self.mlp_dim, self.gelu_approximate, name="MlpBlock_0")(y)
        return tokens._replace(x=tokens.x + y)


class Encoder(nn.Module):
    """Position embeddings, the joint space-time blocks, the final LayerNorm (Scenic's
    ``Transformer``); shared by ViViT, VideoMAE and the factorised encoder.

    ``learned_positions`` and ``final_norm`` can be turned off for backbones that add fixed
    positions themselves or pool before normalising (VideoMAE). ``grid`` (the ``(t, h, w)``
    patch grid of ``x`` in ``(t h w)`` order, after any class token) lets rules that need
    positions (``Rule.needs_positions``) run; only then are positions tracked. A duplicated
    layer's extra runs only reduce (the paper's copies for these models).
    """

    num_layers: int
    num_heads: int
    mlp_dim: int
    class_token: bool
    merging: MergingSettings
    layer_norm_eps: float = 1e-6
    gelu_approximate: bool = True
    attention_fn: AttentionFn = xla_attention
    key_bias: bool = True
    learned_positions: bool = True
    final_norm: bool = True

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        merge_rng: jax.Array | None = None,
        grid: tuple[int, int, int] | None = None,
    ) -> Tokens:
        if self.learned_positions:
            x = AddPositionEmbs(name="posembed_input")(x)
        source = initial_source(x.shape[0], x.shape[1], self.merging.trace_source)
        pos = None
        if needs_positions(self.merging):
            if grid is None:
                raise UserError(
                    f"mode {self.merging.mode!r} needs token positions, which this backbone "
                    "does not track (only global merging over a whole patch grid does: "
                    "vivit, videomae)"
                )
            pos = initial_positions(x.shape[0], grid, class_token=self.class_token)
        tokens = Tokens(x, None, source, pos)
        blocks = encoder_blocks(
            lambda name: EncoderBlock(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                class_token=self.class_token,
                merging=self.merging,
                layer_norm_eps=self.layer_norm_eps,
                gelu_approximate=self.gelu_approximate,
                attention_fn=self.attention_fn,
                key_bias=self.key_bias,
                name=name,
            ),
            self.num_layers,
        )
        for step in encoder_steps(self.merging, self.num_layers, merge_rng):
            tokens = blocks[step.layer](
                tokens, step.key, r=step.r, reduce_only=step.repeats, grid=grid
            )
        if not self.final_norm:
            return tokens
        x = nn.LayerNorm(epsilon=self.layer_norm_eps, name="encoder_norm")(tokens.x)
        return tokens._replace(x=x)


def sow_source(module: nn.Module, tokens: Tokens) -> None:
    """Sow the final source tracking as ``intermediates/source``, when it is tracked."""
    if tokens.source is not None:
        module.sow("intermediates", "source", tokens.source)
