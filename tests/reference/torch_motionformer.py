"""PyTorch reference Motionformer and the paper's token-reduced forward (docs/method.md §3.4, §3.6, §9).

No library ships Motionformer, so the model here is written from the published architecture
description (Patrick et al., "Keeping Your Eye on the Ball", NeurIPS 2021, and docs/method.md §3.4):
its parameter names and shapes are those of the original checkpoints, so a state dict saved from
it has the original's layout. Nothing is imported from `vtm_jax` and no code was copied.

* `TorchMotionformer`: tubelet Conv3d, class token, "separate" position embeddings, pre-LN blocks
  with trajectory attention (original code path: the temporal step weighs the unprojected
  aggregates), final LayerNorm, pre-logits Linear + Tanh, one head or EPIC-KITCHENS heads
  `head0`/`head1`. As the original, `forward` returns softmax probabilities in eval mode;
  `logits` returns the pre-softmax scores (heads concatenated).
* `tome_motionformer_forward`: the paper's merged forward around such a model, every reduction
  through `tome_oracle`, with the paper's `(s f)` groups or the corrected per-frame `(f s)` ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from . import tome_oracle as tm

RandomScores = Callable[[int, tuple[int, int, int]], torch.Tensor]

_MODES = ("merge", "random_merge", "drop", "random_drop", "hybrid")


class TrajectoryAttention(nn.Module):
    """Trajectory attention; parameter names as the original (`qkv`, `proj_q`, `proj_kv`, `proj`)."""

    def __init__(
        self, dim: int, heads: int, qkv_bias: bool = True, original_temporal_values: bool = True
    ):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.original_temporal_values = original_temporal_values

    def forward(
        self, x: torch.Tensor, slots: int, log_size: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, 1 + S, D], patches in (f n) order; log_size [B, S] for the patch keys or None.

        Returns (output [B, 1 + S, D], patch keys [B, H, S, d]).
        """
        b, n, dim = x.shape
        h = self.heads
        d = dim // h
        s = n - 1
        p = s // slots
        scale = d**-0.5

        def heads_first(t: torch.Tensor) -> torch.Tensor:  # [B, N, (h d)] -> [B, H, N, d]
            return t.reshape(b, -1, h, d).permute(0, 2, 1, 3)

        q, k, v = (heads_first(t) for t in self.qkv(x).split(dim, dim=-1))

        # The class token: one softmax over every token, no size bias.
        cls_w = torch.softmax((q[:, :, :1] * scale) @ k.transpose(-1, -2), dim=-1)
        cls_out = cls_w @ v  # [B, H, 1, d]

        # Patch queries: a softmax within each slot's patch keys.
        qp, kp, vp = q[:, :, 1:], k[:, :, 1:], v[:, :, 1:]
        logits = (qp @ kp.transpose(-1, -2)) * scale  # [B, H, S, S]
        if log_size is not None:
            logits = logits + log_size[:, None, None, :]
        logits = logits.reshape(b, h, s, slots, p)
        w = torch.softmax(logits, dim=-1)
        agg = torch.einsum("bhqfn,bhfnd->bhqfd", w, vp.reshape(b, h, slots, p, d))
        agg = agg.permute(0, 2, 3, 1, 4).reshape(b, s, slots, dim)  # [B, S, F, (h d)]

        # Temporal step: query from the query's own slot, keys from every slot's aggregate.
        own_slot = torch.arange(s) // p
        own = agg[:, torch.arange(s), own_slot]  # [B, S, D]
        q2 = self.proj_q(own).reshape(b, s, h, d) * scale
        k2, v2 = self.proj_kv(agg).split(dim, dim=-1)
        k2 = k2.reshape(b, s, slots, h, d)
        w2 = torch.softmax(torch.einsum("bshd,bsfhd->bshf", q2, k2), dim=-1)
        values = agg if self.original_temporal_values else v2
        out = torch.einsum("bshf,bsfhd->bshd", w2, values.reshape(b, s, slots, h, d))

        cls_out = cls_out.permute(0, 2, 1, 3).reshape(b, 1, dim)
        y = torch.cat([cls_out, out.reshape(b, s, dim)], dim=1)
        return self.proj(y), kp


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool, original: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TrajectoryAttention(dim, heads, qkv_bias, original)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, slots: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), slots)[0]
        return x + self.mlp(self.norm2(x))


