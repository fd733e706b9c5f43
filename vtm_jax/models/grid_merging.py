"""Token merging that keeps a ``[time, space]`` grid: the reductions of ViViT models 3 and 4.

Factorised attention (Scenic's models 3 and 4) attends over time at each spatial slot and over
space within each frame, so the tokens must stay a grid ``[B, T, S, D]``: every frame keeps as
many tokens as every other, every slot as many frames. Three reductions keep it, each applying
the merging mode's own rule (``merge``, ``drop``, ``hybrid``, ... as registered) to a folded view
of the grid, so one match moves whole rows of it:

* ``aligned`` (``factorised_groups``, the default): one spatial match per block, shared by all
  frames. The metric is the block's keys averaged over frames, and frames are folded into the
  channels (``[B, S, T D]``): slot ``s`` stays the same region in every frame, so attention over
  time still compares like with like (as ``tube_merge`` keeps a location's tube together).
* ``per_frame``: each frame its own match (``[B T, S, D]`` rows), as the paper does for
  TimeSformer; after it, slot ``s`` of one frame and of the next cover different regions.
* temporal (``temporal_r`` > 0, with ``aligned`` only): whole frames merge, one match per block
  over the frames (keys averaged over space, space folded into the channels, ``[B, T, S D]``).

Sizes stay separable, so every merged value is an exact size-weighted mean: ``space``
``[B, 1 or T, S, 1]`` patches per token within its frame, ``frames`` ``[B, T, 1, 1]`` tubelet
slots per frame; a token's size is their product. The source is tracked in index form over the
original ``(t h w)`` patches, each id the current slot ``t S + s`` (a global layout), by giving
the rule identity ids and reading back where each row went.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vtm_jax.errors import UserError
from vtm_jax.merging import MergingSettings, Tokens, get_rule, key_metric, merge_tokens
from vtm_jax.merging import matching as mg
from vtm_jax.models.layers import size_bias
from vtm_jax.models.macs import GridStep


class Grid(NamedTuple):
    """The tokens of a factorised-attention encoder (see the module docstring)."""

    x: jax.Array  # [B, T, S, D]
    space: jax.Array | None = None  # [B, 1 or T, S, 1]
    frames: jax.Array | None = None  # [B, T, 1, 1]
    source: jax.Array | None = None  # [B, T0 S0]

    def sizes(self) -> jax.Array | None:
        """``[B, T, S, 1]`` original patches per token, or None before any reduction."""
        if self.space is None and self.frames is None:
            return None
        shape = self.x.shape[:3] + (1,)
        one = jnp.ones((), self.x.dtype)
        space = one if self.space is None else self.space
        frames = one if self.frames is None else self.frames
        return jnp.broadcast_to(space * frames, shape)


def initial_grid(x: jax.Array, trace_source: str) -> Grid:
    """The grid before the first block; the source tracked (index form) unless ``none``."""
    b, t, s, _ = x.shape
    source = None
    if trace_source != "none":
        source = jnp.broadcast_to(jnp.arange(t * s, dtype=jnp.int32), (b, t * s))
    return Grid(x, source=source)


def final_source(grid: Grid, trace_source: str) -> jax.Array | None:
    """The source as ``trace_source`` asks: index ``[B, N0]`` or dense ``[B, N, N0]``."""
    if grid.source is None or trace_source != "dense":
        return grid.source
    return mg.groups_to_source(grid.source, grid.x.shape[1] * grid.x.shape[2])


def time_bias(grid: Grid, prop_attn: bool) -> jax.Array | None:
    """Proportional attention over time: ``log(size)`` of each frame's key at a slot,
    ``[B S, 1, 1, T]`` (rows as :func:`time_rows` lays them out)."""
    sizes = grid.sizes()
    if not prop_attn or sizes is None:
        return None
    return size_bias(time_rows(sizes), True)


def space_bias(grid: Grid, prop_attn: bool) -> jax.Array | None:
    """Proportional attention over space: ``log(size)`` of each key in a frame, ``[B T, 1, 1, S]``."""
    sizes = grid.sizes()
    if not prop_attn or sizes is None:
        return None
    return size_bias(space_rows(sizes), True)


def time_rows(x: jax.Array) -> jax.Array:
    """``[B, T, S, ...]`` to ``[B S, T, ...]``: one row per slot, its frames in order."""
    b, t, s = x.shape[:3]
    return jnp.swapaxes(x, 1, 2).reshape((b * s, t) + x.shape[3:])


def from_time_rows(rows: jax.Array, batch: int) -> jax.Array:
    """The inverse of :func:`time_rows`."""
    s, t = rows.shape[0] // batch, rows.shape[1]
    return jnp.swapaxes(rows.reshape((batch, s, t) + rows.shape[2:]), 1, 2)


def space_rows(x: jax.Array) -> jax.Array:
    """``[B, T, S, ...]`` to ``[B T, S, ...]``: one row per frame."""
    b, t, s = x.shape[:3]
    return x.reshape((b * t, s) + x.shape[3:])


def check_grid_settings(merging: MergingSettings) -> None:
    """A UserError for settings a grid cannot run: a mode that needs token positions or acts
    elsewhere than between attention and MLP, or frames merged under per-frame matches."""
    rule = get_rule(merging.mode)
    if rule is None:
        return
    if rule.needs_positions:
        raise UserError(
            f"mode {merging.mode!r} needs token positions, which ViViT models 3 and 4 do not "
            "track (their grid merging keeps slots aligned across frames already: mode merge)"
        )
    # Rule fields of newer method kinds, read with their defaults so older rules pass.
    place = getattr(rule, "place", "attention")
    reads = set(getattr(rule, "reads", ("keys",)))
    if place != "attention" or reads - {"keys"} or getattr(rule, "removed", None) is not None:
        raise UserError(
            f"mode {merging.mode!r} cannot run on ViViT models 3 and 4: their blocks reduce "
            "between attention and MLP, r tokens a step, on the blocks' keys"
        )
    if merging.temporal_r and merging.factorised_groups != "aligned":
        raise UserError(
            "temporal_r merges whole frames, which needs factorised_groups 'aligned' (per-frame "
            f"matches leave no common slots to merge frames by), not {merging.factorised_groups!r}"
        )


def plan_grid(merging: MergingSettings, num_layers: int, frames: int, space: int) -> list[GridStep]:
    """Frames and tokens per frame entering and leaving each step (static), clamped as ever:
    a step removes at most half of the tokens per frame (``r``) and of the frames
    (``temporal_r``, on each layer's last run only)."""
    steps = merging.layer_steps(num_layers)
    merges = merging.mode != "none"
    plan = []
    for i, (layer, r) in enumerate(steps):
        repeats = i + 1 < len(steps) and steps[i + 1][0] == layer
        space_r = mg.clamp_r(space, r, class_token=False) if merges and r > 0 else 0
        temporal = 0 if repeats or not merges else merging.temporal_r
        frames_r = mg.clamp_r(frames, temporal, class_token=False) if temporal > 0 else 0
        plan.append(GridStep(frames, space, frames - frames_r, space - space_r, repeats))
        frames, space = frames - frames_r, space - space_r
    return plan


def grid_metric(keys: jax.Array, head_aggregation: str) -> jax.Array:
    """``[B, T, S, c]`` from the block's keys ``[B, T, S, H, d]``."""
    b, t, s = keys.shape[:3]
    flat = key_metric(keys.reshape((b, t * s) + keys.shape[3:]), head_aggregation)
    return flat.reshape(b, t, s, -1)


def reduce_grid(
    grid: Grid,
    metric: jax.Array,
    step: GridStep,
    *,
    merging: MergingSettings,
    key: jax.Array | None,
) -> Grid:
    """One step's reductions: tokens per frame, then frames, as ``step`` counts them."""
    space_r = step.space_in - step.space_out
    frames_r = step.frames_in - step.frames_out
    if space_r > 0:
        spatial = _aligned if merging.factorised_groups == "aligned" else _per_frame
        grid = spatial(grid, metric, space_r, merging, key)
    if frames_r > 0:
        frame_key = None if key is None else jax.random.fold_in(key, 1)
        grid = _merge_frames(grid, metric.mean(axis=2), frames_r, merging, frame_key)
    return grid


def _apply(rows: Tokens, metric: jax.Array, r: int, merging: MergingSettings, key) -> Tokens:
    """The mode's rule on ``rows``; ``rows.source`` (when tracked) is each row's own index, so
    the returned source says where each row went (-1: dropped)."""
    return merge_tokens(rows, metric, r, settings=merging, class_token=False, key=key)


def _ids(rows: int, n: int, tracked: bool) -> jax.Array | None:
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (rows, n)) if tracked else None


