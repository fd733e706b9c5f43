"""r schedules, the static token counts they give, and analytic FLOPs.

Every count here is a Python int known before tracing, so a model built from a plan compiles
once per (model, schedule, input shape) with no padding or masks.

A schedule is a pure function ``fn(num_layers, r, schedule) -> per-layer r`` (``schedule`` is
the float parameter of ``MergingSettings``; the paper's is its inflection). Schedules live in
:data:`SCHEDULES` by name; :func:`register_schedule` adds one, and ``r_schedule`` may instead
be a ``"package.module:attribute"`` path, imported on first use.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Sequence

from vtm_jax import plugins
from vtm_jax.errors import UserError
from vtm_jax.merging.matching import clamp_r

RSpec = int | tuple[int, float] | Sequence[int]
ScheduleFn = Callable[[int, int, float], Sequence[int]]


def parse_r(num_layers: int, r: RSpec) -> list[int]:
    """Per-layer r exactly as the paper's ``parse_r`` (docs/method.md §2.1).

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


def paper_schedule(num_layers: int, r: int, schedule: float) -> list[int]:
    """The paper's schedule: ``parse_r(num_layers, (r, schedule))``; constant with one layer
    (the paper's parse_r divides by zero there)."""
    return parse_r(num_layers, (r, schedule) if num_layers > 1 else r)


SCHEDULES: dict[str, ScheduleFn] = {"paper": paper_schedule}


def register_schedule(name: str, fn: ScheduleFn, *, replace: bool = False) -> ScheduleFn:
    """Add an r schedule, selectable as ``MergingSettings(r_schedule=name)``.

    ``fn(num_layers, r, schedule)`` must be pure and return ``num_layers`` non-negative ints
    (the requested r per layer; each is still clamped to half the unprotected tokens).
    Registering the same function twice is a no-op; another under a taken name needs
    ``replace=True``. Returns ``fn``.
    """
    if not callable(fn):
        raise TypeError(f"a schedule must be callable, not {type(fn).__name__}")
    plugins.check_name(SCHEDULES, name, fn, replace=replace)
    SCHEDULES[name] = fn
    return fn


def get_schedule(name: str) -> ScheduleFn:
    """The schedule ``name`` selects: registered, or a ``module:attribute`` path."""
    if not isinstance(name, str):
        raise UserError(f"r_schedule must be a string, not {name!r}")
    if plugins.is_path(name):
        fn = plugins.load_object(name, what="r_schedule")
        plugins.check_function(
            fn, name, what="r_schedule", arguments=("num_layers", "r", "schedule")
        )
        return fn
    if name not in SCHEDULES:
        raise UserError(f"unknown r_schedule {name!r}; valid: {plugins.valid_names(SCHEDULES)}")
    return SCHEDULES[name]


def apply_schedule(name: str, num_layers: int, r: int, schedule: float) -> list[int]:
    """Per-layer r from the schedule ``name``, checked: ``num_layers`` ints >= 0."""
    values = list(get_schedule(name)(num_layers, r, schedule))
    # numpy ints are fine; they become Python ints so the plan stays static and hashable.
    if len(values) != num_layers or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in values
    ):
        raise UserError(
            f"r_schedule {name!r} must give {num_layers} non-negative ints, not {values!r}"
        )
    return [int(v) for v in values]


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Tokens entering a layer, the r it actually removes, and tokens leaving it (per group)."""

    tokens_in: int
    r: int
    tokens_out: int
    place: str = "attention"


def plan_tokens(
    tokens: int,
    r_per_layer: Sequence[int],
    *,
    class_token: bool,
    count: Callable[[int, int, int], int] | None = None,
    place: str = "attention",
) -> list[LayerPlan]:
    """Static per-step token counts for one merge group.

    ``count(step, n, r)`` is the tokens a step removes (a mode's own count, see
    ``rules.removal_count``); by default r clamped layer by layer. ``place`` is where in the
    block the mode reduces, for the MAC count.
    """
    plan = []
    for step, r in enumerate(r_per_layer):
        if count is not None:
            r_eff = count(step, tokens, r)
        else:
            r_eff = clamp_r(tokens, r, class_token=class_token) if r > 0 else 0
        plan.append(LayerPlan(tokens, r_eff, tokens - r_eff, place))
        tokens -= r_eff
    return plan


def block_macs(
    tokens_in: int, tokens_out: int, *, hidden: int, mlp_dim: int, place: str = "attention"
) -> int:
    """Multiply-adds of one pre-LN block that reduces at ``place``.

    Reducing after attention (the paper's place): projections q, k, v, out (4 N D^2) and the two
    attention products (2 N^2 D) see the tokens entering the block; the MLP (2 N D M) sees the
    tokens left. At ``block_end`` everything sees the tokens entering; at ``block_start``
    (one-step-ahead attention) q, k and their logits see the tokens entering, the values, the
    weighted sum, the output projection and the MLP the tokens left (``block_start_recompute``:
    the attention is computed again on the tokens left); at ``input`` everything
    sees the tokens entering (the reduction happened before the block).
    """
    n, m, d = tokens_in, tokens_out, hidden
    if place == "block_start":
        return 2 * n * d**2 + n**2 * d + 2 * m * d**2 + m**2 * d + 2 * m * d * mlp_dim
    if place == "block_start_recompute":  # scores on the tokens entering, then a whole block
        return 2 * n * d**2 + n**2 * d + 4 * m * d**2 + 2 * m**2 * d + 2 * m * d * mlp_dim
    if place in ("block_end", "input"):
        m = n
    return 4 * n * d**2 + 2 * n**2 * d + 2 * m * d * mlp_dim
