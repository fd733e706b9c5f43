"""Accelerator checks for scripts/accelerator_check.sh: a timing matrix and logit parity.

  python scripts/bench_accelerator.py check --out out/accelerator           # on a GPU or TPU
  python scripts/bench_accelerator.py check --smoke --out out/accelerator_smoke   # any CPU
  python scripts/bench_accelerator.py parity --output out/accelerator/parity.json

``check`` runs the matrix (scripts/accelerator_matrix.py: ViViT-B at r=0 and the paper's r,
batch 8 and 32, float32 and bfloat16, every attention backend of the platform) and then
``parity`` (the paper's r, ``highest`` precision), within one time budget (``--budget-s``, 420 s: the whole run
fits an 8-minute loan), and writes ``table.json`` and ``table.md``
(scripts/accelerator_report.py) after every step. ``--smoke`` runs the same code on the CPU
with a tiny model in about a minute.

``parity``: every backbone (the paper's configs; alone: at r=0 and the paper's r, at the
``default`` and ``highest`` matmul precision) runs on the
accelerator with each backend that applies there and on the host CPU with plain float32
attention (``xla``), on the same random weights and clip; the report is the largest logit
difference relative to the largest CPU logit, against a tolerance per backend and matmul
precision. Layers are cut to ``--layers`` (2 in the check; every merge step of those layers
still runs at the real token counts).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

START = time.monotonic()  # the budget counts from here, JAX's start-up included
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accelerator_common import Budget, forward, load, random_clips, random_weights  # noqa: E402

BACKBONES = ("vivit_b", "vivit_b_fe", "videomae_b", "timesformer_b", "motionformer_b")
# The CPU's entry serves the smoke run (there the "accelerator" is the CPU itself).
PLATFORM_BACKENDS = {
    "gpu": ("xla", "jax_nn", "cudnn"),
    "tpu": ("xla", "pallas_tpu"),
    "cpu": ("blockwise",),
}
# Largest |logit difference| / largest |CPU logit| accepted. "highest": float32 matmuls on the
# accelerator; "default": the platform's default matmul precision (TF32 on recent GPUs, one
# bfloat16 pass on TPUs); cudnn computes attention in float16 whatever the precision.
TOLERANCE = {"highest": 1e-4, "default": 2e-2, "cudnn": 1e-2}
# 420 s from the process's start, and scripts/accelerator_check.sh stops it 40 s later at most:
# the whole run fits an 8-minute loan.
FULL_BUDGET_S, SMOKE_BUDGET_S = 420.0, 240.0
# Of the budget, the matrix may use 80% before parity starts; parity gets the rest. Parity runs
# at the "highest" precision only: the matrix's float32 rows already show what the platform's
# default precision does to the logits (against a "highest" reference).
MATRIX_SHARE = 0.8


@dataclasses.dataclass(frozen=True)
class ParityPlan:
    """What parity runs. ``settings``: ``r0`` and/or ``paper`` (the paper's r, which runs every
    layer r=0 does plus the merge steps; r=0 costs another compile per backend and precision)."""

    backbones: tuple[str, ...] = BACKBONES
    settings: tuple[str, ...] = ("paper",)
    layers: int = 2
    precisions: tuple[str, ...] = ("highest",)
    chunk_size: int | None = None  # blockwise's (the smoke run's tiny models need a small one)
    smoke: bool = False


FULL_PARITY = ParityPlan()
SMOKE_PARITY = ParityPlan(backbones=("timesformer_b",), layers=2, chunk_size=4, smoke=True)


def _random_params(model: Any, clip: Any, seed: int = 0) -> Any:
    """Initialised weights plus noise on every leaf: the zero-initialised head and biases
    would otherwise make every logit 0 and the comparison empty (scripts/bench_bf16_logits.py)."""
    import jax

    params = jax.jit(model.init)(jax.random.PRNGKey(seed), clip)["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    noisy = [
        x + 0.02 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree_util.tree_unflatten(tree, noisy)


def _parity_row(backbone: str, r: Any, backend: str, precision: str, **fields: Any) -> dict:
    row = {"backbone": backbone, "r": r, "backend": backend, "precision": precision}
    row.update({"status": "ok", "relative_max_logit_error": None, "tolerance": None, "ok": None})
    return {**row, **fields}


def _parity_step(backbone: str, record: Any, merging: Any, plan: ParityPlan, backends) -> list:
    """One backbone at one setting: the CPU reference, then every backend and precision."""
    import jax
    import numpy as np

    from vtm_jax.models.attention import get_attention, xla_attention
    from vtm_jax.models.registry import build_model

    clip = random_clips(1, record.num_frames, record.image_size)
    r = merging.to_dict()["r"]
    with jax.default_device(jax.devices("cpu")[0]):
        reference_model = build_model(record, merging, xla_attention)
        params = random_weights(reference_model, clip)
        expected = np.asarray(jax.jit(forward(reference_model))(params, clip))
    scale = float(np.abs(expected).max())
    on_device = jax.device_put(params, jax.devices()[0])
    rows = []
    for backend in backends:
        model = build_model(record, merging, get_attention(backend, chunk_size=plan.chunk_size))
        for precision in plan.precisions:
            tolerance = TOLERANCE["cudnn" if backend == "cudnn" else precision]
            try:
                with jax.default_matmul_precision(precision):
                    got = np.asarray(jax.jit(forward(model))(on_device, clip))
            except Exception as e:  # a backend that cannot run this model fails its row
                reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
                rows.append(_parity_row(backbone, r, backend, precision, status="error",
                                        reason=reason, tolerance=tolerance, ok=False))  # fmt: skip
                continue
            error = float(np.abs(got - expected).max()) / scale
            rows.append(_parity_row(backbone, r, backend, precision, tolerance=tolerance,
                                    relative_max_logit_error=error, ok=error <= tolerance))  # fmt: skip
    return rows


def parity_rows(
    plan: ParityPlan,
    budget: Budget,
    backends: tuple[str, ...],
    *,
    progress: Callable[[str], None] = print,
    on_rows: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Every parity row; a (backbone, setting) step that would overrun ``budget`` is skipped
    (its rows say so)."""
    from vtm_jax.merging import MergingSettings

    rows: list[dict] = []
    for backbone in plan.backbones:
        record, paper = load(f"{backbone}_k400", smoke=plan.smoke, num_layers=plan.layers)
        for merging in [{"r0": MergingSettings(), "paper": paper}[s] for s in plan.settings]:
            if budget.allows("parity"):
                start = time.monotonic()
                step = _parity_step(backbone, record, merging, plan, backends)
                budget.record("parity", time.monotonic() - start)
            else:
                reason = f"time budget: {budget.elapsed():.0f} s spent"
                r = merging.to_dict()["r"]
                step = [_parity_row(backbone, r, b, p, status="skipped", reason=reason)
                        for b in backends for p in plan.precisions]  # fmt: skip
            for row in step:
                progress(json.dumps(row))
            rows += step
            if on_rows is not None:
                on_rows(rows)
    return rows


