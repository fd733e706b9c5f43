"""ViViT models 3 and 4 (Scenic's factorised self-attention and factorised dot-product
attention) with token merging, in Scenic's parameter layout.

Input ``[B, T, H, W, 3]``. A tubelet Conv embeds ``(t, h, w)`` patches, learned positions are
added over the ``(t h w)`` tokens, and the blocks of :mod:`vtm_jax.models.factorised_blocks`
run on them as a ``[time, space]`` grid; the encoder's output is mean-pooled (Scenic has no
class token for these types: ``classifier`` is ``gap``) and classified. The tree is Scenic's
``ViViT``: ``embedding``, ``Transformer/{posembed_input, encoderblock_i, encoder_norm}``,
``pre_logits`` (with a ``representation_size``), ``output_projection``.

Merging keeps the grid (:mod:`vtm_jax.models.grid_merging`): ``r`` tokens per frame and step,
matched once for all frames (``factorised_groups='aligned'``, the default) or per frame
(``per_frame``), and ``temporal_r`` whole frames per layer. :meth:`token_plan` counts tokens per
frame (``r`` is per frame, as for the factorised encoder); :meth:`grid_plan` adds the frames.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from vtm_jax.errors import UserError
from vtm_jax.merging import MergingSettings, Tokens
from vtm_jax.merging.schedule import LayerPlan
from vtm_jax.models.attention import AttentionFn, xla_attention
from vtm_jax.models.base import (
    SourceLayout,
    TemporalTable,
    check_classifier,
    check_video_shape,
    classifier_head,
    embed_tubelets,
    mean_pool,
    merge_key,
)
from vtm_jax.models.factorised_blocks import ATTENTION_ORDERS, GridEncoder
from vtm_jax.models.grid_merging import check_grid_settings, final_source, plan_grid
from vtm_jax.models.macs import GridStep, embedding_macs, grid_step_macs, head_macs, macs_total


class _GridViViT(nn.Module):
    """What models 3 and 4 share; ``attention`` names their block (a key of
    :data:`~vtm_jax.models.factorised_blocks.BLOCKS`)."""

    num_classes: int
    hidden_size: int = 768
    num_heads: int = 12
    mlp_dim: int = 3072
    num_layers: int = 12
    patch_size: tuple[int, int, int] = (2, 16, 16)  # (t, h, w)
    classifier: str = "gap"
    representation_size: int | None = None
    layer_norm_eps: float = 1e-6
    gelu_approximate: bool = True
    merging: MergingSettings = MergingSettings()
    attention_fn: AttentionFn = xla_attention
    dtype: Any = jnp.float32  # activations and matmuls (models.layers.DTYPES); params float32

    options: ClassVar[tuple[str, ...]] = ("temporal_r", "size_weighted_pool", "factorised_groups")
    attention: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def check(self) -> None:
        """A UserError for what Scenic's module or the grid refuses."""
        check_classifier(self.classifier)
        if self.classifier == "token":
            # Scenic's ViViT asserts this for the factorised types: they have no class token.
            raise UserError(
                f"classifier 'token' is not available for {self.description}; valid: gap"
            )
        check_grid_settings(self.merging)

    def _order(self) -> str:
        return "time_space"

    @nn.compact
    def __call__(
        self, video: jax.Array, *, train: bool = False, merge_rng: jax.Array | None = None
    ) -> jax.Array:
        del train  # no dropout: the checkpoints this serves were trained with rate 0
        merge_rng = merge_key(self, merge_rng)
        check_video_shape(video.shape, self.patch_size)
        self.check()
        x = embed_tubelets(video, self.hidden_size, self.patch_size, self.dtype)
        b, t, h, w, d = x.shape
        grid = GridEncoder(
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            attention=self.attention,
            merging=self.merging,
            attention_order=self._order(),
            layer_norm_eps=self.layer_norm_eps,
            gelu_approximate=self.gelu_approximate,
            attention_fn=self.attention_fn,
            dtype=self.dtype,
            name="Transformer",
        )(x.reshape(b, t, h * w, d), merge_rng, tuple(self._plan(t, h * w)))
        source = final_source(grid, self.merging.trace_source)
        if source is not None:
            self.sow("intermediates", "source", source)
        sizes = grid.sizes()
        tokens = Tokens(
            grid.x.reshape(b, -1, d), None if sizes is None else sizes.reshape(b, -1, 1)
        )
        pooled = mean_pool(tokens, weighted=self.merging.size_weighted_pool)
        return classifier_head(pooled, self.num_classes, self.representation_size, dtype=self.dtype)

    def _plan(self, frames: int, space: int) -> list[GridStep]:
        return plan_grid(self.merging, self.num_layers, frames, space)

    def grid_plan(self, num_frames: int, image_size: int) -> list[GridStep]:
        """Frames and tokens per frame entering and leaving each step (static)."""
        t, h, w = self.patch_size
        return self._plan(num_frames // t, (image_size // h) * (image_size // w))

    def token_plan(self, num_frames: int, image_size: int) -> list[LayerPlan]:
        """Tokens per frame entering and leaving each step; frames merged by ``temporal_r``
        show in :meth:`grid_plan` and the MACs."""
        return [
            LayerPlan(p.space_in, p.space_in - p.space_out, p.space_out)
            for p in self.grid_plan(num_frames, image_size)
        ]

    def analytic_macs(self, num_frames: int, image_size: int) -> dict[str, Any]:
        """Multiply-adds per step and in total (:func:`~vtm_jax.models.macs.grid_step_macs`)."""
        layers = grid_step_macs(
            self.grid_plan(num_frames, image_size),
            hidden=self.hidden_size,
            mlp_dim=self.mlp_dim,
            attention=self.attention,
        )
        return macs_total(
            embedding_macs(num_frames, image_size, self.patch_size, self.hidden_size),
            layers,
            head_macs(self.hidden_size, self.num_classes, self.representation_size),
        )

    def merging_layers(self) -> int:
        return self.num_layers

    def source_layout(self) -> SourceLayout:
        """One row of ids over the ``(t h w)`` patches (each id a token of the final grid)."""
        return SourceLayout(False, False, tuple(self.patch_size))

    def temporal_tables(self, image_size: int) -> list[TemporalTable]:
        """The position table over ``(t h w)`` tokens: ``(h w)`` entries per slot, no class entry."""
        _, h, w = self.patch_size
        per_slot = (image_size // h) * (image_size // w)
        return [TemporalTable(("Transformer", "posembed_input", "pos_embedding"), 0, per_slot)]


class FactorisedSelfAttentionViViT(_GridViViT):
    """ViViT model 3 (``factorized_self_attention_block``): attention over time and over space
    in turn in every block, in ``attention_order``; parameter tree identical to Scenic's."""

    attention_order: str = "time_space"

    attention: ClassVar[str] = "self_attention"
    description: ClassVar[str] = "ViViT model 3 (factorised self-attention)"

    def check(self) -> None:
        if self.attention_order not in ATTENTION_ORDERS:
            raise UserError(
                f"unknown attention_order {self.attention_order!r}; "
                f"valid: {', '.join(ATTENTION_ORDERS)}"
            )
        super().check()

    def _order(self) -> str:
        return self.attention_order


class FactorisedDotProductViViT(_GridViViT):
    """ViViT model 4 (``factorized_dot_product_attention``): half the heads of each block
    attend over time, half over space; parameter tree identical to Scenic's."""

    attention: ClassVar[str] = "dot_product"
    description: ClassVar[str] = "ViViT model 4 (factorised dot-product attention)"

    def check(self) -> None:
        if self.num_heads % 2:
            raise UserError(
                f"ViViT model 4 splits its heads between time and space: num_heads must be "
                f"even, not {self.num_heads}"
            )
        super().check()
