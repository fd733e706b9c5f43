"""VideoMAE (ViT-B fine-tuned classifier) with token merging, in a Scenic-like parameter layout.

Input ``[B, T, H, W, 3]``. A tubelet Conv embeds ``(t, h, w)`` patches in ``(t h w)`` order; a
fixed sine-cosine position table (regenerated, never stored) is added; there is no class token.
Pre-LN blocks run joint space-time attention whose keys have no bias, and exact GELU MLPs.
Each block reduces its tokens after the attention residual and before the MLP, merging globally
over all tokens; without a class token the unmerged tokens keep their score order (docs/method.md
§3.2, §9). The head is ``fc_norm`` of the mean over the remaining tokens, then one Dense.

The paper runs VideoMAE with proportional attention off (``TOME.PROP_ATTN False`` on every
VideoMAE experiment line), while :class:`MergingSettings` defaults to on: converted records
store ``token_merging.prop_attn = False`` (see ``vtm_jax.checkpoints.convert.hf_videomae``); a model built
by hand takes whatever ``merging`` it is given.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vtm_jax.merging import MergingSettings, Support
from vtm_jax.merging.schedule import LayerPlan
from vtm_jax.models.attention import AttentionFn, xla_attention
from vtm_jax.models.base import (
    SourceLayout,
    TemporalTable,
    check_video_shape,
    classifier_head,
    embed_tubelets,
    mean_pool,
    merge_key,
)
from vtm_jax.models.encoder import (
    ENCODER_PLACES,
    ENCODER_READS,
    Encoder,
    encoder_plan,
    masks_padding,
    sow_source,
)
from vtm_jax.models.macs import embedding_macs, head_macs, macs_total, step_macs


@functools.lru_cache(maxsize=8)
def sinusoid_positions(num_tokens: int, width: int) -> np.ndarray:
    """VideoMAE's fixed position table ``[1, N, D]``.

    Entry ``(p, j)`` is ``p / 10000 ** (2 (j // 2) / D)``, then sine on even ``j`` and cosine on
    odd ``j``. Computed in float64 and rounded to float32 once, as the original does.
    """
    pos = np.arange(num_tokens, dtype=np.float64)[:, None]
    j = np.arange(width)
    angles = pos / np.power(10000.0, 2 * (j // 2) / width)
    table = np.where(j % 2 == 0, np.sin(angles), np.cos(angles)).astype(np.float32)
    table.setflags(write=False)  # cached: shared by every caller
    return table[None]


class VideoMAE(nn.Module):
    """VideoMAE video classifier with token merging.

    Parameters: ``embedding`` (Conv, kernel ``(t, h, w, 3, D)``),
    ``Transformer/encoderblock_i/{LayerNorm_0, MultiHeadDotProductAttention_0 (key without
    bias), LayerNorm_1, MlpBlock_0}``, ``fc_norm`` and ``output_projection``. VideoMAE's
    classifiers have no layer scale (``init_values=0``), so there is none here.

    ``layer_norm_eps`` is the blocks' epsilon and ``fc_norm_eps`` the pooled norm's: the paper's
    model uses 1e-6 for both; HuggingFace's port reads the blocks' from its config (1e-12 by
    default) and leaves ``fc_norm`` at PyTorch's 1e-5. ``merging.size_weighted_pool`` weights
    the mean by token sizes (the paper's pooling ignores them). With ``merging.trace_source``
    set, the final source tracking is sown as ``intermediates/source``.
    """

    num_classes: int
    hidden_size: int = 768
    num_heads: int = 12
    mlp_dim: int = 3072
    num_layers: int = 12
    patch_size: tuple[int, int, int] = (2, 16, 16)  # (t, h, w)
    layer_norm_eps: float = 1e-6
    fc_norm_eps: float = 1e-6
    merging: MergingSettings = MergingSettings()
    attention_fn: AttentionFn = xla_attention
    dtype: Any = jnp.float32  # activations and matmuls (models.layers.DTYPES); params float32

    options: ClassVar[tuple[str, ...]] = ("size_weighted_pool",)
    merging_support: ClassVar[Support] = Support("joint", ENCODER_PLACES, ENCODER_READS)

    @nn.compact
    def __call__(
        self, video: jax.Array, *, train: bool = False, merge_rng: jax.Array | None = None
    ) -> jax.Array:
        del train  # no dropout: the paper's test configs set every rate to 0
        merge_rng = merge_key(self, merge_rng)
        check_video_shape(video.shape, self.patch_size)
        x = embed_tubelets(video, self.hidden_size, self.patch_size, self.dtype)
        grid = tuple(x.shape[1:4])
        x = x.reshape(x.shape[0], -1, self.hidden_size)
        x = x + jnp.asarray(sinusoid_positions(x.shape[1], self.hidden_size), x.dtype)
        # The shared encoder without learned positions and final norm; keys have no bias
        # (VideoMAE's qkv bias is (q_bias, 0, v_bias)), exact GELU, no class token.
        tokens = Encoder(
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            class_token=False,
            merging=self.merging,
            layer_norm_eps=self.layer_norm_eps,
            gelu_approximate=False,
            attention_fn=self.attention_fn,
            key_bias=False,
            learned_positions=False,
            final_norm=False,
            dtype=self.dtype,
            name="Transformer",
        )(x, merge_rng, grid, pixels=video)
        sow_source(self, tokens)
        weighted = self.merging.size_weighted_pool or masks_padding(self.merging)
        x = mean_pool(tokens, weighted=weighted)
        x = nn.LayerNorm(epsilon=self.fc_norm_eps, dtype=self.dtype, name="fc_norm")(x)
        return classifier_head(x, self.num_classes, dtype=self.dtype)

    def token_plan(self, num_frames: int, image_size: int) -> list[LayerPlan]:
        """Static token counts of each step (layer, or repeat of a duplicated layer)."""
        t, h, w = self.patch_size
        grid = (num_frames // t, image_size // h, image_size // w)
        patches = grid[0] * grid[1] * grid[2]
        return encoder_plan(self.merging, patches, self.num_layers, class_token=False, grid=grid)

    def analytic_macs(self, num_frames: int, image_size: int) -> dict[str, Any]:
        """Multiply-adds per step and in total.

        A full step is :func:`~vtm_jax.merging.schedule.block_macs` (projections and attention on the
        tokens entering, MLP on the tokens left); a duplicate's extra run costs its key
        projection only. The embedding is the tubelet Conv; the head is the classifier Dense.
        Norms, GELU, softmax, position adds and the matching itself are not counted.
        """
        layers = step_macs(
            self.token_plan(num_frames, image_size),
            self.merging.layer_steps(self.num_layers),
            hidden=self.hidden_size,
            mlp_dim=self.mlp_dim,
        )
        return macs_total(
            embedding_macs(num_frames, image_size, self.patch_size, self.hidden_size),
            layers,
            head_macs(self.hidden_size, self.num_classes),
        )

    def merging_layers(self) -> int:
        return self.num_layers

    def source_layout(self) -> SourceLayout:
        """Global merging: one row of ids over ``(t h w)`` tokens (no class token)."""
        return SourceLayout(False, False, tuple(self.patch_size))

    def temporal_tables(self, image_size: int) -> list[TemporalTable]:
        """None: the sinusoid positions are regenerated for any token count."""
        del image_size
        return []
