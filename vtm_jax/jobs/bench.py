"""Throughput of a model under merging settings, with the paper's protocol.

Random input, a warm-up, then timed forward passes only, at a fixed batch per device
(docs/method.md §5); speedups are ratios to r=0 measured in the same run. Each setting also reports
its analytic multiply-adds, XLA's own FLOP count of the compiled program, the achieved FLOP/s
and the FLOP-ratio limit of its speedup. The batch is split over every device of every process
(``jax.distributed``), so one command measures a CPU, a GPU or a whole TPU pod.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.errors import UserError
from vtm_jax.merging import MergingSettings, get_rule
from vtm_jax.merging.methods import rlt
from vtm_jax.models.attention import get_attention
from vtm_jax.models.base import apply_in_steps
from vtm_jax.models.layers import dtype_name
from vtm_jax.models.registry import build_model
from vtm_jax.runtime import mesh as device_mesh

BENCH_FORMAT = "vtm-jax-bench"  # the "format" of bench's JSON results
# The keys of the results written before they carried the format: still bench's own.
BENCH_LEGACY_KEYS = ("config", "run", "results")
BENCH_SUFFIXES = (".json", ".md", ".png")


def sweep(
    base: MergingSettings,
    *,
    modes: Sequence[str] | None = None,
    r_values: Sequence[int] | None = None,
    schedules: Sequence[float] | None = None,
) -> list[MergingSettings]:
    """The r=0 baseline, then every (mode, r, schedule) combination built on ``base``."""
    settings = [MergingSettings()]
    if base.mode == "none" and not modes:
        return settings
    for mode in modes or [base.mode]:
        # A mode that takes no r (rlt) runs once, at r=0; r=0 is the baseline for the others.
        rs = [0] if _ignores_r(mode) else [r for r in r_values or [base.r] if r != 0]
        for r in rs:
            for schedule in schedules or [base.schedule]:
                setting = dataclasses.replace(base, mode=mode, r=r, schedule=float(schedule))
                if setting not in settings:
                    settings.append(setting)
    return settings


def _ignores_r(mode: str) -> bool:
    """A mode whose token count follows the video (rlt) reduces at r=0, and takes no other r."""
    rule = get_rule(mode)
    return rule is not None and rule.place == "input"


def _xla_flops(compiled) -> float | None:
    """FLOPs XLA counts in the compiled program (None where the backend does not say)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement cost analysis
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def time_forward(
    forward: Callable, params: Any, video: jax.Array, *, warmup: int, iterations: int
) -> dict[str, Any]:
    """Compile, warm up, then time ``iterations`` calls; only the forward pass is timed."""
    start = time.perf_counter()
    compiled = jax.jit(forward).lower(params, video).compile()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(compiled(params, video))
    seconds = []
    for _ in range(iterations):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, video))
        seconds.append(time.perf_counter() - start)
    return {"compile_s": compile_s, "seconds": seconds, "xla_flops": _xla_flops(compiled)}


def _global_video(batch_per_device: int, num_frames: int, size: int, mesh: Mesh) -> jax.Array:
    """Random clips sharded over the batch axis; each process makes only its own rows."""
    local = batch_per_device * jax.local_device_count()
    rng = np.random.default_rng(jax.process_index())
    rows = rng.random((local, num_frames, size, size, 3), dtype=np.float32)
    return device_mesh.global_batch(rows, mesh)


def random_params(record: ModelRecord, attention: str = "auto") -> Any:
    """Random weights of the record's model, replicated on every device (timing does not
    depend on the weights), to pass to :func:`bench_settings` for several calls."""
    mesh = device_mesh.global_mesh()
    model = build_model(record, None, get_attention(attention))
    size = record.image_size
    clip = np.zeros((1, record.num_frames, size, size, 3), np.float32)
    init = jax.jit(model.init, out_shardings=device_mesh.replicated(mesh))
    return init(jax.random.PRNGKey(1), clip)["params"]


