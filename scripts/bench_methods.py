"""Every token-reduction mode on one model at matched MACs: clips/s, MACs and reduction share.

Each mode of the ``methods`` sweep family gets the r whose analytic MACs per clip come closest
to ``merge`` at the paper's r (rlt: its own threshold, its count follows the video); all are
compiled once and timed in turns (one pass of each per round, as ``vtm-jax bench`` does), so a
change in the machine's load hits every mode alike. ``--sittings`` repeats the timed rounds
that many times in the same process and reports each sitting's ratios to r=0 on its own.

The share of time spent in the reduction itself: each mode is timed beside a twin that removes
the same tokens at the same place, reading the same inputs (so the explicit attention of modes
that read it is paid by both), but by slicing off the last tokens instead of choosing them;
``1 - twin / mode`` is the share of the mode's time its own choosing and merging takes.

  .venv/bin/python scripts/bench_methods.py --config=vivit_b_k400 --iterations 3 \\
      --sittings 3 --output out/methods.json
"""

from __future__ import annotations

import argparse
import json
import platform

import jax
import jax.numpy as jnp

from vtm_jax.config.loading import load_config, record_from_config
from vtm_jax.jobs.bench import bench_settings, matmul_peak_gflops, random_params
from vtm_jax.jobs.sweep_families import R_RULES
from vtm_jax.jobs.sweep_methods import (
    REFERENCE_MODE,
    UNMATCHED_MODES,
    matched_r,
    method_modes,
    runs_on,
    total_macs,
)
from vtm_jax.jobs.sweep_plan import merging_fields
from vtm_jax.merging import RULES, MergingSettings, Tokens


def _slice_first(tokens: Tokens, metric, r: int, ctx) -> Tokens:
    """Keep the first ``N - r`` tokens (a class token first): the same count, no choosing."""
    n = tokens.x.shape[1] - r
    size = tokens.size if tokens.size is not None else jnp.ones(tokens.x.shape[:2] + (1,))
    return Tokens(tokens.x[:, :n], size[:, :n])


def register_twins(modes: list[str]) -> dict[str, str]:
    """A ``<mode>_twin`` rule per mode: same count, place and reads, slicing instead."""
    twins = {}
    for mode in modes:
        rule = RULES[mode]
        if mode in UNMATCHED_MODES or rule.place == "input":
            continue
        name = f"{mode}_twin"
        RULES[name] = rule._replace(apply=_slice_first, options=(), check=None)
        twins[mode] = name
    return twins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="vivit_b_k400")
    parser.add_argument("--model", default="vivit", help="the paper's model name, for its r")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--sittings", type=int, default=3)
    parser.add_argument("--output")
    args = parser.parse_args()
    record = record_from_config(load_config(args.config, command="bench"))
    frames = record.num_frames
    base = MergingSettings(mode="merge", r=10**9)
    from vtm_jax.models.registry import build_model

    r_max = build_model(record, base).token_plan(frames, record.image_size)[0].r
    r_paper = max(1, R_RULES["paper"](r_max, args.model))
    reference = dict(merging_fields({}, args.model, record, r_paper))
    target = total_macs(record, reference, frames)
    settings, rows = [MergingSettings()], [("none", 0, total_macs(record, {}, frames))]
    modes = [m for m in method_modes() if runs_on(record, m)]
    for mode in modes:
        fields = dict(merging_fields({"mode": mode}, args.model, record, r_paper))
        if mode in UNMATCHED_MODES:
            fields["r"] = 0
        elif mode != REFERENCE_MODE:
            fields["r"] = matched_r(record, fields, target, frames, r_max)[0]
        settings.append(MergingSettings.from_dict(fields))
        rows.append((mode, fields["r"], total_macs(record, fields, frames)))
    twins = register_twins(modes)
    for mode, twin in twins.items():
        settings.append(
            MergingSettings.from_dict({**settings[modes.index(mode) + 1].to_dict(), "mode": twin})
        )
        rows.append((twin, settings[-1].r, None))
    params = random_params(record)
    sittings, peaks = [], []
    for sitting in range(args.sittings):
        peaks.append(matmul_peak_gflops())  # the machine's state at each sitting
        results = bench_settings(
            record,
            settings,
            iterations=args.iterations,
            params=params,
            progress=lambda line: print(line, flush=True),
        )
        sittings.append([r["clips_per_s"] for r in results])
        print(
            f"sitting {sitting + 1}: "
            + ", ".join(f"{n} {c:.4f}" for (n, _, _), c in zip(rows, sittings[-1], strict=True))
        )
    out = {
        "config": args.config,
        "machine": {"processor": platform.processor(), "devices": str(jax.devices())},
        "matmul_peak_gflop_per_s": peaks,
        "target_macs": target,
        "r_paper": r_paper,
        "rows": [
            {"mode": n, "r": r, "macs": m, "clips_per_s": [s[i] for s in sittings]}
            for i, (n, r, m) in enumerate(rows)
        ],
    }
    print(format_table(out, twins))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=1)


def format_table(out: dict, twins: dict[str, str]) -> str:
    """Per mode: r, GMACs, vs merge, clips/s per sitting, speedup per sitting, reduction share."""
    by_mode = {row["mode"]: row for row in out["rows"]}
    base = by_mode["none"]["clips_per_s"]
    lines = [
        "| mode | r | GMACs | MACs vs merge | clips/s (per sitting) | speedup over r=0 "
        "| reduction share |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in out["rows"]:
        if row["macs"] is None:
            continue
        speed = [c / b for c, b in zip(row["clips_per_s"], base, strict=True)]
        share = "-"
        if row["mode"] in twins:
            twin = by_mode[twins[row["mode"]]]["clips_per_s"]
            # time = 1 / clips_per_s: share = 1 - twin_time / mode_time = 1 - mode / twin
            share = ", ".join(
                f"{100 * (1 - c / t):.0f}%" for c, t in zip(row["clips_per_s"], twin, strict=True)
            )
        gap = f"{100 * (row['macs'] / out['target_macs'] - 1):+.1f}%"
        if row["mode"] == "none" or row["mode"] in UNMATCHED_MODES:
            gap = "-"  # the reference, and a count that follows the video
        lines.append(
            f"| {row['mode']} | {row['r']} | {row['macs'] / 1e9:.1f} | {gap} | "
            + ", ".join(f"{c:.3f}" for c in row["clips_per_s"])
            + " | "
            + ", ".join(f"{s:.2f}x" for s in speed)
            + f" | {share} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
