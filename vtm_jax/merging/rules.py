"""The merging rules (modes) that blocks apply between attention and MLP, and their registry.

A rule is a pure function ``fn(tokens, metric, r, ctx) -> Tokens``: it takes the current tokens
(hidden states, sizes, source tracking and, when it asks for them, positions), the block's
metric ``[B, N, c]``, a static r (already clamped, > 0) and a :class:`MergeContext`, and
returns exactly ``N - r`` tokens. Rules live in :data:`RULES` by name; :func:`register_rule`
adds one from any package, and a config may instead name one as ``"package.module:attribute"``,
imported on first use (see :func:`get_rule`).

One word throughout: *merging* names the concept (this package, the settings, the models'
``merging`` field, the ``token_merging`` config block), even for the modes that drop tokens;
:mod:`vtm_jax.merging.matching` holds the matching and merge functions the rules are built from.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from vtm_jax import plugins
from vtm_jax.errors import UserError
from vtm_jax.merging import matching as mg
from vtm_jax.merging.matching import clamp_r
from vtm_jax.merging.methods import mctf as _mctf
from vtm_jax.merging.methods import pitome as _pitome
from vtm_jax.merging.methods import rlt as _rlt
from vtm_jax.merging.methods import sta as _sta
from vtm_jax.merging.methods import tofu as _tofu
from vtm_jax.merging.methods import vid_tldr as _vid_tldr
from vtm_jax.merging.tokens import (
    LAYOUTS,
    PLACES,
    READS,
    MergeContext,
    Rule,
    RuleFn,
    RuleOption,
    Support,
    Tokens,
)
from vtm_jax.merging.tube import tube_merge

if TYPE_CHECKING:
    from vtm_jax.merging.settings import MergingSettings


def layer_key(settings: MergingSettings, layer: int, rng: jax.Array | None = None) -> jax.Array:
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


def _apply_merge(tokens: Tokens, scores: jax.Array, r: int, class_token: bool, threshold=None):
    n = tokens.x.shape[1]
    match = mg.bipartite_soft_matching(scores, r, class_token=class_token)
    keep = None if threshold is None else mg.hybrid_dst_keep(match, n // 2, threshold)
    x, size = mg.merge_wavg(tokens.x, tokens.size, match, dst_keep=keep)
    return Tokens(x, size, _track(tokens.source, match, n, dst_keep=keep))


def _apply_drop(tokens: Tokens, scores: jax.Array, r: int, class_token: bool):
    n = tokens.x.shape[1]
    match = mg.bipartite_soft_matching(scores, r, class_token=class_token)
    x = mg.drop(tokens.x, match)
    # The paper resets sizes to one after a drop, which turns proportional attention off.
    size = jnp.ones(x.shape[:2] + (1,), x.dtype)
    return Tokens(x, size, _track(tokens.source, match, n, dropped=True))


def _merge(tokens: Tokens, metric: jax.Array, r: int, ctx: MergeContext) -> Tokens:
    return _apply_merge(tokens, mg.cosine_scores(metric), r, ctx.class_token)


def _random_merge(tokens: Tokens, metric: jax.Array, r: int, ctx: MergeContext) -> Tokens:
    return _apply_merge(tokens, mg.random_scores(ctx.key, metric), r, ctx.class_token)


def _hybrid(tokens: Tokens, metric: jax.Array, r: int, ctx: MergeContext) -> Tokens:
    scores = mg.cosine_scores(metric)
    return _apply_merge(tokens, scores, r, ctx.class_token, ctx.settings.rule_options["threshold"])


def _drop(tokens: Tokens, metric: jax.Array, r: int, ctx: MergeContext) -> Tokens:
    return _apply_drop(tokens, mg.cosine_scores(metric), r, ctx.class_token)


def _random_drop(tokens: Tokens, metric: jax.Array, r: int, ctx: MergeContext) -> Tokens:
    return _apply_drop(tokens, mg.random_scores(ctx.key, metric), r, ctx.class_token)


RULES: dict[str, Rule | None] = {
    "none": None,
    "merge": Rule(_merge),
    "random_merge": Rule(_random_merge, random=True),
    "drop": Rule(_drop),
    "random_drop": Rule(_random_drop, random=True),
    "hybrid": Rule(
        _hybrid,
        options=(
            RuleOption(
                "threshold",
                required=True,
                hint="the paper uses 0.4 for ViViT, 0.8 for VideoMAE",
                # A cosine similarity: outside [-1, 1] hybrid would merge or drop only.
                minimum=-1.0,
                maximum=1.0,
            ),
        ),
    ),
    # Shipped beyond the paper's modes: registered here, so every name is listed from the start.
    "tube_merge": tube_merge,
    "pitome": _pitome.RULE,
    "tofu": _tofu.RULE,
    "sta": _sta.RULE,
    "rlt": _rlt.RULE,
    "vid_tldr": _vid_tldr.RULE,
    "mctf": _mctf.RULE,
}


def register_rule(
    name: str,
    fn: RuleFn | Rule,
    *,
    needs_positions: bool = False,
    random: bool = False,
    options: tuple[RuleOption, ...] = (),
    replace: bool = False,
    **needs: Any,
) -> Rule:
    """Add a merging mode, selectable as ``MergingSettings(mode=name)`` or from a config.

    ``fn(tokens, metric, r, ctx) -> Tokens`` must be pure and jit-traceable, with static
    shapes: it returns exactly ``N - r`` tokens with sizes (and source, and positions if it
    ``needs_positions``) reduced the same way, a class token (``ctx.class_token``) kept first.
    A rule that draws from ``ctx.key`` says ``random=True``; one with parameters lists them as
    ``options`` (:class:`RuleOption`) and reads them from ``ctx.settings.rule_options``.
    ``needs`` are the other :class:`Rule` fields (``reads``, ``place``, ``layouts``,
    ``removed``, ``check``): what the rule reads, where it acts, its own token count.
    Registering the same rule twice is a no-op; another rule under a taken name needs
    ``replace=True``. Returns the :class:`Rule`, to keep as a ``module:attribute`` target.
    """
    if isinstance(fn, Rule):
        rule = fn
    else:
        unknown = sorted(set(needs) - set(Rule._fields))
        if unknown:
            raise TypeError(f"register_rule got unknown fields {', '.join(unknown)}")
        rule = Rule(fn, needs_positions, random, tuple(options), **needs)
    check_rule(rule)
    plugins.check_name(RULES, name, rule, replace=replace)
    RULES[name] = rule
    return rule


def check_rule(rule: Rule) -> None:
    """A TypeError for a rule whose declaration the backbones could not honour."""
    if not callable(rule.apply):
        raise TypeError(f"a rule must be callable, not {type(rule.apply).__name__}")
    if rule.place not in PLACES:
        raise TypeError(f"a rule's place must be one of {', '.join(PLACES)}, not {rule.place!r}")
    for what, given, valid in (("reads", rule.reads, READS), ("layouts", rule.layouts, LAYOUTS)):
        unknown = sorted(set(given) - set(valid))
        if unknown:
            raise TypeError(f"a rule's {what} must be among {', '.join(valid)}, not {unknown}")


def get_rule(name: str) -> Rule | None:
    """The rule a mode names (None for ``none``): registered, or a ``module:attribute`` path.

    A path may name a :class:`Rule` or a bare rule function. Unknown names are a UserError
    listing the valid ones.
    """
    if not isinstance(name, str):
        raise UserError(f"mode must be a string, not {name!r}")
    if plugins.is_path(name):
        obj = plugins.load_object(name, what="mode")
        if isinstance(obj, Rule):
            return obj
        if inspect.ismodule(obj) or not callable(obj):
            kind = "module" if inspect.ismodule(obj) else type(obj).__name__
            raise UserError(f"mode {name!r} names a {kind}, not a rule")
        plugins.check_function(obj, name, what="mode", arguments=("tokens", "metric", "r", "ctx"))
        return Rule(obj)
    if name not in RULES:
        raise UserError(f"unknown mode {name!r}; valid: {plugins.valid_names(RULES)}")
    return RULES[name]


def is_random(settings: MergingSettings) -> bool:
    """Whether ``settings.mode`` draws random numbers (from each layer's PRNG key)."""
    rule = get_rule(settings.mode)
    return rule is not None and rule.random


def needs_positions(settings: MergingSettings) -> bool:
    """Whether the encoder must track token positions for ``settings.mode``."""
    rule = get_rule(settings.mode)
    return rule is not None and rule.needs_positions


def removal_count(settings: MergingSettings, n: int, r: int, ctx: MergeContext) -> int:
    """Tokens a layer removes (static): the rule's own count, else r clamped to half of the
    unprotected tokens (docs/method.md §1.1), 0 when the schedule gives 0."""
    rule = get_rule(settings.mode)
    if rule is None:
        return 0
    if rule.removed is not None:
        return int(rule.removed(n, r, ctx))
    return clamp_r(n, r, class_token=ctx.class_token) if r > 0 else 0


def unsupported_reason(rule: Rule, backbone: str, support: Support) -> str | None:
    """Why ``rule`` cannot run on a backbone whose blocks offer ``support``, or None."""
    if support.layout not in rule.layouts:
        layouts = " or ".join(rule.layouts)
        return f"it needs a {layouts} token layout, and {backbone}'s is {support.layout}"
    if rule.place not in support.places:
        places = ", ".join(support.places)
        return f"it acts at {rule.place!r}, and {backbone}'s blocks reduce only at {places}"
    missing = sorted(set(rule.reads) - set(support.reads))
    if missing:
        return f"it reads {', '.join(missing)}, which {backbone}'s blocks do not supply"
    return None


def check_supported(
    settings: MergingSettings, backbone: str, supports: Mapping[str, Support]
) -> None:
    """Refuse a mode that ``backbone`` cannot run, with the reason and the backbones that can.

    ``supports`` maps each backbone name to what its blocks offer (the model registry's).
    """
    rule = get_rule(settings.mode)
    if rule is None or backbone not in supports:
        return
    reason = unsupported_reason(rule, backbone, supports[backbone])
    if reason is not None:
        able = [name for name, s in supports.items() if unsupported_reason(rule, name, s) is None]
        raise UserError(
            f"mode {settings.mode!r} cannot run on {backbone}: {reason}; "
            f"backbones that run it: {', '.join(able) or 'none'}"
        )


def merge_tokens(
    tokens: Tokens,
    metric: jax.Array,
    r: int,
    *,
    settings: MergingSettings,
    class_token: bool,
    key: jax.Array | None = None,
    grid: tuple[int, int, int] | None = None,
    ctx: MergeContext | None = None,
) -> Tokens | tuple[Tokens, jax.Array]:
    """One reduction step under ``settings.mode``, removing the static ``r`` tokens that
    :func:`removal_count` gave (> 0).

    ``grid`` is the ``(t, h, w)`` patch grid; ``ctx`` (which then carries class_token, key and
    grid) adds the layer and attention for rules that read them. A ``block_start`` rule may
    return ``(tokens, probabilities)``; an ``input`` rule may keep every token (padding).
    """
    rule = get_rule(settings.mode)
    if rule.needs_positions and tokens.pos is None:
        raise UserError(
            f"mode {settings.mode!r} needs token positions, which this backbone does not track "
            "(only global merging over a whole patch grid does: vivit, videomae)"
        )
    if ctx is None:
        ctx = MergeContext(settings, class_token, key, grid)
    out = rule.apply(tokens, metric, r, ctx)
    reduced = out if isinstance(out, Tokens) else out[0]
    # Checked here, at trace time, so a faulty extension fails at once with its name: the
    # static plan (schedule.plan_tokens) relies on exactly r tokens going.
    if not isinstance(reduced, Tokens):
        raise UserError(f"mode {settings.mode!r} returned a {type(reduced).__name__}, not Tokens")
    n_in, n_out = tokens.x.shape[1], reduced.x.shape[1]
    if n_out != n_in - r and not (rule.place == "input" and n_out <= n_in):
        raise UserError(f"mode {settings.mode!r} returned {n_out} tokens, not {n_in} - {r}")
    if rule.needs_positions and reduced.pos is None:
        raise UserError(f"mode {settings.mode!r} needs positions but returned none")
    return out


def initial_positions(batch: int, grid: tuple[int, int, int], *, class_token: bool) -> jax.Array:
    """``[B, N, 3]`` float32 ``(t, y, x)`` of each patch in ``(t h w)`` order, CLS first at -1."""
    t, h, w = grid
    coords = jnp.stack(
        jnp.meshgrid(jnp.arange(t), jnp.arange(h), jnp.arange(w), indexing="ij"), axis=-1
    ).reshape(-1, 3)
    coords = coords.astype(jnp.float32)
    if class_token:
        coords = jnp.concatenate([jnp.full((1, 3), -1.0, jnp.float32), coords])
    return jnp.broadcast_to(coords, (batch,) + coords.shape)


def initial_source(batch: int, n: int, trace_source: str) -> jax.Array | None:
    """Source tracking before the first layer: identity (dense) or arange (index form)."""
    if trace_source == "index":
        return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
    if trace_source == "dense":
        return jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32), (batch, n, n))
    return None
