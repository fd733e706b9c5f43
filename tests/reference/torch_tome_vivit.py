"""PyTorch reference of the paper's token-reduced ViViT forward (docs/method.md §3.0, §3.1, §3.6, §9).

A plain function around the modules of a HuggingFace transformers-5 `VivitForVideoClassification`: the weights and the
embedding / layernorm / MLP / classifier modules are the model's own, while every layer's attention is recomputed
eagerly so that proportional attention can be added and the keys used as the matching metric. All merging steps
go through `tome_oracle`. Independent of `vtm_jax`.

Call it on a model in eval mode (dropout off); wrap it in torch.no_grad() if gradients are not needed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import tome_oracle as tm

RandomScores = Callable[[int, tuple[int, int, int]], torch.Tensor]

_MODES = ("merge", "random_merge", "drop", "random_drop", "hybrid")


def _attention(
    attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None, head_aggregation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager multi-head self-attention of an HF VivitAttention; returns (o_proj output, metric)."""
    b, n, _ = x.shape
    h, d = attn.num_attention_heads, attn.head_dim
    k_raw = attn.k_proj(x)  # [B, N, H*d]
    q = attn.q_proj(x).view(b, n, h, d).transpose(1, 2)
    k = k_raw.view(b, n, h, d).transpose(1, 2)
    v = attn.v_proj(x).view(b, n, h, d).transpose(1, 2)
    logits = (q @ k.transpose(-2, -1)) * d**-0.5
    if size is not None:
        # Proportional attention: log(size) of each KEY, after scaling, broadcast over heads and queries.
        logits = logits + size.log()[:, None, None, :, 0]
    ctx = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, h * d)
    if head_aggregation == "mean":
        metric = k.mean(dim=1)  # [B, N, d]
    elif head_aggregation == "concat":
        metric = k_raw  # heads concatenated == the raw key projection, [B, N, H*d]
    else:
        raise ValueError(f"unknown head_aggregation {head_aggregation!r}")
    return attn.o_proj(ctx), metric


def _reduce(
    h: torch.Tensor,
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
    """One merging step with class_token=True; returns (h, size, source)."""
    if mode in ("drop", "random_drop"):
        drop = tm.bipartite_soft_matching_drop(
            metric, r, class_token=True, mode=mode, random_scores=scores
        )
        if isinstance(drop, tuple):
            # The original would call the tuple here and crash; make that explicit rather than silently skip.
            raise TypeError(
                "drop mode with clamped r == 0: the original crashes here ('tuple' is not callable)"
            )
        if trace_source:
            if source is None:
                b, n, _ = h.shape
                source = torch.eye(n, device=h.device)[None].expand(b, n, n)
            source = drop(source)
        h = drop(h)
        return (
            h,
            torch.ones_like(h[..., 0, None]),
            source,
        )  # size reset: prop-attn is a no-op in drop modes
    if mode == "hybrid":
        merge, _ = tm.bipartite_soft_matching_hybrid(
            metric,
            r,
            class_token=True,
            mode=mode,
            threshold=threshold,
            random_scores=scores,
        )
    else:
        merge, _ = tm.bipartite_soft_matching(
            metric, r, class_token=True, mode=mode, random_scores=scores
        )
    if trace_source:
        source = tm.merge_source(merge, h, source)
    h, size = tm.merge_wavg(merge, h, size)
    return h, size, source


def tome_vivit_forward(
    model: nn.Module,
    pixel_values: torch.Tensor,
    r: int | tuple[float, float] | list[int],
    *,
    mode: str = "merge",
    prop_attn: bool = True,
    head_aggregation: str = "mean",
    threshold: float = 0.0,
    random_scores: RandomScores | None = None,
    trace_source: bool = False,
    duplicate: tuple[int, int] | None = None,
) -> dict:
    """Token-reduced forward of an HF `VivitForVideoClassification` on `pixel_values` [B, T, C, H, W].

    Every layer i: h += Attn(LN_before(h)) (with prop attention once a size exists); if r_i > 0 reduce with the
    layer's keys as metric (CLS protected); h += MLP(LN_after(h)). Then final LN, CLS token, classifier.
    `r` goes through `parse_r(num_steps, r)`. `random_scores(step_index, (B, ceil(N/2), floor(N/2)))` replaces
    torch.rand in the random modes; it is called only when the clamped r of that step is > 0 (as torch.rand is).
    `duplicate=(L, Q)` applies docs/method.md §3.6: Q-1 metric-only merge steps (no residual, no MLP, using layer L's
    weights) run before the real layer L; the r list then covers num_layers + Q - 1 steps.

    Returns {'logits': [B, classes], 'token_counts': token count after each step, 'size': final [B, N, 1] or None,
    and 'source': final [B, N, N0] when trace_source}.
    """
    if mode not in _MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {_MODES}")
    vivit = model.vivit
    # Each step is (layer, is_duplicate); duplicates of layer L come before the real layer L.
    steps: list[tuple[nn.Module, bool]] = []
    for j, layer in enumerate(vivit.layers):
        if duplicate is not None and j == duplicate[0]:
            steps += [(layer, True)] * (duplicate[1] - 1)
        steps.append((layer, False))
    r_list = tm.parse_r(len(steps), r)

    h = vivit.embeddings(pixel_values)
    size: torch.Tensor | None = None
    source: torch.Tensor | None = None
    token_counts: list[int] = []
    for i, (layer, is_duplicate) in enumerate(steps):
        r_i = r_list[i]  # the original pops one r per step; extra list entries are never used
        attn_out, metric = _attention(
            layer.attention,
            layer.layernorm_before(h),
            size if prop_attn else None,
            head_aggregation,
        )
        if not is_duplicate:
            h = h + attn_out
        if (
            r_i > 0
        ):  # guard on the requested r, as the patches do; the clamp happens inside the matching
            b, n, _ = h.shape
            scores = None
            if (
                random_scores is not None
                and mode.startswith("random")
                and min(r_i, (n - 1) // 2) > 0
            ):
                scores = random_scores(i, (b, (n + 1) // 2, n // 2))
            h, size, source = _reduce(
                h,
                metric,
                r_i,
                size,
                source,
                mode=mode,
                threshold=threshold,
                trace_source=trace_source,
                scores=scores,
            )
        if not is_duplicate:
            h = h + layer.mlp(layer.layernorm_after(h))
        token_counts.append(h.shape[1])

    h = vivit.layernorm(h)
    out = {
        "logits": model.classifier(h[:, 0]),
        "token_counts": token_counts,
        "size": size,
    }
    if trace_source:
        out["source"] = source
    return out
