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
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vtm_jax.errors import UserError
from vtm_jax.merging import (
    MergeContext,
    MergingSettings,
    Tokens,
    get_rule,
    initial_positions,
    initial_source,
    key_metric,
    layer_key,
    merge_tokens,
    needs_positions,
    removal_count,
)
from vtm_jax.merging.schedule import LayerPlan, plan_tokens
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


# What the shared block offers a rule (merging.tokens.Rule): every place and every read but
# pixels, which the Encoder hands to ``input`` rules before the first block.
ENCODER_PLACES = ("attention", "block_start", "block_end", "input")
ENCODER_READS = ("keys", "hidden", "attention", "pixels")


def rule_place(merging: MergingSettings) -> str:
    """Where ``merging``'s mode reduces in a block (``attention`` for no mode)."""
    rule = get_rule(merging.mode)
    return "attention" if rule is None else rule.place


def rule_reads(merging: MergingSettings) -> tuple[str, ...]:
    rule = get_rule(merging.mode)
    return () if rule is None else rule.reads


def masks_padding(merging: MergingSettings) -> bool:
    """Whether the mode pads at the input (size-0 tokens every block must mask)."""
    return rule_place(merging) == "input"


class EncoderBlock(nn.Module):
    """Pre-LN block: attention, residual, then MLP and residual, with the reduction of the
    mode's tokens where its rule acts (after attention by default; see ``Rule.place``)."""

    num_heads: int
    mlp_dim: int
    class_token: bool
    merging: MergingSettings
    layer_norm_eps: float = 1e-6
    gelu_approximate: bool = True
    attention_fn: AttentionFn = xla_attention
    key_bias: bool = True
    dtype: Any = jnp.float32

    def _bias(self, tokens: Tokens) -> jax.Array | None:
        return size_bias(
            tokens.size, self.merging.prop_attn, mask_empty=masks_padding(self.merging)
        )

    def _reduce(self, tokens: Tokens, keys, r: int, ctx: MergeContext):
        metric = tokens.x
        if "keys" in rule_reads(self.merging):
            metric = key_metric(keys, self.merging.head_aggregation)
        return merge_float32(
            tokens, metric, r, settings=self.merging, class_token=self.class_token, ctx=ctx
        )

    @nn.compact
    def __call__(
        self,
        tokens: Tokens,
        key: jax.Array | None,
        *,
        r: int,
        reduce_only: bool = False,
        grid: tuple[int, int, int] | None = None,
        layer: int = 0,
        num_layers: int = 0,
    ) -> Tokens:
        """``r``: the schedule's r for this step (the rule's count applies, see
        ``rules.removal_count``). ``reduce_only``: a duplicated layer's extra step
        (docs/method.md §3.6): this layer's keys choose the merge, applied to the block's
        input; no attention residual, no MLP. ``grid``: the ``(t, h, w)`` patch grid."""
        ctx = MergeContext(self.merging, self.class_token, key, grid, layer, num_layers)
        place = rule_place(self.merging)
        r = removal_count(self.merging, tokens.x.shape[1], r, ctx) if place != "input" else 0
        norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="LayerNorm_0")
        y = norm(tokens.x)
        attention = SelfAttention(
            self.num_heads,
            self.attention_fn,
            key_bias=self.key_bias,
            dtype=self.dtype,
            name="MultiHeadDotProductAttention_0",
        )
        if reduce_only:
            return self._reduce(tokens, attention(y, keys_only=True), r, ctx) if r else tokens
        keys = None
        if place == "block_start" and r > 0:
            probs, logits, keys = attention(y, bias=self._bias(tokens), scores_only=True)
            out = self._reduce(
                tokens, keys, r, ctx._replace(attention=probs, attention_logits=logits)
            )
            tokens, probs = (out, None) if isinstance(out, Tokens) else out
            y = norm(tokens.x)
            if probs is not None:  # one-step-ahead: the merged attention, no second softmax
                y = attention(y, probabilities=probs)
            else:
                y, keys = attention(y, bias=self._bias(tokens))
            tokens = tokens._replace(x=tokens.x + y)
        elif place == "attention" and r > 0 and "attention" in rule_reads(self.merging):
            y, keys, probs, logits = attention(y, bias=self._bias(tokens), with_attention=True)
            tokens = tokens._replace(x=tokens.x + y)
            ctx = ctx._replace(attention=probs, attention_logits=logits)
            tokens = self._reduce(tokens, keys, r, ctx)
        else:
            y, keys = attention(y, bias=self._bias(tokens))
            tokens = tokens._replace(x=tokens.x + y)
            if place == "attention" and r > 0:
                tokens = self._reduce(tokens, keys, r, ctx)
        y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="LayerNorm_1")(
            tokens.x
        )
        y = MlpBlock(self.mlp_dim, self.gelu_approximate, self.dtype, name="MlpBlock_0")(y)
        tokens = tokens._replace(x=tokens.x + y)
        if place == "block_end" and r > 0:
            tokens = self._reduce(tokens, keys, r, ctx)
        return tokens


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
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        merge_rng: jax.Array | None = None,
        grid: tuple[int, int, int] | None = None,
        pixels: jax.Array | None = None,
    ) -> Tokens:
        """``pixels``: the video the tokens came from, for modes that reduce at the input."""
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
        if rule_place(self.merging) == "input":
            tokens = reduce_input(tokens, pixels, self.merging, self.class_token, grid, merge_rng)
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
                dtype=self.dtype,
                name=name,
            ),
            self.num_layers,
        )
        for step in encoder_steps(self.merging, self.num_layers, merge_rng):
            tokens = blocks[step.layer](
                tokens,
                step.key,
                r=step.r,
                reduce_only=step.repeats,
                grid=grid,
                layer=step.layer,
                num_layers=self.num_layers,
            )
        if not self.final_norm:
            return tokens
        norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="encoder_norm")
        return tokens._replace(x=norm(tokens.x))


