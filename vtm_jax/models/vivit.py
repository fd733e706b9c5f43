"""Spatio-temporal ViViT ("model 1") with token merging, in Scenic's parameter layout.

Input ``[B, T, H, W, 3]`` (Scenic's NTHWC). A tubelet Conv embeds ``(t, h, w)`` patches in
``(t h w)`` order, a class token is prepended, learned position embeddings added, then pre-LN
blocks run joint space-time attention. Each block reduces its tokens after the attention
residual and before the MLP (docs/method.md §3.1), merging globally over all tokens.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from vtm_jax.merging import MergingSettings, Support
from vtm_jax.merging.schedule import LayerPlan
from vtm_jax.models.attention import AttentionFn, xla_attention
from vtm_jax.models.base import (
    SourceLayout,
    TemporalTable,
    check_classifier,
    check_video_shape,
    classifier_head,
    embed_tubelets,
    merge_key,
    pool,
    prepend_class_token,
)
from vtm_jax.models.encoder import (
    ENCODER_PLACES,
    ENCODER_READS,
    Encoder,
    EncoderBlock,
    encoder_plan,
    masks_padding,
    sow_source,
)
from vtm_jax.models.macs import embedding_macs, head_macs, macs_total, step_macs

# The shared encoder is ViViT's (Scenic's Transformer); its block is named here for the tests
# and tools that capture it.
__all__ = ["Encoder", "EncoderBlock", "ViViT"]


class ViViT(nn.Module):
    """ViViT model 1 with token merging; parameter tree identical to Scenic's ``ViViT``.

    ``merging`` holds the merging settings (static); ``attention_fn`` is the attention
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
    merging: MergingSettings = MergingSettings()
    attention_fn: AttentionFn = xla_attention
    dtype: Any = jnp.float32  # activations and matmuls (models.layers.DTYPES); params float32

    options: ClassVar[tuple[str, ...]] = ("size_weighted_pool",)
    merging_support: ClassVar[Support] = Support("joint", ENCODER_PLACES, ENCODER_READS)

    @nn.compact
    def __call__(
        self, video: jax.Array, *, train: bool = False, merge_rng: jax.Array | None = None
    ) -> jax.Array:
        del train  # no dropout: the checkpoints this serves were trained with rate 0
        merge_rng = merge_key(self, merge_rng)
        check_video_shape(video.shape, self.patch_size)
        check_classifier(self.classifier)
        x = embed_tubelets(video, self.hidden_size, self.patch_size, self.dtype)
        b, grid = x.shape[0], tuple(x.shape[1:4])
        x = x.reshape(b, -1, self.hidden_size)
        class_token = self.classifier == "token"
        if class_token:
            x = prepend_class_token(self, x)
        tokens = Encoder(
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            class_token=class_token,
            merging=self.merging,
            layer_norm_eps=self.layer_norm_eps,
            gelu_approximate=self.gelu_approximate,
            attention_fn=self.attention_fn,
            dtype=self.dtype,
            name="Transformer",
        )(x, merge_rng, grid, pixels=video)
        sow_source(self, tokens)
        weighted = self.merging.size_weighted_pool or masks_padding(self.merging)
        x = pool(tokens, class_token=class_token, weighted=weighted)
        return classifier_head(x, self.num_classes, self.representation_size, dtype=self.dtype)

    def token_plan(self, num_frames: int, image_size: int) -> list[LayerPlan]:
        """Static token counts of each step (layer, or repeat of a duplicated layer)."""
        t, h, w = self.patch_size
        class_token = self.classifier == "token"
        grid = (num_frames // t, image_size // h, image_size // w)
        tokens = grid[0] * grid[1] * grid[2] + int(class_token)
        return encoder_plan(
            self.merging, tokens, self.num_layers, class_token=class_token, grid=grid
        )

    def analytic_macs(self, num_frames: int, image_size: int) -> dict[str, Any]:
        """Multiply-adds per step and in total (a duplicate's extra runs cost a key projection)."""
        layers = step_macs(
            self.token_plan(num_frames, image_size),
            self.merging.layer_steps(self.num_layers),
            hidden=self.hidden_size,
            mlp_dim=self.mlp_dim,
        )
        return macs_total(
            embedding_macs(num_frames, image_size, self.patch_size, self.hidden_size),
            layers,
            head_macs(self.hidden_size, self.num_classes, self.representation_size),
        )

    def merging_layers(self) -> int:
        return self.num_layers

    def source_layout(self) -> SourceLayout:
        """Global merging: one row of ids over ``(t h w)`` tokens, after the class token."""
        return SourceLayout(False, self.classifier == "token", tuple(self.patch_size))

    def temporal_tables(self, image_size: int) -> list[TemporalTable]:
        """The joint space-time position table: a class entry, then ``(h w)`` per slot."""
        _, h, w = self.patch_size
        per_slot = (image_size // h) * (image_size // w)
        cls = int(self.classifier == "token")
        return [TemporalTable(("Transformer", "posembed_input", "pos_embedding"), cls, per_slot)]
