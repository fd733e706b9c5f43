"""Time the PyTorch baselines vtm-jax is compared with, under the same protocol as `vtm-jax bench`.

* HF transformers' ViViT with fused attention (``sdpa``), r=0: the best unmerged PyTorch run;
* HF ViViT with eager attention, r=0;
* the paper's method in PyTorch at r: HF ViViT, attention recomputed eagerly with the
  proportional-attention bias and bipartite merging after it, as the original code runs it
  (``tests/reference/torch_tome_vivit.py``, written from method.md).

Random weights and random input, a warm-up, then timed forward passes only.

  .venv/bin/python scripts/bench_pytorch.py --r 300 --output out/torch.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.reference.torch_tome_vivit import tome_vivit_forward  # noqa: E402


def time_it(fn, warmup: int, iterations: int) -> list[float]:
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        seconds = []
        for _ in range(iterations):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", type=int, default=300)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--output")
    args = parser.parse_args()

    torch.manual_seed(0)
    video = torch.rand(args.batch, args.frames, 3, args.size, args.size)
    results = {}
    for attn in ("sdpa", "eager"):
        config = transformers.VivitConfig(
            num_frames=args.frames, image_size=args.size, attn_implementation=attn
        )
        model = transformers.VivitForVideoClassification(config).eval()
        seconds = time_it(lambda m=model: m(pixel_values=video), args.warmup, args.iterations)
        results[f"hf_{attn}_r0"] = seconds
        print(f"HF ViViT {attn} r=0: {min(seconds):.2f} s (min of {len(seconds)})", flush=True)
    seconds = time_it(
        lambda: tome_vivit_forward(model, video, args.r, mode="merge"), args.warmup, args.iterations
    )
    results[f"paper_merge_r{args.r}"] = seconds
    print(f"paper's method (eager + merge) r={args.r}: {min(seconds):.2f} s", flush=True)
    summary = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "input": [args.frames, args.size, args.size],
        "seconds": results,
    }
    if args.output:
        with open(args.output, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
