"""Merging settings: how a model reduces its tokens, frozen and hashable, validated once.

A mode names a rule of :mod:`vtm_jax.merging.rules`; its own parameters (hybrid's
``threshold``) are declared on the rule and set in ``MergingSettings.rule_options``, not as
settings fields.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

from vtm_jax import plugins
from vtm_jax.errors import UserError
from vtm_jax.merging.rules import RULES, get_rule
from vtm_jax.merging.schedule import apply_schedule, get_schedule, parse_r
from vtm_jax.merging.tokens import Rule, RuleOption

HEAD_AGGREGATIONS = ("mean", "concat")
TRACE_SOURCE = ("none", "index", "dense")
MOTIONFORMER_GROUPS = ("paper", "per_frame")
FACTORISED_GROUPS = ("aligned", "per_frame")


class PerLayerR(tuple):
    """A per-layer r list, stored as a tuple so settings stay hashable."""


class RuleOptions(Mapping):
    """The options of one rule (``{"threshold": 0.4}``): read-only and hashable, like settings."""

    def __init__(self, values: Mapping[str, Any] | None = None):
        self._items = tuple(sorted(dict(values or {}).items()))

    def __getitem__(self, name: str) -> Any:
        return dict(self._items)[name]

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return f"RuleOptions({dict(self._items)!r})"


@dataclasses.dataclass(frozen=True)
class MergingSettings:
    """How a model reduces its tokens; frozen and hashable, so it is a static module attribute.

    Attributes:
      mode: a rule of :data:`RULES` (``none``, ``merge``, ``random_merge``, ``drop``,
        ``random_drop``, ``hybrid``, ``tube_merge``, or any added with :func:`register_rule`),
        or a ``"package.module:attribute"`` path to a :class:`Rule` or rule function.
      r: tokens removed per layer: an int, the paper's ``(r, inflection)`` tuple (stored as
        ``r`` plus ``schedule``), or a per-layer list.
      schedule: the inflection of the paper's schedule when ``r`` is an int: 0 constant,
        -1 decreasing from 2r to 0, +1 increasing from 0 to 2r. With a single layer the
        schedule has no span and is ignored (the paper's parse_r divides by zero there).
        Under another ``r_schedule`` it is that schedule's parameter (any finite float).
      r_schedule: how an int ``r`` becomes a per-layer list: ``paper`` (the default, the
        paper's linear inflection above), a schedule added with
        :func:`vtm_jax.merging.schedule.register_schedule`, or a ``"package.module:attribute"`` path
        to a function ``(num_layers, r, schedule) -> per-layer r``.
      prop_attn: add ``log(size)`` of the keys to the attention logits.
      head_aggregation: metric from the keys averaged over heads (``mean``) or concatenated.
      rule_options: the parameters of the mode's rule, those its :class:`Rule` declares
        (``options``); others are refused. ``hybrid`` needs ``threshold``, the similarity
        below which it discards a destination (the paper uses 0.4 for ViViT, 0.8 for
        VideoMAE): ``rule_options={"threshold": 0.4}``.
      seed: seed of the random modes; layer ``l`` uses ``fold_in(PRNGKey(seed), l)``.
      trace_source: ``none``, ``index`` (group id per original token, O(N0)) or ``dense`` (the
        paper's ``[N, N0]`` matrix).
      duplicate: ``(layer, quantity)``: run layer ``layer`` ``quantity`` times, all reduction
        concentrated there (docs/method.md §3.6; what a repeat computes is the model's choice).
      size_weighted_pool: mean-pool tokens weighted by their sizes (the fix to the paper's
        unweighted VideoMAE pooling; upstream ToMe's MAE patch weights them).
      motionformer_groups: ``paper`` reproduces the paper's ``(s f)`` merge groups, which mix
        frames; ``per_frame`` merges within each frame, as intended (docs/method.md §3.4).
      motionformer_concat_keys: Motionformer only: let ``head_aggregation='concat'`` really
        concatenate the heads' keys into the metric. The paper's Motionformer averages them
        over heads whatever is asked, so without this setting concat is refused there; with it
        the model departs from the paper's.
      temporal_r: factorised-encoder ViViT: r per layer of the temporal encoder (0, the
        default, leaves it unmerged; the spatial encoder merges per frame with ``r``). ViViT
        models 3 and 4: frames merged per layer (docs/vivit_models.md).
      factorised_groups: ViViT models 3 and 4 only: ``aligned`` (one spatial match per block
        shared by all frames) or ``per_frame`` (each frame its own match).
    """

    mode: str = "none"
    r: int | tuple[int, float] | list[int] = 0
    schedule: float = 0.0
    prop_attn: bool = True
    head_aggregation: str = "mean"
    rule_options: Mapping[str, Any] = RuleOptions()
    seed: int = 0
    trace_source: str = "none"
    duplicate: tuple[int, int] | None = None
    size_weighted_pool: bool = False
    motionformer_groups: str = "paper"
    motionformer_concat_keys: bool = False
    temporal_r: int = 0
    r_schedule: str = "paper"
    factorised_groups: str = "aligned"

    def __post_init__(self):
        rule = get_rule(self.mode)  # a UserError naming the valid modes
        object.__setattr__(
            self, "rule_options", _checked_options(self.mode, rule, self.rule_options)
        )
        get_schedule(self.r_schedule)
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
        if rule is not None and rule.place == "input" and any(r_values):
            # Its count follows the video: an r would silently do nothing.
            raise UserError(
                f"mode {self.mode!r} takes no r (its token count follows the video): set r to 0"
            )
        if self.r_schedule == "paper":
            if not -1.0 <= float(self.schedule) <= 1.0:
                raise UserError(f"schedule (inflection) must be in [-1, 1], not {self.schedule}")
        else:
            if not math.isfinite(float(self.schedule)):
                raise UserError(f"schedule must be a finite number, not {self.schedule}")
            if isinstance(r, PerLayerR) or self.duplicate is not None:
                # Either would silently bypass the schedule the user asked for.
                raise UserError(
                    f"r_schedule {self.r_schedule!r} needs a single int r without duplicate"
                )
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise UserError(f"seed must be an int in [0, 2**32), not {self.seed!r}")
        if self.duplicate is not None:
            object.__setattr__(self, "duplicate", _checked_duplicate(self, rule))
        if not isinstance(self.temporal_r, int) or self.temporal_r < 0:
            raise UserError(f"temporal_r must be a non-negative int, not {self.temporal_r!r}")
        if self.factorised_groups not in FACTORISED_GROUPS:
            raise UserError(
                f"unknown factorised_groups {self.factorised_groups!r}; "
                f"valid: {', '.join(FACTORISED_GROUPS)}"
            )
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
        if not isinstance(self.motionformer_concat_keys, bool):
            raise UserError(
                f"motionformer_concat_keys must be true or false, not "
                f"{self.motionformer_concat_keys!r}"
            )
        if self.motionformer_concat_keys and self.head_aggregation != "concat":
            raise UserError("motionformer_concat_keys needs head_aggregation 'concat'")
        if self.trace_source not in TRACE_SOURCE:
            raise UserError(
                f"unknown trace_source {self.trace_source!r}; valid: {', '.join(TRACE_SOURCE)}"
            )

    def layer_r(self, num_layers: int) -> list[int]:
        """The requested r of each layer (before the per-layer clamp)."""
        if self.mode == "none":
            return [0] * num_layers
        if isinstance(self.r, PerLayerR):
            # The paper's parse_r pads a short list with zeros and never reads a long one's
            # tail: either is more likely a mistake than a wish, so the count must match.
            if len(self.r) != num_layers:
                raise UserError(
                    f"a per-layer r lists {len(self.r)} values, the model has {num_layers} "
                    "layers; give one r per layer (0 where a layer keeps its tokens)"
                )
            return parse_r(num_layers, list(self.r))
        return apply_schedule(self.r_schedule, num_layers, self.r, float(self.schedule))

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
    def from_dict(cls, values: Mapping[str, Any] | None) -> MergingSettings:
        """Build from a config block, a record's ``token_merging`` (a dict or ConfigDict).

        Unknown keys are an error. A rule's option may also sit at the top level
        (``threshold``), as in config blocks and in records written before ``rule_options``
        existed. Options of other rules than ``mode``'s are presets for those modes (the
        paper's configs carry hybrid's threshold for any mode) and are left out, as are unset
        ones (None, a config placeholder).
        """
        values = dict(values or {})
        given = dict(values.pop("rule_options", None) or {})
        for name in sorted(set(values) & _option_names(values.get("mode", "none"))):
            value = values.pop(name)
            if value is not None and name in given and given[name] != value:
                raise UserError(
                    f"{name} is given twice: {value!r} and rule_options {given[name]!r}"
                )
            given.setdefault(name, value)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(
                f"unknown token_merging option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
            )
        return cls(**values, rule_options={k: v for k, v in given.items() if v is not None})

    @classmethod
    def from_data(cls, values: Mapping[str, Any] | None, where: str) -> MergingSettings:
        """:meth:`from_dict` for settings a data file holds (``where`` names it): a
        ``module:attribute`` mode or r_schedule is refused before anything is imported
        (:func:`check_data_names`)."""
        check_data_names(values, where)
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["rule_options"] = dict(self.rule_options)
        if isinstance(self.r, PerLayerR):
            values["r"] = list(self.r)
        if self.duplicate is not None:
            values["duplicate"] = list(self.duplicate)
        return values


# The settings fields that name code: a registered name, or a module:attribute path.
NAMED_FIELDS = ("mode", "r_schedule")


def check_data_names(values: Any, where: str, *, prefix: str = "token_merging.") -> None:
    """Refuse a ``module:attribute`` mode or r_schedule in settings read from a data file.

    Importing a module runs its code: configs and command lines are code by design and may
    name a path, while a data file (a ``model.json``, a results file, a runs file) may name
    registered modes and schedules only. ``where`` names the file in the one-line message.
    """
    if not isinstance(values, Mapping):
        return
    for name in NAMED_FIELDS:
        value = values.get(name)
        if isinstance(value, str) and plugins.is_path(value):
            refuse_data_path(where, f"{prefix}{name}", value)


def refuse_data_path(where: str, field: str, value: str) -> None:
    """The one-line error for a ``module:attribute`` path a data file names."""
    raise UserError(
        f"{where}: {field} is {value!r}, a module:attribute path; data files may name "
        "registered modes, schedules and datasets only (name a path in a config or on the "
        "command line, which are code)"
    )


def _checked_duplicate(settings: MergingSettings, rule: Rule | None) -> tuple[int, int]:
    """``settings.duplicate`` as a checked ``(layer, quantity)`` tuple."""
    dup = tuple(settings.duplicate)
    if len(dup) != 2 or not all(isinstance(v, int) for v in dup) or dup[0] < 0 or dup[1] < 1:
        raise UserError(
            f"duplicate must be (layer >= 0, quantity >= 1), not {settings.duplicate!r}"
        )
    if isinstance(settings.r, PerLayerR):
        raise UserError("duplicate needs a single int r (it is the r of every repeat)")
    if rule is not None and (rule.place != "attention" or "attention" in rule.reads):
        raise UserError(
            "duplicate repeats a reduction after attention that reads the keys only; mode "
            f"{settings.mode!r} reduces at {rule.place!r} reading {', '.join(rule.reads)}"
        )
    return dup


def _declared_options(rule: Rule | None) -> dict[str, RuleOption]:
    return {} if rule is None else {option.name: option for option in rule.options}


def _known_options(rule: Rule | None) -> dict[str, RuleOption]:
    """The options ``rule`` and every registered rule declare (``rule``'s own win)."""
    known: dict[str, RuleOption] = {}
    for other in RULES.values():
        known |= _declared_options(other)
    return known | _declared_options(rule)


def _option_names(mode: str) -> set[str]:
    return set(_known_options(get_rule(mode)))


def _checked_options(mode: str, rule: Rule | None, given: Any) -> RuleOptions:
    """``given`` checked against the options ``mode``'s rule declares, as :class:`RuleOptions`.

    Options only other registered rules declare are checked, then left out: they are presets
    for those modes (the paper's configs carry hybrid's threshold whatever the mode). A name
    no rule declares is an error.
    """
    if not isinstance(given, Mapping):
        raise UserError(f"rule_options must map option names to values, not {given!r}")
    declared = _declared_options(rule)
    known = _known_options(rule)
    unknown = sorted(set(given) - set(known))
    if unknown:
        takes = f"it takes {', '.join(declared)}" if declared else "it takes none"
        raise UserError(f"mode {mode!r} has no option {', '.join(unknown)} ({takes})")
    values = {name: _checked_value(known[name], value) for name, value in given.items()}
    for option in declared.values():
        if option.required and option.name not in values:
            hint = f" ({option.hint})" if option.hint else ""
            raise UserError(f"mode {mode!r} needs a {option.name}{hint}")
    options = RuleOptions({k: v for k, v in values.items() if k in declared})
    if rule is not None and rule.check is not None:
        rule.check(options)
    return options


_KIND_NAMES = {float: "a finite number", int: "an integer", str: "a string", bool: "true or false"}


def _checked_value(option: RuleOption, value: Any) -> Any:
    kind = option.kind
    if isinstance(value, bool) and kind is not bool:
        ok = False
    elif kind in (int, float):
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        ok = ok and (kind is float or float(value).is_integer())
    else:
        ok = isinstance(value, kind)
    if not ok:
        what = _KIND_NAMES.get(kind, f"a {kind.__name__}")
        raise UserError(f"{option.name} must be {what}, not {value!r}")
    if option.choices is not None and value not in option.choices:
        valid = ", ".join(str(c) for c in option.choices)
        raise UserError(f"{option.name} must be one of {valid}, not {value!r}")
    low, high = option.minimum, option.maximum
    if (low is not None and value < low) or (high is not None and value > high):
        low_text = "-inf" if low is None else f"{low:g}"
        high_text = "inf" if high is None else f"{high:g}"
        raise UserError(f"{option.name} must be in [{low_text}, {high_text}], not {value!r}")
    return kind(value)


# The mode that changing r (or another field only merging reads) switches settings that merge
# nothing to, when no mode is named: the paper's similarity merging.
DEFAULT_MODE = "merge"


def asks_for_merging(changes: Mapping[str, Any]) -> bool:
    """Whether ``changes`` set a field that only a merging mode reads to a value that matters:
    r above 0, a schedule, another r schedule or layer duplication."""
    r = changes.get("r", 0)
    r_values = list(r) if isinstance(r, (list, tuple)) else [r]
    if isinstance(r, tuple) and len(r) == 2 and not isinstance(r, PerLayerR):
        r_values = [r[0]]  # the paper's (r, inflection)
    return bool(
        any(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in r_values)
        or changes.get("schedule") not in (None, 0, 0.0)
        or changes.get("r_schedule") not in (None, "paper")
        or changes.get("duplicate") is not None
    )


def changed(base: MergingSettings, changes: Mapping[str, Any]) -> MergingSettings:
    """``base`` with ``changes`` (settings fields; a rule option may sit at the top level).

    Changes that only a merging mode reads (:func:`asks_for_merging`) made to settings whose
    mode is ``none``, without naming a mode, switch the mode to :data:`DEFAULT_MODE`, and the
    returned settings say so: ``changed(MergingSettings(), {"r": 8}).mode == "merge"``. A rule
    option given that way is an error naming the modes that read it. Naming ``mode="none"``
    keeps it. The API (``settings``, ``with_merging``), the command line's merging flags and
    config overrides all follow this one rule.
    """
    values = base.to_dict()
    changes = dict(changes)
    known = _known_options(None)
    given = {**dict(changes.pop("rule_options", None) or {})}
    given |= {k: changes.pop(k) for k in list(changes) if k in known}
    given = {k: v for k, v in given.items() if v is not None}
    if base.mode == "none" and "mode" not in changes:
        if given:
            name = sorted(given)[0]
            readers = [m for m, rule in RULES.items() if name in _declared_options(rule)]
            raise UserError(
                f"{name} is an option of mode {' or '.join(readers) or '?'}, and the mode is "
                f"none (nothing merges): give the mode too, e.g. mode={readers[0]!r}"
            )
        if asks_for_merging(changes):
            values["mode"] = DEFAULT_MODE
    values.update(changes)
    values["rule_options"] = {**values["rule_options"], **given}
    return MergingSettings.from_dict(values)
