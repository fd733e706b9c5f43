"""A sweep's tables in the paper's layout (JSON, Markdown) and its accuracy-against-r plots."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from vtm_jax import paths as storage
from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.jobs.sweep_families import (
    DATASET_LABELS,
    EVERY_MODEL,
    MODEL_LABELS,
    PAPER_DATASETS,
    TABLE_MODES,
    Family,
)
from vtm_jax.jobs.sweep_plan import Pair, Row, Run, family_rows


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
            results = read_json(path)
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
    from vtm_jax.outputs import atomic_file

    with atomic_file(path, "wb") as f:  # local or remote (gs://); never half a picture
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


def read_json(path: str) -> dict[str, Any]:
    with storage.open_file(path) as f:
        return json.load(f)
