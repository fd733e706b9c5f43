"""The paper's experiment families (docs/method.md §6) as data, and the r values they take.

A family (:class:`Family`) says which models and datasets the paper ran it on, which r values
(as rules relative to the model's own token count), which merging settings, and whether it
measures accuracy or speed. ``r_max`` is the most one first-layer merge step can take (half the
unprotected tokens of a merge group: 1568 for ViViT-B/16x2, 784 for VideoMAE-B, 98 per frame for
TimeSformer and Motionformer); 25% / 12.5% / 6.25% are of the ``2 r_max`` tokens, the paper's r
is the same fraction of ``r_max`` as in the paper and the r curves take 16 equal steps up to
``r_max``. For the paper's models these are exactly the numbers of experiments.sh; for other
sizes they scale (never below 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any

from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.config.paper import MAX_R, MODELS, PAPER_R
from vtm_jax.errors import UserError

PAPER_DATASETS = ("k400", "ssv2", "ek100")
DATASET_LABELS = {"k400": "K400", "ssv2": "SSv2", "ek100": "EK-100"}
MODEL_LABELS = {
    "vivit": "ViViT",
    "videomae": "VideoMAE",
    "timesformer": "TimeSformer",
    "motionformer": "Motionformer",
}
CURVE_STEPS = 16

# r rules: name -> r from (r_max, model). Percentages are of the 2 r_max pairable tokens.
R_RULES: dict[str, Callable[[int, str], int]] = {
    "max": lambda r_max, model: r_max,
    "25%": lambda r_max, model: int(2 * r_max * Fraction(1, 4)),
    "12.5%": lambda r_max, model: int(2 * r_max * Fraction(1, 8)),
    "6.25%": lambda r_max, model: int(2 * r_max * Fraction(1, 16)),
    "paper": lambda r_max, model: r_max * PAPER_R[model] // MAX_R[model],
    # Family 35's second r: 400 for ViViT, 200 for VideoMAE, i.e. 4/3 of the paper's r.
    "4/3 paper": lambda r_max, model: (r_max * PAPER_R[model] // MAX_R[model]) * 4 // 3,
}

ALL = PAPER_DATASETS
EVERY_MODEL = {m: ALL for m in MODELS}
# experiments.sh leaves ViViT on SSv2 out of families 3-7, 13 and 26.
NO_VIVIT_SSV2 = {**EVERY_MODEL, "vivit": ("k400", "ek100")}
VIVIT_VIDEOMAE_KE = {"vivit": ("k400", "ek100"), "videomae": ALL}
VIVIT_VIDEOMAE = {"vivit": ALL, "videomae": ALL}
K400_CURVES = {"vivit": ("k400",), "videomae": ("k400",)}
EK_ONLY = {"vivit": ("ek100",), "videomae": ("ek100",)}


@dataclasses.dataclass(frozen=True)
class Family:
    """One experiment family of the paper (docs/method.md §6), as data.

    Attributes:
      name: what ``--families`` takes.
      paper: its number(s) in docs/method.md §6.
      title: one line for tables and ``--list``.
      kind: ``accuracy`` (eval) or ``time`` (bench).
      coverage: model -> the paper's datasets it ran on; a dataset outside the paper's three
        (say ``synthetic``) takes every family its model is in.
      r: r rules (:data:`R_RULES`, or ``curve``: ``CURVE_STEPS`` equal steps up to r_max).
      settings: one token_merging override dict per variant; ``threshold="paper"`` is the
        paper's hybrid threshold of the model, ``duplicate="first"|"last"`` repeats that layer
        as many times as the model has layers (0 or 11, x12, for the paper's models).
      frames: model -> factor of the checkpoint's frame count (family 34).
      confusion: keep confusion matrices (family 35).
      plot: draw the metric against r.
      views: the ``(clips, three crops)`` test views of each variant (SlowFast's
        ``NUM_ENSEMBLE_VIEWS`` x ``NUM_SPATIAL_CROPS``; the paper's families use 1 x 1).
    """

    name: str
    paper: str
    title: str
    kind: str
    coverage: Mapping[str, tuple[str, ...]]
    r: tuple[str, ...]
    settings: tuple[Mapping[str, Any], ...] = ({},)
    frames: Mapping[str, Fraction] = dataclasses.field(default_factory=dict)
    confusion: bool = False
    plot: bool = False
    views: tuple[tuple[int, bool], ...] = ((1, False),)


def _schedules(
    name: str, first: int, title: str, mode: str, coverage: Mapping[str, tuple[str, ...]]
) -> list[Family]:
    """A mode at the paper's r with constant, decreasing and increasing schedules."""
    return [
        Family(
            name + suffix,
            str(first + i),
            title + words,
            "accuracy",
            coverage,
            ("paper",),
            ({"mode": mode, "schedule": schedule},),
        )
        for i, (suffix, words, schedule) in enumerate(
            [("", "", 0), ("_decreasing", ", decreasing", -1), ("_increasing", ", increasing", 1)]
        )
    ]


def _curves() -> list[Family]:
    """Families 28-33: accuracy and time against r at each schedule, ViViT and VideoMAE on K400."""
    families = []
    for i, (suffix, words, schedule) in enumerate(
        [("", "constant", 0), ("_decreasing", "decreasing", -1), ("_increasing", "increasing", 1)]
    ):
        for j, (kind, part) in enumerate([("accuracy", ""), ("time", "_time")]):
            families.append(
                Family(
                    f"curve{part}{suffix}",
                    str(28 + 2 * i + j),
                    f"{'Accuracy' if kind == 'accuracy' else 'Time'} against r, {words} schedule",
                    kind,
                    K400_CURVES,
                    ("curve",),
                    ({"schedule": schedule},),
                    plot=True,
                )
            )
    return families


FAMILIES: tuple[Family, ...] = (
    Family("baseline", "1", "Baselines (accuracy, r=0)", "accuracy", EVERY_MODEL, ()),
    Family("baseline_time", "2", "Baselines (time, r=0)", "time", EVERY_MODEL, ()),
    Family("r_max", "3", "Merging at the largest r", "accuracy", NO_VIVIT_SSV2, ("max",)),
    Family("r_25", "4", "Merging at r = 25%", "accuracy", NO_VIVIT_SSV2, ("25%",)),
    Family("r_12_5", "5", "Merging at r = 12.5%", "accuracy", NO_VIVIT_SSV2, ("12.5%",)),
    Family("r_6_25", "6", "Merging at r = 6.25%", "accuracy", NO_VIVIT_SSV2, ("6.25%",)),
    Family("r_paper", "7", "Merging at the paper's r", "accuracy", NO_VIVIT_SSV2, ("paper",)),
    Family(
        "r_paper_decreasing",
        "8",
        "Merging at the paper's r, decreasing",
        "accuracy",
        EVERY_MODEL,
        ("paper",),
        ({"schedule": -1},),
    ),
    Family(
        "r_paper_increasing",
        "9",
        "Merging at the paper's r, increasing",
        "accuracy",
        EVERY_MODEL,
        ("paper",),
        ({"schedule": 1},),
    ),
    *[
        Family(
            f"time_merge{suffix}",
            str(10 + i),
            f"Merging at the paper's r (time){words}",
            "time",
            EVERY_MODEL,
            ("paper",),
            ({"schedule": schedule},),
        )
        for i, (suffix, words, schedule) in enumerate(
            [("", "", 0), ("_decreasing", ", decreasing", -1), ("_increasing", ", increasing", 1)]
        )
    ],
    Family(
        "concat",
        "13",
        "Merging at the paper's r, heads concatenated",
        "accuracy",
        VIVIT_VIDEOMAE_KE,
        ("paper",),
        ({"head_aggregation": "concat"},),
    ),
    *_schedules("random_drop", 14, "Random dropping", "random_drop", EVERY_MODEL),
    Family(
        "time_random_drop",
        "17",
        "Random dropping (time)",
        "time",
        EVERY_MODEL,
        ("paper",),
        ({"mode": "random_drop"},),
    ),
    *_schedules("drop", 18, "Dropping (similarity)", "drop", EVERY_MODEL),
    Family(
        "time_drop",
        "21",
        "Dropping (time)",
        "time",
        EVERY_MODEL,
        ("paper",),
        ({"mode": "drop"},),
    ),
    *_schedules("random_merge", 22, "Random merging", "random_merge", EVERY_MODEL),
    Family(
        "time_random_merge",
        "25",
        "Random merging (time)",
        "time",
        EVERY_MODEL,
        ("paper",),
        ({"mode": "random_merge"},),
    ),
    Family(
        "duplicate",
        "26",
        "All reduction in one repeated layer (first or last)",
        "accuracy",
        VIVIT_VIDEOMAE_KE,
        ("paper",),
        ({"duplicate": "first"}, {"duplicate": "last"}),
    ),
    Family(
        "hybrid",
        "27",
        "Hybrid merging and dropping",
        "accuracy",
        VIVIT_VIDEOMAE,
        ("paper",),
        ({"mode": "hybrid", "threshold": "paper"},),
    ),
    *_curves(),
    Family(
        "frames",
        "34",
        "Accuracy against r with swapped frame counts (ViViT 1/2, VideoMAE 2x)",
        "accuracy",
        K400_CURVES,
        ("curve",),
        frames={"vivit": Fraction(1, 2), "videomae": Fraction(2)},
        plot=True,
    ),
    Family(
        "confusion",
        "35",
        "Confusion matrices at r = 0, the paper's r and 4/3 of it",
        "accuracy",
        EK_ONLY,
        ("paper", "4/3 paper"),
        confusion=True,
    ),
    # Not in experiments.sh (the paper tests 1 view): how accuracy at r=0 and at the paper's
    # r moves with SlowFast's multi-view test, up to its default of 10 clips x 3 crops.
    Family(
        "views",
        "-",
        "View count: temporal clips x spatial crops",
        "accuracy",
        EVERY_MODEL,
        ("paper",),
        views=((1, False), (1, True), (2, True), (4, True), (10, True)),
    ),
)

# Beyond the paper, not in ``all``: the field's other methods at matched MACs
# (vtm_jax.jobs.sweep_methods plans its runs and writes its table).
METHODS_FAMILY = Family(
    "methods",
    "-",
    "Token-reduction methods at matched MACs (beyond the paper)",
    "methods",
    EVERY_MODEL,
    ("paper", "25%", "max"),
    plot=True,
)
EXTRA_FAMILIES = (METHODS_FAMILY,)

# The headline table (docs/method.md §8): every mode at the paper's r, accuracy and speed. It reads
# the runs of these families, plus merging for ViViT on SSv2 (the table reports it, family 7
# does not run it).
TABLE_FAMILIES = (
    "baseline",
    "baseline_time",
    "r_paper",
    "random_drop",
    "drop",
    "random_merge",
    "hybrid",
    "time_merge",
    "time_random_drop",
    "time_drop",
    "time_random_merge",
)
TABLE_MODES = ("random_drop", "drop", "random_merge", "merge", "hybrid")
SHORTHANDS = {
    "table": "the headline table (docs/method.md §8) and the families it reads",
    "all": "every family of the paper, and the headline table",
}


def family_names() -> list[str]:
    return [f.name for f in FAMILIES]


def get_families(names: Sequence[str]) -> tuple[list[Family], bool]:
    """The families named (comma-separated names allowed) and whether the table is wanted."""
    by_name = {f.name: f for f in FAMILIES + EXTRA_FAMILIES}
    chosen: list[str] = []
    table = False
    for item in names:
        for name in filter(None, (n.strip() for n in item.split(","))):
            if name == "all":
                chosen += family_names()
                table = True
            elif name == "table":
                chosen += TABLE_FAMILIES
                table = True
            elif name in by_name:
                chosen.append(name)
            else:
                raise UserError(
                    f"unknown family {name!r}; valid: {', '.join([*SHORTHANDS, *by_name])}"
                )
    if not chosen:
        raise UserError("no family given; --list shows them")
    return [by_name[n] for n in dict.fromkeys(chosen)], table


def describe_families() -> str:
    """The ``--list`` text: per family its name, number, kind, r rules, coverage and title."""
    lines = [f"{'family':<24} {'#':>2}  {'kind':<8}  {'r':<20}  covers, and what it is"]
    for f in FAMILIES + EXTRA_FAMILIES:
        r = ", ".join(("0", *f.r))  # every family has its r=0 reference row
        lines.append(f"{f.name:<24} {f.paper:>2}  {f.kind:<8}  {r:<20}  {_coverage_text(f)}")
        lines.append(f"{'':<61}{f.title}")
    for name, text in SHORTHANDS.items():
        lines.append(f"{name:<24} {'':>2}  {'':<8}  {'':<20}  {text}")
    return "\n".join(lines)


def _coverage_text(family: Family) -> str:
    groups: dict[tuple[str, ...], list[str]] = {}
    for model, datasets in family.coverage.items():
        groups.setdefault(datasets, []).append(model)
    return "; ".join(
        f"{', '.join(models)}: {', '.join(DATASET_LABELS[d] for d in datasets)}"
        for datasets, models in groups.items()
    )


def covers(family: Family, model: str, dataset: str) -> bool:
    """Whether the paper ran ``family`` for ``model`` on ``dataset`` (any family of the model
    on a dataset the paper did not use)."""
    if model not in family.coverage:
        return False
    return dataset in family.coverage[model] or dataset not in PAPER_DATASETS


def r_values(
    rules: Sequence[str], model: str, r_max: int, curve_steps: int = CURVE_STEPS
) -> list[int]:
    """The r of each rule for a model whose first merge step can take at most ``r_max``."""
    values: list[int] = []
    for rule in rules:
        if rule == "curve":
            values += [max(1, r_max * k // curve_steps) for k in range(1, curve_steps + 1)]
        elif rule in R_RULES:
            values.append(max(1, R_RULES[rule](r_max, model)))
        else:
            raise UserError(f"unknown r rule {rule!r}; valid: curve, {', '.join(R_RULES)}")
    return list(dict.fromkeys(values))


def first_step_max_r(record: ModelRecord, num_frames: int | None = None) -> int:
    """The most tokens the model's first merge step can remove (its own clamp)."""
    from vtm_jax.merging import MergingSettings
    from vtm_jax.models.registry import build_model

    frames = num_frames or record.num_frames
    model = build_model(record, MergingSettings(mode="merge", r=10**9))
    return model.token_plan(frames, record.image_size)[0].r


def num_layers(record: ModelRecord) -> int:
    """The layers the model's r list covers (the backbone says: ViViT-FE's spatial encoder)."""
    from vtm_jax.models.registry import build_model

    return build_model(record).merging_layers()
