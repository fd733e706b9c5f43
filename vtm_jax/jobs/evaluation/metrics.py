"""Top-k counts over the views of each video, per head and joint, and the results table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from vtm_jax.checkpoints.record import Head
from vtm_jax.merging import MergingSettings

TOP_K = 5


def view_metrics(
    logits: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    heads: Sequence[Head],
    *,
    softmax_views: bool = False,
    ensemble: str = "sum",
) -> tuple[dict[str, jax.Array], list[jax.Array], jax.Array]:
    """Metric counts of one batch, each head's top-k classes and each video's scores.

    ``logits`` ``[B, V, C]`` (V views per video), ``labels`` ``[B, heads]``, ``mask`` ``[B]``
    (1 = real). Each head's views (logits, or softmax probabilities with ``softmax_views``)
    are combined by ``ensemble``: ``sum`` (SlowFast's default; the same ranking as the mean)
    or ``max`` (SlowFast's: the elementwise maximum over views and zero, as its meter starts
    from zeros). Returns ``(sums, top, scores)``: integer counts keyed ``count``, ``top1``,
    ``top5`` (multi-head: ``<head>_top1``, ``<head>_top5``, and ``action_top1`` /
    ``action_top5``, where every head is right within its top-k, as SlowFast's multitask
    accuracy), per head ``[B, k]`` class indices best first (ties: lower index), and the
    combined scores ``[B, C]`` (views averaged for ``sum``).
    """
    real = mask > 0
    sums = {"count": real.sum(dtype=jnp.int32)}
    top, combined = [], []
    all_right = {1: real, TOP_K: real}
    for h, (name, start, stop) in enumerate(heads):
        scores = logits[..., start:stop].astype(jnp.float32)
        if softmax_views:
            scores = jax.nn.softmax(scores, axis=-1)
        if ensemble == "max":
            scores = jnp.maximum(scores.max(axis=1), 0.0)
        else:
            scores = scores.mean(axis=1)
        _, best = jax.lax.top_k(scores, min(TOP_K, stop - start))
        label = labels[:, h]
        hits = {1: best[:, 0] == label, TOP_K: (best == label[:, None]).any(-1)}
        prefix = f"{name}_" if name else ""
        for k, hit in hits.items():
            sums[f"{prefix}top{k}"] = (hit & real).sum(dtype=jnp.int32)
            all_right[k] = all_right[k] & hit
        top.append(best)
        combined.append(scores)
    if len(heads) > 1:
        for k in (1, TOP_K):
            sums[joint_name(heads, k)] = all_right[k].sum(dtype=jnp.int32)
    return sums, top, jnp.concatenate(combined, axis=-1)


def joint_name(heads: Sequence[Head], k: int = 1) -> str:
    """``action_top<k>`` for EPIC's verb and noun heads, ``joint_top<k>`` for other pairs."""
    joint = "action" if [h[0] for h in heads] == ["verb", "noun"] else "joint"
    return f"{joint}_top{k}"


def sum_names(heads: Sequence[Head]) -> list[str]:
    """The counts a run keeps, in the order the table shows them."""
    names = ["count"]
    for name, _, _ in heads:
        prefix = f"{name}_" if name else ""
        names += [prefix + "top1", prefix + f"top{TOP_K}"]
    if len(heads) > 1:
        names += [joint_name(heads, 1), joint_name(heads, TOP_K)]
    return names


def with_metrics(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with its ``metrics`` (fractions of the evaluated videos) and clip rate."""
    sums = state["sums"]
    count = sums["count"]
    metrics = {k: (v / count if count else 0.0) for k, v in sums.items() if k != "count"}
    clips_per_s = state["clips"] / state["wall_s"] if state["wall_s"] > 0 else 0.0
    return {**state, "metrics": metrics, "clips_per_s": clips_per_s}


def format_results(results: dict[str, Any]) -> str:
    """A readable summary: the run, a table of metrics, skipped videos and timing."""
    run, info, sums = results["run"], results["info"], results["sums"]
    lines = [
        f"checkpoint: {run['checkpoint']} ({run['architecture']})",
        f"dataset: {run['dataset']}, {run['num_examples']} videos "
        f"({sums['count']} evaluated, {len(results['skipped'])} skipped)"
        + ("" if results.get("complete") else f", {results['done']} done so far"),
        f"views: {run['num_clips']} clip(s) x {3 if run['three_crops'] else 1} crop(s), "
        f"mean of {run['view_average']}; input protocol {_protocol_name(run['preprocessing'])}",
        "token merging: " + _merging_line(run["token_merging"]),
        "",
        "| metric | value | correct / evaluated |",
        "|---|---|---|",
    ]
    for name, value in results["metrics"].items():
        lines.append(f"| {name} | {100 * value:.2f}% | {sums[name]} / {sums['count']} |")
    lines += _skipped_lines(results)
    lines.append("")
    lines.append(
        f"{info['devices']} {info['device_kind']} device(s) in {info['processes']} process(es), "
        f"batch {info['batch_size_per_device']} per device; {results['wall_s']:.1f} s, "
        f"{results['clips_per_s']:.3g} clips/s"
    )
    return "\n".join(lines)


def _merging_line(merging: dict[str, Any]) -> str:
    """``mode=hybrid, r=8, threshold=0.4``: the fields off their defaults, then rule options."""
    defaults = MergingSettings().to_dict()
    items = [
        (k, v)
        for k, v in merging.items()
        if k != "rule_options" and (k in ("mode", "r") or v != defaults.get(k))
    ]
    items += list((merging.get("rule_options") or {}).items())
    return ", ".join(f"{k}={v}" for k, v in items)


def _skipped_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    if results["skipped"]:
        lines.append("")
        lines.append(f"skipped {len(results['skipped'])} corrupt video(s):")
        for item in results["skipped"][:10]:
            lines.append(f"  {item['video_id']}: {item['reason']}")
        if len(results["skipped"]) > 10:
            lines.append(f"  ... and {len(results['skipped']) - 10} more")
    if results.get("missing"):
        lines.append(
            f"{len(results['missing'])} listed video(s) were not found when the dataset was "
            "built and are not counted (see the results file)"
        )
    return lines


def _protocol_name(prep: dict[str, Any]) -> str:
    protocol = prep.get("protocol", "centred")
    if protocol == "paper":
        return f"paper ({prep.get('paper_loader', 'kinetics')} loader)"
    return protocol
