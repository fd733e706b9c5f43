"""Time the PyTorch peers of vtm-jax, under the same protocol as `vtm-jax bench`.

* HF transformers' ViViT with fused attention (``sdpa``), r=0;
* HF ViViT with eager attention, r=0;
* the paper's method in PyTorch at r: HF ViViT, attention recomputed eagerly with the
  proportional-attention bias and bipartite merging after it, as the original code runs it
  (``tests/reference/torch_tome_vivit.py``, written from docs/method.md; under transformers 4.x
  its modules are reached through the 4.x attribute names, the computation is the same);
* a dense float32 matmul, to give this machine's peak in the same process.

Random weights and random input, one warm-up, then timed forward passes only; the reported
time is the median. It runs under whichever transformers the interpreter has, so the same
script measures transformers 5.x (the project's venv) and 4.46 (the version the paper's code
patches; a scratch venv, see ``scripts/bench_side_by_side.py``).

  .venv/bin/python scripts/bench_pytorch.py --r 300 --batch 1 --output out/torch.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.reference.torch_tome_vivit import tome_vivit_forward  # noqa: E402

RUNS = ("sdpa", "eager", "paper")


def time_it(fn: Callable[[], Any], warmup: int, iterations: int) -> list[float]:
    """Seconds of each timed call after ``warmup`` untimed ones, without autograd."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        seconds = []
        for _ in range(iterations):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
    return seconds


def matmul_peak_gflops(repeats: int = 20) -> float:
    """Best float32 GEMM rate (GFLOP/s) at ViViT-B's MLP shape, [3137, 768] x [768, 3072]."""
    a, b = torch.randn(3137, 768), torch.randn(768, 3072)
    seconds = time_it(lambda: a @ b, 2, repeats)
    return 2 * 3137 * 768 * 3072 / min(seconds) / 1e9


def paper_model_view(model: torch.nn.Module) -> Any:
    """``model`` as ``tome_vivit_forward`` addresses it, for transformers 4.x or 5.x.

    transformers 5 names ViViT's pieces ``vivit.layers[i].attention.q_proj`` and ``.mlp``; 4.x
    has ``vivit.encoder.layer[i].attention.attention.query`` and an intermediate/output pair
    whose output also adds a residual. The view maps the 4.x modules onto the 5.x names; the
    tensors and the operations run are the same.
    """
    vivit = model.vivit
    if hasattr(vivit, "layers"):
        return model
    layers = []
    for layer in vivit.encoder.layer:
        self_attn = layer.attention.attention
        attention = SimpleNamespace(
            q_proj=self_attn.query,
            k_proj=self_attn.key,
            v_proj=self_attn.value,
            o_proj=layer.attention.output.dense,
            num_attention_heads=self_attn.num_attention_heads,
            head_dim=self_attn.attention_head_size,
        )

        def mlp(h: torch.Tensor, layer=layer) -> torch.Tensor:
            # 4.x's VivitOutput adds its input as a residual; the caller adds it itself.
            return layer.output.dense(layer.intermediate(h))

        layers.append(
            SimpleNamespace(
                attention=attention,
                layernorm_before=layer.layernorm_before,
                layernorm_after=layer.layernorm_after,
                mlp=mlp,
            )
        )
    view = SimpleNamespace(embeddings=vivit.embeddings, layers=layers, layernorm=vivit.layernorm)
    return SimpleNamespace(vivit=view, classifier=model.classifier)


def build(attn: str, frames: int, size: int) -> torch.nn.Module:
    config = transformers.VivitConfig(num_frames=frames, image_size=size)
    config._attn_implementation = attn  # both 4.x and 5.x read this field
    model = transformers.VivitForVideoClassification(config).eval()
    if getattr(model.config, "_attn_implementation", attn) != attn:
        raise SystemExit(f"transformers {transformers.__version__} did not take attn={attn}")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", type=int, default=300)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument(
        "--runs", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS)
    )
    parser.add_argument("--output")
    args = parser.parse_args()
    runs = [r for r in args.runs.split(",") if r]
    if unknown := set(runs) - set(RUNS):
        parser.error(f"unknown runs {sorted(unknown)}; valid: {', '.join(RUNS)}")

    tf = transformers.__version__
    peak = matmul_peak_gflops()
    print(f"torch {torch.__version__}, transformers {tf}, {torch.get_num_threads()} threads; "
          f"float32 matmul peak {peak:.0f} GFLOP/s", flush=True)  # fmt: skip
    torch.manual_seed(0)
    video = torch.rand(args.batch, args.frames, 3, args.size, args.size)
    results: dict[str, dict[str, Any]] = {}
    for name in runs:
        if name == "paper":
            # The paper's code recomputes attention eagerly whatever the model's setting.
            model = paper_model_view(build("eager", args.frames, args.size))
            key, label = f"paper_merge_r{args.r}", f"paper's method (eager + merge) r={args.r}"

            def fn(model=model):
                return tome_vivit_forward(model, video, args.r, mode="merge")["logits"]
        else:
            model = build(name, args.frames, args.size)
            key, label = f"hf_{name}_r0", f"HF ViViT {name} r=0"

            def fn(model=model):
                return model(pixel_values=video).logits

        seconds = time_it(fn, args.warmup, args.iterations)
        median = statistics.median(seconds)
        results[key] = {
            "r": args.r if name == "paper" else 0,
            "seconds": seconds,
            "median_s": median,
        }
        print(f"{label}: {median / args.batch:.3f} s/clip (median of {len(seconds)}, batch "
              f"{args.batch}: {', '.join(f'{s:.2f}' for s in seconds)} s)", flush=True)  # fmt: skip
        del model
    # Measured again after the timing, the best kept (as vtm-jax bench does).
    peak = max(peak, matmul_peak_gflops())
    summary = {
        "torch": torch.__version__,
        "transformers": tf,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "input": [args.frames, args.size, args.size],
        "matmul_peak_gflop_per_s": peak,
        "results": results,
    }
    if args.output:
        with open(args.output, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
