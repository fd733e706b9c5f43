"""What a merging rule reads and returns: the tokens, its context, and the rule record.

These types sit below :mod:`vtm_jax.merging` (the settings and the rule registry) so that a
rule module, such as the shipped :mod:`vtm_jax.merging.tube`, can be imported by the
registry itself without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax

if TYPE_CHECKING:
    from vtm_jax.merging.settings import MergingSettings


class Tokens(NamedTuple):
    """What a merging step changes: hidden states, sizes and (optionally) source tracking.

    ``size`` is ``None`` until the first reduction (every token then counts 1). ``source`` is
    ``None`` (not tracked), ``[B, N0]`` group ids (index form) or ``[B, N, N0]`` (dense form).
    ``pos`` is ``None`` unless the mode's rule declares ``needs_positions``: then ``[B, N, 3]``
    float32, each token's size-weighted centroid ``(t, y, x)`` on the patch grid (see
    :func:`vtm_jax.merging.initial_positions`; a class token sits at ``(-1, -1, -1)``).
    """

    x: jax.Array
    size: jax.Array | None = None
    source: jax.Array | None = None
    pos: jax.Array | None = None


class MergeContext(NamedTuple):
    """What a rule may read besides the tokens, the metric and r.

    ``grid`` is the ``(t, h, w)`` patch grid of the clip (None where a backbone does not know
    it). ``layer`` is the block's index and ``num_layers`` the blocks of the encoder (static).
    For rules that read ``"attention"``: ``attention`` holds the softmax probabilities
    ``[B, H, N, N]`` (float32) as the block applies them, log-size bias included, and
    ``attention_logits`` the scaled ``q.k`` logits before any bias; both None otherwise.
    """

    settings: MergingSettings
    class_token: bool
    key: jax.Array | None = None
    grid: tuple[int, int, int] | None = None
    layer: int = 0
    num_layers: int = 0
    attention: jax.Array | None = None
    attention_logits: jax.Array | None = None


RuleFn = Callable[[Tokens, jax.Array, int, MergeContext], Tokens]


class RuleOption(NamedTuple):
    """A parameter of one rule, set in ``MergingSettings.rule_options`` (a number, float or int).

    ``required``: the rule cannot run without it, and ``hint`` says what to give (shown when it
    is missing). An option that is not required and not given is absent from
    ``ctx.settings.rule_options``; the rule then uses its own default. ``minimum`` and
    ``maximum`` (inclusive, None: unbounded) are the range of a number the rule can use;
    settings outside it are refused. ``choices``: the values a string (or other) option may
    take.
    """

    name: str
    kind: type = float
    required: bool = False
    hint: str = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None


READS = ("keys", "hidden", "attention", "pixels")
PLACES = ("attention", "block_start", "block_end", "input")
LAYOUTS = ("joint", "frame")


class Support(NamedTuple):
    """What a backbone's blocks offer a rule: its token layout, the places where they reduce
    and what they can supply (see :class:`Rule`)."""

    layout: str
    places: tuple[str, ...] = ("attention",)
    reads: tuple[str, ...] = ("keys",)


RemovedFn = Callable[[int, int, MergeContext], int]


class Rule(NamedTuple):
    """A merging mode: one pure function doing both the matching and its application.

    ``needs_positions``: the rule reads ``tokens.pos``; the encoder then tracks positions
    (only backbones that know their patch grid can), and ``pos`` must be returned reduced too.
    ``random``: the rule draws from ``ctx.key``, so evaluation records how draws are keyed.
    ``options``: the parameters the rule reads from ``ctx.settings.rule_options``; settings
    giving any other option for this mode are refused. ``check``: further validation of the
    options (relations between them), raising a UserError, run when settings are made.

    What a method needs from the backbone, which builds exactly that (docs/methods.md):

    * ``reads``: ``keys`` (the metric is the block's keys, per ``head_aggregation``), ``hidden``
      (the metric is the hidden states where the rule acts), ``attention`` (the block also fills
      ``ctx.attention`` and ``ctx.attention_logits``), ``pixels`` (the metric is the video).
    * ``place``: ``attention`` (after the attention residual, before the MLP: the paper's modes),
      ``block_start`` (before attention; the rule may return ``(tokens, probabilities)``, the
      merged ``[B, H, N - r, N - r]`` attention the block then applies to the merged values),
      ``block_end`` (after the MLP residual) or ``input`` (on the patch tokens before the first
      block; the metric is then the video ``[B, T, H, W, C]``).
    * ``layouts``: ``joint`` (one sequence of every patch of the clip: ViViT, VideoMAE) and/or
      ``frame`` (a sequence per frame: TimeSformer, Motionformer, the factorised encoder).
    * ``removed``: ``(n, r, ctx) -> tokens removed`` at a layer (static ints), when the method
      counts otherwise than :func:`~vtm_jax.merging.matching.clamp_r`; blocks and the analytic
      token plan both use it, so they agree.
    * ``mac_place``: ``settings -> place`` for the MAC count, where an option changes what the
      block computes (``block_start_recompute``: the block recomputes attention on the merged
      tokens instead of applying the merged probabilities).
    """

    apply: RuleFn
    needs_positions: bool = False
    random: bool = False
    options: tuple[RuleOption, ...] = ()
    reads: tuple[str, ...] = ("keys",)
    place: str = "attention"
    layouts: tuple[str, ...] = LAYOUTS
    removed: RemovedFn | None = None
    check: Callable[[Any], None] | None = None
    mac_place: Callable[[Any], str] | None = None
