"""The accelerator check's timing matrix: one model at r=0 and the paper's r, for each batch,
dtype and attention backend of the platform.

Each (batch, dtype, backend) pair compiles both settings, warms them up and times them in turns
(r=0, r, r=0, ...), as ``vtm-jax bench`` does, so a change of load hits both sides of the
speedup. A row holds clips/s, the speedup over r=0, the FLOP-limit speedup (analytic MACs at
r=0 over MACs at r) and the share of it reached, XLA's peak memory of the program, the
device's own peak (``memory_stats``; null where the platform keeps none), and the largest logit
difference against float32 XLA attention at the ``highest`` matmul precision on the first
batch's clips. ``Budget`` skips a pair that would overrun; its rows say so.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from accelerator_common import (
    Budget,
    forward,
    load,
    random_clips,
    random_weights,
    relative_difference,
)

from vtm_jax.merging import MergingSettings
from vtm_jax.models.attention import cudnn_attention, get_attention, xla_attention
from vtm_jax.models.registry import build_model

# Every attention of each platform (the CPU's: for the smoke run). jax_nn is left out: in JAX
# 0.10 it is XLA's own attention, as xla is, and four more pairs would not fit the budget. A
# backend that fails on the device (memory, an unsupported shape) gets an error row; the
# others still run.
PLATFORM_BACKENDS = {
    "gpu": ("xla", "cudnn", "blockwise"),
    "tpu": ("xla", "pallas_tpu", "blockwise"),
    "cpu": ("xla", "blockwise"),
}
DTYPES = ("float32", "bfloat16")
ROW_FIELDS = (
    "backend", "dtype", "dtype_scope", "batch", "r", "mode", "status", "reason", "compile_s",
    "seconds", "clips_per_s", "speedup", "flop_limit", "flop_share", "gmacs_per_clip",
    "program_bytes", "peak_bytes_in_use", "max_logit_diff", "rel_logit_diff",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class MatrixPlan:
    """What the matrix runs. ``chunk_size``: blockwise attention's query chunk (None: its
    default); the smoke run's 4 makes blockwise chunk its few tokens instead of falling back
    to plain attention."""

    config: str = "vivit_b_k400"
    batches: tuple[int, ...] = (8, 32)
    dtypes: tuple[str, ...] = DTYPES
    iterations: int = 3
    warmup: int = 1
    chunk_size: int | None = None
    smoke: bool = False


FULL = MatrixPlan()
SMOKE = MatrixPlan(batches=(2,), iterations=5, chunk_size=4, smoke=True)


def _bf16_inputs(fn: Callable) -> Callable:
    """``fn`` on bfloat16 ``q, k, v`` (the bias as given), its output cast back."""

    def attention(q, k, v, *, bias=None):
        cast = (x.astype(jnp.bfloat16) for x in (q, k, v))
        return fn(*cast, bias=bias).astype(q.dtype)

    return attention


def attention_in(backend: str, dtype: str, chunk_size: int | None = None) -> Callable | None:
    """The backend's attention with ``dtype`` matmul inputs; None where it has no such option.

    bfloat16: ``blockwise_bf16``; cuDNN's ``compute_dtype``; ``pallas_tpu`` on bfloat16 inputs
    (its kernel accumulates and takes the softmax in float32). ``xla`` has none: on bfloat16
    inputs its softmax would be bfloat16 too, which no other row does.
    """
    if dtype == "float32":
        return get_attention(backend, chunk_size=chunk_size)
    if backend == "blockwise":
        return get_attention("blockwise_bf16", chunk_size=chunk_size)
    if backend == "cudnn":
        get_attention("cudnn")  # the platform check
        return functools.partial(cudnn_attention, compute_dtype=jnp.bfloat16)
    if backend == "pallas_tpu":
        return _bf16_inputs(get_attention(backend))
    return None


def build_for(
    record: Any, merging: Any, backend: str, dtype: str, chunk_size: int | None = None
) -> tuple[Any, str]:
    """The model of one row and what its dtype reaches (``dtype_scope``: ``attention``, its
    matmul inputs, or ``model``); None for the model where the backend has no such option."""
    # The model-wide dtype: activations and every matmul in ``dtype``; softmax, merging and
    # logits in float32 (vtm_jax.models.layers). The attention backend itself runs float32
    # inputs converted by the model, so every backend has a bfloat16 row.
    return build_model(
        record, merging, attention_in(backend, "float32", chunk_size), dtype
    ), "model"


def _device_peak() -> int | None:
    """The device's peak bytes in use so far in this process (None where none is kept)."""
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def _compile(model: Any, params: Any, video: Any) -> tuple[Any, float, int | None]:
    """The compiled forward pass, its compile seconds and XLA's peak memory of the program."""
    start = time.perf_counter()
    compiled = jax.jit(forward(model)).lower(params, video).compile()
    seconds = time.perf_counter() - start
    try:
        peak = compiled.memory_analysis().peak_memory_in_bytes
    except Exception:  # a backend without memory analysis
        peak = None
    return compiled, seconds, (int(peak) if peak else None)