def encoder_plan(
    merging: MergingSettings,
    tokens: int,
    num_layers: int,
    *,
    class_token: bool,
    grid: tuple[int, int, int] | None = None,
) -> list[LayerPlan]:
    """The static token counts of an :class:`Encoder`'s steps under ``merging``, with the
    mode's own count (``Rule.removed``) and place; an ``input`` mode's reduction comes first."""
    steps = merging.layer_steps(num_layers)
    place = rule_place(merging)
    rule = get_rule(merging.mode)
    if rule is not None and rule.mac_place is not None:
        place = rule.mac_place(merging)
    if place == "input":
        ctx = MergeContext(merging, class_token, None, grid, -1, 0)
        tokens -= removal_count(merging, tokens, 0, ctx)
        return plan_tokens(tokens, [0] * len(steps), class_token=class_token, place=place)

    count = step_counter(merging, num_layers, class_token=class_token, grid=grid)
    return plan_tokens(
        tokens, [r for _, r in steps], class_token=class_token, count=count, place=place
    )


def step_counter(
    merging: MergingSettings,
    num_layers: int,
    *,
    class_token: bool,
    grid: tuple[int, int, int] | None = None,
) -> Callable[[int, int, int], int]:
    """``count(step, n, r)`` for :func:`~vtm_jax.merging.schedule.plan_tokens`: what the
    blocks remove at each step (``rules.removal_count`` with that step's layer)."""
    steps = merging.layer_steps(num_layers)

    def count(step: int, n: int, r: int) -> int:
        ctx = MergeContext(merging, class_token, None, grid, steps[step][0], num_layers)
        return removal_count(merging, n, r, ctx)

    return count


def reduce_input(
    tokens: Tokens,
    pixels: jax.Array | None,
    merging: MergingSettings,
    class_token: bool,
    grid: tuple[int, int, int] | None,
    merge_rng: jax.Array | None,
) -> Tokens:
    """Apply an ``input`` mode (run-length tokenization) to the embedded patch tokens."""
    if pixels is None or grid is None:
        raise UserError(f"mode {merging.mode!r} reads the video, which this backbone does not pass")
    del merge_rng  # no input mode draws random numbers yet
    ctx = MergeContext(merging, class_token, None, grid, -1, 0)
    n = tokens.x.shape[1]
    r = removal_count(merging, n, 0, ctx)
    return merge_float32(tokens, pixels, r, settings=merging, class_token=class_token, ctx=ctx)


def merge_float32(
    tokens: Tokens, metric: jax.Array, r: int, **kwargs: Any
) -> Tokens | tuple[Tokens, jax.Array]:
    """:func:`~vtm_jax.merging.merge_tokens` with the merge arithmetic in float32, whatever
    the model's dtype; the merged hidden states go back in the model's dtype.

    Why at this boundary: the rules compute in their inputs' dtype, so a bfloat16 model would
    give them bfloat16 scores (which decide what merges), weighted averages and sizes
    (bfloat16 counts exactly only up to 256 patches, and ``log(size)`` is proportional
    attention's bias). Casting here keeps every rule, shipped or registered, in float32; for a
    float32 model each cast is a no-op.
    """
    dtype = tokens.x.dtype
    size = None if tokens.size is None else tokens.size.astype(jnp.float32)
    tokens = tokens._replace(x=tokens.x.astype(jnp.float32), size=size)
    out = merge_tokens(tokens, metric.astype(jnp.float32), r, **kwargs)
    merged = out if isinstance(out, Tokens) else out[0]
    merged = merged._replace(x=merged.x.astype(dtype))
    return merged if isinstance(out, Tokens) else (merged, *out[1:])


def sow_source(module: nn.Module, tokens: Tokens) -> None:
    """Sow the final source tracking as ``intermediates/source``, when it is tracked."""
    if tokens.source is not None:
        module.sow("intermediates", "source", tokens.source)
