"""The bfloat16 attention option against float32: speed and effect on a model's logits.

ViViT-B/16x2 (32x224x224) at r=0 and r=300, random weights with noise on every leaf (the
zero-initialised head would make every logit 0), one random clip: ``blockwise`` (float32) and
``blockwise_bf16`` (bfloat16 matmul inputs, float32 softmax and accumulation) on the same
weights, timed alternately, and the largest logit difference between them.

  .venv/bin/python scripts/bench_bf16_logits.py --rounds 3 --output out/bf16.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_accelerator import _random_params  # noqa: E402

from vtm_jax.config.loading import load_config, record_from_config
from vtm_jax.merging import MergingSettings
from vtm_jax.models.attention import get_attention
from vtm_jax.models.registry import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="vivit_b_k400")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output")
    args = parser.parse_args()
    config = load_config([f"--config={args.config}"])
    record = record_from_config(config)
    size, frames = record.image_size, record.num_frames
    clip = np.random.default_rng(0).random((1, frames, size, size, 3), dtype=np.float32)
    results = []
    params = None
    for merging in (MergingSettings(), MergingSettings.from_dict(config.token_merging)):
        compiled, logits = {}, {}
        for backend in ("blockwise", "blockwise_bf16"):
            model = build_model(record, merging, get_attention(backend))
            if params is None:
                params = _random_params(model, clip)
            forward = jax.jit(lambda p, x, m=model: m.apply({"params": p}, x))
            compiled[backend] = forward.lower(params, clip).compile()
            logits[backend] = np.asarray(compiled[backend](params, clip))  # also the warm-up
        seconds: dict[str, list[float]] = {name: [] for name in compiled}
        for _ in range(args.rounds):
            for name, fn in compiled.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(params, clip))
                seconds[name].append(time.perf_counter() - start)
        diff = float(np.abs(logits["blockwise_bf16"] - logits["blockwise"]).max())
        scale = float(np.abs(logits["blockwise"]).max())
        row = {
            "r": merging.to_dict()["r"],
            "seconds": seconds,
            "median_s": {k: float(np.median(v)) for k, v in seconds.items()},
            "max_logit_diff": diff,
            "max_abs_logit": scale,
            "same_top1": bool(
                (logits["blockwise_bf16"].argmax(-1) == logits["blockwise"].argmax(-1)).all()
            ),
        }
        results.append(row)
        med = row["median_s"]
        print(
            f"r={row['r']}: float32 {med['blockwise']:.2f} s, bf16 {med['blockwise_bf16']:.2f} s "
            f"({med['blockwise'] / med['blockwise_bf16']:.2f}x); max |logit diff| {diff:.2e} "
            f"(largest |logit| {scale:.2f}); same top-1: {row['same_top1']}",
            flush=True,
        )
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"config": args.config, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
