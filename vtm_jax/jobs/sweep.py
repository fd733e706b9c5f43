"""Named sweeps: the paper's experiment families (docs/method.md §6) over the checkpoints you have.

A family is data (:class:`Family`): which models and datasets the paper ran it on, which r
values (as rules relative to the model's own token count), which merging settings, and
whether it measures accuracy (``vtm-jax eval``'s code) or speed (``vtm-jax bench``'s code).
:func:`run_sweep` expands the chosen families into runs for the ``(model, dataset)`` pairs of a
runs file, runs each once (a run shared by several families, such as r=0, runs once), each
into its own results file under ``WORKDIR/runs/`` named after its settings and a hash of its
whole config, and writes every family's table in the paper's layout (``<family>.json``,
``<family>.md`` and, for r sweeps, ``<family>.png``). A second call skips finished runs and
resumes an interrupted evaluation where it stopped.

r values come from the model itself: ``r_max`` is the most one first-layer merge step can take
(half the unprotected tokens of a merge group: 1568 for ViViT-B/16x2, 784 for VideoMAE-B, 98
per frame for TimeSformer and Motionformer), 25% / 12.5% / 6.25% are of the ``2 r_max``
tokens, the paper's r is the same fraction of ``r_max`` as in the paper (300/1568 for ViViT,
150/784 for VideoMAE, 18/98 for the others) and the r curves take 16 equal steps up to
``r_max``. For the paper's models these are exactly the numbers of experiments.sh; for other
sizes they scale (never below 1).

Every run evaluates at the checkpoint's own frame count (family 34 alone changes it), VideoMAE
without proportional attention. Time runs time the checkpoint's architecture with random
weights at the paper's protocol (4 clips per device, 5 warm-up and 100 timed passes; any
``--config.bench.*`` override changes it), and a speedup is the ratio to the r=0 time run of the
same model and dataset. The headline table (``table``) also needs merging at the paper's r for
ViViT on SSv2, which the table reports but family 7 does not run; it is run for the table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any

from vtm_jax import paths as storage
from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.config.paper import HYBRID_THRESHOLD, MAX_R, MODELS, PAPER_R
from vtm_jax.errors import UserError

PAPER_DATASETS = ("k400", "ssv2", "ek100")
DATASET_LABELS = {"k400": "K400", "ssv2": "SSv2", "ek100": "EK-100"}
MODEL_LABELS = {
    "vivit": "ViViT",
    "videomae": "VideoMAE",
    "timesformer": "TimeSformer",
    "motionformer": "Motionformer",
}
REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
RUN_FIELDS = {"checkpoint", "data_dir", "manual_dir", "config", "overrides"}
# The paper's speed protocol (docs/method.md §5): 8 clips over 2 GPUs, 5 warm-up, 100 timed passes.
TIME_DEFAULTS = {"bench.batch_size": 4, "bench.warmup": 5, "bench.iterations": 100}
CURVE_STEPS = 16
TIME_FORMAT = "vtm-jax-sweep-time"

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
    "all": "every family, and the headline table",
}


def family_names() -> list[str]:
    return [f.name for f in FAMILIES]


def get_families(names: Sequence[str]) -> tuple[list[Family], bool]:
    """The families named (comma-separated names allowed) and whether the table is wanted."""
    by_name = {f.name: f for f in FAMILIES}
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
    for f in FAMILIES:
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


# ------------------------------------------------------------------------- runs file


@dataclasses.dataclass(frozen=True)
class Pair:
    """One (model, dataset) of the runs file, with its paths and base config."""

    model: str
    dataset: str
    checkpoint: str
    data_dir: str
    manual_dir: str | None
    config: str
    overrides: tuple[str, ...]


def read_runs(path: str) -> list[Pair]:
    """The pairs of a runs file (JSON: model -> dataset -> checkpoint, data_dir, manual_dir
    and optionally config and overrides); relative paths are relative to the file."""
    try:
        with storage.open_file(path) as f:
            runs = json.load(f)
    except OSError as e:
        raise UserError(f"cannot read runs file {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"runs file {path} is not valid JSON: {e}") from None
    if not isinstance(runs, dict) or not runs:
        raise UserError(f"runs file {path} must hold a JSON object: model -> dataset -> paths")
    base = storage.parent(path)

    def place(value: str) -> str:
        if storage.is_remote(value):  # gs://... as given: normpath would fold its "//"
            return value
        if storage.is_remote(base):
            return storage.join(base, value)
        return os.path.normpath(os.path.join(base, os.path.expanduser(value)))

    pairs = []
    for model, datasets in runs.items():
        if model not in MODELS:
            raise UserError(f"runs file: unknown model {model!r}; valid: {', '.join(MODELS)}")
        if not isinstance(datasets, dict) or not datasets:
            raise UserError(f"runs file: {model} must map datasets to their paths")
        for dataset, entry in datasets.items():
            where = f"runs file: {model}/{dataset}"
            if not isinstance(entry, dict):
                raise UserError(f"{where} must be an object with checkpoint and data_dir")
            unknown = sorted(set(entry) - RUN_FIELDS)
            if unknown:
                raise UserError(
                    f"{where}: unknown fields {', '.join(unknown)}; valid: "
                    f"{', '.join(sorted(RUN_FIELDS))}"
                )
            for field in ("checkpoint", "data_dir"):
                if not isinstance(entry.get(field), str) or not entry[field]:
                    raise UserError(f"{where} needs {field} (a path)")
            for field in ("manual_dir", "config"):
                if entry.get(field) is not None and not isinstance(entry[field], str):
                    raise UserError(f"{where}: {field} must be a path")
            config = entry.get("config")
            if config is None:
                if dataset not in PAPER_DATASETS:
                    raise UserError(
                        f"{where}: a dataset other than {', '.join(PAPER_DATASETS)} needs "
                        "a config (a config file for that dataset)"
                    )
                config = os.path.join(REPO_CONFIGS, f"{model}_b_{dataset}.py")
            else:
                config = place(config)
            if not storage.is_file(config):
                raise UserError(f"{where}: no config file {config}")
            pairs.append(
                Pair(
                    model=model,
                    dataset=dataset,
                    checkpoint=place(entry["checkpoint"]),
                    data_dir=place(entry["data_dir"]),
                    manual_dir=place(entry["manual_dir"]) if entry.get("manual_dir") else None,
                    config=config,
                    overrides=_override_args(entry.get("overrides"), where),
                )
            )
    return pairs


def _override_args(overrides: Any, where: str) -> tuple[str, ...]:
    """``{"a.b": value}`` or ``["--config.a.b=value", ...]`` as override arguments."""
    if overrides is None:
        return ()
    if isinstance(overrides, dict):
        return tuple(f"--config.{k}={format_value(v)}" for k, v in overrides.items())
    if isinstance(overrides, list) and all(
        isinstance(a, str) and a.startswith("--config.") for a in overrides
    ):
        return tuple(overrides)
    raise UserError(
        f"{where}: overrides must be an object {{field: value}} or a list of --config.x=y"
    )


def format_value(value: Any) -> str:
    """A config override value as ml_collections parses it from a command line."""
    if isinstance(value, (list, tuple)):
        inner = ", ".join(format_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return str(value)


# ----------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class Run:
    """One eval or bench run: a pair, the kind and the settings it overrides."""

    pair: Pair
    kind: str  # accuracy | time
    merging: tuple[tuple[str, Any], ...]  # token_merging fields set by the family
    frames: int | None = None  # evaluated frame count, where the family changes it
    confusion: bool = False
    checkpoint_frames: int = 0  # the checkpoint's own frame count
    views: tuple[int, bool] = (1, False)  # temporal clips, three spatial crops

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.merging)

    def overrides(self) -> list[str]:
        args = [f"--config.token_merging.{k}={format_value(v)}" for k, v in self.merging]
        # The checkpoint's own frame count unless the family changes it: a config written for
        # another count must not change the token count the r values were derived from.
        args.append(f"--config.dataset_configs.num_frames={self.frames or self.checkpoint_frames}")
        if self.confusion:
            args.append("--config.eval.confusion_matrix=True")
        if self.views != (1, False):
            clips, three = self.views
            args.append(f"--config.dataset_configs.num_test_clips={clips}")
            args.append(f"--config.dataset_configs.do_three_spatial_crops={three}")
        return args

    def slug(self) -> str:
        s = self.settings
        parts = [self.kind, s["mode"], f"r{s['r']}"]
        if s.get("schedule"):
            parts.append(f"s{s['schedule']:+g}")
        if s.get("head_aggregation") == "concat":
            parts.append("concat")
        if s.get("duplicate"):
            parts.append("dup{}x{}".format(*s["duplicate"]))
        if s.get("threshold") is not None:
            parts.append(f"t{s['threshold']:g}")
        if self.frames is not None:
            parts.append(f"f{self.frames}")
        if self.confusion:
            parts.append("cm")
        if self.views != (1, False):
            parts.append(f"v{self.views[0]}x{3 if self.views[1] else 1}")
        return "-".join(parts)


@dataclasses.dataclass
class Row:
    """One row of a family's table: a model, an r and a reduction, over datasets."""

    model: str
    r: int
    reduction: str
    runs: dict[str, Run]  # dataset -> run


