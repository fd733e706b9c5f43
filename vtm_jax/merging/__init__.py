"""The merge core: settings, rules, matching, token state, schedules and token counts.

Nothing here knows about models. :mod:`.settings` (how a model merges), :mod:`.rules` (the
modes and their registry), :mod:`.matching` (bipartite matching and the functions that apply
a match), :mod:`.tokens` (what a rule reads and returns), :mod:`.schedule` (r per layer, the
static token counts and analytic MACs), :mod:`.tube` (temporal tube merging).
"""

from vtm_jax.merging.rules import (
    RULES,
    check_supported,
    get_rule,
    initial_positions,
    initial_source,
    is_random,
    key_metric,
    layer_key,
    merge_tokens,
    needs_positions,
    register_rule,
    removal_count,
)
from vtm_jax.merging.settings import MergingSettings, PerLayerR, RuleOptions
from vtm_jax.merging.tokens import MergeContext, Rule, RuleFn, RuleOption, Support, Tokens

__all__ = [
    "RULES",
    "MergeContext",
    "MergingSettings",
    "PerLayerR",
    "Rule",
    "RuleFn",
    "RuleOption",
    "RuleOptions",
    "Support",
    "Tokens",
    "check_supported",
    "get_rule",
    "initial_positions",
    "initial_source",
    "is_random",
    "key_metric",
    "layer_key",
    "merge_tokens",
    "needs_positions",
    "register_rule",
    "removal_count",
]
