"""Attention alone at ViViT-B sizes (12 heads of 64), with the proportional-attention bias.

Best of 5 jitted runs per backend and chunk size, batch 1, float32.

  .venv/bin/python scripts/bench_attention.py [--tokens 3137 1569]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from vtm_jax.attention import blockwise_attention, xla_attention


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
    parser.add_argument("--tokens", type=int, nargs="+", default=[3137, 1569])
    parser.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512])
    args = parser.parse_args()
    for n in args.tokens:
        q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, n, 12, 64)) for i in range(3))
        sizes = jax.random.randint(jax.random.PRNGKey(5), (1, 1, 1, n), 1, 5)
        bias = jnp.log(sizes.astype(jnp.float32))
        plain = best_ms(lambda q, k, v, b: xla_attention(q, k, v, bias=b), q, k, v, bias)
        print(f"{n} tokens: xla {plain:.0f} ms", flush=True)
        for chunk in args.chunks:
            ms = best_ms(
                lambda q, k, v, b, c=chunk: blockwise_attention(q, k, v, bias=b, chunk_size=c),
                q, k, v, bias,
            )  # fmt: skip
            print(
                f"{n} tokens: blockwise chunk {chunk} {ms:.0f} ms ({plain / ms:.2f}x)", flush=True
            )


if __name__ == "__main__":
    main()