def _document(smoke: bool, budget_s: float, plan: Any, parity_plan: ParityPlan) -> dict:
    """The check's JSON document before any row: where, what and how long."""
    from accelerator_report import FORMAT, run_info

    record, paper = load(plan.config, smoke=smoke)
    layers = max(v for k, v in record.model.items() if k.endswith("num_layers"))
    return {
        "format": FORMAT, "smoke": smoke, "run": run_info(), "config": plan.config,
        "model": {"architecture": record.architecture, "num_frames": record.num_frames,
                  "image_size": record.image_size, "num_layers": layers, "fields": record.model},
        "merging": {"r0": 0, "paper": paper.to_dict()},
        "plan": dataclasses.asdict(plan), "budget_s": budget_s, "elapsed_s": 0.0,
        "complete": False, "rows": [],
        "parity": {**dataclasses.asdict(parity_plan), "rows": [], "failed": 0},
    }  # fmt: skip


def check(args: argparse.Namespace) -> int:
    """The whole check: the matrix, then parity, within the budget; writes as it goes."""
    import jax
    from accelerator_matrix import FULL, SMOKE, run_matrix
    from accelerator_report import write

    platform = jax.default_backend()
    if platform not in ("gpu", "tpu") and not args.smoke:
        print(f"no GPU or TPU here (JAX's default backend is {platform}); --smoke runs the "
              "check on the CPU with a tiny model", file=sys.stderr)  # fmt: skip
        return 2
    plan, parity_plan = (SMOKE, SMOKE_PARITY) if args.smoke else (FULL, FULL_PARITY)
    budget_s = (
        args.budget_s
        if args.budget_s is not None
        else (SMOKE_BUDGET_S if args.smoke else FULL_BUDGET_S)
    )
    os.makedirs(args.out, exist_ok=True)
    doc = _document(args.smoke, budget_s, plan, parity_plan)

    def save(**changes: Any) -> None:
        if "parity_rows" in changes:
            doc["parity"]["rows"] = changes.pop("parity_rows")
        doc.update(changes, elapsed_s=time.monotonic() - START)
        write(args.out, doc)

    save()
    rows = run_matrix(plan, Budget(budget_s * MATRIX_SHARE, START), on_rows=lambda r: save(rows=r))
    backends = PLATFORM_BACKENDS[platform]
    parity = parity_rows(parity_plan, Budget(budget_s, START), backends,
                         on_rows=lambda r: save(parity_rows=r))  # fmt: skip
    doc["parity"]["failed"] = sum(row["ok"] is False for row in parity)
    errors = sum(row["status"] == "error" for row in rows)
    done = all(row["status"] in ("ok", "n/a") for row in rows + parity)
    save(complete=done)
    print(f"{len(rows)} matrix rows ({errors} errors), {len(parity)} parity rows "
          f"({doc['parity']['failed']} failed); {doc['elapsed_s']:.0f} s; "
          f"{os.path.join(args.out, 'table.md')} and table.json")  # fmt: skip
    return 1 if errors or doc["parity"]["failed"] else 0


