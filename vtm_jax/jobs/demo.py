"""The paper's result in miniature, on the shipped demo checkpoint and the synthetic dataset.

``run_demo`` evaluates the checkpoint at r=0 and with every merging mode at one r, times each
setting with the benchmark's protocol, sweeps r for an accuracy-against-throughput plot, and
draws which tokens merged. Every figure it prints comes from this run.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from vtm_jax import paths
from vtm_jax.errors import UserError
from vtm_jax.merging import MergingSettings

DEMO_CHECKPOINT = "demo_vivit"
DEMO_FORMAT = "vtm-jax-demo"  # the "format" of demo.json; demo.md, .png and the clip go beside
# The keys of a demo.json written before it carried the format: still the demo's own.
DEMO_LEGACY_KEYS = ("checkpoint", "dataset", "table", "curve", "pictures")
DEMO_VIDEO = "demo_video.npy"


def shipped_checkpoint() -> str:
    """The demo checkpoint inside the package (``vtm_jax/assets/demo_vivit``)."""
    path = str(importlib.resources.files("vtm_jax") / "assets" / DEMO_CHECKPOINT)
    if not os.path.isdir(path):
        raise UserError(f"the shipped demo checkpoint is missing: {path}")
    return path


def demo_config(checkpoint: str) -> ml_collections.ConfigDict:
    """The config a checkpoint was trained with (its record keeps it)."""
    from vtm_jax.checkpoints.store import load_record

    trained = load_record(checkpoint).trained
    if not trained or "config" not in trained:
        raise UserError(f"{checkpoint} records no training config; give --config=FILE")
    return ml_collections.ConfigDict(trained["config"])


def demo_settings(config: ml_collections.ConfigDict) -> list[MergingSettings]:
    """r=0, then each of the demo's modes at the config's r (hybrid with its threshold)."""
    base = MergingSettings.from_dict(config.token_merging)
    demo = config.demo
    settings = [MergingSettings()]
    for mode in demo.modes:
        options = {"threshold": demo.hybrid_threshold} if mode == "hybrid" else {}
        settings.append(dataclasses.replace(base, mode=mode, rule_options=options))
    return settings


def curve_settings(config: ml_collections.ConfigDict) -> list[MergingSettings]:
    base = MergingSettings.from_dict(config.token_merging)
    return [
        dataclasses.replace(base, mode=mode, r=int(r), rule_options={})
        for mode in config.demo.curve_modes
        for r in config.demo.curve_r
    ]


def _picture_layers(config: ml_collections.ConfigDict) -> list[int]:
    return list(config.demo.get("visualize_layers", (2, 4, 6)))


def check_demo_outputs(
    config: ml_collections.ConfigDict,
    checkpoint: str,
    out_dir: str,
    *,
    what: str = "out_dir",
    overwrite: bool = False,
) -> list[str]:
    """Before any work: the demo's files replace only an earlier demo's (and pictures vtm-jax
    drew), unless ``overwrite`` (``vtm_jax.outputs.claim_outputs``); returns the pictures'
    paths."""
    from vtm_jax.checkpoints.store import checkpoint_inputs
    from vtm_jax.jobs.pictures import picture_owner
    from vtm_jax.jobs.visualize import picture_paths
    from vtm_jax.outputs import claim_outputs, results_targets

    stem, video = paths.join(out_dir, "demo"), paths.join(out_dir, DEMO_VIDEO)
    derived = [stem + ".md", stem + ".png", video]
    targets = results_targets(
        stem + ".json", derived, DEMO_FORMAT, "demo results", legacy=DEMO_LEGACY_KEYS
    )
    pictures = picture_paths(checkpoint, video, _picture_layers(config), out_dir)
    targets.update({picture: picture_owner for picture in pictures})
    claim_outputs(targets, what=what, overwrite=overwrite, inputs=checkpoint_inputs(checkpoint))
    return pictures


def run_demo(
    config: ml_collections.ConfigDict,
    *,
    checkpoint: str,
    out_dir: str,
    progress: bool = True,
    say=print,
    overwrite: bool = False,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Accuracy and speed of every setting, the table, the plot and the visualisation.

    Files in ``out_dir`` that are not an earlier demo's are refused before any work, unless
    ``overwrite`` (:func:`check_demo_outputs`). ``dtype``: see :func:`demo_dtype`."""
    import jax

    from vtm_jax.checkpoints.store import load_checkpoint
    from vtm_jax.data.datasets import open_split
    from vtm_jax.jobs.bench import bench_settings

    dtype = demo_dtype(config, dtype)  # before any work
    began = time.perf_counter()
    pictures = check_demo_outputs(config, checkpoint, out_dir, overwrite=overwrite)
    paths.makedirs(out_dir)
    data = config.dataset_configs
    say(f"synthetic test set in {data.data_dir} (built on first use)")
    source = open_split(
        config.dataset_name,
        data.get("split", "test"),
        data_dir=data.data_dir,
        config=(data.get("builder_options") or {}) or None,
    )
    params, record = load_checkpoint(checkpoint)
    main = demo_settings(config)
    curve = [s for s in curve_settings(config) if s not in main]
    everything = main + curve
    devices = jax.device_count()
    batch = max(1, int(data.get("test_batch_size", devices)) // devices)
    attention = config.demo.get("attention", "auto")

    accuracy = _accuracy(checkpoint, source, everything, batch, (attention, dtype), progress, say)
    say("timing every setting (random input, warm-up, then timed forward passes)")
    bench = config.get("bench", {})
    speed = bench_settings(
        record,
        everything,
        batch_size=int(bench.get("batch_size", 1)),
        warmup=int(bench.get("warmup", 1)),
        iterations=int(bench.get("iterations", 3)),
        attention=bench.get("attention", attention),
        params=params,
        progress=(lambda *_: None),
        dtype=dtype,
    )
    rows = _rows(everything, accuracy, speed)
    table_rows = rows[: len(main)]
    table = format_demo_table(table_rows, record.architecture)
    say("\n" + table)
    stem = paths.join(out_dir, "demo")
    summary = {
        "checkpoint": paths.absolute(checkpoint),
        "dataset": f"{config.dataset_name}/{source.split}",
        "test_examples": len(source),
        "table": table_rows,
        "curve": rows[len(main) :],
        "devices": devices,
        "device_kind": jax.devices()[0].device_kind,
        "dtype": dtype,
        "seconds": round(time.perf_counter() - began, 1),
        "pictures": pictures,
    }
    # demo.json first: the files beside it are the demo's because it is (a rerun after an
    # interruption recognises them).
    _write_summary(stem, summary, table)
    plot_accuracy_speed(rows, stem + ".png", title=f"{record.architecture} on synthetic")
    _visualise(checkpoint, source, config, out_dir)
    summary["seconds"] = round(time.perf_counter() - began, 1)
    _write_summary(stem, summary, table)
    say(f"\nwritten: {stem}.json, {stem}.md, {stem}.png and {len(pictures)} pictures in {out_dir}")
    return summary


def demo_dtype(config: ml_collections.ConfigDict, dtype: str | None = None) -> str:
    """What the demo's model computes in, for accuracy and speed alike: ``dtype`` (``--dtype``),
    else the config's ``demo.dtype``, else float32; a UserError for an unknown name."""
    from vtm_jax.models.layers import dtype_name

    return dtype_name(dtype or config.demo.get("dtype", "float32"))


def _accuracy(
    checkpoint: str,
    source: Any,
    settings: Sequence[MergingSettings],
    batch: int,
    compute: tuple[str, str],
    progress: bool,
    say,
) -> list[float]:
    """Top-1 of every setting, evaluated in turn; ``compute``: the attention backend and the
    model's dtype."""
    from vtm_jax.jobs.evaluation.evaluate import evaluate

    accuracy = []
    for i, merging in enumerate(settings, 1):
        say(f"[{i}/{len(settings)}] accuracy, {_describe(merging)}")
        results = evaluate(
            checkpoint,
            source,
            merging=merging,
            batch_size=batch,
            attention=compute[0],
            dtype=compute[1],
            progress=progress,
        )
        accuracy.append(results["metrics"]["top1"])
    return accuracy


def _rows(
    settings: Sequence[MergingSettings],
    accuracy: Sequence[float],
    speed: Sequence[dict[str, Any]],
) -> list[dict[str, Any]]:
    """One row per setting: its accuracy and bench's timing."""
    return [
        {
            "mode": s.mode,
            "r": s.to_dict()["r"],
            "threshold": s.rule_options.get("threshold"),
            "top1": acc,
            "clips_per_s": t["clips_per_s"],
            "speedup": t["speedup"],
            "gmacs_per_clip": t["gmacs_per_clip"],
            "flop_limit": t["flop_limit"],
            "tokens_per_layer": t["tokens_per_layer"],
        }
        for s, acc, t in zip(settings, accuracy, speed, strict=True)
    ]


def _write_summary(stem: str, summary: dict[str, Any], table: str) -> None:
    """``<stem>.json`` and ``<stem>.md`` (local or remote, gs://), each written whole."""
    from vtm_jax.outputs import atomic_file, write_json

    write_json(stem + ".json", {"format": DEMO_FORMAT, **summary}, indent=2)
    with atomic_file(stem + ".md") as f:
        f.write(table + "\n")


def format_demo_table(rows: Sequence[dict[str, Any]], architecture: str) -> str:
    """The paper's table: accuracy, throughput, speedup over r=0, and multiply-adds."""
    lines = [
        "| model | r | reduction | top-1 | clips/s | speedup | GMACs/clip |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mode = "- (baseline)" if row["mode"] == "none" else row["mode"]
        if row["mode"] == "hybrid":
            mode += f" (threshold {row['threshold']:g})"
        r = 0 if row["mode"] == "none" else row["r"]
        lines.append(
            f"| {architecture} | {r} | {mode} | {100 * row['top1']:.2f} | {row['clips_per_s']:.1f} | "
            f"{row['speedup']:.2f}x | {row['gmacs_per_clip']:.3f} |"
        )
    return "\n".join(lines)


def plot_accuracy_speed(rows: Sequence[dict[str, Any]], path: str, *, title: str) -> None:
    """Top-1 against throughput, one line per mode over r (the baseline is one point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    baseline = next(r for r in rows if r["mode"] == "none")
    series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["mode"] not in ("none", "hybrid"):
            series.setdefault(row["mode"], []).append(row)
    for mode, points in series.items():
        points = sorted(points, key=lambda p: p["r"])
        ax.plot(
            [baseline["clips_per_s"]] + [p["clips_per_s"] for p in points],
            [100 * baseline["top1"]] + [100 * p["top1"] for p in points],
            marker="o",
            label=mode,
        )
    for row in rows:
        if row["mode"] == "hybrid":
            ax.scatter(row["clips_per_s"], 100 * row["top1"], marker="*", s=90, label="hybrid")
    ax.scatter(
        baseline["clips_per_s"], 100 * baseline["top1"], color="black", zorder=5, label="r=0"
    )
    ax.set_xlabel("clips/s")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{title}: accuracy against throughput over r")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from vtm_jax.outputs import atomic_file

    with atomic_file(path, "wb") as f:  # local or remote (gs://); never half a picture
        fig.savefig(f, format="png")
    plt.close(fig)


def _visualise(
    checkpoint: str, source: Any, config: ml_collections.ConfigDict, out_dir: str
) -> list[str]:
    """Which tokens merged in the first test video, at a few depths."""
    from vtm_jax.jobs.visualize import visualize
    from vtm_jax.outputs import atomic_file

    video = np.asarray(source[0]["video"])
    path = paths.join(out_dir, DEMO_VIDEO)
    with atomic_file(path, "wb") as f:
        np.save(f, video)
    merging = MergingSettings.from_dict(config.token_merging)
    # Checked with the demo's files before any work (check_demo_outputs).
    return visualize(
        checkpoint,
        path,
        layers=_picture_layers(config),
        out_dir=out_dir,
        merging=merging,
        overwrite=True,
    )


def _describe(merging: MergingSettings) -> str:
    if merging.mode == "none":
        return "r=0"
    extra = "".join(f", {k} {v:g}" for k, v in merging.rule_options.items())
    return f"{merging.mode}, r={merging.to_dict()['r']}{extra}"