def _measure(models: list[Any], params: Any, video: Any, plan: MatrixPlan) -> list[dict]:
    """Compile each model, warm up (the first call's logits kept), time in turns."""
    runs = []
    for model in models:
        compiled, compile_s, program_bytes = _compile(model, params, video)
        logits = np.asarray(compiled(params, video), np.float32)
        for _ in range(plan.warmup - 1):
            jax.block_until_ready(compiled(params, video))
        runs.append(
            {"compiled": compiled, "compile_s": compile_s, "program_bytes": program_bytes,
             "logits": logits, "seconds": []}
        )  # fmt: skip
    for _ in range(plan.iterations):
        for run in runs:
            start = time.perf_counter()
            jax.block_until_ready(run["compiled"](params, video))
            run["seconds"].append(time.perf_counter() - start)
    peak = _device_peak()
    for run in runs:
        del run["compiled"]
        run["peak_bytes_in_use"] = peak
    return runs


def _fill(rows: list[dict], runs: list[dict], macs: list[int], reference: list | None) -> None:
    """The measured fields of a pair's rows (the first is r=0)."""
    rates = [
        row["batch"] / float(np.median(run["seconds"])) for row, run in zip(rows, runs, strict=True)
    ]
    for i, (row, run) in enumerate(zip(rows, runs, strict=True)):
        speedup, limit = rates[i] / rates[0], macs[0] / macs[i]
        diff = (
            (None, None) if reference is None else relative_difference(run["logits"], reference[i])
        )
        row.update(
            status="ok", compile_s=run["compile_s"], seconds=run["seconds"],
            clips_per_s=rates[i], speedup=speedup, flop_limit=limit,
            flop_share=None if i == 0 else speedup / limit, gmacs_per_clip=macs[i] / 1e9,
            program_bytes=run["program_bytes"], peak_bytes_in_use=run["peak_bytes_in_use"],
            max_logit_diff=diff[0], rel_logit_diff=diff[1],
        )  # fmt: skip


