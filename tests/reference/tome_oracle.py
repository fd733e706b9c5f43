"""Independent PyTorch oracle of the token-reduction functions of "Video, How Do Your Tokens Merge?".

Written from the functional description in /work/shared/reference/docs/method.md (sections 1 and 2.1), which describes
the paper's `tome/merge.py` and `tome/utils.py` (themselves built on facebookresearch/ToMe). Nothing here is copied
from either repository, and nothing is imported from `vtm_jax`: this module is the yardstick the JAX code is checked
against.

Deliberate deviations from the original, all of which only matter at exact ties or for misuse:
* `argsort(..., stable=True)`: ties in the best-match similarity go in index order (torch's default sort is not
  guaranteed stable). `max(-1)` already returns the first maximal index on ties.
* Unknown modes raise ValueError (the original raises NameError on an undefined `scores`).
* `merge_source` reduces with "amax" (the original spells it "max", an alias in recent torch).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

MergeFn = Callable[..., torch.Tensor]


def do_nothing(x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    """Identity; returned in place of merge/unmerge when nothing is reduced."""
    return x


def _reduce_name(mode: str) -> str:
    # The original passes "max" for source tracking; scatter_reduce's canonical name is "amax".
    return "amax" if mode == "max" else mode


def _scores(
    metric: torch.Tensor, score_mode: str, random_scores: torch.Tensor | None
) -> torch.Tensor:
    """[B, ceil(N/2), floor(N/2)] similarity of every A token (even position) to every B token (odd position)."""
    b, n = metric.shape[0], metric.shape[1]
    shape = (b, (n + 1) // 2, n // 2)
    if score_mode == "cosine":
        if random_scores is not None:
            raise ValueError("random_scores is only meaningful for the random modes")
        metric = metric / metric.norm(
            dim=-1, keepdim=True
        )  # no epsilon: a zero key gives NaN, as in the original
        a, bb = metric[..., ::2, :], metric[..., 1::2, :]
        return a @ bb.transpose(-1, -2)
    # Uniform [0, 1) scores; the metric only provides shape and device.
    if random_scores is None:
        return torch.rand(shape, device=metric.device)
    if tuple(random_scores.shape) != shape:
        raise ValueError(f"random_scores must have shape {shape}, got {tuple(random_scores.shape)}")
    return random_scores.to(metric.device).clone()  # clone: the CLS row is overwritten below


def _match(
    metric: torch.Tensor,
    r: int,
    class_token: bool,
    score_mode: str,
    random_scores: torch.Tensor | None,
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Steps 1-6 of docs/method.md §1.1. Returns None when the clamped r is <= 0.

    Otherwise returns (r_eff, unm_idx [B,t1-r,1], src_idx [B,r,1], dst_idx [B,r,1], node_max_sorted [B,t1]),
    all indices into the A (src_idx, unm_idx) or B (dst_idx) halves.
    """
    protected = int(class_token)
    n = metric.shape[1]
    r = min(r, (n - protected) // 2)  # at most half of the unprotected tokens per call
    if r <= 0:
        return None
    with torch.no_grad():
        scores = _scores(metric, score_mode, random_scores)
        if class_token:
            scores[..., 0, :] = -math.inf  # A-token 0 (sequence position 0) is CLS: never a src
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
        unm_idx = edge_idx[..., r:, :]  # unmerged A tokens, in descending score order
        src_idx = edge_idx[..., :r, :]  # the r A tokens with the highest best-match similarity
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            # Only with a class token are the kept A tokens put back in position order (CLS first).
            unm_idx = unm_idx.sort(dim=-2)[0]
        node_max_sorted = node_max.gather(dim=-1, index=edge_idx[..., 0])
    return r, unm_idx, src_idx, dst_idx, node_max_sorted


def _make_unmerge(
    n_tokens: int,
    r: int,
    unm_idx: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
) -> MergeFn:
    def unmerge(x: torch.Tensor) -> torch.Tensor:
        # docs/method.md §1.1 step 8: B tokens back at odd positions, unmerged A tokens at 2*unm_idx, each merged src
        # position 2*src_idx gets a copy of its dst's value.
        unm_len = unm_idx.shape[1]
        unm, dst = x[..., :unm_len, :], x[..., unm_len:, :]
        b, _, c = unm.shape
        src = dst.gather(dim=-2, index=dst_idx.expand(b, r, c))
        out = torch.zeros(b, n_tokens, c, device=x.device, dtype=x.dtype)
        out[..., 1::2, :] = dst
        out.scatter_(dim=-2, index=(2 * unm_idx).expand(b, unm_len, c), src=unm)
        out.scatter_(dim=-2, index=(2 * src_idx).expand(b, r, c), src=src)
        return out

    return unmerge


def _score_mode(mode: str, cosine: tuple[str, ...], random: tuple[str, ...]) -> str:
    if mode in cosine:
        return "cosine"
    if mode in random:
        return "random"
    raise ValueError(f"unknown mode {mode!r}; expected one of {cosine + random}")


def bipartite_soft_matching(
    metric: torch.Tensor,
    r: int,
    class_token: bool = False,
    mode: str = "merge",
    random_scores: torch.Tensor | None = None,
) -> tuple[MergeFn, MergeFn]:
    """Bipartite soft matching (docs/method.md §1.1, §1.2). `metric` is [B, N, c].

    mode 'merge': cosine scores; 'random_merge': uniform scores (`random_scores` [B, ceil(N/2), floor(N/2)] if given,
    else torch.rand). Returns (merge, unmerge); merge(x, mode='mean'|'sum'|'max') maps [B, N, C] -> [B, N - r, C]
    with token order [unmerged A tokens, all B tokens].
    """
    score_mode = _score_mode(mode, ("merge",), ("random_merge",))
    matched = _match(metric, r, class_token, score_mode, random_scores)
    if matched is None:
        return do_nothing, do_nothing
    r, unm_idx, src_idx, dst_idx, _ = matched

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        b, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(b, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(b, r, c))
        # include_self=True (torch default): the dst's own value takes part in the reduction.
        dst = dst.scatter_reduce(-2, dst_idx.expand(b, r, c), src, reduce=_reduce_name(mode))
        return torch.cat([unm, dst], dim=1)

    return merge, _make_unmerge(metric.shape[1], r, unm_idx, src_idx, dst_idx)


def bipartite_soft_matching_drop(
    metric: torch.Tensor,
    r: int,
    class_token: bool = False,
    mode: str = "drop",
    random_scores: torch.Tensor | None = None,
) -> MergeFn | tuple[MergeFn, MergeFn]:
    """Drop variant (docs/method.md §1.4): deletes the r A tokens a merge would have merged; B tokens untouched.

    mode 'drop' (cosine) or 'random_drop' (uniform). Returns a SINGLE function drop(x) -> [B, N - r, C].
    As in the original, when the clamped r is <= 0 it returns the TUPLE (do_nothing, do_nothing) instead; a caller
    that then calls the result crashes ("tuple is not callable"), which is the original's latent bug.
    """
    score_mode = _score_mode(mode, ("drop",), ("random_drop",))
    matched = _match(metric, r, class_token, score_mode, random_scores)
    if matched is None:
        return do_nothing, do_nothing
    r, und_idx, _, _, _ = matched

    def drop(x: torch.Tensor) -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        b, t1, c = src.shape
        und = src.gather(dim=-2, index=und_idx.expand(b, t1 - r, c))
        return torch.cat([und, dst], dim=1)

    return drop


def bipartite_soft_matching_hybrid(
    metric: torch.Tensor,
    r: int,
    class_token: bool = False,
    mode: str = "hybrid",
    threshold: float = 0.0,
    random_scores: torch.Tensor | None = None,
) -> tuple[MergeFn, MergeFn]:
    """Hybrid merge/drop (docs/method.md §1.5). mode 'merge'|'hybrid' (cosine) or 'random_merge' (uniform).

    Before merging, every dst that receives at least one src whose best-match similarity is below `threshold` is
    multiplied by 0 (scatter 'prod' of the per-src mask, include_self=True), so through merge_wavg that dst's value
    and size are discarded and replaced by its srcs' weighted mean. threshold=-1 is bit-identical to merge.
    The returned unmerge is the plain one and ignores discarded dsts (as in the original).
    """
    score_mode = _score_mode(mode, ("merge", "hybrid"), ("random_merge",))
    matched = _match(metric, r, class_token, score_mode, random_scores)
    if matched is None:
        return do_nothing, do_nothing
    r, unm_idx, src_idx, dst_idx, node_max_sorted = matched
    with torch.no_grad():
        keep = (node_max_sorted[..., :r] >= threshold)[..., None]  # [B, r, 1], aligned with src_idx

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        b, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(b, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(b, r, c))
        index = dst_idx.expand(b, r, c)
        mask = keep.to(dst.dtype).expand(b, r, c)
        dst = dst.scatter_reduce(-2, index, mask, reduce="prod")
        dst = dst.scatter_reduce(-2, index, src, reduce=_reduce_name(mode))
        return torch.cat([unm, dst], dim=1)

    return merge, _make_unmerge(metric.shape[1], r, unm_idx, src_idx, dst_idx)


def merge_wavg(
    merge: MergeFn, x: torch.Tensor, size: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge (docs/method.md §1.3): returns (merged x, merged size [B, N', 1])."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def merge_source(
    merge: MergeFn, x: torch.Tensor, source: torch.Tensor | None = None
) -> torch.Tensor:
    """Source tracking (docs/method.md §1.8): [B, N', N0] 0/1 matrix, rows OR-ed on merge. Starts as eye(N)."""
    if source is None:
        b, n, _ = x.shape
        source = torch.eye(n, device=x.device)[None, ...].expand(b, n, n)
    return merge(source, mode="amax")


def parse_r(num_layers: int, r: list[int] | tuple[float, float] | int) -> list[int]:
    """Per-layer r (docs/method.md §2.1).

    list: right-padded with 0 to num_layers, never truncated (a copy is returned).
    (r, inflect): r_i = int(min + step*i), min = int(r*(1-inflect)), max = 2r - min, step = (max-min)/(L-1).
    int: constant, same as (r, 0). The tuple/int forms divide by zero when num_layers == 1, as in the original.
    """
    if isinstance(r, list):
        return list(r) + [0] * max(0, num_layers - len(r))
    inflect = 0.0
    if isinstance(r, tuple):
        r, inflect = r
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)
    return [int(min_val + step * i) for i in range(num_layers)]
