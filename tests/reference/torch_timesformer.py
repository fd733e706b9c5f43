"""PyTorch reference of the paper's token-reduced TimeSformer forward (docs/method.md §3.0, §3.3, §3.6, §9).

A plain function around the modules of a HuggingFace transformers-5 `TimesformerForVideoClassification`: the
embeddings, layer norms, dense layers and classifier are the model's own, while both attentions of every block are
recomputed eagerly, so that proportional attention can be added to the spatial step and its keys used as the matching
metric. Every merging step goes through `tome_oracle`. Written from docs/method.md; independent of `vtm_jax`.

Layout: one class token, then the patches in (p t) order (spatial index major, frame minor). Reduction is per frame:
the patches are rearranged to [(B T), p, C] (frames as the batch of the matching, no protected token), merged with the
same r in every frame, and re-interleaved as (p' t). Sizes and source are per frame, [(B T), p, 1] and [(B T), p, p0].

Call it on a model in eval mode; wrap it in torch.no_grad() if gradients are not needed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import tome_oracle as tm

RandomScores = Callable[[int, tuple[int, int, int]], torch.Tensor]

_MODES = ("merge", "random_merge", "drop", "random_drop", "hybrid")


def _attention(
    attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention of an HF TimeSformerAttention (fused qkv); returns (output, keys [B, H, N, d]).

    With `size` [B, N-1, 1], log(size) is added to the logits of patch queries x patch keys only (not the row or
    the column of token 0, the class token), after the 1/sqrt(d) scaling.
    """
    b, n, c = x.shape
    h = attn.attention.num_heads
    d = c // h
    qkv = attn.attention.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q @ k.transpose(-2, -1)) * d**-0.5
    if size is not None:
        logits = logits.clone()
        logits[:, :, 1:, 1:] += size.log()[:, None, None, :, 0]
    ctx = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
    return attn.output.dense(ctx), k


