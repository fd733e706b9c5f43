"""The bfloat16 options against float32: speed, and their effect on logits and accuracy.

``speed`` (the default): a config's model (``vivit_b_k400``: ViViT-B/16x2, 32x224x224) at r=0
and the config's r, random weights with noise on every leaf (the zero-initialised head would
make every logit 0), one random batch, three variants on the same weights, compiled, warmed up
once, then timed in turns (one pass of each per round), so the ratios come from one run:

* ``float32``: the float32 model, ``blockwise`` attention (the CPU's ``auto``);
* ``attention_bf16``: ``blockwise_bf16``, bfloat16 matmul inputs in the attention only;
* ``model_bf16``: the model-wide ``dtype="bfloat16"`` (activations and every matmul;
  softmax, merge arithmetic and logits float32), ``blockwise`` attention.

Each row has the median seconds per pass, the speedup over float32 and the largest logit
difference to float32 (with the largest logit, and whether the top-1 classes agree).

``demo``: the shipped demo checkpoint on its synthetic test set (what ``vtm-jax demo``
evaluates), every setting of the demo's table, through ``vtm_jax.evaluate`` with the scores
saved, in float32 and in bfloat16: top-1 of each and the largest |logit| difference.

  .venv/bin/python scripts/bench_bf16_logits.py --rounds 3 --output out/bf16_speed.json
  .venv/bin/python scripts/bench_bf16_logits.py --config vivit_demo --batch 64 --rounds 5
  .venv/bin/python scripts/bench_bf16_logits.py demo --output out/bf16_demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

import jax
import numpy as np

from vtm_jax.config.loading import load_config, record_from_config
from vtm_jax.merging import MergingSettings
from vtm_jax.models.attention import get_attention
from vtm_jax.models.registry import build_model

# name: (attention backend, model dtype)
VARIANTS = {
    "float32": ("blockwise", "float32"),
    "attention_bf16": ("blockwise_bf16", "float32"),
    "model_bf16": ("blockwise", "bfloat16"),
}


def noisy_params(model: Any, clip: np.ndarray, seed: int = 0) -> Any:
    """Initialised float32 weights plus noise on every leaf."""
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), clip)["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    noisy = [x + 0.02 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree_util.tree_unflatten(tree, noisy)


def speed(config_name: str, batch: int, rounds: int) -> dict[str, Any]:
    config = load_config([f"--config={config_name}"])
    record = record_from_config(config)
    size, frames = record.image_size, record.num_frames
    clip = np.random.default_rng(0).random((batch, frames, size, size, 3), dtype=np.float32)
    params = noisy_params(build_model(record), clip[:1])
    rows = []
    for merging in (MergingSettings(), MergingSettings.from_dict(config.token_merging)):
        compiled, logits = {}, {}
        for name, (backend, dtype) in VARIANTS.items():
            model = build_model(record, merging, get_attention(backend), dtype)
            forward = jax.jit(lambda p, x, m=model: m.apply({"params": p}, x))
            start = time.perf_counter()
            compiled[name] = forward.lower(params, clip).compile()
            compile_s = time.perf_counter() - start
            logits[name] = np.asarray(compiled[name](params, clip))  # also the warm-up
            print(f"r={merging.to_dict()['r']} {name}: compiled in {compile_s:.1f} s", flush=True)
        seconds: dict[str, list[float]] = {name: [] for name in compiled}
        for _ in range(rounds):
            for name, fn in compiled.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(params, clip))
                seconds[name].append(time.perf_counter() - start)
        rows.append(_speed_row(merging, seconds, logits))
    return {"config": config_name, "batch": batch, "rounds": rounds, "results": rows}


def _speed_row(merging: MergingSettings, seconds: dict, logits: dict) -> dict[str, Any]:
    median = {name: float(np.median(times)) for name, times in seconds.items()}
    reference = logits["float32"]
    row: dict[str, Any] = {"r": merging.to_dict()["r"], "mode": merging.mode, "seconds": seconds}
    row["median_s"] = median
    row["speedup"] = {name: median["float32"] / median[name] for name in median}
    row["max_abs_logit"] = float(np.abs(reference).max())
    row["max_logit_diff"] = {
        name: float(np.abs(value - reference).max()) for name, value in logits.items()
    }
    row["same_top1"] = {
        name: bool((value.argmax(-1) == reference.argmax(-1)).all())
        for name, value in logits.items()
    }
    print(
        f"r={row['r']}: "
        + ", ".join(
            f"{name} {median[name]:.3f} s ({row['speedup'][name]:.2f}x, "
            f"max |logit diff| {row['max_logit_diff'][name]:.2e})"
            for name in median
        )
        + f"; largest |logit| {row['max_abs_logit']:.2f}",
        flush=True,
    )
    return row


def demo(batch: int | None) -> dict[str, Any]:
    """Top-1 of every demo table setting in float32 and bfloat16, and their logit difference."""
    import vtm_jax
    from vtm_jax.data.datasets import open_split
    from vtm_jax.jobs.demo import demo_config, demo_settings

    checkpoint = vtm_jax.demo_checkpoint()
    config = demo_config(checkpoint)
    data = config.dataset_configs
    source = open_split(
        config.dataset_name,
        data.get("split", "test"),
        data_dir=data.data_dir,
        config=(data.get("builder_options") or {}) or None,
    )
    batch = batch or int(data.get("test_batch_size", 1))
    attention = config.demo.get("attention", "auto")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for i, merging in enumerate(demo_settings(config)):
            scores, top1 = {}, {}
            for dtype in ("float32", "bfloat16"):
                path = os.path.join(scratch, f"{i}_{dtype}.json")
                results = vtm_jax.evaluate(
                    checkpoint,
                    source,
                    merging=merging,
                    batch_size=batch,
                    attention=attention,
                    dtype=dtype,
                    results_path=path,
                    save_scores=True,
                    progress=False,
                )
                top1[dtype] = results["metrics"]["top1"]
                with np.load(path[: -len(".json")] + ".scores.npz") as saved:
                    scores[dtype] = saved["scores"][np.argsort(saved["index"])]
            rows.append(_demo_row(merging, top1, scores))
    return {"checkpoint": checkpoint, "test_examples": len(source), "results": rows}


def _demo_row(merging: MergingSettings, top1: dict, scores: dict) -> dict[str, Any]:
    reference, half = scores["float32"], scores["bfloat16"]
    per_clip = np.abs(half - reference).max(axis=-1)
    row = {
        "mode": merging.mode,
        "r": 0 if merging.mode == "none" else merging.to_dict()["r"],
        "threshold": merging.rule_options.get("threshold"),
        "top1": top1,
        "max_logit_diff": float(per_clip.max()),
        "median_clip_logit_diff": float(np.median(per_clip)),  # each clip's largest
        "p99_clip_logit_diff": float(np.percentile(per_clip, 99)),
        "max_abs_logit": float(np.abs(reference).max()),
        "top1_changed": int((half.argmax(-1) != reference.argmax(-1)).sum()),
    }
    print(
        f"{row['mode']} r={row['r']}: top-1 float32 {100 * top1['float32']:.2f}, bfloat16 "
        f"{100 * top1['bfloat16']:.2f}; max |logit diff| {row['max_logit_diff']:.3g} (median "
        f"clip {row['median_clip_logit_diff']:.3g}, 99th pct {row['p99_clip_logit_diff']:.3g}) "
        f"(largest |logit| {row['max_abs_logit']:.2f}); predictions changed: "
        f"{row['top1_changed']}",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", choices=("speed", "demo"), default="speed")
    parser.add_argument("--config", default="vivit_b_k400", help="speed: a shipped config")
    parser.add_argument("--batch", type=int, help="clips per pass (speed: 1; demo: its own)")
    parser.add_argument("--rounds", type=int, default=3, help="speed: timed passes of each")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args()
    began, load_before = time.time(), list(os.getloadavg())
    if args.what == "speed":
        result = speed(args.config, args.batch or 1, args.rounds)
    else:
        result = demo(args.batch)
    result.update(
        device_kind=jax.devices()[0].device_kind,
        cpu_count=os.cpu_count(),
        load_average_before=load_before,  # 1, 5, 15 min: the machine is shared
        load_average_after=list(os.getloadavg()),
        jax=jax.__version__,
        wall_s=round(time.time() - began, 1),
    )
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
