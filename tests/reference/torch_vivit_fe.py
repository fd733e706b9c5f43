"""A torch reference of Scenic's factorised-encoder ViViT with per-frame token merging.

Written from the architecture description (scenic_vivit.md §1.2) and docs/method.md, on the raw
Scenic parameter tree; every merge step goes through the independent `tome_oracle`.
Independent of `vtm_jax`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from . import tome_oracle as tm


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))


def _layer_norm(x: torch.Tensor, p: dict) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, x.shape[-1:], _t(p["scale"]), _t(p["bias"]), eps=1e-6)


def _dense(x: torch.Tensor, p: dict, spec: str) -> torch.Tensor:
    return torch.einsum(spec, x, _t(p["kernel"])) + _t(p["bias"])


def encoder(
    p: dict,
    x: torch.Tensor,
    r_list: list[int],
    *,
    mode: str = "merge",
    prop_attn: bool = True,
    threshold: float = 0.0,
    random_scores: Callable[[int, tuple[int, int, int]], torch.Tensor] | None = None,
) -> torch.Tensor:
    """A pre-LN encoder (class token at position 0) that reduces after each attention residual."""
    x = x + _t(p["posembed_input"]["pos_embedding"])
    size = None
    for i, r in enumerate(r_list):
        blk = p[f"encoderblock_{i}"]
        att = blk["MultiHeadDotProductAttention_0"]
        y = _layer_norm(x, blk["LayerNorm_0"])
        q, k, v = (_dense(y, att[n], "bnd,dhk->bnhk") for n in ("query", "key", "value"))
        logits = torch.einsum("bqhk,bnhk->bhqn", q, k) / math.sqrt(q.shape[-1])
        if prop_attn and size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        ctx = torch.einsum("bhqn,bnhk->bqhk", logits.softmax(-1), v)
        x = x + _dense(ctx, att["out"], "bqhk,hkd->bqd")
        if r > 0:
            metric = k.mean(dim=2)
            scores = None
            if mode.startswith("random"):
                n = x.shape[1]
                scores = random_scores(i, (x.shape[0], (n + 1) // 2, n // 2))
            if mode in ("drop", "random_drop"):
                drop = tm.bipartite_soft_matching_drop(metric, r, True, mode, random_scores=scores)
                if not isinstance(drop, tuple):
                    x = drop(x)
                    size = torch.ones_like(x[..., :1])
            else:
                if mode == "hybrid":
                    merge, _ = tm.bipartite_soft_matching_hybrid(
                        metric, r, True, threshold=threshold
                    )
                else:
                    merge, _ = tm.bipartite_soft_matching(
                        metric, r, True, mode, random_scores=scores
                    )
                x, size = tm.merge_wavg(merge, x, size)
        y = _layer_norm(x, blk["LayerNorm_1"])
        mlp = blk["MlpBlock_0"]
        hidden = torch.nn.functional.gelu(
            _dense(y, mlp["Dense_0"], "bnd,dm->bnm"), approximate="tanh"
        )
        x = x + _dense(hidden, mlp["Dense_1"], "bnm,md->bnd")
    return _layer_norm(x, p["encoder_norm"])


def factorised_vivit_forward(
    params: dict,
    video: np.ndarray,
    spatial_r: list[int],
    temporal_r: list[int],
    temporal_random_scores: Callable[[int, tuple[int, int, int]], torch.Tensor] | None = None,
    **reduce_kwargs,
) -> torch.Tensor:
    """Logits of a token-classifier factorised-encoder ViViT; ``video`` is ``[B, T, H, W, 3]``."""
    kernel = _t(params["embedding"]["kernel"])  # (t, h, w, 3, D)
    t, h, w, _, d = kernel.shape
    x = torch.from_numpy(np.array(video, np.float32))
    b, frames, height, width, _ = x.shape
    # Tubelets as (b, slot, row, col, t*h*w*3), then the conv as one matmul.
    x = x.reshape(b, frames // t, t, height // h, h, width // w, w, 3)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, frames // t, -1, t * h * w * 3)
    x = x @ kernel.reshape(-1, d) + _t(params["embedding"]["bias"])
    slots, patches = x.shape[1], x.shape[2]
    x = x.reshape(b * slots, patches, d)
    cls = _t(params["cls_SpatialTransformer"]).expand(b * slots, 1, d)
    x = encoder(params["SpatialTransformer"], torch.cat([cls, x], 1), spatial_r, **reduce_kwargs)
    x = x[:, 0].reshape(b, slots, d)
    cls = _t(params["cls_TemporalTransformer"]).expand(b, 1, d)
    temporal_kwargs = {**reduce_kwargs, "random_scores": temporal_random_scores}
    x = encoder(
        params["TemporalTransformer"], torch.cat([cls, x], 1), temporal_r, **temporal_kwargs
    )
    return _dense(x[:, 0], params["output_projection"], "bd,dc->bc")