def parity(args: argparse.Namespace) -> int:
    """``parity`` alone (no time budget unless given), written to ``--output``."""
    import jax

    platform = jax.default_backend()
    backends = tuple(args.backends or PLATFORM_BACKENDS.get(platform, ()))
    if platform not in ("gpu", "tpu") and not args.backends:
        print(f"no accelerator: JAX's default backend is {platform}", file=sys.stderr)
        return 2
    plan = dataclasses.replace(
        FULL_PARITY,
        backbones=tuple(args.backbones),
        layers=args.layers,
        settings=("r0", "paper"),
        precisions=("default", "highest"),
    )
    rows = parity_rows(plan, Budget(args.budget_s or float("inf"), START), backends)
    failed = sum(row["ok"] is False for row in rows)
    with open(args.output, "w") as f:
        json.dump({"platform": platform, "device": jax.devices()[0].device_kind, "rows": rows},
                  f, indent=2)  # fmt: skip
    print(f"{len(rows) - failed} of {len(rows)} parity checks within tolerance or not run")
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="the matrix and parity, within a time budget")
    c.add_argument("--smoke", action="store_true", help="a tiny model on the CPU")
    c.add_argument("--out", default="out/accelerator")
    c.add_argument(
        "--budget-s", type=float, help=f"default {FULL_BUDGET_S:g} (smoke {SMOKE_BUDGET_S:g})"
    )
    p = sub.add_parser("parity")
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--backends", nargs="+", help="instead of the platform's (e.g. a CPU dry run)")
    p.add_argument("--budget-s", type=float)
    p.add_argument("--output", default="out/accelerator/parity.json")
    args = parser.parse_args()
    sys.exit(check(args) if args.command == "check" else parity(args))


if __name__ == "__main__":
    main()