def _pair(
    setup: dict, backend: str, dtype: str, batch: int, video: Any, budget: Budget
) -> list[dict]:
    """The two rows (r=0, the paper's r) of one (batch, dtype, backend)."""
    plan, settings = setup["plan"], setup["settings"]
    rows = [dict.fromkeys(ROW_FIELDS) for _ in settings]
    built = [build_for(setup["record"], s, backend, dtype, plan.chunk_size) for s in settings]
    for row, merging, (_, scope) in zip(rows, settings, built, strict=True):
        row.update(backend=backend, dtype=dtype, dtype_scope=scope, batch=batch,
                   r=merging.to_dict()["r"], mode=merging.mode)  # fmt: skip
    if built[0][0] is None:
        return [dict(row, status="n/a", reason=f"{backend} has no {dtype} option") for row in rows]
    if not budget.allows(batch):
        reason = f"time budget: {budget.elapsed():.0f} s spent, about {budget.estimate(batch):.0f} s more needed"
        return [dict(row, status="skipped", reason=reason) for row in rows]
    start = time.monotonic()
    try:
        runs = _measure([model for model, _ in built], setup["params"], video, plan)
        _fill(rows, runs, setup["macs"], setup["reference"])
    except Exception as e:  # out of memory, a shape the kernel refuses: recorded, the rest runs
        message = (str(e).strip().splitlines() or [""])[0][:300]
        rows = [dict(row, status="error", reason=f"{type(e).__name__}: {message}") for row in rows]
    budget.record(batch, time.monotonic() - start)
    return rows


def _reference(record: Any, settings: list, params: Any, clips: Any) -> list:
    """Float32 XLA attention's logits at the ``highest`` matmul precision, per setting."""
    logits = []
    with jax.default_matmul_precision("highest"):
        for merging in settings:
            model = build_model(record, merging, xla_attention)
            logits.append(np.asarray(jax.jit(forward(model))(params, clips), np.float32))
    return logits


def setup_matrix(plan: MatrixPlan, budget: Budget, progress: Callable[[str], None] = print) -> dict:
    """The model, weights, clips, MACs and reference logits every pair shares."""
    record, paper = load(plan.config, smoke=plan.smoke)
    settings = [MergingSettings(), paper]
    t, size = record.num_frames, record.image_size
    clips = random_clips(max(plan.batches), t, size)
    models = [build_model(record, s, xla_attention) for s in settings]
    params = jax.device_put(random_weights(models[0], clips[:1]), jax.devices()[0])
    setup = {
        "plan": plan, "record": record, "settings": settings, "clips": clips, "params": params,
        "macs": [m.analytic_macs(t, size)["total"] for m in models],
        "reference": None,
    }  # fmt: skip
    progress(f"reference logits: float32 xla, highest precision, batch {plan.batches[0]}")
    if not budget.allows("reference"):
        progress("no reference logits: the time budget is spent")
        return setup
    start = time.monotonic()
    try:
        setup["reference"] = _reference(record, settings, params, clips[: plan.batches[0]])
    except Exception as e:  # the rows are still timed; their logit differences stay null
        progress(f"no reference logits: {type(e).__name__}: {str(e)[:200]}")
    budget.record("reference", time.monotonic() - start)
    return setup


def run_matrix(
    plan: MatrixPlan,
    budget: Budget,
    *,
    progress: Callable[[str], None] = print,
    on_rows: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Every row of the matrix, in order: batch, dtype, backend, then r=0 and the paper's r.
    ``on_rows`` gets the rows so far after each pair (to write them as they come)."""
    setup = setup_matrix(plan, budget, progress)
    backends = PLATFORM_BACKENDS.get(jax.default_backend(), ("xla",))
    rows: list[dict] = []
    for batch in plan.batches:
        video = jax.device_put(setup["clips"][:batch], jax.devices()[0])
        for dtype in plan.dtypes:
            for backend in backends:
                pair = _pair(setup, backend, dtype, batch, video, budget)
                rows += pair
                for row in pair:
                    progress(_line(row))
                if on_rows is not None:
                    on_rows(rows)
    return rows


def _line(row: dict) -> str:
    """One row for the console."""
    head = f"batch {row['batch']} {row['dtype']} {row['backend']} r={row['r']}"
    if row["status"] != "ok":
        return f"{head}: {row['status']} ({row['reason']})"
    return (
        f"{head}: {row['clips_per_s']:.4g} clips/s, speedup {row['speedup']:.2f}x of "
        f"{row['flop_limit']:.2f}x, compile {row['compile_s']:.1f} s"
    )
