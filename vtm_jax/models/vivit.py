"""Spatio-temporal ViViT ("model 1") with token reduction, in Scenic's parameter layout.

Input ``[B, T, H, W, 3]`` (Scenic's NTHWC). A tubelet Conv embeds ``(t, h, w)`` patches in
``(t h w)`` order, a class token is prepended, learned position embeddings added, then pre-LN
blocks run joint space-time attention. Each block reduces its tokens after the attention
residual and before the MLP (docs/method.md §3.1), merging globally over all tokens.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vtm_jax.attention import AttentionFn, xla_attention
from vtm_jax.errors import UserError
from vtm_jax.merge import clamp_r
from vtm_jax.models.layers import AddPositionEmbs, MlpBlock, SelfAttention, size_bias
from vtm_jax.reduction import (
    ReductionSettings,
    Tokens,
    initial_positions,
    initial_source,
    key_metric,
    layer_key,
    needs_positions,
    reduce_tokens,
)
from vtm_jax.schedule import LayerPlan, block_macs, plan_tokens

CLASSIFIERS = ("token", "gap")


class EncoderBlock(nn.Module):
    """Pre-LN block: attention, residual, reduction of ``r`` tokens, then MLP and residual."""

    num_heads: int
    mlp_dim: int
    class_token: bool
    merging: ReductionSettings
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
            tokens = reduce_tokens(
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
    """Position embeddings, the blocks, and the final LayerNorm (Scenic's ``Transformer``).

    ``learned_positions`` and ``final_norm`` can be turned off for backbones that add fixed
    positions themselves or pool before normalising (VideoMAE). ``grid`` (the ``(t, h, w)``
    patch grid of ``x`` in ``(t h w)`` order, after any class token) lets rules that need
    positions (``Rule.needs_positions``) run; only then are positions tracked.
    """

    num_layers: int
    num_heads: int
    mlp_dim: int
    class_token: bool
    merging: ReductionSettings
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
        blocks = [
            EncoderBlock(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                class_token=self.class_token,
                merging=self.merging,
                layer_norm_eps=self.layer_norm_eps,
                gelu_approximate=self.gelu_approximate,
                attention_fn=self.attention_fn,
                key_bias=self.key_bias,
                name=f"encoderblock_{layer}",
            )
            for layer in range(self.num_layers)
        ]
        steps = self.merging.layer_steps(self.num_layers)
        for step, (layer, r) in enumerate(steps):
            # All but the last run of a duplicated layer only reduce (the paper's copies).
            repeat = step + 1 < len(steps) and steps[step + 1][0] == layer
            key = layer_key(self.merging, step, merge_rng)
            tokens = blocks[layer](tokens, key, r=r, reduce_only=repeat, grid=grid)
        if not self.final_norm:
            return tokens
        x = nn.LayerNorm(epsilon=self.layer_norm_eps, name="encoder_norm")(tokens.x)
        return tokens._replace(x=x)


class ViViT(nn.Module):
    """ViViT model 1 with token reduction; parameter tree identical to Scenic's ``ViViT``.

    ``merging`` holds the reduction settings (static); ``attention_fn`` is the attention
    backend. With ``merging.trace_source`` set, the final source tracking is sown as
    ``intermediates/source`` (apply with ``mutable=['intermediates']``).
    """

    num_classes: int
    hidden_size: int = 768
    num_heads: int = 12
    mlp_dim: int = 3072
    num_layers: int = 12
    patch_size: tuple[int, int, int] = (2, 16, 16)  # (t, h, w)
    classifier: str = "token"
    representation_size: int | None = None
    layer_norm_eps: float = 1e-6
    gelu_approximate: bool = True
    merging: ReductionSettings = ReductionSettings()
    attention_fn: AttentionFn = xla_attention

    @nn.compact
    def __call__(
        self, video: jax.Array, *, train: bool = False, merge_rng: jax.Array | None = None
    ) -> jax.Array:
        del train  # no dropout: the checkpoints this serves were trained with rate 0
        check_video_shape(video.shape, self.patch_size)
        if self.classifier not in CLASSIFIERS:
            raise UserError(
                f"unknown classifier {self.classifier!r}; valid: {', '.join(CLASSIFIERS)}"
            )
        x = nn.Conv(
            self.hidden_size,
            self.patch_size,
            strides=self.patch_size,
            padding="VALID",
            name="embedding",
        )(video)
        b, grid = x.shape[0], tuple(x.shape[1:4])
        x = x.reshape(b, -1, self.hidden_size)
        class_token = self.classifier == "token"
        if class_token:
            cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden_size))
            x = jnp.concatenate(
                [jnp.broadcast_to(cls, (b, 1, self.hidden_size)).astype(x.dtype), x], 1
            )
        tokens = Encoder(
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            class_token=class_token,
            merging=self.merging,
            layer_norm_eps=self.layer_norm_eps,
            gelu_approximate=self.gelu_approximate,
            attention_fn=self.attention_fn,
            name="Transformer",
        )(x, merge_rng, grid)
        if tokens.source is not None:
            self.sow("intermediates", "source", tokens.source)
        if class_token:
            x = tokens.x[:, 0]
        else:
            x = mean_pool(tokens, weighted=self.merging.size_weighted_pool)
        if self.representation_size is not None:
            x = nn.tanh(nn.Dense(self.representation_size, name="pre_logits")(x))
        return nn.Dense(
            self.num_classes, kernel_init=nn.initializers.zeros, name="output_projection"
        )(x)

    def token_plan(self, num_frames: int, image_size: int) -> list[LayerPlan]:
        """Static token counts of each step (layer, or repeat of a duplicated layer)."""
        t, h, w = self.patch_size
        class_token = self.classifier == "token"
        tokens = (num_frames // t) * (image_size // h) * (image_size // w) + int(class_token)
        steps = self.merging.layer_steps(self.num_layers)
        return plan_tokens(tokens, [r for _, r in steps], class_token=class_token)

    def analytic_macs(self, num_frames: int, image_size: int) -> dict[str, Any]:
        """Multiply-adds per step and in total (a duplicate's extra runs cost a key projection)."""
        t, h, w = self.patch_size
        patches = (num_frames // t) * (image_size // h) * (image_size // w)
        layers = step_macs(
            self.token_plan(num_frames, image_size),
            self.merging.layer_steps(self.num_layers),
            hidden=self.hidden_size,
            mlp_dim=self.mlp_dim,
        )
        embed = patches * t * h * w * 3 * self.hidden_size
        head = self.hidden_size * (self.representation_size or 0) + (
            (self.representation_size or self.hidden_size) * self.num_classes
        )
        return {
            "embedding": embed,
            "layers": layers,
            "head": head,
            "total": embed + sum(layers) + head,
        }


def step_macs(
    plan: list[LayerPlan], steps: list[tuple[int, int]], *, hidden: int, mlp_dim: int
) -> list[int]:
    """Multiply-adds of each step of a pre-LN encoder that reduces between attention and MLP.

    A full step is :func:`block_macs`; the extra runs of a duplicated layer (all but its last)
    only project keys and reduce, so they cost ``N D^2``.
    """
    macs = []
    for i, p in enumerate(plan):
        if i + 1 < len(steps) and steps[i + 1][0] == steps[i][0]:
            macs.append(p.tokens_in * hidden**2)
        else:
            macs.append(block_macs(p.tokens_in, p.tokens_out, hidden=hidden, mlp_dim=mlp_dim))
    return macs


def mean_pool(tokens: Tokens, *, weighted: bool) -> jax.Array:
    """Mean over tokens: unweighted as in the paper, or weighted by token sizes."""
    if not weighted or tokens.size is None:
        return tokens.x.mean(axis=1)
    return (tokens.x * tokens.size).sum(axis=1) / tokens.size.sum(axis=1)


def check_video_shape(shape: tuple[int, ...], patch_size: tuple[int, int, int]) -> None:
    """A clear error for a video the tubelet embedding cannot cut into whole patches."""
    if len(shape) != 5 or shape[-1] != 3:
        raise UserError(f"expected a video batch [B, T, H, W, 3], got shape {tuple(shape)}")
    for name, size, patch in zip(
        ("frames", "height", "width"), shape[1:4], patch_size, strict=True
    ):
        if size % patch:
            raise UserError(f"{name} {size} is not a multiple of the tubelet size {patch}")