def bench_settings(
    record: ModelRecord,
    settings: Sequence[MergingSettings],
    *,
    batch_size: int = 1,
    warmup: int = 1,
    iterations: int = 3,
    attention: str = "auto",
    params: Any = None,
    progress: Callable[[str], None] = print,
    clips_per_step: int | None = None,
    dtype: str = "float32",
) -> list[dict[str, Any]]:
    """Time each setting; ``batch_size`` is per device. The r=0 setting is the baseline.

    Settings are timed in turns, one pass of each per round, after all are compiled and
    warmed up. ``clips_per_step`` runs each batch that many clips at a time
    (:func:`vtm_jax.models.base.apply_in_steps`; None: the whole batch at once). ``dtype``:
    what the models compute in (``float32``, ``bfloat16``; the parameters stay float32)."""
    if batch_size < 1 or iterations < 1 or warmup < 0:
        raise UserError("bench needs batch_size >= 1, iterations >= 1 and warmup >= 0")
    dtype = dtype_name(dtype)
    num_frames, size = record.num_frames, record.image_size
    attention_fn = get_attention(attention)
    mesh = device_mesh.global_mesh()
    video = _global_video(batch_size, num_frames, size, mesh)
    global_batch = video.shape[0]
    if params is None:
        params = random_params(record, attention)
    # Compile and warm up every setting first, then time them in turns (one pass of each per
    # round): a change in the machine's load hits every setting alike instead of skewing the
    # speedups, which are ratios of settings.
    runs = [
        _compiled_run(
            record, merging, attention_fn, params, video, warmup, progress, clips_per_step, dtype
        )
        for merging in settings
    ]
    seconds: list[list[float]] = [[] for _ in runs]
    progress(f"timing {len(runs)} setting(s) in turns, {iterations} pass(es) each")
    for _ in range(iterations):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            jax.block_until_ready(run.compiled(params, video))
            seconds[i].append(time.perf_counter() - start)
    results = [
        _result(run, times, num_frames, size, batch_size, global_batch)
        for run, times in zip(runs, seconds, strict=True)
    ]
    baseline = next((r for r in results if r["mode"] == "none"), None)
    for r in results:
        r["clips_per_step"] = clips_per_step
        r["dtype"] = dtype
        if baseline is not None:
            r["speedup"] = r["clips_per_s"] / baseline["clips_per_s"]
            r["flop_limit"] = baseline["gmacs_per_clip"] / r["gmacs_per_clip"]
    return results


class _CompiledRun(NamedTuple):
    merging: MergingSettings
    model: Any
    compiled: Any
    compile_s: float


def _compiled_run(
    record: ModelRecord,
    merging: MergingSettings,
    attention_fn: Any,
    params: Any,
    video: jax.Array,
    warmup: int,
    progress: Callable[[str], None],
    clips_per_step: int | None = None,
    dtype: str = "float32",
) -> _CompiledRun:
    """One setting's model in ``dtype``, compiled for ``video`` and run ``warmup`` times."""
    model = build_model(record, merging, attention_fn, dtype)
    # Mode rlt with buckets: the host picks the token length this batch needs (rlt.bucket).
    bucketed = rlt.batch_settings(merging, video, getattr(model, "patch_size", None))
    if bucketed is not merging:
        merging, model = bucketed, build_model(record, bucketed, attention_fn, dtype)
    progress(
        f"compiling mode={merging.mode} r={merging.to_dict()['r']} schedule={merging.schedule}"
    )

    def forward(p, x):
        return apply_in_steps(model, p, x, clips_per_step=clips_per_step)

    start = time.perf_counter()
    compiled = jax.jit(forward).lower(params, video).compile()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(compiled(params, video))
    return _CompiledRun(merging, model, compiled, compile_s)


