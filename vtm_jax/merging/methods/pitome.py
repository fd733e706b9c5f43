"""PiToMe, spectrum-preserving token merging (Tran et al., NeurIPS 2024), as the mode ``pitome``.

Each token gets an *energy*: the mean over all tokens of ``ELU(cos - margin)`` of their mean
keys, high for a token in a large cluster of similar tokens. Tokens are ranked by energy; the
most crowded ones are merged and the isolated ones kept. Two variants, as in the authors' code
(hchautran/PiToMe ``algo/pitome/merge.py``, whose steps the functions below follow):

* ``pitome``: the ``2 r`` highest-energy tokens alternate into A and B (in energy order); every
  A token merges into its most similar B token; the other tokens are kept, in energy order.
  Output ``[class token, kept, B]``.
* ``pitome_bsm``: all tokens alternate into A and B in energy order, then ToMe's bipartite
  matching merges the ``r`` A tokens with the best match; the unmerged A tokens stay in
  descending order of that match. Output ``[class token, unmerged A, B]``.

Merging is ToMe's size-weighted mean, sizes tracked (the authors' block applies no
proportional attention: ``prop_attn=False`` matches them). The margin falls linearly with depth
(``m - m l / L``). Which variant a layer uses follows one of the authors' patches
(``bsm_layers``): the DeiT patch (the default) runs ``pitome_bsm`` in the first ``ceil(L / 2)``
layers, the MAE patch in the rest. Class tokens are never merged.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vtm_jax.merging import matching as mg
from vtm_jax.merging.tokens import MergeContext, Rule, RuleOption, Tokens

DEFAULT_MARGIN = 0.75  # the authors' DeiT and MAE patches
DEFAULT_ALPHA = 1.0
# Which layers run the pitome_bsm variant: the authors' DeiT patch (the default, as for the
# supervised ViTs ViViT, TimeSformer and Motionformer start from) or MAE patch (for VideoMAE),
# or one variant throughout.
BSM_LAYERS = ("first_half", "second_half", "none", "all")
DEFAULT_BSM_LAYERS = "first_half"


class Split(NamedTuple):
    """One layer's decision over the ``T`` tokens after any class token (indices into them).

    Output order is ``[kept, dst]``; ``src[k]`` merges into ``dst[dst_slot[k]]``.
    """

    kept: jax.Array  # [B, K] tokens passed through unchanged, in output order
    dst: jax.Array  # [B, nB] destination tokens (B), in output order
    src: jax.Array  # [B, r] tokens merged away
    dst_slot: jax.Array  # [B, r] index into ``dst`` of each src's destination


def similarity(metric: jax.Array) -> jax.Array:
    """Cosine similarity ``[B, T, T]`` of every token pair (F.normalize's 1e-12 floor)."""
    metric = metric.astype(jnp.float32)
    norm = jnp.linalg.norm(metric, axis=-1, keepdims=True)
    metric = metric / jnp.maximum(norm, 1e-12)
    return metric @ jnp.swapaxes(metric, -1, -2)


def energy(sim: jax.Array, margin: float, alpha: float) -> jax.Array:
    """``[B, T]``: mean over every token j (itself included) of ``ELU(sim_ij - margin)``."""
    return jax.nn.elu(sim - margin, alpha=alpha).mean(axis=-1)


def energy_order(scores: jax.Array) -> jax.Array:
    """Token indices by descending energy. Stable: exact ties keep position order (torch's
    argsort leaves them unspecified)."""
    return jnp.argsort(-scores, axis=-1, stable=True)


def layer_margin(margin: float, layer: int, num_layers: int) -> float:
    """The authors' schedule ``m - m l / L``, in Python floats as they compute it."""
    return margin - margin * (layer / max(num_layers, 1))


def uses_bsm(bsm_layers: str, layer: int, num_layers: int) -> bool:
    """Whether ``layer`` runs ``pitome_bsm`` (else ``pitome``) under the ``bsm_layers`` choice."""
    first = layer < math.ceil(num_layers * 0.5)
    return {"first_half": first, "second_half": not first, "none": False, "all": True}[bsm_layers]


def _pair_scores(sim: jax.Array, a_idx: jax.Array, b_idx: jax.Array) -> jax.Array:
    """``sim[a_idx][:, b_idx]`` per batch row: ``[B, nA, nB]``."""
    rows = jnp.take_along_axis(sim, a_idx[:, :, None], axis=1)
    return jnp.take_along_axis(rows, b_idx[:, None, :], axis=2)


def pitome_split(sim: jax.Array, order: jax.Array, r: int) -> Split:
    """The ``pitome`` variant: the ``2 r`` most energetic tokens alternate into A and B, each A
    goes to its most similar B, the rest are protected (needs ``2 r <= T``)."""
    merge_idx, protected = order[:, : 2 * r], order[:, 2 * r :]
    a_idx, b_idx = merge_idx[:, ::2], merge_idx[:, 1::2]
    dst_slot = _pair_scores(sim, a_idx, b_idx).argmax(axis=-1)
    return Split(protected, b_idx, a_idx, dst_slot)


def pitome_bsm_split(sim: jax.Array, order: jax.Array, r: int) -> Split:
    """The ``pitome_bsm`` variant: A and B alternate over all tokens in energy order, then
    bipartite matching picks the ``r`` A tokens with the best match (unmerged A left in
    descending order of their best match, as the authors leave them)."""
    a_idx, b_idx = order[:, ::2], order[:, 1::2]
    scores = _pair_scores(sim, a_idx, b_idx)
    node_max, node_idx = scores.max(axis=-1), scores.argmax(axis=-1)
    edge_idx = jnp.argsort(-node_max, axis=-1, stable=True)
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    return Split(
        kept=jnp.take_along_axis(a_idx, unm_idx, axis=-1),
        dst=b_idx,
        src=jnp.take_along_axis(a_idx, src_idx, axis=-1),
        dst_slot=jnp.take_along_axis(node_idx, src_idx, axis=-1),
    )


def _rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, idx[..., None], axis=1)


