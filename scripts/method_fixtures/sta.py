"""Reference outputs of STA (Ding et al., ICCV 2023) from its authors' own code, for tests/methods.

Runs ``model_vit.py`` of Mark12Ding/STA at commit faf10be5af889afed737e13517c4904c8572c3d7
(``VisionTransformer.merge`` with its inner ``tome_drop``, ``Block``, ``forward_features``),
imported from a checkout outside this repository, and writes small float32 arrays:

* ``tests/methods/fixtures/sta_merge.npz``: ``merge(x, metric, index, depth)`` at the three
  stages (index 0, depth // 3, 2 depth // 3 with depth 6) on random ``x`` and ``metric`` (torch
  seed 0), for two cases: ``a`` (B 2, 16 tokens per frame, C 8, key width 8, r 3) and ``b``
  (B 2, 25 tokens per frame, an odd count, C 6, key width 4, r 12, the most STA can drop from
  25). Inputs at each stage have the token count the previous stages leave. Besides the output,
  the kept indices: the row of the input each output row equals (rows of random inputs are
  distinct, and a gather copies them bit for bit).
* ``tests/methods/fixtures/sta_block.npz``: one authors' ``Block`` (width 16, 2 heads, MLP 64,
  q/v biases, LayerNorm eps 1e-6; random weights, torch seed 1) followed by ``merge`` at
  stage 1 (index 0) and, for a second random input, at stage 2 (index depth // 3, backward
  walk), r 3.
* ``tests/methods/fixtures/sta_model.npz``: the logits of a tiny ``VisionTransformer`` (16
  frames of 8x8 pixels, tubelet 2, patch 2, so an (8, 4, 4) grid; width 16, depth 6, 2 heads,
  5 classes; random weights, torch seed 2) on a random video (torch seed 3) at r 3 and r 0.

Weights are saved under the authors' parameter names (``w/<name>``). The authors' default
initialisation zeroes the head (``init_scale=0``), so every parameter is redrawn from a seeded
generator instead. Run with the reference environment (torch, timm 0.4.12, einops):

  python scripts/method_fixtures/sta.py /path/to/STA-checkout
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import numpy as np

REPO = "Mark12Ding/STA"
COMMIT = "faf10be5af889afed737e13517c4904c8572c3d7"
OUT = Path(__file__).resolve().parents[2] / "tests" / "methods" / "fixtures"
DEPTH = 6
FRAMES, TUBELET = 16, 2


def kept_rows(out, x):
    """For each output row, the index of the equal input row (gathers copy rows exactly)."""
    eq = (out[:, :, None, :] == x[:, None, :, :]).all(-1)
    if not bool((eq.sum(-1) == 1).all()):
        raise SystemExit("an output row matches no input row, or several")
    return eq.int().argmax(-1)


def randomise(module, torch, seed):
    """Redraw every parameter: weights ~ N(0, 1/fan_in), LayerNorm scales near 1, biases small."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim > 1:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def weights(module, prefix=""):
    return {f"w/{prefix}{k}": v.detach().numpy().copy() for k, v in module.state_dict().items()}


def stage_inputs(torch, gen, batch, n, width, key_width, r):
    """Random (x, metric) at each stage, with the token counts the earlier stages leave."""
    counts = [FRAMES // TUBELET * n]
    for groups in (8, 4):
        counts.append(counts[-1] - groups * r)
    return [
        (
            torch.randn(batch, c, width, generator=gen),
            torch.randn(batch, c, key_width, generator=gen),
        )
        for c in counts
    ]


def merge_fixture(torch, model_vit):
    gen = torch.Generator().manual_seed(0)
    arrays = {}
    for case, (n, width, key_width, r) in {"a": (16, 8, 8, 3), "b": (25, 6, 4, 12)}.items():
        model = model_vit.VisionTransformer(depth=DEPTH, embed_dim=8, num_heads=1, r=r)
        inputs = stage_inputs(torch, gen, 2, n, width, key_width, r)
        for stage, (index, (x, metric)) in enumerate(
            zip((0, DEPTH // 3, 2 * DEPTH // 3), inputs, strict=True)
        ):
            out = model.merge(x, metric, index, DEPTH)
            key = f"{case}/stage{stage}"
            arrays.update(
                {
                    f"{key}/x": x.numpy(),
                    f"{key}/metric": metric.numpy(),
                    f"{key}/out": out.numpy(),
                    f"{key}/kept": kept_rows(out, x).numpy().astype(np.int32),
                }
            )
        arrays[f"{case}/r"] = np.int32(r)
        arrays[f"{case}/tokens_per_frame"] = np.int32(n)
    return arrays


def block_fixture(torch, model_vit):
    r, n, width = 3, 16, 16
    block = model_vit.Block(
        dim=width,
        num_heads=2,
        mlp_ratio=4,
        qkv_bias=True,
        init_values=0.0,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
    )
    randomise(block, torch, 1)
    block.eval()
    model = model_vit.VisionTransformer(depth=DEPTH, embed_dim=8, num_heads=1, r=r)
    gen = torch.Generator().manual_seed(4)
    arrays = {"r": np.int32(r), **weights(block)}
    for stage, (index, tokens) in enumerate(((0, 8 * n), (DEPTH // 3, 8 * (n - r)))):
        x = torch.randn(2, tokens, width, generator=gen)
        with torch.no_grad():
            y, metric = block(x)
            out = model.merge(y, metric, index, DEPTH)
        arrays.update(
            {
                f"stage{stage}/x": x.numpy(),
                f"stage{stage}/block_out": y.numpy(),
                f"stage{stage}/metric": metric.numpy(),
                f"stage{stage}/out": out.numpy(),
                f"stage{stage}/kept": kept_rows(out, y).numpy().astype(np.int32),
            }
        )
    return arrays


def model_fixture(torch, model_vit):
    r, size, patch = 3, 8, 2
    config = dict(
        img_size=size,
        patch_size=patch,
        num_classes=5,
        embed_dim=16,
        depth=DEPTH,
        num_heads=2,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        all_frames=FRAMES,
        tubelet_size=TUBELET,
    )
    model = model_vit.VisionTransformer(r=r, **config)
    randomise(model, torch, 2)
    model.eval()
    video = torch.randn(2, 3, FRAMES, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(video)
        model.r = 0
        logits_r0 = model(video)
    return {
        "r": np.int32(r),
        "image_size": np.int32(size),
        "patch_size": np.int32(patch),
        "video": video.numpy(),
        "logits": logits.numpy(),
        "logits_r0": logits_r0.numpy(),
        **weights(model),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help=f"a checkout of {REPO} at {COMMIT}")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.checkout).resolve()))
    import model_vit  # the authors' module
    import torch

    torch.set_grad_enabled(False)
    meta = {
        "repo": np.array(REPO),
        "commit": np.array(COMMIT),
        "torch": np.array(torch.__version__),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    for name, build in (
        ("merge", merge_fixture),
        ("block", block_fixture),
        ("model", model_fixture),
    ):
        path = OUT / f"sta_{name}.npz"
        np.savez_compressed(path, **meta, **build(torch, model_vit))
        print(f"{path}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
