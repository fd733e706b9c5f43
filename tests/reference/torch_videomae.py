"""PyTorch reference of the paper's token-reduced VideoMAE forward (docs/method.md §3.0, §3.2, §3.6, §9).

A plain function around the modules of a HuggingFace transformers-5 `VideoMAEForVideoClassification`: the embeddings
(tubelet Conv3d + fixed sinusoidal table), layer norms, MLPs, `fc_norm` and classifier are the model's own; every
layer's attention is recomputed eagerly from its query/key/value Linears (the key has no bias) so that proportional
attention can be added and the keys used as the matching metric. All merging steps go through `tome_oracle`, with
class_token=False (no CLS: clamp N//2, unmerged tokens stay in score order). Independent of `vtm_jax`.

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
    attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None, head_aggregation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention of an HF VideoMAEAttention; returns (output projection, metric)."""
    self_attn = attn.attention
    b, n, _ = x.shape
    h, d = self_attn.num_attention_heads, self_attn.attention_head_size
    k_raw = self_attn.key(x)  # [B, N, H*d], no bias
    q = self_attn.query(x).view(b, n, h, d).transpose(1, 2)
    k = k_raw.view(b, n, h, d).transpose(1, 2)
    v = self_attn.value(x).view(b, n, h, d).transpose(1, 2)
    logits = (q * d**-0.5) @ k.transpose(-2, -1)  # the original scales q before the product
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
    return attn.output.dense(ctx), metric


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
    """One merging step with class_token=False; returns (h, size, source)."""
    if mode in ("drop", "random_drop"):
        drop = tm.bipartite_soft_matching_drop(
            metric, r, class_token=False, mode=mode, random_scores=scores
        )
        if isinstance(drop, tuple):
            raise TypeError(
                "drop mode with clamped r == 0: the original crashes here ('tuple' is not callable)"
            )
        if trace_source:
            if source is None:
                b, n, _ = h.shape
                source = torch.eye(n, device=h.device)[None].expand(b, n, n)
            source = drop(source)
        h = drop(h)
        return h, torch.ones_like(h[..., 0, None]), source  # size reset after a drop
    if mode == "hybrid":
        merge, _ = tm.bipartite_soft_matching_hybrid(
            metric, r, class_token=False, mode=mode, threshold=threshold, random_scores=scores
        )
    else:
        merge, _ = tm.bipartite_soft_matching(
            metric, r, class_token=False, mode=mode, random_scores=scores
        )
    if trace_source:
        source = tm.merge_source(merge, h, source)
    h, size = tm.merge_wavg(merge, h, size)
    return h, size, source


def tome_videomae_forward(
    model: nn.Module,
    pixel_values: torch.Tensor,
    r: int | tuple[float, float] | list[int],
    *,
    mode: str = "merge",
    prop_attn: bool = False,
    head_aggregation: str = "mean",
    threshold: float = 0.0,
    random_scores: RandomScores | None = None,
    trace_source: bool = False,
    duplicate: tuple[int, int] | None = None,
    size_weighted_pool: bool = False,
) -> dict:
    """Token-reduced forward of an HF `VideoMAEForVideoClassification` on `pixel_values` [B, T, C, H, W].

    Every layer i: h += Attn(LN_before(h)) (with prop attention once a size exists; the paper's VideoMAE runs have
    it off, hence the default); if r_i > 0 reduce with the layer's keys as metric; h += MLP(LN_after(h)). Then
    fc_norm(mean over tokens) and the classifier. The paper's mean is unweighted; `size_weighted_pool` weights it by
    token sizes (upstream ToMe's MAE variant, not the paper's).
    `r` goes through `parse_r(num_steps, r)`. `random_scores(step_index, (B, ceil(N/2), floor(N/2)))` replaces
    torch.rand in the random modes; it is called only when the clamped r of that step is > 0.
    `duplicate=(L, Q)` (docs/method.md §3.6): Q-1 metric-only merge steps (no residual, no MLP, layer L's weights) run
    before the real layer L; the r list then covers num_layers + Q - 1 steps.

    Returns {'logits', 'token_counts' (after each step), 'size' (final [B, N, 1] or None), and 'source' when
    trace_source}.
    """
    if mode not in _MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {_MODES}")
    videomae = model.videomae
    steps: list[tuple[nn.Module, bool]] = []
    for j, layer in enumerate(videomae.encoder.layer):
        if duplicate is not None and j == duplicate[0]:
            steps += [(layer, True)] * (duplicate[1] - 1)
        steps.append((layer, False))
    r_list = tm.parse_r(len(steps), r)

    h = videomae.embeddings(pixel_values, None)
    size: torch.Tensor | None = None
    source: torch.Tensor | None = None
    token_counts: list[int] = []
    for i, (layer, is_duplicate) in enumerate(steps):
        r_i = r_list[i]
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
        ):  # guard on the requested r, as the patches do; the clamp happens in the matching
            b, n, _ = h.shape
            scores = None
            if random_scores is not None and mode.startswith("random") and min(r_i, n // 2) > 0:
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
            h = layer.output(layer.intermediate(layer.layernorm_after(h)), h)  # adds the residual
        token_counts.append(h.shape[1])

    if size_weighted_pool and size is not None:
        pooled = (h * size).sum(dim=1) / size.sum(dim=1)
    else:
        pooled = h.mean(dim=1)
    out = {
        "logits": model.classifier(model.fc_norm(pooled)),
        "token_counts": token_counts,
        "size": size,
    }
    if trace_source:
        out["source"] = source
    return out