def merging_fields(
    variant: Mapping[str, Any], model: str, record: ModelRecord, r: int
) -> tuple[tuple[str, Any], ...] | None:
    """The token_merging fields a run sets: the family's variant resolved for the model
    (None: the variant does not apply to the model)."""
    fields: dict[str, Any] = {
        "mode": "merge",
        "r": r,
        "schedule": 0,
        "head_aggregation": "mean",
        # The paper runs VideoMAE without proportional attention in every family.
        "prop_attn": model != "videomae",
    }
    for key, value in variant.items():
        if key == "threshold" and value == "paper":
            if model not in HYBRID_THRESHOLD:
                return None  # the paper ran hybrid only where it chose a threshold
            value = HYBRID_THRESHOLD[model]
        if key == "duplicate":
            layers = num_layers(record)
            value = (0 if value == "first" else layers - 1, layers)
        fields[key] = value
    if r == 0:
        fields = {**fields, "mode": "none", "r": 0}
        fields.pop("threshold", None)
        fields.pop("duplicate", None)
    if isinstance(fields["schedule"], (int, float)):
        fields["schedule"] = float(fields["schedule"])
    return tuple(fields.items())


def family_rows(
    family: Family,
    pairs: Sequence[Pair],
    records: Mapping[tuple[str, str], ModelRecord],
    curve_steps: int = CURVE_STEPS,
) -> list[Row]:
    """The rows of a family over the pairs it covers: an r=0 reference row, then each r of
    each variant; a row gathers one run per dataset."""
    rows: dict[tuple, Row] = {}
    for pair in pairs:
        if not covers(family, pair.model, pair.dataset):
            continue
        record = records[(pair.model, pair.dataset)]
        frames = None
        if pair.model in family.frames:
            factor = family.frames[pair.model]
            frames = int(record.num_frames * factor)
            if frames < 1 or frames != record.num_frames * factor:
                raise UserError(
                    f"{family.name}: {pair.model}/{pair.dataset} has "
                    f"{record.num_frames} frames; x{factor} is not a frame count"
                )
        r_max = first_step_max_r(record, frames)
        entries = [({}, 0)] + [
            (variant, r)
            for variant in family.settings
            for r in r_values(family.r, pair.model, r_max, curve_steps)
        ]
        for views in family.views:
            for variant, r in entries:
                merging = merging_fields(variant, pair.model, record, r)
                if merging is None:
                    continue
                run = Run(
                    pair,
                    family.kind,
                    merging,
                    frames,
                    family.confusion,
                    record.num_frames,
                    views,
                )
                label = reduction_label(run.settings, frames, views)
                key = (pair.model, r, label)
                rows.setdefault(key, Row(pair.model, r, label, {})).runs[pair.dataset] = run
    order = {m: i for i, m in enumerate(MODELS)}
    return sorted(rows.values(), key=lambda row: (order[row.model], row.r > 0, row.r))