def _resized(size: jax.Array | None, shape: tuple[int, ...]) -> jax.Array | None:
    """A rule's sizes back on the grid (None if the rule keeps none)."""
    return None if size is None else size.reshape(shape)


def _track(source: jax.Array | None, slots: jax.Array, moved: jax.Array) -> jax.Array | None:
    """Each original patch's new slot, from ``slots`` (``[B, T S]``, the new slot of each old
    one) where ``moved`` says the old one survived."""
    if source is None:
        return None
    return mg.track_groups(source, jnp.where(moved, slots, -1).astype(jnp.int32))


def _aligned(grid: Grid, metric: jax.Array, r: int, merging: MergingSettings, key) -> Grid:
    """One spatial match for all frames: frames folded into the channels."""
    b, t, s, d = grid.x.shape
    folded = jnp.swapaxes(grid.x, 1, 2).reshape(b, s, t * d)
    size = None if grid.space is None else grid.space[:, 0]
    rows = Tokens(folded, size, _ids(b, s, grid.source is not None))
    out = _apply(rows, metric.mean(axis=1), r, merging, key)
    x = jnp.swapaxes(out.x.reshape(b, s - r, t, d), 1, 2)
    source = None
    if grid.source is not None:
        dest = jnp.broadcast_to(out.source[:, None, :], (b, t, s))
        slots = jnp.arange(t)[None, :, None] * (s - r) + dest
        source = _track(grid.source, slots.reshape(b, t * s), dest.reshape(b, t * s) >= 0)
    return Grid(x, _resized(out.size, (b, 1, s - r, 1)), grid.frames, source)


