"""Factorised-encoder ViViT ("model 2", Scenic's ``SpaceTimeViViT``) with token merging.

A spatial transformer runs on each frame's tubelet tokens (its own class token), each frame is
pooled to one token, and a temporal transformer runs over those. Merging happens inside the
spatial encoder, per frame, with the same r in every frame (each frame is a batch row of the
matching); the temporal encoder merges only when ``merging.temporal_r`` > 0. The parameter tree
is Scenic's: ``SpatialTransformer``, ``TemporalTransformer``, ``cls_SpatialTransformer``,
``cls_TemporalTransformer``, ``embedding``, ``output_projection``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from vtm_jax.merging import MergingSettings, Support, Tokens
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
from vtm_jax.models.encoder import ENCODER_PLACES, ENCODER_READS, Encoder, encoder_plan, sow_source
from vtm_jax.models.macs import embedding_macs, head_macs, macs_total, step_macs


class FactorisedEncoderViViT(nn.Module):
    """ViViT model 2; ``spatial_*`` / ``temporal_*`` size the two encoders (width shared)."""

    num_classes: int
    hidden_size: int = 768
    spatial_num_layers: int = 12
    spatial_num_heads: int = 12
    spatial_mlp_dim: int = 3072
    temporal_num_layers: int = 4
    temporal_num_heads: int = 12
    temporal_mlp_dim: int = 3072
    patch_size: tuple[int, int, int] = (2, 16, 16)  # (t, h, w)
    classifier: str = "token"
    representation_size: int | None = None
    layer_norm_eps: float = 1e-6
    gelu_approximate: bool = True
    merging: MergingSettings = MergingSettings()
    attention_fn: AttentionFn = xla_attention
    dtype: Any = jnp.float32  # activations and matmuls (models.layers.DTYPES); params float32

    options: ClassVar[tuple[str, ...]] = ("temporal_r", "size_weighted_pool")
    # Frames are the spatial encoder's sequences; nothing reaches it as a video.
    merging_support: ClassVar[Support] = Support(
        "frame", tuple(p for p in ENCODER_PLACES if p != "input"), ENCODER_READS[:3]
    )

    def _encoder(self, name: str, merging: MergingSettings) -> Encoder:
        prefix = name[: -len("Transformer")].lower()
        return Encoder(
            num_layers=getattr(self, f"{prefix}_num_layers"),
            num_heads=getattr(self, f"{prefix}_num_heads"),
            mlp_dim=getattr(self, f"{prefix}_mlp_dim"),
            class_token=self.classifier == "token",
            merging=merging,
            layer_norm_eps=self.layer_norm_eps,
            gelu_approximate=self.gelu_approximate,
            attention_fn=self.attention_fn,
            dtype=self.dtype,
            name=name,
        )

    def _encode(self, x: jax.Array, name: str, merging: MergingSettings, rng) -> Tokens:
        """Class token (if any), encoder; ``x`` is ``[batch, tokens, D]``."""
        if self.classifier == "token":
            x = prepend_class_token(self, x, f"cls_{name}")
        return self._encoder(name, merging)(x, rng)

    def _pool(self, tokens: Tokens) -> jax.Array:
        class_token = self.classifier == "token"
        return pool(tokens, class_token=class_token, weighted=self.merging.size_weighted_pool)

    @nn.compact
    def __call__(
        self, video: jax.Array, *, train: bool = False, merge_rng: jax.Array | None = None
    ) -> jax.Array:
        del train
        merge_rng = merge_key(self, merge_rng)
        check_video_shape(video.shape, self.patch_size)
        check_classifier(self.classifier)
        x = embed_tubelets(video, self.hidden_size, self.patch_size, self.dtype)
        b, t = x.shape[:2]
        # Frames become batch rows: the spatial encoder, and its merging, work per frame.
        frames = x.reshape(b * t, -1, self.hidden_size)
        spatial = self._encode(frames, "SpatialTransformer", self.merging, merge_rng)
        sow_source(self, spatial)
        per_frame = self._pool(spatial).reshape(b, t, self.hidden_size)
        temporal = self._encode(
            per_frame,
            "TemporalTransformer",
            temporal_settings(self.merging),
            temporal_rng(self.merging, merge_rng),
        )
        return classifier_head(
            self._pool(temporal), self.num_classes, self.representation_size, dtype=self.dtype
        )

    def token_plan(self, num_frames: int, image_size: int) -> list[LayerPlan]:
        """Per-frame token counts of the spatial steps, then the temporal steps."""
        t, h, w = self.patch_size
        cls = int(self.classifier == "token")
        grid = (1, image_size // h, image_size // w)
        spatial = encoder_plan(
            self.merging,
            grid[1] * grid[2] + cls,
            self.spatial_num_layers,
            class_token=bool(cls),
            grid=grid,
        )
        temporal = encoder_plan(
            temporal_settings(self.merging),
            num_frames // t + cls,
            self.temporal_num_layers,
            class_token=bool(cls),
        )
        return spatial + temporal

    def analytic_macs(self, num_frames: int, image_size: int) -> dict[str, Any]:
        """Multiply-adds: spatial blocks count once per frame; duplicate repeats a key projection."""
        frames = num_frames // self.patch_size[0]
        spatial_steps = self.merging.layer_steps(self.spatial_num_layers)
        temporal_steps = temporal_settings(self.merging).layer_steps(self.temporal_num_layers)
        plan = self.token_plan(num_frames, image_size)
        spatial = step_macs(
            plan[: len(spatial_steps)],
            spatial_steps,
            hidden=self.hidden_size,
            mlp_dim=self.spatial_mlp_dim,
        )
        temporal = step_macs(
            plan[len(spatial_steps) :],
            temporal_steps,
            hidden=self.hidden_size,
            mlp_dim=self.temporal_mlp_dim,
        )
        layers = [frames * m for m in spatial] + temporal  # the spatial encoder runs per frame
        return macs_total(
            embedding_macs(num_frames, image_size, self.patch_size, self.hidden_size),
            layers,
            head_macs(self.hidden_size, self.num_classes, self.representation_size),
        )

    def merging_layers(self) -> int:
        """The spatial encoder's: the r list is per spatial layer (``temporal_r`` is one int)."""
        return self.spatial_num_layers

    def source_layout(self) -> SourceLayout:
        """Per-frame merging: one row of ids per frame (after its class token, if any)."""
        return SourceLayout(True, self.classifier == "token", tuple(self.patch_size))

    def temporal_tables(self, image_size: int) -> list[TemporalTable]:
        """The temporal encoder's positions: one per slot, after its class entry (if any)."""
        del image_size  # the spatial table follows the image size, not the frame count
        cls = int(self.classifier == "token")
        return [TemporalTable(("TemporalTransformer", "posembed_input", "pos_embedding"), cls, 1)]


def temporal_rng(merging: MergingSettings, merge_rng: jax.Array | None) -> jax.Array:
    """The temporal encoder's base key: split off the spatial one, so no key is used twice
    (the spatial encoder's step keys are ``fold_in(base, step)``)."""
    base = jax.random.PRNGKey(merging.seed) if merge_rng is None else merge_rng
    return jax.random.split(base)[1]


def temporal_settings(merging: MergingSettings) -> MergingSettings:
    """The temporal encoder's settings: the same mode, r = ``temporal_r``, no duplication."""
    if merging.temporal_r == 0:
        return MergingSettings(trace_source="none")
    return dataclasses.replace(
        merging,
        r=merging.temporal_r,
        schedule=0.0,
        r_schedule="paper",  # temporal_r is the same in every temporal layer
        duplicate=None,
        trace_source="none",
    )
