"""Attention alone at ViViT-B sizes (12 heads of 64), with the proportional-attention bias.

Best of ``--repeats`` jitted runs per backend and chunk size, batch 1, float32 (plus the
bfloat16-matmul option), and PyTorch's fused CPU attention
(``scaled_dot_product_attention`` with the same additive key bias) when torch is installed,
timed in a subprocess right after, so that the two runtimes' thread pools never overlap.

  .venv/bin/python scripts/bench_attention.py [--tokens 3137 1569] [--chunks 128 256 512]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

TORCH = """
import sys, time, torch
n, repeats = int(sys.argv[1]), int(sys.argv[2])
q, k, v = (torch.randn(1, 12, n, 64) for _ in range(3))
bias = torch.log(torch.randint(1, 5, (1, 1, 1, n)).float())
with torch.inference_mode():
    f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    f()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter(); f(); best = min(best, time.perf_counter() - start)
print(best * 1e3)
"""


def best_ms(fn, *args, repeats: int = 5) -> float:
    import jax

    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def torch_ms(n: int, repeats: int) -> float | None:
    try:
        out = subprocess.run(
            [sys.executable, "-c", TORCH, str(n), str(repeats)],
            capture_output=True,
            text=True,
            check=True,
        )
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None  # no torch in this environment
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[3137, 1569])
    parser.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp

    from vtm_jax.models.attention import blockwise_attention, xla_attention

    for n in args.tokens:
        q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, n, 12, 64)) for i in range(3))
        sizes = jax.random.randint(jax.random.PRNGKey(5), (1, 1, 1, n), 1, 5)
        bias = jnp.log(sizes.astype(jnp.float32))
        flops = 4 * n * n * 12 * 64
        plain = best_ms(
            lambda q, k, v, b: xla_attention(q, k, v, bias=b), q, k, v, bias, repeats=args.repeats
        )
        print(f"{n} tokens: xla {plain:.0f} ms", flush=True)
        for dtype in (None, jnp.bfloat16):
            for chunk in args.chunks:
                ms = best_ms(
                    lambda q, k, v, b, c=chunk, t=dtype: blockwise_attention(
                        q, k, v, bias=b, chunk_size=c, compute_dtype=t
                    ),
                    q, k, v, bias, repeats=args.repeats,
                )  # fmt: skip
                name = "blockwise" if dtype is None else "blockwise_bf16"
                print(
                    f"{n} tokens: {name} chunk {chunk} {ms:.0f} ms ({plain / ms:.2f}x xla, "
                    f"{flops / ms / 1e6:.0f} GFLOP/s)",
                    flush=True,
                )
        ms = torch_ms(n, args.repeats)
        if ms is not None:
            print(
                f"{n} tokens: torch sdpa (fused, same key bias) {ms:.0f} ms "
                f"({flops / ms / 1e6:.0f} GFLOP/s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
