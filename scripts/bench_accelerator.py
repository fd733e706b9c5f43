"""Accelerator checks for scripts/accelerator_check.sh: logit parity against the CPU, and the
ViViT-B table of BENCHMARKS.md from `vtm-jax bench` results.

  python scripts/bench_accelerator.py parity --output out/accelerator/parity.json
  python scripts/bench_accelerator.py table out/accelerator/bench_*.json --output TABLE.md

``parity``: every backbone (the paper's configs, at r=0 and the paper's r) runs on the
accelerator with each backend that applies there and on the host CPU with plain float32
attention (``xla``), on the same random weights and clip; the report is the largest logit
difference relative to the largest CPU logit, against a tolerance per backend and matmul
precision. Layers are cut to ``--layers`` (4 by default: every merge step of those layers
still runs at the real token counts) so that the whole check fits in a few minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

BACKBONES = ("vivit_b", "vivit_b_fe", "videomae_b", "timesformer_b", "motionformer_b")
PLATFORM_BACKENDS = {"gpu": ("xla", "jax_nn", "cudnn"), "tpu": ("xla", "pallas_tpu")}
# Largest |logit difference| / largest |CPU logit| accepted. "highest": float32 matmuls on the
# accelerator; "default": the platform's default matmul precision (TF32 on recent GPUs, one
# bfloat16 pass on TPUs); cudnn computes attention in float16 whatever the precision.
TOLERANCE = {"highest": 1e-4, "default": 2e-2, "cudnn": 1e-2}


def _random_params(model: Any, clip: Any, seed: int = 0) -> Any:
    """Initialised weights plus noise on every leaf: the zero-initialised head and biases
    would otherwise make every logit 0 and the comparison empty."""
    import jax

    params = jax.jit(model.init)(jax.random.PRNGKey(seed), clip)["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    noisy = [
        x + 0.02 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree_util.tree_unflatten(tree, noisy)


def parity(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from vtm_jax.config.loading import load_config, record_from_config
    from vtm_jax.merging import MergingSettings
    from vtm_jax.models.attention import get_attention, xla_attention
    from vtm_jax.models.registry import build_model

    platform = jax.default_backend()
    backends = args.backends or PLATFORM_BACKENDS.get(platform)
    if backends is None:
        print(f"no accelerator: JAX's default backend is {platform}", file=sys.stderr)
        return 2
    cpu = jax.devices("cpu")[0]
    rows, failed = [], 0
    for backbone in args.backbones:
        config = load_config(f"{backbone}_k400")
        record = record_from_config(config)
        model = {
            k: min(v, args.layers) if k.endswith("num_layers") else v
            for k, v in record.model.items()
        }
        record = dataclasses.replace(record, model=model)
        size, frames = record.image_size, record.num_frames
        rng = np.random.default_rng(0)
        clip = rng.random((1, frames, size, size, 3), dtype=np.float32)
        paper = MergingSettings.from_dict(config.token_merging)
        for merging in (MergingSettings(), paper):
            with jax.default_device(cpu):
                reference_model = build_model(record, merging, xla_attention)
                params = _random_params(reference_model, clip)
                expected = np.asarray(
                    jax.jit(lambda p, x, m=reference_model: m.apply({"params": p}, x))(params, clip)
                )
            scale = float(np.abs(expected).max())
            for backend in backends:
                model = build_model(record, merging, get_attention(backend))
                for precision in ("default", "highest"):
                    with jax.default_matmul_precision(precision):
                        forward = jax.jit(lambda p, x, m=model: m.apply({"params": p}, x))
                        got = np.asarray(forward(jax.device_put(params, jax.devices()[0]), clip))
                    error = float(np.abs(got - expected).max()) / scale
                    tolerance = TOLERANCE["cudnn" if backend == "cudnn" else precision]
                    ok = error <= tolerance
                    failed += not ok
                    row = {
                        "backbone": backbone,
                        "r": merging.to_dict()["r"],
                        "backend": backend,
                        "precision": precision,
                        "relative_max_logit_error": error,
                        "tolerance": tolerance,
                        "ok": ok,
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    with open(args.output, "w") as f:
        json.dump(
            {"platform": platform, "device": jax.devices()[0].device_kind, "rows": rows},
            f,
            indent=2,
        )
    print(f"{len(rows) - failed} of {len(rows)} parity checks within tolerance")
    return 1 if failed else 0


def table(args: argparse.Namespace) -> int:
    """The Markdown table of BENCHMARKS.md's accelerator section from bench JSON files."""
    lines = [
        "| backend | batch | device | r=0 s/clip | r=300 s/clip | speedup | FLOP limit | "
        "r=0 GFLOP/s | matmul peak GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in args.files:
        with open(path) as f:
            data = json.load(f)
        run, results = data["run"], data["results"]
        base = next(r for r in results if r["mode"] == "none")
        merged = next((r for r in results if r["mode"] != "none"), None)
        batch = run["global_batch"]

        def per_clip(r: dict, batch: int = batch) -> float:
            return sorted(r["seconds"])[len(r["seconds"]) // 2] / batch

        backend = data["config"].get("bench", {}).get("attention", "auto")
        lines.append(
            f"| {backend} | {batch} | {run['device_kind']} | {per_clip(base):.4f} | "
            + (
                f"{per_clip(merged):.4f} | {merged['speedup']:.2f}x | {merged['flop_limit']:.2f}x"
                if merged
                else "- | - | -"
            )  # fmt: skip
            + f" | {base['achieved_gflop_per_s']:.0f} | {run.get('matmul_peak_gflop_per_s', 0):.0f} |"
        )
    text = "\n".join(lines) + "\n"
    with open(args.output, "w") as f:
        f.write(text)
    print(text)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("parity")
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--backends", nargs="+", help="instead of the platform's (e.g. a CPU dry run)")
    p.add_argument("--output", default="out/accelerator/parity.json")
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+")
    t.add_argument("--output", default="out/accelerator/table.md")
    args = parser.parse_args()
    sys.exit(parity(args) if args.command == "parity" else table(args))


if __name__ == "__main__":
    main()
