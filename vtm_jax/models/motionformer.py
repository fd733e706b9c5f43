"""Motionformer (trajectory attention) with token merging (docs/method.md §3.4, §3.6).

Input ``[B, T, H, W, 3]``. A tubelet Conv cuts ``(2, 16, 16)`` patches, flattened frame-major:
the ``S = F * P`` patch tokens are in ``(f n)`` order (``F`` temporal slots, ``P`` patches per
slot), after one class token. Position embeddings are "separate": a spatial table (its entry 0
belongs to the class token) tiled over the slots plus a temporal table repeated over the
patches of each slot. Twelve pre-LN blocks run trajectory attention, then the class token goes
through the final LayerNorm, a pre-logits ``Dense + tanh`` and ``output_projection``.

Trajectory attention, per head (the original code path, ``USE_ORIGINAL_TRAJ_ATTN_CODE=True``):

1. the class token attends to every token (one plain softmax);
2. each patch query attends to the patch keys of each slot separately (softmax within the
   slot), giving one aggregate per (query, slot), ``[S, F]``;
3. the query's own-slot aggregate is projected by ``proj_q``, every aggregate by the key half of
   ``proj_kv``; a softmax over the ``F`` slots weighs the **unprojected** aggregates (the
   original's typo: the value half of ``proj_kv`` is never used; ``original_temporal_values``
   = False uses it as the paper describes).

Token merging (the paper's patch): after the attention residual and before the MLP, the
patch tokens are split into ``F`` groups and each group is reduced on its own with the mean of
the patch keys over heads as metric (``head_aggregation='concat'``, which the paper's
Motionformer ignores, is refused unless ``merging.motionformer_concat_keys`` asks for the
concatenated keys by name), ``class_token=False`` (clamp ``P // 2``, unmerged tokens
in score order). ``merging.motionformer_groups``:

* ``paper`` (default): the paper's ``b (s f) -> (b f) s`` split: group ``g`` is the flat patch
  positions ``j`` with ``j % F == g``. As the tokens are actually ``(f n)``, each group takes
  ``P / F`` tokens of every slot, and after the first reduction the re-interleaved tokens are
  read back as ``(f n)`` by the next block, so its slot structure is scrambled (docs/method.md §3.4,
  §10). Faithful to the paper's numbers.
* ``per_frame``: ``b (f s) -> (b f) s``: each group is one slot, as intended.

Proportional attention adds ``log(size)`` of the patch keys to the patch-query logits of step 2
only; the class token's attention and step 3 get no bias. Sizes and tracked sources are kept
per group, as in the paper (``[B * F, P, 1]``; sources ``[B * F, P0]`` or ``[B * F, P, P0]``,
where with ``paper`` groups original column ``c`` of group ``g`` is flat patch ``c * F + g``).
Duplication (docs/method.md §3.6) runs the **whole** block (attention, reduction, MLP) several times
with tied weights, as the paper's Motionformer duplication does.

``__call__`` returns logits. The original model returns softmax probabilities in eval mode
(one softmax per head for EPIC-KITCHENS); :func:`eval_probabilities` reproduces that. Softmax is
monotone, so top-1 and the EK action accuracy are the same either way.
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
)
from vtm_jax.models.encoder import (
    encoder_blocks,
    encoder_steps,
    merge_float32,
    sow_source,
    step_counter,
)
from vtm_jax.models.layers import MlpBlock
from vtm_jax.models.macs import embedding_macs, head_macs, macs_total

_XAVIER = nn.initializers.xavier_uniform()


def to_groups(patches: jax.Array, num_slots: int, grouping: str) -> jax.Array:
    """``[B, S, C]`` patch tokens in flat order to ``[B * F, S / F, C]`` merge groups."""
    b, s, c = patches.shape
    p = s // num_slots
    if grouping == "paper":  # b (s f) c -> (b f) s c
        return patches.reshape(b, p, num_slots, c).transpose(0, 2, 1, 3).reshape(-1, p, c)
    return patches.reshape(b * num_slots, p, c)  # b (f s) c -> (b f) s c


def from_groups(groups: jax.Array, num_slots: int, grouping: str) -> jax.Array:
    """Inverse of :func:`to_groups`: ``[B * F, P, C]`` back to the flat ``[B, F * P, C]``."""
    bf, p, c = groups.shape
    b = bf // num_slots
    if grouping == "paper":
        return groups.reshape(b, num_slots, p, c).transpose(0, 2, 1, 3).reshape(b, p * num_slots, c)
    return groups.reshape(b, num_slots * p, c)


class PairProjection(nn.Module):
    """The original's ``proj_kv``: one ``(D, 2, H, d)`` kernel whose halves give keys and values.

    Only the halves asked for are computed: the original code path never uses the values.
    """

    num_heads: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, values: bool) -> tuple[jax.Array, jax.Array | None]:
        width = x.shape[-1]
        shape = (2, self.num_heads, width // self.num_heads)
        kernel = self.param("kernel", _XAVIER, (width,) + shape).astype(x.dtype)
        bias = self.param("bias", nn.initializers.zeros, shape) if self.use_bias else None

        def half(i: int) -> jax.Array:
            y = jnp.einsum("...c,chd->...hd", x, kernel[:, i])
            return y if bias is None else y + bias[i].astype(x.dtype)

        return half(0), half(1) if values else None


class TrajectoryAttention(nn.Module):
    """Trajectory attention over ``[B, 1 + F * P, D]`` tokens in ``(f n)`` order.

    Returns the output and the patch keys ``[B, F * P, H, d]`` (the merge metric's source).
    Both softmax attentions over keys (class token; per-slot patch attention) go through
    ``attention_fn``; the temporal step (a softmax over ``F`` values per query) is inline.
    """

    num_heads: int
    num_slots: int
    qkv_bias: bool = True
    original_temporal_values: bool = True
    attention_fn: AttentionFn = xla_attention
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, key_bias: jax.Array | None = None):
        """``key_bias``: ``[B, F * P]`` log sizes of the patch keys in flat order, or None."""
        b, n, width = x.shape
        h, f = self.num_heads, self.num_slots
        if width % h:
            raise UserError(f"hidden size {width} is not divisible by {h} heads")
        d = width // h
        s = n - 1
        p = s // f
        proj = dict(features=(h, d), use_bias=self.qkv_bias, kernel_init=_XAVIER, dtype=self.dtype)
        q = nn.DenseGeneral(name="query", **proj)(x)
        k = nn.DenseGeneral(name="key", **proj)(x)
        v = nn.DenseGeneral(name="value", **proj)(x)

        cls_out = self.attention_fn(q[:, :1], k, v)  # [B, 1, H, d]

        # Step 2: every patch query against the patch keys of each slot; slots are the batch.
        q_p, k_p, v_p = q[:, 1:], k[:, 1:], v[:, 1:]
        q_slots = jnp.broadcast_to(q_p[:, None], (b, f, s, h, d)).reshape(b * f, s, h, d)
        bias = None
        if key_bias is not None:  # float32 log sizes, whatever the model's dtype
            bias = key_bias.reshape(b * f, 1, 1, p).astype(jnp.float32)
        agg = self.attention_fn(
            q_slots, k_p.reshape(b * f, p, h, d), v_p.reshape(b * f, p, h, d), bias=bias
        )
        agg = agg.reshape(b, f, s, width).transpose(0, 2, 1, 3)  # [B, S, F, (h d)]

        # Step 3: the query's own slot (query j sits in slot j // P) gives the temporal query.
        own = agg[:, jnp.arange(s), jnp.arange(s) // p]  # [B, S, (h d)]
        q2 = nn.DenseGeneral(name="proj_q", **proj)(own) * (d**-0.5)
        k2, v2 = PairProjection(h, self.qkv_bias, name="proj_kv")(
            agg, values=not self.original_temporal_values
        )  # [B, S, F, H, d]
        # The softmax over slots in float32 (a no-op for a float32 model), as every softmax.
        logits = jnp.einsum("bshd,bsfhd->bshf", q2, k2, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits, axis=-1)
        values = agg.reshape(b, s, f, h, d) if self.original_temporal_values else v2
        patches = jnp.einsum("bshf,bsfhd->bshd", weights.astype(values.dtype), values)

        y = jnp.concatenate([cls_out, patches], axis=1)
        out = nn.DenseGeneral(
            width, axis=(-2, -1), kernel_init=_XAVIER, dtype=self.dtype, name="out"
        )(y)
        return out, k_p


class TrajectoryBlock(nn.Module):
    """Pre-LN block: trajectory attention, residual, per-group reduction, MLP, residual.

    ``tokens.x`` is the flat ``[B, 1 + F * P, D]`` sequence; ``tokens.size`` and
    ``tokens.source`` are per merge group (``[B * F, P, ...]``), as the paper keeps them.
    """

    num_heads: int
    mlp_dim: int
    num_slots: int
    merging: MergingSettings
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    original_temporal_values: bool = True
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
        f, grouping = self.num_slots, self.merging.motionformer_groups
        y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="LayerNorm_0")(
            tokens.x
        )
        key_bias = None
        if self.merging.prop_attn and tokens.size is not None:
            key_bias = from_groups(jnp.log(tokens.size), f, grouping)[..., 0]
        y, keys = TrajectoryAttention(
            self.num_heads,
            f,
            self.qkv_bias,
            self.original_temporal_values,
            self.attention_fn,
            self.dtype,
            name="TrajectoryAttention_0",
        )(y, key_bias=key_bias)
        x = tokens.x + y
        ctx = MergeContext(self.merging, False, key, None, layer, num_layers)
        r = removal_count(self.merging, (x.shape[1] - 1) // f, r, ctx)
        if r > 0:
            metric = to_groups(key_metric(keys, self.merging.head_aggregation), f, grouping)
            grouped = Tokens(to_groups(x[:, 1:], f, grouping), tokens.size, tokens.source)
            grouped = merge_float32(
                grouped, metric, r, settings=self.merging, class_token=False, key=key
            )
            x = jnp.concatenate([x[:, :1], from_groups(grouped.x, f, grouping)], axis=1)
            tokens = grouped
        y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="LayerNorm_1")(x)
        y = MlpBlock(self.mlp_dim, gelu_approximate=False, dtype=self.dtype, name="MlpBlock_0")(y)
        return tokens._replace(x=x + y)


def check_head_aggregation(merging: MergingSettings) -> None:
    """Refuse ``concat`` unless asked for by name: the paper's Motionformer ignores it."""
    if merging.head_aggregation == "concat" and not merging.motionformer_concat_keys:
        raise UserError(
            "Motionformer takes head_aggregation 'mean' only: the paper's Motionformer averages "
            "the keys over heads whatever is asked; set motionformer_concat_keys=True to "
            "concatenate them all the same (departing from the paper)"
        )


class Motionformer(nn.Module):
    """Motionformer (ViT-B, trajectory attention) with token merging.

    Parameters: ``embedding`` (Conv, kernel ``(t, h, w, 3, D)``), ``cls`` ``(1, 1, D)``,
    ``pos_embedding`` ``(1, 1 + P, D)`` (entry 0: the class token's), ``temporal_embedding``
    ``(1, F, D)``, ``encoderblock_{i}`` (``LayerNorm_0``, ``TrajectoryAttention_0`` with
    ``query``/``key``/``value``/``proj_q`` ``(D, H, d)``, ``proj_kv`` ``(D, 2, H, d)``, ``out``
    ``(H, d, D)``; ``LayerNorm_1``, ``MlpBlock_0``), ``encoder_norm``, ``pre_logits`` (when
    ``representation_size``) and ``output_projection``. The input must have the ``F`` slots and
    ``P`` patches the embeddings were made for. With ``merging.trace_source`` the final per-group
    source is sown as ``intermediates/source``.
    """

    num_classes: int
    hidden_size: int = 768
    num_heads: int = 12
    mlp_dim: int = 3072
    num_layers: int = 12
    patch_size: tuple[int, int, int] = (2, 16, 16)  # (t, h, w)
    representation_size: int | None = 768  # the pre-logits Dense + tanh (USE_MLP)
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    original_temporal_values: bool = True  # USE_ORIGINAL_TRAJ_ATTN_CODE
    merging: MergingSettings = MergingSettings()
    attention_fn: AttentionFn = xla_attention
    dtype: Any = jnp.float32  # activations and matmuls (models.layers.DTYPES); params float32

    options: ClassVar[tuple[str, ...]] = ("motionformer_groups", "motionformer_concat_keys")

    @nn.compact
    def __call__(
        self, video: jax.Array, *, train: bool = False, merge_rng: jax.Array | None = None
    ) -> jax.Array:
        del train  # no dropout: the released checkpoints use rate 0 at test time
        merge_rng = merge_key(self, merge_rng)
        check_video_shape(video.shape, self.patch_size)
        check_head_aggregation(self.merging)
        t, ph, pw = self.patch_size
        f = video.shape[1] // t
        p = (video.shape[2] // ph) * (video.shape[3] // pw)
        self._check_input_fits(f, p)
        x = embed_tubelets(video, self.hidden_size, self.patch_size, self.dtype)
        b, dim = x.shape[0], self.hidden_size
        x = x.reshape(b, f * p, dim)  # (f n): frame-major, as the Conv3d flatten
        init = nn.initializers.normal(stddev=0.02)
        cls = self.param("cls", init, (1, 1, dim)).astype(x.dtype)
        pos = self.param("pos_embedding", init, (1, 1 + p, dim)).astype(x.dtype)
        temporal = self.param("temporal_embedding", init, (1, f, dim)).astype(x.dtype)
        # Spatial table tiled over the slots plus the temporal table repeated within each slot.
        patch_pos = (pos[:, None, 1:] + temporal[:, :, None]).reshape(1, f * p, dim)
        x = jnp.concatenate(
            [jnp.broadcast_to(cls + pos[:, :1], (b, 1, dim)), x + patch_pos], axis=1
        )

        blocks = encoder_blocks(
            lambda name: TrajectoryBlock(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                num_slots=f,
                merging=self.merging,
                layer_norm_eps=self.layer_norm_eps,
                qkv_bias=self.qkv_bias,
                original_temporal_values=self.original_temporal_values,
                attention_fn=self.attention_fn,
                dtype=self.dtype,
                name=name,
            ),
            self.num_layers,
        )
        tokens = Tokens(x, None, initial_source(b * f, p, self.merging.trace_source))
        # A duplicated layer is listed several times: the whole block reruns with tied weights.
        for step in encoder_steps(self.merging, self.num_layers, merge_rng):
            tokens = blocks[step.layer](
                tokens, step.key, r=step.r, layer=step.layer, num_layers=self.num_layers
            )
        sow_source(self, tokens)
        norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="encoder_norm")
        x = norm(tokens.x)[:, 0]
        # The original's head keeps Flax's default initialiser (it is trained from it).
        return classifier_head(
            x, self.num_classes, self.representation_size, zero_init=False, dtype=self.dtype
        )

    def _check_input_fits(self, slots: int, patches: int) -> None:
        """A one-line error when the video does not fit the position embeddings."""
        t, ph, _ = self.patch_size
        if self.has_variable("params", "temporal_embedding"):
            have = self.get_variable("params", "temporal_embedding").shape[1]
            if have != slots:
                raise UserError(
                    f"this Motionformer was made for {have * t} frames, not {slots * t}"
                )
        if self.has_variable("params", "pos_embedding"):
            have = self.get_variable("params", "pos_embedding").shape[1] - 1
            if have != patches:
                side = round(have**0.5) * ph
                raise UserError(
                    f"this Motionformer was made for {side}x{side} pixels "
                    f"({have} patches per frame, the video gives {patches})"
                )

    def token_plan(self, num_frames: int, image_size: int) -> list[LayerPlan]:
        """Tokens per merge group (``P`` patches; ``F`` groups, plus the class token overall)."""
        _, ph, pw = self.patch_size
        patches = (image_size // ph) * (image_size // pw)
        steps = self.merging.layer_steps(self.num_layers)
        count = step_counter(self.merging, self.num_layers, class_token=False)
        return plan_tokens(patches, [r for _, r in steps], class_token=False, count=count)

    def analytic_macs(self, num_frames: int, image_size: int) -> dict[str, Any]:
        """Multiply-adds per step (every step is a whole block) and in total.

        With ``N = 1 + S`` tokens, ``S = F * P`` patches and width ``D``, one block costs:
        q, k, v and out projections ``4 N D^2``; class-token attention ``2 N D``; per-slot patch
        attention ``2 S^2 D`` (logits and weighted sum over ``F * P`` keys); ``proj_q`` ``S D^2``;
        the key half of ``proj_kv`` on the ``S * F`` aggregates ``S F D^2`` (twice that when the
        value half is used; the original code computes both halves even when it discards one);
        temporal logits and weighted sum ``2 S F D``; MLP ``2 N' D M`` on the reduced tokens.
        """
        slots = num_frames // self.patch_size[0]
        dim = self.hidden_size
        kv_halves = 1 if self.original_temporal_values else 2
        layers = []
        for plan in self.token_plan(num_frames, image_size):
            s = slots * plan.tokens_in
            n = s + 1
            attention = (
                4 * n * dim**2
                + 2 * n * dim
                + 2 * s * s * dim
                + s * dim**2
                + kv_halves * s * slots * dim**2
                + 2 * s * slots * dim
            )
            layers.append(attention + 2 * (1 + slots * plan.tokens_out) * dim * self.mlp_dim)
        return macs_total(
            embedding_macs(num_frames, image_size, self.patch_size, dim),
            layers,
            head_macs(dim, self.num_classes, self.representation_size),
        )

    def merging_layers(self) -> int:
        return self.num_layers

    def source_layout(self) -> SourceLayout:
        """Per-group sources ``[B F, P0]``; the paper's groups interleave the frame-major
        patches (member ``c`` of group ``g`` is patch ``c * F + g``, docs/method.md §3.4)."""
        paper = self.merging.motionformer_groups == "paper"
        return SourceLayout(
            True, False, tuple(self.patch_size), "interleaved" if paper else "frame"
        )

    def temporal_tables(self, image_size: int) -> list[TemporalTable]:
        """The separate temporal positions, one entry per slot."""
        del image_size
        return [TemporalTable(("temporal_embedding",), 0, 1)]


def eval_probabilities(logits: jax.Array, class_splits: list[int] | None = None) -> jax.Array:
    """What the original Motionformer returns in eval mode: a softmax per classifier head.

    ``class_splits`` (EPIC-KITCHENS ``[97, 300]``) cuts the concatenated head into the original
    heads; the probabilities are concatenated back in the same layout.
    """
    if not class_splits:
        return jax.nn.softmax(logits, axis=-1)
    if sum(class_splits) != logits.shape[-1]:
        raise UserError(f"class_splits {class_splits} do not add up to {logits.shape[-1]} classes")
    bounds = [sum(class_splits[:i]) for i in range(1, len(class_splits))]
    parts = jnp.split(logits, bounds, axis=-1)
    return jnp.concatenate([jax.nn.softmax(part, axis=-1) for part in parts], axis=-1)
