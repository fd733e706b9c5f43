"""What a merging rule reads and returns: the tokens, its context, and the rule record.

These types sit below :mod:`vtm_jax.merging` (the settings and the rule registry) so that a
rule module, such as the shipped :mod:`vtm_jax.merging.tube`, can be imported by the
registry itself without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

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
    """What a rule may read besides the tokens, the metric and r (static apart from ``key``).

    ``grid`` is the ``(t, h, w)`` patch grid of a backbone that tracks positions, else None.
    """

    settings: MergingSettings
    class_token: bool
    key: jax.Array | None = None
    grid: tuple[int, int, int] | None = None


RuleFn = Callable[[Tokens, jax.Array, int, MergeContext], Tokens]


class RuleOption(NamedTuple):
    """A parameter of one rule, set in ``MergingSettings.rule_options`` (a number, float or int).

    ``required``: the rule cannot run without it, and ``hint`` says what to give (shown when it
    is missing). An option that is not required and not given is absent from
    ``ctx.settings.rule_options``; the rule then uses its own default. ``minimum`` and
    ``maximum`` (inclusive, None: unbounded) are the range of a number the rule can use;
    settings outside it are refused.
    """

    name: str
    kind: type = float
    required: bool = False
    hint: str = ""
    minimum: float | None = None
    maximum: float | None = None


class Rule(NamedTuple):
    """A merging mode: one pure function doing both the matching and its application.

    ``needs_positions``: the rule reads ``tokens.pos``; the encoder then tracks positions
    (only backbones that know their patch grid can), and ``pos`` must be returned reduced too.
    ``random``: the rule draws from ``ctx.key``, so evaluation records how draws are keyed.
    ``options``: the parameters the rule reads from ``ctx.settings.rule_options``; settings
    giving any other option for this mode are refused.
    """

    apply: RuleFn
    needs_positions: bool = False
    random: bool = False
    options: tuple[RuleOption, ...] = ()
