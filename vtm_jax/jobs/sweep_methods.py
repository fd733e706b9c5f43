"""The ``methods`` sweep family: the field's token-reduction methods at matched compute.

Beyond the paper: each mode of :mod:`vtm_jax.merging.methods`, with the paper's ``merge`` as
the reference, on every (model, dataset) pair of the runs file. For each budget (the r rules
in :data:`BUDGETS`), ``merge`` at that r sets the target multiply-adds per clip; every other
mode gets the r whose analytic MAC count (the backbone's ``analytic_macs``, which follows the
mode's own token count and the place where it reduces) comes closest, and the table says how
close (within :data:`MATCH_TOLERANCE` counts as matched). Each row is one accuracy run and one
time run; the table gives accuracy, GMACs, clips/s and the speedup over r=0, and the plot
accuracy against GFLOPs per clip, one curve per method.

``rlt`` removes a number of tokens that follows the video, not r: its analytic count is the
unreduced one (padding keeps the static shape), so it runs once, at its own threshold, and
the table marks it unmatched; its speed is what the timing shows.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.config.paper import MODELS
from vtm_jax.jobs.sweep_families import (
    DATASET_LABELS,
    METHODS_FAMILY,
    MODEL_LABELS,
    covers,
    first_step_max_r,
    r_values,
)
from vtm_jax.jobs.sweep_plan import Pair, Run, merging_fields

BUDGETS = METHODS_FAMILY.r
REFERENCE_MODE = "merge"
MATCH_TOLERANCE = 0.02
# The peer methods, in the order of docs/methods.md; those not registered are left out.
PEER_MODES = ("vid_tldr", "sta", "rlt", "pitome", "tofu", "mctf")
UNMATCHED_MODES = ("rlt",)  # their token count follows the video, not r
# Settings each method's published numbers use, where they differ from the paper's defaults:
# PiToMe's blocks call attention without sizes (no proportional attention).
AUTHORS_SETTINGS = {"pitome": {"prop_attn": False}}


@dataclasses.dataclass
class MethodRow:
    """One method at one budget on one model: its accuracy and time runs per dataset."""

    model: str
    r: int
    reduction: str
    budget: str
    macs: int
    target_macs: int
    runs: dict[str, Run]  # dataset -> accuracy run, "dataset time" -> time run


def method_modes() -> list[str]:
    """``merge`` and the registered peer modes."""
    from vtm_jax.merging import RULES

    return [REFERENCE_MODE] + [m for m in PEER_MODES if m in RULES]


def method_variant(mode: str, record: ModelRecord) -> dict[str, Any]:
    """The token_merging fields a mode runs with here: its name, the settings of its authors'
    numbers and, for rlt, buckets of one tubelet's patches (so padding saves compute)."""
    variant = {"mode": mode, **AUTHORS_SETTINGS.get(mode, {})}
    if mode == "rlt":
        _, h, w = record.model["patch_size"]
        variant["bucket"] = (record.image_size // h) * (record.image_size // w)
    return variant


def total_macs(record: ModelRecord, fields: Mapping[str, Any], frames: int) -> int:
    """The analytic multiply-adds per clip of ``record``'s model under ``fields``."""
    from vtm_jax.merging import MergingSettings
    from vtm_jax.models.registry import build_model

    model = build_model(record, MergingSettings.from_dict(dict(fields)))
    return int(model.analytic_macs(frames, record.image_size)["total"])


def runs_on(record: ModelRecord, mode: str) -> bool:
    """Whether the model's backbone can run ``mode`` (a peer method may need another layout)."""
    from vtm_jax.errors import UserError
    from vtm_jax.merging import MergingSettings
    from vtm_jax.models.registry import check_settings_apply

    try:
        check_settings_apply(record.architecture, MergingSettings(mode=mode))
    except UserError:
        return False
    return True


def matched_r(
    record: ModelRecord, base: Mapping[str, Any], target: int, frames: int, r_max: int
) -> tuple[int, int]:
    """The r (with the MACs it costs) whose MACs come closest to ``target`` for ``base``'s
    mode: a bisection for the smallest r costing at most ``target`` (MACs fall as r grows),
    then the nearer of it and the r before."""

    def cost(r: int) -> int:
        return total_macs(record, {**base, "r": r}, frames)

    low, high = 1, max(1, 4 * r_max)
    if cost(high) > target:
        return high, cost(high)
    while low < high:
        mid = (low + high) // 2
        if cost(mid) <= target:
            high = mid
        else:
            low = mid + 1
    candidates = [(abs(cost(r) - target), r) for r in {low, max(1, low - 1)}]
    r = min(candidates)[1]
    return r, cost(r)


def method_rows(
    pairs: Sequence[Pair], records: Mapping[tuple[str, str], ModelRecord]
) -> list[MethodRow]:
    """The family's rows over the pairs it covers: r=0, then each mode at each budget."""
    rows: dict[tuple, MethodRow] = {}
    for pair in pairs:
        if not covers(METHODS_FAMILY, pair.model, pair.dataset):
            continue
        record = records[(pair.model, pair.dataset)]
        frames = record.num_frames
        r_max = first_step_max_r(record)
        entries = [("r=0", "none", 0, None)]
        for budget in BUDGETS:
            (r_ref,) = r_values([budget], pair.model, r_max)
            base = dict(merging_fields({}, pair.model, record, r_ref))
            target = total_macs(record, base, frames)
            for mode in method_modes():
                if not runs_on(record, mode):
                    continue
                if mode in UNMATCHED_MODES:
                    entries.append(("own", mode, 0, None))
                    continue
                fields = dict(
                    merging_fields(method_variant(mode, record), pair.model, record, r_ref)
                )
                r = (
                    r_ref
                    if mode == REFERENCE_MODE
                    else matched_r(record, fields, target, frames, r_max)[0]
                )
                entries.append((budget, mode, r, target))
        for budget, mode, r, target in dict.fromkeys(entries):
            variant = method_variant(mode, record)
            fields = merging_fields(variant, pair.model, record, r)
            if r == 0 and mode != "none":  # a mode that takes no r keeps its name at r=0
                fields = tuple({**dict(fields), **variant, "r": 0}.items())
            macs = total_macs(record, dict(fields), frames)
            key = (pair.model, budget, mode)
            row = rows.setdefault(
                key,
                MethodRow(pair.model, r, mode, budget, macs, target or macs, {}),
            )
            for kind, name in (("accuracy", pair.dataset), ("time", f"{pair.dataset} time")):
                row.runs[name] = Run(pair, kind, fields, None, False, record.num_frames)
    order = {m: i for i, m in enumerate(MODELS)}
    budgets = {b: i for i, b in enumerate(("r=0", *BUDGETS, "own"))}
    modes = {m: i for i, m in enumerate(("none", REFERENCE_MODE, *PEER_MODES))}
    return sorted(
        rows.values(),
        key=lambda row: (order[row.model], budgets[row.budget], modes.get(row.reduction, 99)),
    )


def methods_table(
    rows: Sequence[MethodRow], paths: Mapping[Run, str], workdir: str
) -> dict[str, Any]:
    """The family's table as data: per row its budget, MACs, accuracy, clips/s, speedup."""
    from vtm_jax.jobs.sweep_tables import accuracy_cells, read_json

    out_rows = []
    baselines: dict[tuple[str, str], float] = {}
    for row in rows:
        cells: dict[str, float | None] = {}
        runs = {}
        for name, run in row.runs.items():
            results = read_json(paths[run])
            runs[name] = os.path.relpath(paths[run], workdir)
            if run.kind == "accuracy":
                cells.update(accuracy_cells(run.pair.dataset, results))
                continue
            label = DATASET_LABELS.get(run.pair.dataset, run.pair.dataset)
            clips = results["result"]["frames_per_s"] / run.checkpoint_frames
            if row.budget == "r=0":
                baselines[(row.model, label)] = clips
            base = baselines.get((row.model, label))
            cells[f"{label} clips/s"] = clips
            cells[f"{label} Speedup"] = clips / base if base else None
        out_rows.append(
            {
                "model": row.model,
                "budget": row.budget,
                "mode": row.reduction,
                "r": row.r,
                "gmacs": row.macs / 1e9,
                "macs_vs_target": row.macs / row.target_macs - 1,
                "matched": abs(row.macs / row.target_macs - 1) <= MATCH_TOLERANCE,
                "token_merging": next(iter(row.runs.values())).settings,
                "cells": cells,
                "runs": runs,
            }
        )
    columns = list(dict.fromkeys(c for row in out_rows for c in row["cells"]))
    return {
        "family": METHODS_FAMILY.name,
        "paper": METHODS_FAMILY.paper,
        "title": METHODS_FAMILY.title,
        "kind": METHODS_FAMILY.kind,
        "tolerance": MATCH_TOLERANCE,
        "columns": columns,
        "rows": out_rows,
    }


def format_methods(table: dict[str, Any]) -> str:
    """Model | Budget | Method | r | GMACs | vs merge | per dataset: accuracy, clips/s, speedup."""
    columns = table["columns"]
    lines = [
        table["title"],
        "",
        "| Model | Budget | Method | r | GMACs | MACs vs merge | " + " | ".join(columns) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(columns),
    ]
    for row in table["rows"]:
        gap = "-" if row["budget"] in ("r=0", "own") else f"{100 * row['macs_vs_target']:+.1f}%"
        cells = [_cell(c, row["cells"].get(c)) for c in columns]
        lines.append(
            f"| {MODEL_LABELS.get(row['model'], row['model'])} | {row['budget']} | "
            f"{row['mode']} | {row['r']} | {row['gmacs']:.3f} | {gap} | " + " | ".join(cells) + " |"
        )
    tolerance = 100 * table["tolerance"]
    lines += [
        "",
        f"Top-1 accuracy (%). Each method's r is the one whose analytic MACs per clip come "
        f"closest to merge's at the budget's r (matched within {tolerance:g}% where the gap "
        "says so); rlt's token count follows the video (budget 'own': its threshold). "
        "Speedup: clips/s against r=0 of the same model.",
    ]
    return "\n".join(lines) + "\n"


def _cell(column: str, value: float | None) -> str:
    if value is None:
        return "-"
    if column.endswith(("clips/s", "Speedup")):
        return f"{value:.2f}"
    return f"{100 * value:.2f}"


def plot_methods(table: dict[str, Any], path: str) -> None:
    """Accuracy against GFLOPs per clip (multiply-adds), one curve per model, dataset, method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    series: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    reference: dict[tuple[str, str], tuple[float, float]] = {}
    for row in table["rows"]:
        for column, value in row["cells"].items():
            if value is None or column.endswith(("clips/s", "Speedup", "Verb", "Noun")):
                continue
            point = (row["gmacs"], 100 * value)
            if row["budget"] == "r=0":
                reference[(row["model"], column)] = point
            else:
                series.setdefault((row["model"], column, row["mode"]), []).append(point)
    for (model, column, mode), points in series.items():
        points = sorted(points + [reference.get((model, column), points[-1])])
        label = f"{mode} ({MODEL_LABELS.get(model, model)}, {column})"
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("GFLOPs per clip (multiply-adds, as fvcore counts them)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(table["title"], fontsize=9)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=6)
    fig.tight_layout()
    from vtm_jax.outputs import atomic_file

    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