def reduction_label(
    settings: Mapping[str, Any],
    frames: int | None = None,
    views: tuple[int, bool] = (1, False),
) -> str:
    """How the paper's table names a reduction, with the family's qualifiers."""
    extra = []
    if settings.get("schedule", 0) < 0:
        extra.append("decreasing")
    elif settings.get("schedule", 0) > 0:
        extra.append("increasing")
    if settings.get("head_aggregation") == "concat":
        extra.append("concat heads")
    if settings.get("duplicate"):
        extra.append("layer {} x{}".format(*settings["duplicate"]))
    if settings.get("threshold") is not None and settings["mode"] == "hybrid":
        extra.append(f"threshold {settings['threshold']:g}")
    if frames is not None:
        extra.append(f"{frames} frames")
    if views != (1, False):
        extra.append(f"{views[0]} x {3 if views[1] else 1} views")
    if settings["mode"] == "none":
        return "- (baseline" + "".join(f", {e}" for e in extra) + ")"
    label = settings["mode"].replace("_", " ")
    return label + (f" ({', '.join(extra)})" if extra else "")


# ------------------------------------------------------------------------------ run


class Runner:
    """Runs each run once, into its own results file, and reads the results back."""

    def __init__(
        self,
        workdir: str,
        user_overrides: Sequence[str],
        *,
        say: Callable[[str], None] = print,
        progress: bool = True,
    ):
        self.workdir = storage.absolute(workdir)
        self.user_overrides = list(user_overrides)
        self.say = say
        self.progress = progress
        self.sources: dict = {}  # opened dataset splits, shared by the runs on them
        self.params: dict = {}  # random weights per model, shared by its time runs
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def config_args(self, pair: Pair, extra: Sequence[str] = ()) -> list[str]:
        """Base file, the paper's speed protocol, your overrides, the pair's, then the run's."""
        args = [f"--config={pair.config}"]
        args += [f"--config.{k}={v}" for k, v in TIME_DEFAULTS.items()]
        args += self.user_overrides + list(pair.overrides) + list(extra)
        args += [f"--config.checkpoint={pair.checkpoint}"]
        args += [f"--config.dataset_configs.data_dir={pair.data_dir}"]
        if pair.manual_dir:
            args += [f"--config.dataset_configs.manual_dir={pair.manual_dir}"]
        return args

    def load_config(self, pair: Pair, extra: Sequence[str] = ()):
        from vtm_jax.config.loading import load_config

        try:
            return load_config(self.config_args(pair, extra))
        except UserError as e:
            raise UserError(f"{pair.model}/{pair.dataset}: {e}") from None

    def record(self, pair: Pair) -> ModelRecord:
        """The pair's checkpoint record (a bare Scenic checkpoint: from its Scenic config)."""
        from vtm_jax.checkpoints.store import load_record
        from vtm_jax.config.scenic_checkpoint import checkpoint_record

        config = self.load_config(pair)
        try:
            return load_record(pair.checkpoint, scenic_record=checkpoint_record(config))
        except UserError as e:
            raise UserError(f"runs file: {pair.model}/{pair.dataset}: {e}") from None

    def path(self, run: Run) -> tuple[str, Any]:
        """The run's results file (its settings and a hash of its whole config) and config."""
        config = self.load_config(run.pair, run.overrides())
        # Only what the run reads: new timing settings do not redo the accuracy runs.
        unread = ("bench",) if run.kind == "accuracy" else ("eval", "results_path")
        identity = {k: v for k, v in config.to_dict().items() if k not in unread}
        blob = json.dumps(identity, sort_keys=True, default=str)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
        folder = storage.join(self.workdir, "runs", run.pair.model, run.pair.dataset)
        return storage.join(folder, f"{run.slug()}-{digest}.json"), config

    def execute(self, run: Run, index: int, total: int) -> str:
        """Run ``run`` unless its results file is complete; returns that file."""
        path, config = self.path(run)
        name = f"[{index}/{total}] {run.pair.model} {run.pair.dataset} {run.slug()}"
        if _complete(path):
            self.say(f"{name}: done before, skipped")
            self.skipped.append(path)
            return path
        storage.makedirs(storage.parent(path))
        try:
            self._execute(run, config, path, name)
        except UserError as e:
            raise UserError(f"{run.pair.model}/{run.pair.dataset} {run.slug()}: {e}") from None
        self.ran.append(path)
        return path

    def _execute(self, run: Run, config, path: str, name: str) -> None:
        """Evaluate (eval resumes a half-written file itself) or time ``run`` into ``path``."""
        if run.kind == "accuracy":
            from vtm_jax.jobs.evaluation.from_config import eval_config

            config.results_path = path
            results = eval_config(
                config, sources=self.sources, progress=self.progress, report=False
            )
            shown = ", ".join(f"{k} {100 * v:.2f}" for k, v in results["metrics"].items())
            self.say(f"{name}: {shown}")
        else:
            result = self._time(run, config)
            _write_json(path, {"format": TIME_FORMAT, "complete": True, **result})
            self.say(f"{name}: {result['result']['frames_per_s']:.4g} frames/s")

    def _time(self, run: Run, config) -> dict[str, Any]:
        """Bench's timing of the checkpoint's architecture (random weights, as vtm-jax bench)."""
        from vtm_jax.checkpoints.store import load_record
        from vtm_jax.config.scenic_checkpoint import checkpoint_record
        from vtm_jax.jobs.bench import bench_settings, random_params, run_info
        from vtm_jax.merging import MergingSettings

        record = load_record(run.pair.checkpoint, scenic_record=checkpoint_record(config))
        bench = config.get("bench", {})
        batch = int(bench.get("batch_size", 1))
        attention = bench.get("attention", "auto")
        merging = MergingSettings.from_dict(config.token_merging)
        key = json.dumps([record.to_json(), attention], sort_keys=True, default=str)
        if key not in self.params:  # one initialisation per model, not per timed setting
            self.params[key] = random_params(record, attention)
        (result,) = bench_settings(
            record,
            [merging],
            batch_size=batch,
            warmup=int(bench.get("warmup", 1)),
            iterations=int(bench.get("iterations", 3)),
            attention=attention,
            params=self.params[key],
            progress=lambda _: None,
        )
        return {"config": config.to_dict(), "run": run_info(batch), "result": result}


