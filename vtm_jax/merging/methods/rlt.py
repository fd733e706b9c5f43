"""Run-Length Tokenization (RLT; Choudhury et al., NeurIPS 2024): drop the patches that repeat.

Before the first block, each tubelet patch is compared with the same patch one tubelet
earlier; a patch whose mean absolute pixel change is at most ``threshold`` is dropped. The
steps follow the authors' code (rccchoudhury/rlt at 69ec8b4, ``batched_find_idxs_to_keep``
and ``Tokenizer.collate_tokens``), one function each, so parity is checkable piece by piece:

1. :func:`tubelet_scores`: for tubelet ``k + 1`` of size ``t``, ``|frame(k t + 2 t - 1) -
   frame(k t)|`` (the last frame of tubelet ``k + 1`` against the first of tubelet ``k``),
   averaged over each patch and then over channels; the first tubelet scores 255.
2. :func:`keep_mask`: score above ``threshold`` (the first tubelet always kept).
3. :func:`front_order` and :func:`gather_kept`: the kept tokens moved to the front in their
   original order (what the authors' boolean gather gives), the rest left behind as padding of
   size 0, which every block masks out of attention and pooling ignores.

The authors pack the kept tokens of all clips into one sequence with a block-diagonal mask;
here every clip keeps a static ``[N]`` shape (padding instead of packing), or ``length`` slots
when that option is set, chosen per batch on the host (:func:`batch_settings`) so that short
clips cost less. The common budget ``r`` does not apply: the kept count follows the video.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from vtm_jax.errors import UserError
from vtm_jax.merging.tokens import MergeContext, Rule, RuleOption, Tokens

DEFAULT_THRESHOLD = 0.1  # the authors' drop_param
FIRST_TUBELET_SCORE = 255.0  # the authors' dummy score of the first tubelet


def tubelet_scores(video: jax.Array, patch_size: tuple[int, int, int]) -> jax.Array:
    """``[B, t, h, w]`` float32: how much each tubelet patch changed since the tubelet before.

    ``video`` is ``[B, T, H, W, C]`` as the model receives it (normalised), ``patch_size`` the
    tubelet ``(pt, ph, pw)``. Score ``k + 1`` compares frame ``k pt + 2 pt - 1`` with frame
    ``k pt`` (the authors' slices), the mean over the patch's pixels and then its channels.
    """
    pt, ph, pw = patch_size
    b, frames, height, width, channels = video.shape
    x = video.astype(jnp.float32)
    diffs = jnp.abs(x[:, 2 * pt - 1 :: pt] - x[:, : frames - pt : pt])
    h, w = height // ph, width // pw
    diffs = diffs[:, :, : h * ph, : w * pw]
    pooled = diffs.reshape(b, -1, h, ph, w, pw, channels).mean(axis=(3, 5)).mean(axis=-1)
    first = jnp.full((b, 1, h, w), FIRST_TUBELET_SCORE, jnp.float32)
    return jnp.concatenate([first, pooled], axis=1)


def keep_mask(video: jax.Array, threshold: float, patch_size: tuple[int, int, int]) -> jax.Array:
    """``[B, t h w]`` bool in ``(t h w)`` order: the patches RLT keeps.

    A patch is kept when its score is above ``threshold``; the first tubelet always (the
    authors' dummy score keeps it too, for any threshold below 255).
    """
    scores = tubelet_scores(video, patch_size)
    keep = (scores > threshold).at[:, 0].set(True)
    return keep.reshape(keep.shape[0], -1)


def front_order(keep: jax.Array) -> jax.Array:
    """``[B, N]`` int32: the kept tokens' indices first, each group in its original order.

    A stable sort of ``not keep``: the order of the authors' boolean gather.
    """
    return jnp.argsort(~keep, axis=1, stable=True).astype(jnp.int32)


def kept_counts(keep: jax.Array) -> jax.Array:
    """``[B]`` int32: tokens kept per clip (the authors' ``num_tokens``)."""
    return keep.sum(axis=1).astype(jnp.int32)


def _take(values: jax.Array | None, order: jax.Array) -> jax.Array | None:
    if values is None:
        return None
    idx = order.reshape(order.shape + (1,) * (values.ndim - 2))
    return jnp.take_along_axis(values, idx, axis=1)


def _source_after(
    source: jax.Array | None, order: jax.Array, kept: jax.Array, n: int
) -> jax.Array | None:
    """Source tracking after the move of ``n`` tokens to the slots ``order`` gives them.

    Dense ``[B, n, N0]``: each slot's row, padding rows emptied. Index form ``[B, N0]`` (the
    current token of each original): the original's new slot, -1 once dropped or cut off.
    """
    if source is None:
        return None
    if source.ndim == 3:
        return _take(source, order) * kept[..., None].astype(source.dtype)
    rows = jnp.arange(order.shape[0])[:, None]
    slots = jnp.where(kept, jnp.arange(order.shape[1], dtype=jnp.int32), -1)
    slot_of = jnp.full((order.shape[0], n), -1, jnp.int32).at[rows, order].set(slots)
    moved = jnp.take_along_axis(slot_of, jnp.maximum(source, 0), axis=-1)
    return jnp.where(source >= 0, moved, -1)


def gather_kept(tokens: Tokens, keep: jax.Array, length: int) -> Tokens:
    """The first ``length`` tokens in :func:`front_order`; dropped ones padded with size 0.

    ``keep`` is ``[B, N]`` over every token (a class token's entry True). Sizes become 1 for a
    kept token (its size before, if any) and 0 for padding, in float32 so that pooled means
    stay exact; positions and source tracking follow the tokens.
    """
    n = keep.shape[1]
    order = front_order(keep)[:, :length]
    kept = jnp.take_along_axis(keep, order, axis=1)
    size = jnp.ones(keep.shape + (1,), jnp.float32)
    if tokens.size is not None:
        size = tokens.size.astype(jnp.float32)
    size = _take(size, order) * kept[..., None].astype(jnp.float32)
    return Tokens(
        _take(tokens.x, order),
        size,
        _source_after(tokens.source, order, kept, n),
        _take(tokens.pos, order),
    )


def patch_size_of(video_shape: tuple[int, ...], grid: tuple[int, int, int]) -> tuple[int, ...]:
    """The tubelet ``(pt, ph, pw)`` that cuts ``video_shape`` ``[B, T, H, W, C]`` into ``grid``."""
    sizes = video_shape[1:4]
    if any(g <= 0 or s % g for s, g in zip(sizes, grid, strict=True)):
        raise UserError(f"mode 'rlt': a video of {sizes} frames/pixels has no patch grid {grid}")
    return tuple(s // g for s, g in zip(sizes, grid, strict=True))


def slot_count(ctx: MergeContext, patches: int, grid: tuple[int, int, int] | None) -> int:
    """Patch slots each clip keeps: ``length`` when set (checked against the grid), else all."""
    length = ctx.settings.rule_options.get("length")
    if length is None:
        return patches
    smallest = grid[1] * grid[2] if grid is not None else 1
    if not smallest <= length <= patches:
        raise UserError(
            f"rlt length must be between {smallest} (the first tubelet's patches, always kept) "
            f"and {patches} (every patch), not {length}"
        )
    return int(length)


def run_length_tokens(tokens: Tokens, metric: jax.Array, r: int, ctx: MergeContext) -> Tokens:
    """The ``rlt`` rule: ``metric`` is the video; ``r`` (the input's static count) is unused.

    Returns ``cls + slots`` tokens: the kept patches first, then padding of size 0.
    """
    del r  # removed_tokens gives the same count from the same options
    if ctx.grid is None:
        raise UserError("mode 'rlt' needs the patch grid of the clip")
    threshold = ctx.settings.rule_options.get("rlt_threshold", DEFAULT_THRESHOLD)
    patch = patch_size_of(metric.shape, ctx.grid)
    keep = keep_mask(metric, threshold, patch)
    if ctx.class_token:
        keep = jnp.concatenate([jnp.ones_like(keep[:, :1]), keep], axis=1)
    if keep.shape[1] != tokens.x.shape[1]:
        raise UserError(
            f"mode 'rlt': {tokens.x.shape[1]} tokens, but the grid {ctx.grid} has {keep.shape[1]}"
        )
    slots = slot_count(ctx, math.prod(ctx.grid), ctx.grid)
    return gather_kept(tokens, keep, int(ctx.class_token) + slots)


def removed_tokens(n: int, r: int, ctx: MergeContext) -> int:
    """Static tokens removed at the input: those beyond ``length`` (0 without it); ``r`` unused."""
    del r
    patches = n - int(ctx.class_token)
    return patches - slot_count(ctx, patches, ctx.grid)


# ---------------------------------------------------------------------------------------------
# Host side: a bucket length per batch


@functools.partial(jax.jit, static_argnames=("threshold", "patch_size"))
def largest_kept_count(
    video: jax.Array, *, threshold: float, patch_size: tuple[int, int, int]
) -> jax.Array:
    """The most patches any clip of ``video`` keeps (a replicated scalar, readable per host)."""
    return kept_counts(keep_mask(video, threshold, patch_size)).max()


def bucket_length(count: int, bucket: int, patches: int) -> int:
    """The smallest multiple of ``bucket`` that holds ``count`` patches, at most ``patches``."""
    if bucket < 1:
        raise UserError(f"rlt bucket must be a positive number of tokens, not {bucket}")
    return min(patches, -(-max(int(count), 1) // bucket) * bucket)


def asks_for_buckets(settings: Any) -> bool:
    """Whether ``settings`` are rlt's with a ``bucket`` and no fixed ``length``."""
    options = settings.rule_options
    return settings.mode == "rlt" and "bucket" in options and "length" not in options


def batch_settings(settings: Any, video: Any, patch_size: tuple[int, int, int] | None) -> Any:
    """``settings`` with the ``length`` this batch needs, when mode ``rlt`` asks for buckets.

    Any other settings (another mode, no ``bucket``, or a ``length`` already fixed) come back
    unchanged. ``video`` is the batch as the model receives it; ``patch_size`` the backbone's
    tubelet. Each distinct length is its own compiled program, so few buckets mean few compiles.
    """
    options = settings.rule_options
    if not asks_for_buckets(settings):
        return settings
    if patch_size is None:
        raise UserError("mode 'rlt' needs a backbone with a tubelet patch size (vivit, videomae)")
    patch_size = tuple(int(p) for p in patch_size)
    threshold = float(options.get("rlt_threshold", DEFAULT_THRESHOLD))
    count = int(largest_kept_count(video, threshold=threshold, patch_size=patch_size))
    sizes = tuple(video.shape[1:4])
    patches = math.prod(s // p for s, p in zip(sizes, patch_size, strict=True))
    length = bucket_length(count, int(options["bucket"]), patches)
    return dataclasses.replace(settings, rule_options={**options, "length": length})


RULE = Rule(
    run_length_tokens,
    options=(
        RuleOption(
            "rlt_threshold",
            hint="the authors use 0.1 on ImageNet-normalised pixels",
            minimum=0.0,
        ),
        RuleOption(
            "length",
            kind=int,
            hint="patch slots per clip; beyond the kept count they are padding",
            minimum=1,
        ),
        RuleOption(
            "bucket",
            kind=int,
            hint="evaluation and bench pick length per batch as a multiple of this",
            minimum=1,
        ),
    ),
    reads=("pixels",),
    place="input",
    layouts=("joint",),
    removed=removed_tokens,
)