def _to_frames(patches: torch.Tensor, frames: int) -> torch.Tensor:
    """b (p t) c -> (b t) p c."""
    b, n, c = patches.shape
    return (
        patches.reshape(b, n // frames, frames, c)
        .permute(0, 2, 1, 3)
        .reshape(b * frames, n // frames, c)
    )


def _from_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(b t) p c -> b (p t) c."""
    bt, p, c = x.shape
    return (
        x.reshape(bt // frames, frames, p, c)
        .permute(0, 2, 1, 3)
        .reshape(bt // frames, p * frames, c)
    )


def _attention_part(
    layer: nn.Module, h: torch.Tensor, size: torch.Tensor | None, frames: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Temporal then spatial attention of one divided space-time block; returns (h, per-frame metric [(B T), p, d])."""
    b, n, c = h.shape
    p = (n - 1) // frames
    cls, patches = h[:, :1], h[:, 1:]
    # Temporal: the T frames of each spatial slot; no class token, no size bias.
    slots = patches.reshape(b * p, frames, c)
    res, _ = _attention(layer.temporal_attention, layer.temporal_layernorm(slots))
    xt = patches + layer.temporal_dense(res.reshape(b, p * frames, c))
    # Spatial: per frame, [copy of the class token, the frame's p patches].
    cls_copies = cls.expand(b, frames, c).reshape(b * frames, 1, c)
    xs = torch.cat([cls_copies, _to_frames(xt, frames)], dim=1)
    res, k = _attention(layer.attention, layer.layernorm_before(xs), size)
    cls_res = res[:, 0].reshape(b, frames, c).mean(dim=1, keepdim=True)  # averaged over frames
    h = torch.cat([cls, xt], dim=1) + torch.cat([cls_res, _from_frames(res[:, 1:], frames)], dim=1)
    return h, k.mean(dim=1)[:, 1:]  # metric: head-mean keys of the patches only


def _reduce(
    x: torch.Tensor,
    metric: torch.Tensor,
    r: int,
    size: torch.Tensor | None,
    source: torch.Tensor | None,
    *,
    mode: str,
    threshold: float,
    trace_source: bool,
    scores: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One per-frame reduction of x [(B T), p, C] with class_token=False; returns (x, size, source)."""
    if mode in ("drop", "random_drop"):
        drop = tm.bipartite_soft_matching_drop(
            metric, r, class_token=False, mode=mode, random_scores=scores
        )
        if isinstance(drop, tuple):
            # The original would call the tuple here and crash; make that explicit rather than silently skip.
            raise TypeError(
                "drop mode with clamped r == 0: the original crashes here ('tuple' is not callable)"
            )
        if trace_source:
            if source is None:
                bt, n, _ = x.shape
                source = torch.eye(n, device=x.device)[None].expand(bt, n, n)
            source = drop(source)
        x = drop(x)
        return (
            x,
            torch.ones_like(x[..., 0, None]),
            source,
        )  # size reset: prop attention is a no-op after a drop
    if mode == "hybrid":
        merge, _ = tm.bipartite_soft_matching_hybrid(
            metric, r, class_token=False, mode=mode, threshold=threshold, random_scores=scores
        )
    else:
        merge, _ = tm.bipartite_soft_matching(
            metric, r, class_token=False, mode=mode, random_scores=scores
        )
    if trace_source:
        source = tm.merge_source(merge, x, source)
    x, size = tm.merge_wavg(merge, x, size)
    return x, size, source


def timesformer_forward(
    model: nn.Module,
    pixel_values: torch.Tensor,
    r: int | tuple[float, float] | list[int],
    *,
    mode: str = "merge",
    prop_attn: bool = True,
    threshold: float = 0.0,
    random_scores: RandomScores | None = None,
    trace_source: bool = False,
    duplicate: tuple[int, int] | None = None,
) -> dict:
    """Token-reduced forward of an HF `TimesformerForVideoClassification` on `pixel_values` [B, T, C, H, W].

    Each step: temporal attention + residual; spatial attention per frame (prop attention on the patch x patch logits
    once a size exists) with the frame-averaged class-token residual; if r_i > 0, per-frame reduction of the patches
    using the spatial keys; MLP + residual. Then final LN, class token, classifier. The paper's TimeSformer has no
    head_aggregation option (it always averages the keys over heads).

    `r` goes through `parse_r(num_steps, r)`. `random_scores(step_index, ((B T), ceil(p/2), floor(p/2)))` replaces
    torch.rand in the random modes; it is called only when the clamped r of that step is > 0. `duplicate=(L, Q)`
    (docs/method.md §3.6): the whole block L runs Q times with tied weights, so the r list covers num_layers + Q - 1 steps.

    Returns {'logits', 'token_counts': patches per frame after each step, 'size': final [(B T), p, 1] or None, and
    'source': final [(B T), p, p0] when trace_source}.
    """
    if mode not in _MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {_MODES}")
    frames = pixel_values.shape[1]
    steps: list[nn.Module] = []
    for j, layer in enumerate(model.timesformer.encoder.layer):
        steps += [layer] * (duplicate[1] if duplicate is not None and j == duplicate[0] else 1)
    r_list = tm.parse_r(len(steps), r)

    h = model.timesformer.embeddings(pixel_values)  # [B, 1 + p T, C], (p t) order
    size: torch.Tensor | None = None
    source: torch.Tensor | None = None
    token_counts: list[int] = []
    for i, layer in enumerate(steps):
        h, metric = _attention_part(layer, h, size if prop_attn else None, frames)
        if (
            r_list[i] > 0
        ):  # guard on the requested r, as the patch does; the clamp happens inside the matching
            b, n, c = h.shape
            p = (n - 1) // frames
            scores = None
            if (
                random_scores is not None
                and mode.startswith("random")
                and min(r_list[i], p // 2) > 0
            ):
                scores = random_scores(i, (b * frames, (p + 1) // 2, p // 2))
            x, size, source = _reduce(
                _to_frames(h[:, 1:], frames),
                metric,
                r_list[i],
                size,
                source,
                mode=mode,
                threshold=threshold,
                trace_source=trace_source,
                scores=scores,
            )
            h = torch.cat([h[:, :1], _from_frames(x, frames)], dim=1)
        h = h + layer.output(layer.intermediate(layer.layernorm_after(h)))
        token_counts.append((h.shape[1] - 1) // frames)

    h = model.timesformer.layernorm(h)
    out = {"logits": model.classifier(h[:, 0]), "token_counts": token_counts, "size": size}
    if trace_source:
        out["source"] = source
    return out