def _per_frame(grid: Grid, metric: jax.Array, r: int, merging: MergingSettings, key) -> Grid:
    """Each frame its own spatial match: frames are rows of the matching."""
    b, t, s, d = grid.x.shape
    size = None
    if grid.space is not None:
        size = space_rows(jnp.broadcast_to(grid.space, (b, t, s, 1)))
    rows = Tokens(space_rows(grid.x), size, _ids(b * t, s, grid.source is not None))
    out = _apply(rows, space_rows(metric), r, merging, key)
    x = out.x.reshape(b, t, s - r, d)
    source = None
    if grid.source is not None:
        dest = out.source.reshape(b, t, s)
        slots = jnp.arange(t)[None, :, None] * (s - r) + dest
        source = _track(grid.source, slots.reshape(b, t * s), dest.reshape(b, t * s) >= 0)
    return Grid(x, _resized(out.size, (b, t, s - r, 1)), grid.frames, source)


def _merge_frames(grid: Grid, metric: jax.Array, r: int, merging: MergingSettings, key) -> Grid:
    """One match over the frames: space folded into the channels (slots stay aligned)."""
    b, t, s, d = grid.x.shape
    size = None if grid.frames is None else grid.frames[:, :, 0]
    rows = Tokens(grid.x.reshape(b, t, s * d), size, _ids(b, t, grid.source is not None))
    out = _apply(rows, metric, r, merging, key)
    x = out.x.reshape(b, t - r, s, d)
    source = None
    if grid.source is not None:
        dest = jnp.broadcast_to(out.source[:, :, None], (b, t, s))
        slots = dest * s + jnp.arange(s)[None, None, :]
        source = _track(grid.source, slots.reshape(b, t * s), dest.reshape(b, t * s) >= 0)
    return Grid(x, grid.space, _resized(out.size, (b, t - r, 1, 1)), source)
