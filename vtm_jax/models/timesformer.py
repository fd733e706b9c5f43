"""TimeSformer (divided space-time attention) with per-frame token merging.

Input ``[B, T, H, W, 3]``. Each frame is cut into ``p`` patches by a 2-D conv; the sequence is
one class token followed by the patches in ``(p t)`` order (spatial index major, frame minor),
``1 + p T`` tokens, as in the paper's TimeSformer and HF's ``TimesformerForVideoClassification``.

A block (docs/method.md §3.3):

1. temporal attention: each spatial slot attends over its ``T`` frames (no class token, no size
   bias), then ``temporal_fc`` and a residual;
2. spatial attention per frame over ``[class-token copy, p patches]``; proportional attention
   adds ``log(size)`` to the patch-query x patch-key logits only; the class-token outputs are
   averaged over frames and added to the single class token;
3. reduction per frame, on the ``(b t) p`` layout with the same r in every frame (each frame is
   a batch row of the matching, no protected token); the metric is the head-mean of the spatial
   attention keys of the patches; the frames are then re-interleaved as ``(p' t)``;
4. MLP with its residual.

Sizes and source tracking are per frame: ``[B T, p, 1]`` and ``[B T, p0]`` / ``[B T, p, p0]``.
With ``merging.duplicate=(L, Q)`` the whole block L runs Q times with tied weights (§3.6).
``merging.head_aggregation`` must be ``mean``: the paper's TimeSformer ignores the option.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from vtm_jax.errors import UserError
from vtm_jax.merging import (
    MergeContext,
    MergingSettings,
    Tokens,
    initial_source,
    key_metric,
    removal_count,
)
from vtm_jax.merging.schedule import LayerPlan, plan_tokens
from vtm_jax.models.attention import AttentionFn, xla_attention
from vtm_jax.models.base import (
    SourceLayout,
    TemporalTable,
    check_video_shape,
    classifier_head,
    embed_tubelets,
    merge_key,
    prepend_class_token,
)
from vtm_jax.models.encoder import (
    encoder_blocks,
    encoder_steps,
    merge_float32,
    sow_source,
    step_counter,
)
from vtm_jax.models.layers import AddPositionEmbs, MlpBlock, SelfAttention
from vtm_jax.models.macs import embedding_macs, head_macs, macs_total


def spatial_size_bias(size: jax.Array | None, prop_attn: bool) -> jax.Array | None:
    """Proportional attention of the spatial step, ``[B T, 1, 1 + p, 1 + p]``.

    ``log(size)`` of each patch key on the rows of patch queries; the class-token row and
    column get nothing (the paper biases ``attn[:, :, 1:, 1:]`` only).
    """
    if not prop_attn or size is None:
        return None
    key_bias = jnp.pad(jnp.log(size[..., 0]), ((0, 0), (1, 0)))  # [BT, 1 + p], CLS key 0
    patch_query = (jnp.arange(key_bias.shape[1]) > 0)[:, None]
    return jnp.where(patch_query, key_bias[:, None, :], 0.0)[:, None].astype(key_bias.dtype)


def to_frames(patches: jax.Array, num_frames: int) -> jax.Array:
    """``[B, p T, D]`` in ``(p t)`` order to ``[B T, p, D]`` (one row per frame)."""
    b, n, d = patches.shape
    p = n // num_frames
    return patches.reshape(b, p, num_frames, d).transpose(0, 2, 1, 3).reshape(-1, p, d)


def from_frames(frames: jax.Array, num_frames: int) -> jax.Array:
    """``[B T, p, D]`` back to ``[B, p T, D]`` in ``(p t)`` order."""
    bt, p, d = frames.shape
    b = bt // num_frames
    return frames.reshape(b, num_frames, p, d).transpose(0, 2, 1, 3).reshape(b, p * num_frames, d)


class EncoderBlock(nn.Module):
    """Divided space-time block: temporal attention, spatial attention, per-frame reduction, MLP.

    ``tokens.x`` is ``[B, 1 + p T, D]`` (class token, then ``(p t)``); ``tokens.size`` and
    ``tokens.source`` are per frame.
    """

    num_frames: int
    num_heads: int
    mlp_dim: int
    merging: MergingSettings
    layer_norm_eps: float = 1e-6
    gelu_approximate: bool = False
    attention_fn: AttentionFn = xla_attention
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        tokens: Tokens,
        key: jax.Array | None,
        *,
        r: int,
        layer: int = 0,
        num_layers: int = 0,
    ) -> Tokens:
        b, n, d = tokens.x.shape
        t = self.num_frames
        p = (n - 1) // t
        cls, patches = tokens.x[:, :1], tokens.x[:, 1:]

        # Temporal: each spatial slot over its T frames. No size bias (the paper has none).
        slots = patches.reshape(b * p, t, d)
        # Submodules made inline, not by helper methods: a method's output is an intermediate
        # that capture_intermediates would record, and a module is no JAX value.
        norm = dict(epsilon=self.layer_norm_eps, dtype=self.dtype)
        attention = dict(num_heads=self.num_heads, attention_fn=self.attention_fn, dtype=self.dtype)
        y = nn.LayerNorm(**norm, name="LayerNorm_temporal")(slots)
        y, _ = SelfAttention(**attention, name="MultiHeadDotProductAttention_temporal")(y)
        y = nn.Dense(d, dtype=self.dtype, name="temporal_fc")(y)
        patches = patches + y.reshape(b, p * t, d)

        # Spatial: each frame with its own copy of the class token.
        frames = to_frames(patches, t)
        cls_copies = jnp.broadcast_to(cls, (b, t, d)).reshape(b * t, 1, d)
        y = nn.LayerNorm(**norm, name="LayerNorm_0")(jnp.concatenate([cls_copies, frames], axis=1))
        y, keys = SelfAttention(**attention, name="MultiHeadDotProductAttention_0")(
            y, bias=spatial_size_bias(tokens.size, self.merging.prop_attn)
        )
        cls = cls + y[:, 0].reshape(b, t, d).mean(axis=1, keepdims=True)
        frame_tokens = Tokens(frames + y[:, 1:], tokens.size, tokens.source)

        # Reduction per frame: frames are the batch of the matching, no protected token.
        ctx = MergeContext(self.merging, False, key, None, layer, num_layers)
        r = removal_count(self.merging, p, r, ctx)
        if r > 0:
            frame_tokens = merge_float32(
                frame_tokens,
                key_metric(keys[:, 1:], "mean"),
                r,
                settings=self.merging,
                class_token=False,
                key=key,
            )
        x = jnp.concatenate([cls, from_frames(frame_tokens.x, t)], axis=1)

        y = nn.LayerNorm(**norm, name="LayerNorm_1")(x)
        y = MlpBlock(self.mlp_dim, self.gelu_approximate, self.dtype, name="MlpBlock_0")(y)
        return frame_tokens._replace(x=x + y)


class Encoder(nn.Module):
    """The blocks in execution order (a duplicated block repeats whole) and the final norm."""

    num_frames: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    merging: MergingSettings
    layer_norm_eps: float = 1e-6
    gelu_approximate: bool = False
    attention_fn: AttentionFn = xla_attention
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: Tokens, merge_rng: jax.Array | None = None) -> Tokens:
        blocks = encoder_blocks(
            lambda name: EncoderBlock(
                num_frames=self.num_frames,
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                merging=self.merging,
                layer_norm_eps=self.layer_norm_eps,
                gelu_approximate=self.gelu_approximate,
                attention_fn=self.attention_fn,
                dtype=self.dtype,
                name=name,
            ),
            self.num_layers,
        )
        # Duplication (docs/method.md §3.6): the same block object runs Q times with tied weights.
        for step in encoder_steps(self.merging, self.num_layers, merge_rng):
            tokens = blocks[step.layer](
                tokens, step.key, r=step.r, layer=step.layer, num_layers=self.num_layers
            )
        norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="encoder_norm")
        return tokens._replace(x=norm(tokens.x))


class TimeSformer(nn.Module):
    """TimeSformer (divided space-time) with per-frame token merging.

    Parameters: ``embedding`` (per-frame conv, kernel ``(ph, pw, 3, D)``), ``cls``,
    ``posembed_input/pos_embedding (1, 1 + p, D)``, ``time_embedding (1, T, D)``,
    ``Transformer/encoderblock_i/{LayerNorm_temporal, MultiHeadDotProductAttention_temporal,
    temporal_fc, LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0}``,
    ``Transformer/encoder_norm`` and ``output_projection``. The frame count and image size
    are fixed by the embeddings (no interpolation). With ``merging.trace_source`` set, the
    final per-frame source is sown as ``intermediates/source`` (``[B T, p0]`` or
    ``[B T, p, p0]``).
    """

    num_classes: int
    hidden_size: int = 768
    num_heads: int = 12
    mlp_dim: int = 3072
    num_layers: int = 12
    patch_size: tuple[int, int] = (16, 16)  # (h, w)
    layer_norm_eps: float = 1e-6
    gelu_approximate: bool = False  # the paper's and HF's TimeSformer use exact GELU
    merging: MergingSettings = MergingSettings()
    attention_fn: AttentionFn = xla_attention
    dtype: Any = jnp.float32  # activations and matmuls (models.layers.DTYPES); params float32

    options: ClassVar[tuple[str, ...]] = ()

    @nn.compact
    def __call__(
        self, video: jax.Array, *, train: bool = False, merge_rng: jax.Array | None = None
    ) -> jax.Array:
        del train  # no dropout or drop-path at inference
        merge_rng = merge_key(self, merge_rng)
        check_video_shape(video.shape, self.patch_size)
        if self.merging.head_aggregation != "mean":
            raise UserError(
                f"TimeSformer supports head_aggregation 'mean' only, not "
                f"{self.merging.head_aggregation!r} (the paper's TimeSformer ignores the option)"
            )
        b, t, h, w, _ = video.shape
        ph, pw = self.patch_size
        p = (h // ph) * (w // pw)
        d = self.hidden_size
        self._check_embeddings(t, p)

        x = embed_tubelets(
            video.reshape(b * t, h, w, video.shape[-1]), d, self.patch_size, self.dtype
        )
        x = prepend_class_token(self, x.reshape(b * t, p, d))
        x = AddPositionEmbs(name="posembed_input")(x)  # one (1, 1 + p, D) table for every frame
        # One class token (every frame's copy is the same), patches to (p t) plus time embedding.
        cls = x[:b, :1]
        time = self.param("time_embedding", nn.initializers.normal(stddev=0.02), (1, t, d))
        patches = x[:, 1:].reshape(b, t, p, d).transpose(0, 2, 1, 3) + time[:, None].astype(x.dtype)
        x = jnp.concatenate([cls, patches.reshape(b, p * t, d)], axis=1)

        source = initial_source(b * t, p, self.merging.trace_source)
        tokens = Encoder(
            num_frames=t,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            merging=self.merging,
            layer_norm_eps=self.layer_norm_eps,
            gelu_approximate=self.gelu_approximate,
            attention_fn=self.attention_fn,
            dtype=self.dtype,
            name="Transformer",
        )(Tokens(x, None, source), merge_rng)
        sow_source(self, tokens)
        return classifier_head(tokens.x[:, 0], self.num_classes, dtype=self.dtype)

    def _check_embeddings(self, frames: int, patches: int) -> None:
        """A clear error when the video does not fit the stored embeddings."""
        params = self.variables.get("params", {})
        if "time_embedding" in params and params["time_embedding"].shape[1] != frames:
            raise UserError(
                f"video has {frames} frames; this TimeSformer's time embedding has "
                f"{params['time_embedding'].shape[1]}"
            )
        pos = params.get("posembed_input", {}).get("pos_embedding")
        if pos is not None and pos.shape[1] != patches + 1:
            raise UserError(
                f"video frames give {patches} patches; this TimeSformer's position embedding "
                f"has {pos.shape[1] - 1} (a different image size)"
            )

    def _patches(self, image_size: int) -> int:
        ph, pw = self.patch_size
        return (image_size // ph) * (image_size // pw)

    def token_plan(self, num_frames: int, image_size: int) -> list[LayerPlan]:
        """Patch tokens per frame entering and leaving each step (the class token excluded);
        the sequence holds ``1 + num_frames * tokens``."""
        del num_frames  # every frame loses the same r
        steps = self.merging.layer_steps(self.num_layers)
        count = step_counter(self.merging, self.num_layers, class_token=False)
        return plan_tokens(
            self._patches(image_size), [r for _, r in steps], class_token=False, count=count
        )

    def analytic_macs(self, num_frames: int, image_size: int) -> dict[str, Any]:
        """Multiply-adds per clip, per step (a duplicated block counts in full each time).

        Per step with ``p`` patches per frame entering and ``p'`` leaving, ``T`` frames, width
        ``D``, MLP width ``M``: temporal q, k, v, out and ``temporal_fc`` ``5 p T D^2`` plus the
        products ``2 p T^2 D``; spatial q, k, v, out ``4 T (1 + p) D^2`` plus ``2 T (1 + p)^2 D``;
        MLP ``2 (1 + p' T) D M``. Norms, softmax and merging are not counted.
        """
        t, d, m = num_frames, self.hidden_size, self.mlp_dim
        layers = []
        for plan in self.token_plan(num_frames, image_size):
            p = plan.tokens_in
            temporal = 5 * p * t * d**2 + 2 * p * t**2 * d
            spatial = t * (4 * (1 + p) * d**2 + 2 * (1 + p) ** 2 * d)
            mlp = 2 * (1 + plan.tokens_out * t) * d * m
            layers.append(temporal + spatial + mlp)
        return macs_total(
            embedding_macs(num_frames, image_size, self.patch_size, d),
            layers,
            head_macs(d, self.num_classes),
        )

    def merging_layers(self) -> int:
        return self.num_layers

    def source_layout(self) -> SourceLayout:
        """Per-frame merging: sources are per frame (``[B T, p0]``), although the hidden
        states are in ``(p t)`` order; a token covers one frame."""
        return SourceLayout(True, False, (1, *self.patch_size))

    def temporal_tables(self, image_size: int) -> list[TemporalTable]:
        """The time embedding, one entry per frame."""
        del image_size
        return [TemporalTable(("time_embedding",), 0, 1)]
