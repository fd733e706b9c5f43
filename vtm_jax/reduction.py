"""Reduction settings and the reduction rules (modes) that blocks apply between attention and MLP.

A rule takes the current tokens, their sizes and source tracking, the block's metric and a
static r, and returns the reduced triple. Rules are looked up by name in :data:`RULES`, so a new
mode is one function and one dict entry.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vtm_jax import merge as mg
from vtm_jax.errors import UserError
from vtm_jax.schedule import parse_r

HEAD_AGGREGATIONS = ("mean", "concat")
TRACE_SOURCE = ("none", "index", "dense")
MOTIONFORMER_GROUPS = ("paper", "per_frame")


class Tokens(NamedTuple):
    """What a reduction step changes: hidden states, sizes and (optionally) source tracking.

    ``size`` is ``None`` until the first reduction (every token then counts 1). ``source`` is
    ``None`` (not tracked), ``[B, N0]`` group ids (index form) or ``[B, N, N0]`` (dense form).
    """

    x: jax.Array
    size: jax.Array | None = None
    source: jax.Array | None = None


class PerLayerR(tuple):
    """A per-layer r list, stored as a tuple so settings stay hashable."""


@dataclasses.dataclass(frozen=True)
class ReductionSettings:
    """How a model reduces its tokens; frozen and hashable, so it is a static module attribute.

    Attributes:
      mode: one of :data:`RULES` (``none``, ``merge``, ``random_merge``, ``drop``,
        ``random_drop``, ``hybrid``).
      r: tokens removed per layer: an int, the paper's ``(r, inflection)`` tuple (stored as
        ``r`` plus ``schedule``), or a per-layer list.
      schedule: the inflection of the paper's schedule when ``r`` is an int: 0 constant,
        -1 decreasing from 2r to 0, +1 increasing from 0 to 2r. With a single layer the
        schedule has no span and is ignored (the paper's parse_r divides by zero there).
      prop_attn: add ``log(size)`` of the keys to the attention logits.
      head_aggregation: metric from the keys averaged over heads (``mean``) or concatenated.
      threshold: similarity below which hybrid mode discards a destination; hybrid needs it
        (the paper uses 0.4 for ViViT and 0.8 for VideoMAE).
      seed: seed of the random modes; layer ``l`` uses ``fold_in(PRNGKey(seed), l)``.
      trace_source: ``none``, ``index`` (group id per original token, O(N0)) or ``dense`` (the
        paper's ``[N, N0]`` matrix).
      duplicate: ``(layer, quantity)``: run layer ``layer`` ``quantity`` times, all reduction
        concentrated there (method.md §3.6; what a repeat computes is the model's choice).
      size_weighted_pool: mean-pool tokens weighted by their sizes (the fix to the paper's
        unweighted VideoMAE pooling; upstream ToMe's MAE patch weights them).
      motionformer_groups: ``paper`` reproduces the paper's ``(s f)`` merge groups, which mix
        frames; ``per_frame`` merges within each frame, as intended (method.md §3.4).
      temporal_r: factorised-encoder ViViT only: r per layer of the temporal encoder (0, the
        default, leaves it unmerged; the spatial encoder merges per frame with ``r``).
    """

    mode: str = "none"
    r: int | tuple[int, float] | list[int] = 0
    schedule: float = 0.0
    prop_attn: bool = True
    head_aggregation: str = "mean"
    threshold: float | None = None
    seed: int = 0
    trace_source: str = "none"
    duplicate: tuple[int, int] | None = None
    size_weighted_pool: bool = False
    motionformer_groups: str = "paper"
    temporal_r: int = 0

    def __post_init__(self):
        if self.mode not in RULES:
            raise UserError(f"unknown mode {self.mode!r}; valid: {', '.join(RULES)}")
        r = self.r
        if isinstance(r, tuple) and not isinstance(r, PerLayerR):
            # The paper's (r, inflection) form, as its parse_r reads a tuple.
            if len(r) != 2:
                raise UserError(
                    f"a tuple r must be (r, inflection), not {r!r}; use a list per layer"
                )
            if self.schedule not in (0, 0.0):
                raise UserError("give the inflection either in r=(r, inflection) or in schedule")
            r, schedule = r
            object.__setattr__(self, "schedule", float(schedule))
        elif isinstance(r, list):
            r = PerLayerR(r)
        object.__setattr__(self, "r", r)
        r_values = r if isinstance(r, tuple) else (r,)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in r_values):
            raise UserError(f"r must be a non-negative int or a list of them, not {self.r!r}")
        if not -1.0 <= float(self.schedule) <= 1.0:
            raise UserError(f"schedule (inflection) must be in [-1, 1], not {self.schedule}")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise UserError(f"threshold must be a finite number, not {self.threshold}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise UserError(f"seed must be an int in [0, 2**32), not {self.seed!r}")
        if self.duplicate is not None:
            dup = tuple(self.duplicate)
            if (
                len(dup) != 2
                or not all(isinstance(v, int) for v in dup)
                or dup[0] < 0
                or dup[1] < 1
            ):
                raise UserError(
                    f"duplicate must be (layer >= 0, quantity >= 1), not {self.duplicate!r}"
                )
            if isinstance(self.r, PerLayerR):
                raise UserError("duplicate needs a single int r (it is the r of every repeat)")
            object.__setattr__(self, "duplicate", dup)
        if not isinstance(self.temporal_r, int) or self.temporal_r < 0:
            raise UserError(f"temporal_r must be a non-negative int, not {self.temporal_r!r}")
        if self.motionformer_groups not in MOTIONFORMER_GROUPS:
            raise UserError(
                f"unknown motionformer_groups {self.motionformer_groups!r}; "
                f"valid: {', '.join(MOTIONFORMER_GROUPS)}"
            )
        if self.head_aggregation not in HEAD_AGGREGATIONS:
            raise UserError(
                f"unknown head_aggregation {self.head_aggregation!r}; "
                f"valid: {', '.join(HEAD_AGGREGATIONS)}"
            )
        if self.trace_source not in TRACE_SOURCE:
            raise UserError(
                f"unknown trace_source {self.trace_source!r}; valid: {', '.join(TRACE_SOURCE)}"
            )
        if self.mode == "hybrid" and self.threshold is None:
            raise UserError(
                "mode 'hybrid' needs a threshold (the paper uses 0.4 for ViViT, 0.8 for VideoMAE)"
            )

    def layer_r(self, num_layers: int) -> list[int]:
        """The requested r of each layer (before the per-layer clamp)."""
        if self.mode == "none":
            return [0] * num_layers
        if isinstance(self.r, PerLayerR):
            return parse_r(num_layers, list(self.r))[:num_layers]
        return parse_r(num_layers, (self.r, float(self.schedule)) if num_layers > 1 else self.r)

    def layer_steps(self, num_layers: int) -> list[tuple[int, int]]:
        """``(layer, r)`` in execution order; a layer listed several times is duplicated.

        Without duplication this is ``enumerate(layer_r)``. With ``duplicate=(L, Q)`` layer L
        runs Q times with r each and every other layer with r=0: the paper's r list
        ``[0]*L + [r]*Q + [0]*(layers-1-L)``. Duplication only applies when a mode is set.
        """
        if self.duplicate is None or self.mode == "none":
            return list(enumerate(self.layer_r(num_layers)))
        layer, quantity = self.duplicate
        if layer >= num_layers:
            raise UserError(f"duplicate layer {layer} does not exist ({num_layers} layers)")
        return (
            [(i, 0) for i in range(layer)]
            + [(layer, self.r)] * quantity
            + [(i, 0) for i in range(layer + 1, num_layers)]
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> ReductionSettings:
        """Build from a config block (a dict or ConfigDict); unknown keys are an error."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(
                f"unknown token_merging option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        if isinstance(self.r, PerLayerR):
            values["r"] = list(self.r)
        if self.duplicate is not None:
            values["duplicate"] = list(self.duplicate)
        return values


def layer_key(settings: ReductionSettings, layer: int, rng: jax.Array | None = None) -> jax.Array:
    """The PRNG key of one layer's random scores: explicit, so runs are reproducible."""
    base = jax.random.PRNGKey(settings.seed) if rng is None else rng
    return jax.random.fold_in(base, layer)


def key_metric(keys: jax.Array, head_aggregation: str) -> jax.Array:
    """The matching metric from attention keys ``[B, N, H, d]``."""
    if head_aggregation == "mean":
        return keys.mean(axis=2)
    return keys.reshape(keys.shape[:2] + (-1,))


def _track(source: jax.Array | None, match: mg.Match, n: int, **dest_kwargs) -> jax.Array | None:
    if source is None:
        return None
    if source.ndim == 2:  # index form
        return mg.track_groups(source, mg.destinations(match, n, **dest_kwargs))
    if dest_kwargs.get("dropped"):
        return mg.drop(source, match)
    return mg.merge(source, match, reduce="max", dst_keep=dest_kwargs.get("dst_keep"))


RuleFn = Callable[..., Tokens]


def _merge_rule(tokens: Tokens, scores: jax.Array, r: int, *, class_token: bool, threshold=None):
    n = tokens.x.shape[1]
    match = mg.bipartite_soft_matching(scores, r, class_token=class_token)
    keep = None if threshold is None else mg.hybrid_dst_keep(match, n // 2, threshold)
    x, size = mg.merge_wavg(tokens.x, tokens.size, match, dst_keep=keep)
    return Tokens(x, size, _track(tokens.source, match, n, dst_keep=keep))


def _drop_rule(tokens: Tokens, scores: jax.Array, r: int, *, class_token: bool, threshold=None):
    del threshold
    n = tokens.x.shape[1]
    match = mg.bipartite_soft_matching(scores, r, class_token=class_token)
    x = mg.drop(tokens.x, match)
    # The paper resets sizes to one after a drop, which turns proportional attention off.
    size = jnp.ones(x.shape[:2] + (1,), x.dtype)
    return Tokens(x, size, _track(tokens.source, match, n, dropped=True))


class Rule(NamedTuple):
    """A reduction mode: how it scores A-B pairs and how it applies the match."""

    random_scores: bool
    apply: RuleFn


RULES: dict[str, Rule | None] = {
    "none": None,
    "merge": Rule(False, _merge_rule),
    "random_merge": Rule(True, _merge_rule),
    "drop": Rule(False, _drop_rule),
    "random_drop": Rule(True, _drop_rule),
    "hybrid": Rule(False, _merge_rule),
}


def reduce_tokens(
    tokens: Tokens,
    metric: jax.Array,
    r: int,
    *,
    settings: ReductionSettings,
    class_token: bool,
    key: jax.Array | None = None,
) -> Tokens:
    """One reduction step with static ``r`` (already clamped, > 0) under ``settings.mode``."""
    rule = RULES[settings.mode]
    if rule.random_scores:
        scores = mg.random_scores(key, metric)
    else:
        scores = mg.cosine_scores(metric)
    threshold = settings.threshold if settings.mode == "hybrid" else None
    return rule.apply(tokens, scores, r, class_token=class_token, threshold=threshold)


def initial_source(batch: int, n: int, trace_source: str) -> jax.Array | None:
    """Source tracking before the first layer: identity (dense) or arange (index form)."""
    if trace_source == "index":
        return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
    if trace_source == "dense":
        return jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32), (batch, n, n))
    return None