def apply_split(x: jax.Array, split: Split, reduce: str = "sum") -> jax.Array:
    """``[B, T, C] -> [B, T - r, C]``: ``[kept, dst]`` with each src reduced into its dst
    (``sum``, or ``max`` for dense source tracking); the dst's own value takes part."""
    dst = _rows(x, split.dst)
    src = _rows(x, split.src)
    batch = jnp.arange(x.shape[0])[:, None]
    if reduce == "sum":
        dst = dst.at[batch, split.dst_slot].add(src)
    else:
        dst = dst.at[batch, split.dst_slot].max(src)
    return jnp.concatenate([_rows(x, split.kept), dst], axis=1)


def _with_class_token(fn, x: jax.Array, class_token: bool) -> jax.Array:
    """``fn`` applied to the tokens after the class token, which stays first, untouched."""
    if not class_token:
        return fn(x)
    return jnp.concatenate([x[:, :1], fn(x[:, 1:])], axis=1)


def merge_wavg(
    x: jax.Array, size: jax.Array | None, split: Split, *, class_token: bool
) -> tuple[jax.Array, jax.Array]:
    """ToMe's size-weighted merge through ``split`` (float32), sizes summed."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    size = jnp.ones(x.shape[:2] + (1,), jnp.float32) if size is None else size.astype(jnp.float32)
    merged = _with_class_token(lambda v: apply_split(v, split), x * size, class_token)
    size = _with_class_token(lambda v: apply_split(v, split), size, class_token)
    return (merged / size).astype(dtype), size


def destinations(split: Split, t: int, *, class_token: bool) -> jax.Array:
    """``[B, N]``: the output index each input token (class token included) goes to."""
    b, k = split.kept.shape
    offset = int(class_token)
    batch = jnp.arange(b)[:, None]
    out = jnp.zeros((b, t), jnp.int32)
    out = out.at[batch, split.kept].set(offset + jnp.arange(k, dtype=jnp.int32))
    out = out.at[batch, split.dst].set(offset + k + jnp.arange(split.dst.shape[1], dtype=jnp.int32))
    out = out.at[batch, split.src].set((offset + k + split.dst_slot).astype(jnp.int32))
    if class_token:
        out = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), out], axis=1)
    return out


def track_source(source: jax.Array | None, split: Split, *, class_token: bool):
    """Source tracking through ``split``: index form via destinations, dense form by max (the
    authors' ``merge_source`` reduces with ``amax``)."""
    if source is None:
        return None
    if source.ndim == 2:
        t = split.kept.shape[1] + split.dst.shape[1] + split.src.shape[1]
        return mg.track_groups(source, destinations(split, t, class_token=class_token))
    return _with_class_token(lambda v: apply_split(v, split, "max"), source, class_token)


def keep_ratio_removed(t: int, keep_ratio: float) -> int:
    """The authors' count: ``floor(T - T ratio)`` of the ``T`` unprotected tokens."""
    return math.floor(t - t * keep_ratio) if keep_ratio < 1.0 else 0


def removed(n: int, r: int, ctx: MergeContext) -> int:
    """Tokens a layer removes: ``keep_ratio``'s count when given, else the common budget ``r``
    clamped to half of the tokens after the class token."""
    ratio = ctx.settings.rule_options.get("keep_ratio")
    if ratio is None:
        return mg.clamp_r(n, r, class_token=ctx.class_token) if r > 0 else 0
    return keep_ratio_removed(n - int(ctx.class_token), ratio)


def pitome_merge(tokens: Tokens, metric: jax.Array, r: int, ctx: MergeContext) -> Tokens:
    """The ``pitome`` rule: energy ranking on the mean keys, then this layer's variant."""
    options = ctx.settings.rule_options
    offset = int(ctx.class_token)
    sim = similarity(metric[:, offset:])
    margin = layer_margin(options.get("margin", DEFAULT_MARGIN), ctx.layer, ctx.num_layers)
    order = energy_order(energy(sim, margin, options.get("alpha", DEFAULT_ALPHA)))
    bsm = uses_bsm(options.get("bsm_layers", DEFAULT_BSM_LAYERS), ctx.layer, ctx.num_layers)
    split = (pitome_bsm_split if bsm else pitome_split)(sim, order, r)
    x, size = merge_wavg(tokens.x, tokens.size, split, class_token=ctx.class_token)
    return Tokens(x, size, track_source(tokens.source, split, class_token=ctx.class_token))


RULE = Rule(
    pitome_merge,
    options=(
        RuleOption(
            "keep_ratio",
            minimum=0.5,
            maximum=1.0,
            hint="tokens kept per layer, replacing r; below 0.5 the pitome split breaks (2r > T)",
        ),
        RuleOption("margin", minimum=0.0, maximum=1.0, hint="first layer's margin (0.75)"),
        RuleOption("alpha", minimum=0.0, hint="ELU alpha of the energy (1.0)"),
        RuleOption("bsm_layers", kind=str, choices=BSM_LAYERS),
    ),
    reads=("keys",),
    place="attention",
    layouts=("joint", "frame"),
    removed=removed,
)