def _result(
    run: _CompiledRun,
    times: list[float],
    num_frames: int,
    size: int,
    batch_size: int,
    global_batch: int,
) -> dict[str, Any]:
    """One setting's row: its tokens and multiply-adds per layer, and its measured rates."""
    merging = run.merging
    plan = run.model.token_plan(num_frames, size)
    macs = run.model.analytic_macs(num_frames, size)
    xla_flops = _xla_flops(run.compiled)
    median = float(np.median(times))
    gmacs = macs["total"] / 1e9
    return {
        "mode": merging.mode,
        "r": merging.to_dict()["r"],
        "schedule": merging.schedule,
        "settings": merging.to_dict(),
        "tokens_per_layer": [p.tokens_out for p in plan],
        "r_per_layer": [p.r for p in plan],
        "gmacs_per_layer": [m / 1e9 for m in macs["layers"]],
        "gmacs_per_clip": gmacs,
        # XLA costs the program one device runs, on its share of the batch.
        "xla_gflops_per_clip": (None if xla_flops is None else xla_flops / 1e9 / batch_size),
        "compile_s": run.compile_s,
        "seconds": times,
        "clips_per_s": global_batch / median,
        "clips_per_s_per_device": global_batch / median / len(jax.devices()),
        "frames_per_s": global_batch * num_frames / median,
        "achieved_gflop_per_s": 2 * gmacs * global_batch / median,
    }


def matmul_peak_gflops(repeats: int = 20) -> float:
    """Best float32 GEMM rate (GFLOP/s) of one device at ViViT-B's MLP shape,
    ``[3137, 768] x [768, 3072]``: the yardstick for a model run's achieved GFLOP/s."""
    a = jax.random.normal(jax.random.PRNGKey(0), (3137, 768), np.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (768, 3072), np.float32)
    dot = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(dot(a, b))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(dot(a, b))
        best = min(best, time.perf_counter() - start)
    return 2 * 3137 * 768 * 3072 / best / 1e9


def run_info(batch_size: int) -> dict[str, Any]:
    """Where and how the numbers were measured, with this device's float32 matmul peak."""
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": len(jax.devices()),
        "processes": jax.process_count(),
        "batch_per_device": batch_size,
        "global_batch": batch_size * len(jax.devices()),
        "jax": jax.__version__,
        "matmul_peak_gflop_per_s": matmul_peak_gflops(),
    }


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the results."""
    rows = [
        "| mode | r | schedule | GMACs/clip | XLA GFLOPs/clip | FLOP limit | clips/s | "
        "frames/s | speedup | GFLOP/s | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        xla = r["xla_gflops_per_clip"]
        rows.append(
            f"| {r['mode']} | {r['r']} | {r['schedule']:g} | {r['gmacs_per_clip']:.4g} | "
            f"{'-' if xla is None else f'{xla:.4g}'} | {r.get('flop_limit', float('nan')):.2f}x | "
            f"{r['clips_per_s']:.4g} | {r['frames_per_s']:.4g} | "
            f"{r.get('speedup', float('nan')):.2f}x | {r['achieved_gflop_per_s']:.4g} | "
            f"{r['compile_s']:.1f} |"
        )
    return "\n".join(rows)


def plot_speed(results: Sequence[dict[str, Any]], path: str, title: str) -> None:
    """Speedup against r for each (mode, schedule), with the FLOP-ratio limit; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    series: dict[tuple[str, float], list[dict]] = {}
    for r in results:
        if r["mode"] != "none" and isinstance(r["r"], int):
            series.setdefault((r["mode"], r["schedule"]), []).append(r)
    limits: dict[float, list[dict]] = {}
    for (mode, schedule), rows in series.items():
        rows = sorted(rows, key=lambda row: row["r"])
        label = mode if schedule == 0 else f"{mode}, schedule {schedule:g}"
        xs = [0] + [row["r"] for row in rows]
        ax.plot(xs, [1.0] + [row["speedup"] for row in rows], marker="o", label=label)
        limits.setdefault(schedule, rows)  # the limit depends on r and schedule, not the mode
    for schedule, rows in limits.items():
        label = "FLOP limit" if schedule == 0 else f"FLOP limit, schedule {schedule:g}"
        xs = [0] + [row["r"] for row in rows]
        ax.plot(xs, [1.0] + [row["flop_limit"] for row in rows], ls="--", color="gray", label=label)
    ax.set_xlabel("r (tokens removed per layer)")
    ax.set_ylabel("speedup over r=0")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from vtm_jax.outputs import atomic_file

    with atomic_file(path, "wb") as f:  # local or remote (gs://); never half a picture
        fig.savefig(f, format="png")
    plt.close(fig)