class _Embed(nn.Module):
    def __init__(self, conv: nn.Module):
        super().__init__()
        self.proj = conv


class TorchMotionformer(nn.Module):
    """Motionformer; `video` is [B, 3, T, H, W] (slowfast's layout)."""

    def __init__(
        self,
        *,
        num_classes: int | list[int] = 10,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        img_size: int = 224,
        patch: int = 16,
        tubelet_t: int = 2,
        slots: int = 8,
        use_mlp: bool = True,
        qkv_bias: bool = True,
        original_temporal_values: bool = True,
    ):
        super().__init__()
        grid = img_size // patch
        self.slots, self.patches = slots, grid * grid
        # The original always builds a 2-D patch embedding; with a tubelet it is never used.
        self.patch_embed = _Embed(nn.Conv2d(3, dim, patch, stride=patch))
        self.patch_embed_3d = _Embed(
            nn.Conv3d(3, dim, (tubelet_t, patch, patch), stride=(tubelet_t, patch, patch))
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Sized for img_size: the original sizes it for 224 px and resizes it bicubically at other
        # crops on every forward (vtm_jax's converter does that resize once).
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patches, dim))
        self.temp_embed = nn.Parameter(torch.zeros(1, slots, dim))
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio, qkv_bias, original_temporal_values) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pre_logits = nn.Sequential()  # identity unless USE_MLP; keys pre_logits.fc.*
        if use_mlp:
            self.pre_logits.add_module("fc", nn.Linear(dim, dim))
            self.pre_logits.add_module("act", nn.Tanh())
        self.class_splits = list(num_classes) if isinstance(num_classes, list) else None
        if self.class_splits:
            for i, c in enumerate(self.class_splits):
                setattr(self, f"head{i}", nn.Linear(dim, c))
        else:
            self.head = nn.Linear(dim, num_classes)

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 1 + F * P, D]: class token, then patches frame-major, plus position embeddings."""
        x = self.patch_embed_3d.proj(video).flatten(2).transpose(1, 2)
        b = x.shape[0]
        spatial = self.pos_embed[:, 1:].repeat(1, self.slots, 1)  # tiled over the slots
        temporal = self.temp_embed.repeat_interleave(self.patches, dim=1)  # per slot
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
        return torch.cat([cls, x + (spatial + temporal)], dim=1)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm, class token, pre-logits, heads (concatenated): the logits."""
        x = self.pre_logits(self.norm(x)[:, 0])
        if self.class_splits:
            return torch.cat(
                [getattr(self, f"head{i}")(x) for i in range(len(self.class_splits))], -1
            )
        return self.head(x)

    def logits(self, video: torch.Tensor) -> torch.Tensor:
        x = self.embed(video)
        for block in self.blocks:
            x = block(x, self.slots)
        return self.classify(x)

    def forward(self, video: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        logits = self.logits(video)
        if self.training:
            return logits
        if self.class_splits:  # one softmax per head, returned as a list as the original does
            return [p.softmax(-1) for p in logits.split(self.class_splits, dim=-1)]
        return logits.softmax(-1)


# ---------------------------------------------------------------------------------------------
# The paper's merged forward


def _to_groups(x: torch.Tensor, slots: int, groups: str) -> torch.Tensor:
    """[B, S, C] flat patches -> [B * F, S / F, C] merge groups."""
    b, s, c = x.shape
    if groups == "paper":  # group g = flat positions j with j % F == g, in order of j // F
        return x.reshape(b, s // slots, slots, c).permute(0, 2, 1, 3).reshape(b * slots, -1, c)
    if groups == "per_frame":  # group g = slot g
        return x.reshape(b * slots, s // slots, c)
    raise ValueError(f"unknown groups {groups!r}")


def _from_groups(x: torch.Tensor, slots: int, groups: str) -> torch.Tensor:
    bf, p, c = x.shape
    b = bf // slots
    if groups == "paper":
        return x.reshape(b, slots, p, c).permute(0, 2, 1, 3).reshape(b, p * slots, c)
    return x.reshape(b, slots * p, c)


def _reduce(x, metric, r, size, source, *, mode, threshold, trace_source, scores):
    """One merging step with class_token=False on [G, P, C] groups; returns (x, size, source)."""
    if mode in ("drop", "random_drop"):
        drop = tm.bipartite_soft_matching_drop(
            metric, r, class_token=False, mode=mode, random_scores=scores
        )
        if isinstance(drop, tuple):
            raise TypeError("drop mode with clamped r == 0: the original crashes here")
        if trace_source:
            if source is None:
                g, n, _ = x.shape
                source = torch.eye(n)[None].expand(g, n, n)
            source = drop(source)
        x = drop(x)
        return x, torch.ones_like(x[..., :1]), source
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


def tome_motionformer_forward(
    model: TorchMotionformer,
    video: torch.Tensor,
    r: int | tuple[float, float] | list[int],
    *,
    mode: str = "merge",
    prop_attn: bool = True,
    head_aggregation: str = "mean",
    threshold: float = 0.0,
    random_scores: RandomScores | None = None,
    duplicate: tuple[int, int] | None = None,
    groups: str = "paper",
    trace_source: bool = False,
) -> dict:
    """Token-reduced forward of `model` on `video` [B, 3, T, H, W] (docs/method.md §3.4).

    Every step: x += Attn(norm1(x)) (proportional attention on the per-slot patch logits once a
    size exists); if r_i > 0, split the patches into F groups (`groups`: the paper's (s f) or the
    per-frame (f s)) and reduce each with its mean-over-heads patch keys (class_token=False);
    then x += MLP(norm2(x)). `head_aggregation='concat'` (not the paper's, whose Motionformer
    averages whatever is asked) uses the heads' keys concatenated instead of their mean. `duplicate=(L, Q)` runs the whole block L Q times (tied weights); the
    r list covers the num_layers + Q - 1 steps. `random_scores(step, (B * F, ceil(P/2), P//2))`
    replaces torch.rand in the random modes (called only when the clamped r is > 0).

    Returns {'logits', 'probs' (the original's eval output: softmax per head), 'token_counts'
    (tokens per group after each step), 'size' (per group), 'source' (per group, if traced)}.
    """
    if mode not in _MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {_MODES}")
    blocks = list(model.blocks)
    if duplicate is not None:
        layer, quantity = duplicate
        blocks = blocks[:layer] + [blocks[layer]] * quantity + blocks[layer + 1 :]
    r_list = tm.parse_r(len(blocks), r)
    slots = model.slots
    x = model.embed(video)
    size = source = None
    counts = []
    for step, block in enumerate(blocks):
        log_size = None
        if prop_attn and size is not None:
            log_size = _from_groups(size, slots, groups).log()[..., 0]
        out, keys = block.attn(block.norm1(x), slots, log_size)
        x = x + out
        if r_list[step] > 0:
            if head_aggregation == "mean":
                metric = keys.mean(dim=1)
            else:  # heads concatenated: the raw key projection
                b, h, s, d = keys.shape
                metric = keys.permute(0, 2, 1, 3).reshape(b, s, h * d)
            metric = _to_groups(metric, slots, groups)
            patches = _to_groups(x[:, 1:], slots, groups)
            g, p, _ = patches.shape
            scores = None
            if (
                random_scores is not None
                and mode.startswith("random")
                and min(r_list[step], p // 2) > 0
            ):
                scores = random_scores(step, (g, (p + 1) // 2, p // 2))
            patches, size, source = _reduce(
                patches,
                metric,
                r_list[step],
                size,
                source,
                mode=mode,
                threshold=threshold,
                trace_source=trace_source,
                scores=scores,
            )
            x = torch.cat([x[:, :1], _from_groups(patches, slots, groups)], dim=1)
        x = x + block.mlp(block.norm2(x))
        counts.append((x.shape[1] - 1) // slots)
    logits = model.classify(x)
    splits = model.class_splits or [logits.shape[-1]]
    probs = torch.cat([p.softmax(-1) for p in logits.split(splits, dim=-1)], dim=-1)
    out = {"logits": logits, "probs": probs, "token_counts": counts, "size": size}
    if trace_source:
        out["source"] = source
    return out


def randomise(model: TorchMotionformer, seed: int = 0) -> TorchMotionformer:
    """Redraw every parameter (embeddings, biases and norms included) so that a conversion that
    drops, swaps or misplaces any of them cannot match; the heads get O(1) weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.startswith("head"):
                param.copy_(noise)
            elif name in ("cls_token", "pos_embed", "temp_embed"):
                param.copy_(0.5 * noise)
            elif param.ndim > 1:  # weights: outputs of about unit variance
                param.copy_(noise / math.sqrt(param[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            else:  # biases
                param.copy_(0.2 * noise)
    return model.eval()
