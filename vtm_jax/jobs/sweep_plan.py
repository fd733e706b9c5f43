"""A sweep's plan: the runs file's (model, dataset) pairs, and each family's rows of runs.

A :class:`Run` is one eval or bench run: a pair, its kind and the config values it sets; a run
shared by several families (such as r=0) is the same run. A :class:`Row` gathers one run per
dataset, as a row of the paper's tables.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from vtm_jax import paths as storage
from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.config.paper import HYBRID_THRESHOLD, MODELS
from vtm_jax.config.shipped import shipped_configs
from vtm_jax.errors import UserError
from vtm_jax.jobs.sweep_families import (
    CURVE_STEPS,
    PAPER_DATASETS,
    Family,
    covers,
    first_step_max_r,
    num_layers,
    r_values,
)
from vtm_jax.merging.settings import refuse_data_path

RUN_FIELDS = {"checkpoint", "data_dir", "manual_dir", "config", "overrides"}


# ------------------------------------------------------------------------- runs file


@dataclasses.dataclass(frozen=True)
class Pair:
    """One (model, dataset) of the runs file, with its paths and base config."""

    model: str
    dataset: str
    checkpoint: str
    data_dir: str
    manual_dir: str | None
    config: str  # a shipped config's name or a file
    arguments: tuple[str, ...] = ()  # the runs file's overrides as --config.x=y
    values: tuple[tuple[str, Any], ...] = ()  # ... or as {field: value}


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
            # Both become folders under the workdir: a plain name never leads outside it.
            storage.plain_name(dataset, f"runs file {path}: dataset of {model}")
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
                config = shipped_configs()[f"{model}_b_{dataset}"]  # the paper's, by name
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
                    **_overrides(entry.get("overrides"), f"runs file {path}: {model}/{dataset}"),
                )
            )
    return pairs


DEMO_RUNS = "demo"


def demo_pairs(workdir: str) -> list[Pair]:
    """``--runs demo``: the shipped demo checkpoint on the synthetic dataset, built on first
    use under ``workdir/data`` (the demo's own config, nothing to download)."""
    from vtm_jax.jobs.demo import shipped_checkpoint

    return [
        Pair(
            model="vivit",
            dataset="synthetic",
            checkpoint=shipped_checkpoint(),
            data_dir=storage.join(workdir, "data"),
            manual_dir=None,
            config=shipped_configs()["vivit_demo"],
        )
    ]


def _overrides(overrides: Any, where: str) -> dict[str, tuple]:
    """``{"a.b": value}`` (config values) or ``["--config.a.b=value", ...]`` (arguments)."""
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        for key, value in overrides.items():
            _check_code_names(str(key), value, where)
        # Hashable, as runs are; a JSON list sets a tuple, as (a, b) does on a command line.
        return {"values": tuple((k, _frozen(v)) for k, v in overrides.items())}
    if isinstance(overrides, list) and all(
        isinstance(a, str) and a.startswith("--config.") for a in overrides
    ):
        for argument in overrides:
            key, _, value = argument[len("--config.") :].partition("=")
            _check_code_names(key, value, where)
        return {"arguments": tuple(overrides)}
    raise UserError(
        f"{where}: overrides must be an object {{field: value}} or a list of --config.x=y"
    )


# Config fields naming code (a module:attribute path imports it), and the blocks holding them.
CODE_FIELDS = {"mode", "modes", "r_schedule", "dataset_name"}
CODE_BLOCKS = {"token_merging", "bench", "training"}


def _check_code_names(key: str, value: Any, where: str) -> None:
    """Refuse an override setting a mode, schedule or dataset to a ``module:attribute`` path:
    a runs file is data, and may name registered ones only (configs and command lines may)."""
    name = key.rsplit(".", 1)[-1]
    if isinstance(value, Mapping):
        for inner, item in value.items():
            _check_code_names(f"{key}.{inner}", item, where)
    elif name in CODE_FIELDS | CODE_BLOCKS:
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, str) and ":" in item:
                refuse_data_path(f"{where}: overrides", key, item)


def _frozen(value: Any) -> Any:
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


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

    def values(self) -> dict[str, Any]:
        """The config values the run sets (``{"token_merging.r": 8, ...}``)."""
        values = {f"token_merging.{k}": v for k, v in self.merging}
        # The checkpoint's own frame count unless the family changes it: a config written for
        # another count must not change the token count the r values were derived from.
        values["dataset_configs.num_frames"] = self.frames or self.checkpoint_frames
        if self.confusion:
            values["eval.confusion_matrix"] = True
        if self.views != (1, False):
            clips, three = self.views
            values["dataset_configs.num_test_clips"] = clips
            values["dataset_configs.do_three_spatial_crops"] = three
        return values

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
