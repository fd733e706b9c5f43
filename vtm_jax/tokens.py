"""What a reduction rule reads and returns: the tokens, its context, and the rule record.

These types sit below :mod:`vtm_jax.reduction` (the settings and the rule registry) so that a
rule module, such as the shipped :mod:`vtm_jax.extensions.tube`, can be imported by the
registry itself without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import jax

if TYPE_CHECKING:
    from vtm_jax.reduction import ReductionSettings


class Tokens(NamedTuple):
    """What a reduction step changes: hidden states, sizes and (optionally) source tracking.

    ``size`` is ``None`` until the first reduction (every token then counts 1). ``source`` is
    ``None`` (not tracked), ``[B, N0]`` group ids (index form) or ``[B, N, N0]`` (dense form).
    ``pos`` is ``None`` unless the mode's rule declares ``needs_positions``: then ``[B, N, 3]``
    float32, each token's size-weighted centroid ``(t, y, x)`` on the patch grid (see
    :func:`vtm_jax.reduction.initial_positions`; a class token sits at ``(-1, -1, -1)``).
    """

    x: jax.Array
    size: jax.Array | None = None
    source: jax.Array | None = None
    pos: jax.Array | None = None


class ReduceContext(NamedTuple):
    """What a rule may read besides the tokens, the metric and r (static apart from ``key``).

    ``grid`` is the ``(t, h, w)`` patch grid of a backbone that tracks positions, else None.
    """

    settings: ReductionSettings
    class_token: bool
    key: jax.Array | None = None
    grid: tuple[int, int, int] | None = None


RuleFn = Callable[[Tokens, jax.Array, int, ReduceContext], Tokens]


class Rule(NamedTuple):
    """A reduction mode: one pure function doing both the matching and its application.

    ``needs_positions``: the rule reads ``tokens.pos``; the encoder then tracks positions
    (only backbones that know their patch grid can), and ``pos`` must be returned reduced too.
    ``random``: the rule draws from ``ctx.key``, so evaluation records how draws are keyed.
    """

    apply: RuleFn
    needs_positions: bool = False
    random: bool = False
