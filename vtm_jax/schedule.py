"""r schedules, the static token counts they give, and analytic FLOPs.

Every count here is a Python int known before tracing, so a model built from a plan compiles
once per (model, schedule, input shape) with no padding or masks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from vtm_jax.errors import UserError
from vtm_jax.merge import clamp_r

RSpec = int | tuple[int, float] | Sequence[int]


def parse_r(num_layers: int, r: RSpec) -> list[int]:
    """Per-layer r exactly as the paper's ``parse_r`` (method.md §2.1).

    * an int is the same r in every layer;
    * ``(r, inflection)`` goes linearly from ``int(r (1 - inflection))`` to ``2 r - that``,
      each value truncated with ``int``: -1 decreases from 2r to 0, +1 increases, 0 is constant;
    * a list is used as given, right-padded with zeros (a longer list is not truncated; the
      extra values are never used).
    """
    if isinstance(r, bool):
        raise UserError(f"r must be an int, (r, inflection) or a list of ints, not {r!r}")
    if isinstance(r, int):
        return [r] * num_layers
    if (
        isinstance(r, tuple)
        and len(r) == 2
        and not isinstance(r[1], bool)
        and isinstance(r[0], int)
    ):
        value, inflect = r
        if num_layers < 2:
            raise UserError("an (r, inflection) schedule needs at least 2 layers")
        min_val = int(value * (1.0 - inflect))
        max_val = 2 * value - min_val
        step = (max_val - min_val) / (num_layers - 1)
        return [int(min_val + step * i) for i in range(num_layers)]
    if isinstance(r, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in r):
        values = list(r)
        return values + [0] * (num_layers - len(values))
    raise UserError(f"r must be an int, (r, inflection) or a list of ints, not {r!r}")


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Tokens entering a layer, the r it actually removes, and tokens leaving it (per group)."""

    tokens_in: int
    r: int
    tokens_out: int


def plan_tokens(tokens: int, r_per_layer: Sequence[int], *, class_token: bool) -> list[LayerPlan]:
    """Static per-layer token counts for one merge group (the clamp applied layer by layer)."""
    plan = []
    for r in r_per_layer:
        r_eff = clamp_r(tokens, r, class_token=class_token) if r > 0 else 0
        plan.append(LayerPlan(tokens, r_eff, tokens - r_eff))
        tokens -= r_eff
    return plan


def block_macs(tokens_in: int, tokens_out: int, *, hidden: int, mlp_dim: int) -> int:
    """Multiply-adds of one pre-LN block that reduces after attention and before the MLP.

    Projections q, k, v, out (4 N D^2) and the two attention products (2 N^2 D) see the tokens
    entering the block; the MLP (2 N D M) sees the tokens left after the reduction.
    """
    attention = 4 * tokens_in * hidden**2 + 2 * tokens_in**2 * hidden
    return attention + 2 * tokens_out * hidden * mlp_dim