def _complete(path: str) -> bool:
    try:
        with storage.open_file(path) as f:
            return bool(json.load(f).get("complete"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def _read(path: str) -> dict[str, Any]:
    with storage.open_file(path) as f:
        return json.load(f)


def _write_json(path: str, data: Any) -> None:
    from vtm_jax.outputs import write_json

    write_json(path, data, default=str)  # atomic; no temporary file left behind


# ---------------------------------------------------------------------------- tables


def accuracy_cells(dataset: str, results: dict[str, Any]) -> dict[str, float]:
    """A run's columns: top-1, or action / verb / noun top-1 for verb and noun heads."""
    metrics = results["metrics"]
    label = DATASET_LABELS.get(dataset, dataset)
    if "action_top1" in metrics:
        return {
            f"{label} Action": metrics["action_top1"],
            f"{label} Verb": metrics["verb_top1"],
            f"{label} Noun": metrics["noun_top1"],
        }
    return {label: metrics["top1"]}


def column_order(columns: Sequence[str]) -> list[str]:
    """Paper datasets first, in the paper's order, then the others as they came."""
    paper = [DATASET_LABELS[d] for d in PAPER_DATASETS]

    def key(column: str) -> tuple[int, int]:
        for i, label in enumerate(paper):
            if column == label or column.startswith(label + " "):
                return (i, columns.index(column))
        return (len(paper), columns.index(column))

    return sorted(dict.fromkeys(columns), key=key)


def family_table(
    family: Family, rows: Sequence[Row], paths: Mapping[Run, str], workdir: str
) -> dict[str, Any]:
    """A family's table as data: one entry per row, cells by column."""
    out_rows = []
    columns: list[str] = []
    baselines: dict[tuple[str, str], float] = {}
    for row in rows:  # r=0 rows come first per model: the speed references
        cells: dict[str, float | None] = {}
        entry: dict[str, Any] = {
            "model": row.model,
            "r": row.r,
            "reduction": row.reduction,
            "token_merging": None,
            "runs": {},
        }
        for dataset, run in row.runs.items():
            path = paths[run]
            results = _read(path)
            entry["token_merging"] = run.settings
            entry["frames"] = run.frames
            entry["runs"][dataset] = os.path.relpath(path, workdir)
            if family.kind == "accuracy":
                cells.update(accuracy_cells(dataset, results))
                if results["run"].get("frames"):
                    entry["frames_changed"] = results["run"]["frames"]
                if family.confusion and "confusion_matrix" in results:
                    entry.setdefault("confusion_matrix", {})[dataset] = results["confusion_matrix"]
            else:
                label = DATASET_LABELS.get(dataset, dataset)
                fps = results["result"]["frames_per_s"]
                if row.r == 0:
                    baselines[(row.model, dataset)] = fps
                base = baselines.get((row.model, dataset))
                cells[f"{label} FPS"] = fps
                cells[f"{label} Speedup"] = fps / base if base else None
        columns += list(cells)
        entry["cells"] = cells
        out_rows.append(entry)
    return {
        "family": family.name,
        "paper": family.paper,
        "title": family.title,
        "kind": family.kind,
        "columns": column_order(columns),
        "rows": out_rows,
    }


def format_markdown(table: dict[str, Any]) -> str:
    """The paper's layout: Model | r | Reduction | one column per dataset metric."""
    columns = table["columns"]
    where = f"family {table['paper']}" if table["paper"].isdigit() else table["paper"]
    lines = [
        f"{table['title']} ({where}, {table['kind']})",
        "",
        "| Model | r | Reduction | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for row in table["rows"]:
        cells = [_cell(column, row["cells"].get(column)) for column in columns]
        lines.append(
            f"| {MODEL_LABELS.get(row['model'], row['model'])} | {row['r']} | "
            f"{row['reduction']} | " + " | ".join(cells) + " |"
        )
    notes = []
    if "accuracy" in table["kind"]:
        notes.append("Top-1 accuracy (%); EK-100 action = verb and noun both right.")
    if "time" in table["kind"]:
        notes.append("FPS = input frames per second; speedup against r=0 of the same model.")
    for frames in dict.fromkeys(
        json.dumps(row["frames_changed"], sort_keys=True)
        for row in table["rows"]
        if row.get("frames_changed")
    ):
        f = json.loads(frames)
        notes.append(
            f"Evaluated on {f['evaluated']} frames with a {f['checkpoint']}-frame checkpoint; "
            f"position embeddings: {f['position_embeddings']}."
        )
    if any(row.get("confusion_matrix") for row in table["rows"]):
        notes.append(f"Confusion matrices (rows: true class) per row in {table['family']}.json.")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _cell(column: str, value: float | None) -> str:
    if value is None:
        return "-"
    if column.endswith("FPS"):
        return f"{value:.2f}"
    if column.endswith("Speedup"):
        return f"{value:.2f}"
    return f"{100 * value:.2f}"


def plot_family(table: dict[str, Any], path: str) -> None:
    """The family's metric against r: one line per model, dataset column and variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = table["kind"] == "time"
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for row in table["rows"]:
        for column, value in row["cells"].items():
            if value is None:
                continue
            wanted = column.endswith("Speedup") if timed else not column.endswith(("Verb", "Noun"))
            if wanted:
                series.setdefault((row["model"], column), []).append((row["r"], value))
    for (model, column), points in series.items():
        points.sort()
        scale = 1 if timed else 100
        ax.plot(
            [p[0] for p in points],
            [scale * p[1] for p in points],
            marker="o",
            label=f"{MODEL_LABELS.get(model, model)}, {column}",
        )
    ax.set_xlabel("r (tokens removed per layer)")
    ax.set_ylabel("speedup over r=0" if timed else "top-1 accuracy (%)")
    ax.set_title(f"{table['title']} (family {table['paper']})", fontsize=9)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    fig.tight_layout()
    with storage.open_file(path, "wb") as f:  # local or remote (gs://)
        fig.savefig(f, format="png")
    plt.close(fig)


def headline_rows(
    pairs: Sequence[Pair], records: Mapping[tuple[str, str], ModelRecord]
) -> tuple[list[Row], list[Row]]:
    """Accuracy and time rows of the headline table: r=0 and every mode at the paper's r
    (hybrid where the paper has a threshold for the model, and never timed, as in the paper)."""
    variants = tuple(
        {"mode": mode, **({"threshold": "paper"} if mode == "hybrid" else {})}
        for mode in TABLE_MODES
    )
    accuracy = Family("table", "§8", "Headline", "accuracy", EVERY_MODEL, ("paper",), variants)
    time = dataclasses.replace(accuracy, kind="time", settings=variants[:-1])
    return family_rows(accuracy, pairs, records), family_rows(time, pairs, records)


def headline_table(
    accuracy: Sequence[Row], time: Sequence[Row], paths: Mapping[Run, str], workdir: str
) -> dict[str, Any]:
    """docs/method.md §8's layout: accuracy per dataset, then FPS and speedup (K400's timing where
    there is one, else the first dataset's)."""
    family = Family("table", "docs/method.md §8", "Headline table", "accuracy", {}, ())
    table = family_table(family, accuracy, paths, workdir)
    timed = family_table(dataclasses.replace(family, kind="time"), time, paths, workdir)
    speed: dict[tuple[str, str], tuple[float, float | None, str]] = {}
    for row in timed["rows"]:
        for dataset in [*PAPER_DATASETS, *row["runs"]]:
            label = DATASET_LABELS.get(dataset, dataset)
            if f"{label} FPS" in row["cells"]:
                speed[(row["model"], row["reduction"])] = (
                    row["cells"][f"{label} FPS"],
                    row["cells"][f"{label} Speedup"],
                    dataset,
                )
                break
    for row in table["rows"]:
        fps, speedup, dataset = speed.get((row["model"], row["reduction"]), (None, None, None))
        row["cells"]["FPS"], row["cells"]["Speedup"] = fps, speedup
        row["timed_on"] = dataset
        row["runs"].update(
            {
                f"time/{k}": v
                for t in timed["rows"]
                if (t["model"], t["reduction"]) == (row["model"], row["reduction"])
                for k, v in t["runs"].items()
            }
        )
    table["columns"] = [*table["columns"], "FPS", "Speedup"]
    table["kind"] = "accuracy and time"
    table["title"] = "Every reduction at the paper's r"
    return table


# ----------------------------------------------------------------------------- main


def run_sweep(
    runs_file: str,
    workdir: str,
    families: Sequence[str],
    *,
    overrides: Sequence[str] = (),
    curve_steps: int = CURVE_STEPS,
    say: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the named families over the runs file's pairs; write their tables into ``workdir``.

    Returns ``{"families": {name: table}, "ran": [...], "skipped": [...]}``.
    """
    if curve_steps < 1:
        raise UserError(f"--curve-steps must be at least 1, not {curve_steps}")
    chosen, want_table = get_families(families)
    pairs = read_runs(runs_file)
    runner = Runner(workdir, overrides, say=say, progress=progress)
    records = {(p.model, p.dataset): runner.record(p) for p in pairs}
    planned: dict[str, list[Row]] = {}
    for family in chosen:
        planned[family.name] = family_rows(family, pairs, records, curve_steps)
    headline = headline_rows(pairs, records) if want_table else None
    # Every distinct run once, grouped by pair so each dataset is opened once.
    runs: dict[Run, None] = {}
    all_rows = [row for rows in planned.values() for row in rows]
    if headline:
        all_rows += headline[0] + headline[1]
    for row in all_rows:
        for run in row.runs.values():
            runs.setdefault(run)
    order = {(p.model, p.dataset): i for i, p in enumerate(pairs)}
    todo = sorted(runs, key=lambda r: (order[(r.pair.model, r.pair.dataset)], r.kind))
    storage.makedirs(workdir)
    say(f"{len(chosen)} famil{'y' if len(chosen) == 1 else 'ies'}, {len(todo)} runs in {workdir}")
    paths = {run: runner.execute(run, i, len(todo)) for i, run in enumerate(todo, 1)}

    written = {}
    for family in chosen:
        if not planned[family.name]:
            say(f"{family.name}: the runs file has no pair this family covers")
        table = family_table(family, planned[family.name], paths, runner.workdir)
        written[family.name] = table
        _write_table(table, storage.join(workdir, family.name), plot=family.plot)
    if headline:
        table = headline_table(headline[0], headline[1], paths, runner.workdir)
        written["table"] = table
        _write_table(table, storage.join(workdir, "table"), plot=False)
        say("\n" + format_markdown(table))
    say(
        f"wrote {len(written)} table(s) to {workdir}: {', '.join(written)} "
        f"({len(runner.ran)} runs run, {len(runner.skipped)} done before)"
    )
    return {"families": written, "ran": runner.ran, "skipped": runner.skipped}


def _write_table(table: dict[str, Any], stem: str, *, plot: bool) -> None:
    _write_json(stem + ".json", table)
    with storage.open_file(stem + ".md", "w") as f:
        f.write(format_markdown(table))
    if plot:
        plot_family(table, stem + ".png")
