"""Throughput of a model under reduction settings, with the paper's protocol.

Random input, a warm-up, then timed forward passes only, at a fixed batch (method.md §5);
speedups are ratios to r=0 measured in the same run. Analytic multiply-adds come with each
setting, so the measured speedup can be read against its FLOP-ratio limit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from vtm_jax.attention import get_attention
from vtm_jax.errors import UserError
from vtm_jax.models.registry import build_model
from vtm_jax.reduction import ReductionSettings


def time_forward(
    fn, params: Any, video: jax.Array, *, warmup: int, iterations: int
) -> dict[str, Any]:
    """Compile, warm up, then time ``iterations`` calls of a jitted forward pass."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(params, video).compile()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(compiled(params, video))
    seconds = []
    for _ in range(iterations):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, video))
        seconds.append(time.perf_counter() - start)
    return {"compile_s": compile_s, "seconds": seconds}


def bench_settings(
    record: dict[str, Any],
    settings: Sequence[ReductionSettings],
    *,
    batch_size: int = 1,
    warmup: int = 1,
    iterations: int = 3,
    attention: str = "auto",
    params: Any = None,
    progress=print,
) -> list[dict[str, Any]]:
    """Time each setting on random input; the first r=0 setting is the speedup baseline."""
    if batch_size < 1 or iterations < 1 or warmup < 0:
        raise UserError("bench needs batch_size >= 1, iterations >= 1 and warmup >= 0")
    num_frames, size = record["input"]["num_frames"], record["input"]["image_size"]
    attention_fn = get_attention(attention)
    video = jax.random.uniform(jax.random.PRNGKey(0), (batch_size, num_frames, size, size, 3))
    if params is None:
        model = build_model(record, None, attention_fn)
        params = jax.jit(model.init)(jax.random.PRNGKey(1), video[:1])["params"]
    results = []
    for merging in settings:
        model = build_model(record, merging, attention_fn)
        plan = model.token_plan(num_frames, size)
        macs = model.analytic_macs(num_frames, size)
        progress(f"timing mode={merging.mode} r={merging.r} schedule={merging.schedule} ...")

        def forward(p, x, model=model):
            return model.apply({"params": p}, x)

        timing = time_forward(forward, params, video, warmup=warmup, iterations=iterations)
        median = float(np.median(timing["seconds"]))
        results.append(
            {
                "mode": merging.mode,
                "r": merging.to_dict()["r"],
                "schedule": merging.schedule,
                "tokens_per_layer": [p.tokens_out for p in plan],
                "r_per_layer": [p.r for p in plan],
                "gmacs_per_layer": [m / 1e9 for m in macs["layers"]],
                "gmacs": macs["total"] / 1e9 * batch_size,
                "compile_s": timing["compile_s"],
                "seconds": timing["seconds"],
                "clips_per_s": batch_size / median,
                "frames_per_s": batch_size * num_frames / median,
            }
        )
    baseline = next((r for r in results if r["mode"] == "none" or r["r"] == 0), None)
    for r in results:
        if baseline is not None:
            r["speedup"] = r["clips_per_s"] / baseline["clips_per_s"]
            r["flop_limit"] = baseline["gmacs"] / r["gmacs"]
    return results


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the results."""
    rows = [
        "| mode | r | schedule | GMACs | FLOP limit | clips/s | frames/s | speedup | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['mode']} | {r['r']} | {r['schedule']} | {r['gmacs']:.4g} | "
            f"{r.get('flop_limit', float('nan')):.2f}x | {r['clips_per_s']:.3f} | "
            f"{r['frames_per_s']:.2f} | {r.get('speedup', float('nan')):.2f}x | "
            f"{r['compile_s']:.1f} |"
        )
    return "\n".join(rows)