def check_bench_outputs(
    stem: str, *, what: str, overwrite: bool = False, inputs: dict | None = None
) -> None:
    """``stem.json``, ``.md`` and ``.png`` can be written, and replace nothing but an earlier
    bench's results (``vtm_jax.outputs.claim_outputs``) unless ``overwrite``."""
    from vtm_jax.outputs import check_output_file, claim_outputs, results_targets

    for suffix in BENCH_SUFFIXES:
        check_output_file(stem + suffix, what=what)
    targets = results_targets(
        stem + ".json",
        [stem + ".md", stem + ".png"],
        BENCH_FORMAT,
        "bench results",
        legacy=BENCH_LEGACY_KEYS,
    )
    claim_outputs(targets, what=what, overwrite=overwrite, inputs=inputs)


def bench(
    config: Any, *, stem: str | None = None, overwrite: bool | None = None
) -> list[dict[str, Any]]:
    """``vtm-jax bench`` on a loaded config: time r=0 and the config's merging settings.

    ``stem``: write ``stem.json`` (config, machine, results), ``stem.md`` (the table) and
    ``stem.png`` (the plot); checked before anything is timed. Existing files there are
    replaced only when they are an earlier bench's results, or with ``overwrite`` (default:
    the config's ``bench.overwrite``). Process 0 prints and writes.
    """
    from vtm_jax.config.loading import record_from_config
    from vtm_jax.outputs import atomic_file, write_json

    options = config.get("bench", {})
    if overwrite is None:
        overwrite = bool(options.get("overwrite", False))
    if stem:  # every file the results go to, before anything is timed
        check_bench_outputs(stem, what="--output", overwrite=overwrite)
    record = record_from_config(config)
    settings = sweep(
        MergingSettings.from_dict(config.get("token_merging")),
        modes=options.get("modes"),
        r_values=options.get("r_values"),
        schedules=options.get("schedules"),
    )
    batch = options.get("batch_size", 1)
    info = run_info(batch)
    lead = jax.process_index() == 0
    say = print if lead else (lambda *_: None)
    fields = ", ".join(f"{k}={v}" for k, v in record.model.items() if v is not None)
    say(
        f"{config.get('experiment_name', 'model')}: {record.architecture} ({fields}), input "
        f"{record.num_frames}x{record.image_size}x{record.image_size}, random weights; "
        f"{info['devices']} {info['device_kind']} device(s) in {info['processes']} process(es), "
        f"batch {batch} per device, {dtype_name(options.get('dtype'))}"
    )
    results = bench_settings(
        record,
        settings,
        batch_size=batch,
        warmup=options.get("warmup", 1),
        iterations=options.get("iterations", 3),
        attention=options.get("attention", "auto"),
        progress=say,
        clips_per_step=options.get("clips_per_step"),
        dtype=options.get("dtype", "float32"),
    )
    # Measured again after the timing, the best kept: one reading taken in a loaded moment
    # would make every rate look closer to the peak than it is.
    info["matmul_peak_gflop_per_s"] = max(info["matmul_peak_gflop_per_s"], matmul_peak_gflops())
    for r in results:
        say(f"\nmode={r['mode']} r={r['r']} schedule={r['schedule']}")
        say(f"  r per layer:      {r['r_per_layer']}")
        say(f"  tokens per layer: {r['tokens_per_layer']}")
        say(f"  GMACs per layer:  {[float(f'{g:.4g}') for g in r['gmacs_per_layer']]}")
    table = format_table(results)
    say("\n" + table)
    if stem and lead:
        document = {
            "format": BENCH_FORMAT,
            "config": config.to_dict(),
            "run": info,
            "results": results,
        }
        write_json(stem + ".json", document, indent=2, default=str)
        with atomic_file(stem + ".md") as f:
            f.write(table + "\n")
        plot_speed(results, stem + ".png", f"{record.architecture} on {info['device_kind']}")
        print(f"\nresults written to {stem}.json, {stem}.md and {stem}.png")
    return results
