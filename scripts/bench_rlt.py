"""Throughput of mode ``rlt``, static shape against buckets, against r=0 (one run per call).

A small VideoMAE (ViT-S sized: 384 wide, 6 heads, 12 layers) with random weights on 16 frames of
224x224: two clips whose background stands still while a 64-pixel square moves 8 pixels a frame.
Every setting is compiled and warmed up first, then timed in turns (one pass of each per round),
as ``vtm-jax bench`` does. Run it three times and compare the speedups.

  .venv/bin/python scripts/bench_rlt.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from vtm_jax.merging import MergingSettings
from vtm_jax.merging.methods import rlt
from vtm_jax.models.videomae import VideoMAE

FRAMES, SIZE, BATCH, PASSES = 16, 224, 2, 3
MODEL = dict(num_classes=400, hidden_size=384, num_heads=6, mlp_dim=1536, num_layers=12)


def moving_square_clips() -> jax.Array:
    rng = np.random.default_rng(0)
    video = np.repeat(rng.normal(size=(BATCH, 1, SIZE, SIZE, 3)), FRAMES, axis=1)
    for b in range(BATCH):
        for f in range(FRAMES):
            y, x = 40 + 8 * f + 16 * b, 20 + 8 * f
            video[b, f, y : y + 64, x : x + 64] = 2.0
    return jnp.asarray(video.astype(np.float32))


def main() -> None:
    video = moving_square_clips()
    params = jax.jit(VideoMAE(**MODEL).init)(jax.random.PRNGKey(0), video[:1])["params"]
    bucketed = MergingSettings(mode="rlt", prop_attn=False, rule_options={"bucket": 196})
    settings = {
        "none": MergingSettings(prop_attn=False),
        "rlt static": MergingSettings(mode="rlt", prop_attn=False),
        "rlt buckets": rlt.batch_settings(bucketed, video, (2, 16, 16)),
    }
    keep = rlt.keep_mask(video, rlt.DEFAULT_THRESHOLD, (2, 16, 16))
    length = settings["rlt buckets"].rule_options["length"]
    kept = np.asarray(rlt.kept_counts(keep)).tolist()
    print(f"kept per clip {kept} of {keep.shape[1]}, bucket length {length}")
    runs = {}
    for name, merging in settings.items():
        model = VideoMAE(**MODEL, merging=merging)
        compiled = jax.jit(lambda p, v, m=model: m.apply({"params": p}, v))
        compiled = compiled.lower(params, video).compile()
        jax.block_until_ready(compiled(params, video))
        runs[name] = (model, compiled, [])
    for _ in range(PASSES):
        for _model, compiled, seconds in runs.values():
            start = time.perf_counter()
            jax.block_until_ready(compiled(params, video))
            seconds.append(time.perf_counter() - start)
    base = BATCH / float(np.median(runs["none"][2]))
    for name, (model, _, seconds) in runs.items():
        rate = BATCH / float(np.median(seconds))
        gmacs = model.analytic_macs(FRAMES, SIZE)["total"] / 1e9
        print(f"{name:12s} GMACs/clip {gmacs:.2f}  clips/s {rate:.3f}  speedup {rate / base:.2f}")


if __name__ == "__main__":
    main()
