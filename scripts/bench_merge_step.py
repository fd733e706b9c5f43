"""Cost of the merge step against the whole block, layer by layer, for ViViT-B at r=300.

Times, at each layer's token count, one jitted merging step (cosine scores, matching,
size-weighted merge of the hidden states and sizes) and one jitted ViViT-B block that includes
it, and prints the share of the block the step takes.

  .venv/bin/python scripts/bench_merge_step.py [--r 300] [--mode merge] [--output out/merge.json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from vtm_jax.merging import MergingSettings, Tokens, merge_tokens
from vtm_jax.models.attention import get_attention
from vtm_jax.models.vivit import EncoderBlock, ViViT


def best_ms(fn, *args, repeats: int = 5) -> float:
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", type=int, default=300)
    parser.add_argument("--mode", default="merge")
    parser.add_argument("--output")
    args = parser.parse_args()
    merging = MergingSettings(mode=args.mode, r=args.r, rule_options={"threshold": 0.4})
    plan = ViViT(num_classes=400, merging=merging).token_plan(32, 224)
    block = EncoderBlock(
        num_heads=12, mlp_dim=3072, class_token=True, merging=merging, attention_fn=get_attention()
    )
    key = jax.random.PRNGKey(0)
    rows = []
    for layer, step in enumerate(plan):
        n = step.tokens_in
        x = jax.random.normal(jax.random.PRNGKey(layer), (1, n, 768))
        metric = jax.random.normal(jax.random.PRNGKey(layer + 100), (1, n, 64))
        size = jnp.ones((1, n, 1))
        params = block.init(key, Tokens(x, size), key, r=step.r)

        def reduce_step(x, metric, size, r=step.r):
            return merge_tokens(
                Tokens(x, size), metric, r, settings=merging, class_token=True, key=key
            )

        def whole_block(params, x, size, r=step.r):
            return block.apply(params, Tokens(x, size), key, r=r)

        merge_ms = best_ms(reduce_step, x, metric, size) if step.r else 0.0
        block_ms = best_ms(whole_block, params, x, size)
        rows.append(
            {
                "layer": layer,
                "tokens_in": n,
                "r": step.r,
                "merge_ms": merge_ms,
                "block_ms": block_ms,
            }
        )
        print(
            f"layer {layer:2d}: {n:4d} tokens, r={step.r:3d}: merge step {merge_ms:6.2f} ms, "
            f"block {block_ms:7.1f} ms ({100 * merge_ms / block_ms:.1f}%)",
            flush=True,
        )
    merge_total = sum(r["merge_ms"] for r in rows)
    block_total = sum(r["block_ms"] for r in rows)
    print(
        f"all layers: merge steps {merge_total:.1f} ms of {block_total:.1f} ms in blocks "
        f"({100 * merge_total / block_total:.1f}%)"
    )
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"mode": args.mode, "r": args.r, "layers": rows}, f, indent=2)


if __name__ == "__main__":
    main()
