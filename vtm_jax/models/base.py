"""What a backbone must provide (:class:`Backbone`), and the pieces backbones share.

A backbone is a Flax module that classifies a video ``[B, T, H, W, 3]`` while reducing its
tokens as ``merging`` (a :class:`~vtm_jax.merging.MergingSettings`) says. The rest of
vtm_jax (evaluation, benchmarks, sweeps, pictures, conversion checks) reaches a backbone only
through this contract and :mod:`vtm_jax.models.registry`, never by its architecture name.

Shared here: the video shape check, the tubelet embedding and class token, the base key of
a call's random draws (:func:`merge_key`), running a batch a few clips at a time
(:func:`apply_in_steps`), pooling and the classifier head. The merging encoder (its steps,
the pre-LN joint space-time blocks, sowing the source) is :mod:`vtm_jax.models.encoder`; the
multiply-add bookkeeping of ``analytic_macs`` is :mod:`vtm_jax.models.macs`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vtm_jax.errors import UserError
from vtm_jax.merging import MergingSettings, Tokens
from vtm_jax.merging.schedule import LayerPlan
from vtm_jax.models.attention import AttentionFn

CLASSIFIERS = ("token", "gap")

# The reduction options only some backbones read; a backbone lists those it reads in its
# ``options`` and the registry refuses the others (a non-default value would be ignored).
BACKBONE_OPTIONS = (
    "temporal_r",
    "motionformer_groups",
    "motionformer_concat_keys",
    "size_weighted_pool",
    "factorised_groups",
)


class SourceLayout(NamedTuple):
    """How a backbone's sown source (``intermediates/source``, index form) maps to the video.

    ``per_group``: one row per merge group (``[G, P0]``: per frame, or Motionformer's groups)
    rather than one row over all tokens (``[1, N0]``); ``class_token``: a class token at index
    0 of each row; ``patch``: ``(pt, ph, pw)`` pixels per token; ``layout`` (per-group rows):
    ``frame``, member ``c`` of group ``g`` is token ``g * P + c`` of the frame-major patch grid,
    or ``interleaved``, token ``c * G + g``.
    """

    per_group: bool
    class_token: bool
    patch: tuple[int, int, int]
    layout: str = "frame"


class TemporalTable(NamedTuple):
    """A learned parameter table whose length follows the frame count (:mod:`vtm_jax.checkpoints.frame_count`).

    The table at ``path`` is ``(1, class_entries + slots * per_slot, D)``, slot-major (``(t h
    w)`` order), with ``slots = frames // tubelet`` and ``per_slot`` spatial entries per slot
    (1 when the table is purely temporal).
    """

    path: tuple[str, ...]
    class_entries: int
    per_slot: int


@runtime_checkable
class Backbone(Protocol):
    """The contract every backbone meets (see README "Adding a backbone").

    * ``__call__(video, *, train=False, merge_rng=None)``: logits ``[B, classes]`` for a video
      ``[B, T, H, W, 3]``. It first resolves its base key with :func:`merge_key` (an explicit
      ``merge_rng``, else the ``'merge'`` RNG stream, else None: ``merging.seed``); each step's
      random draws then use ``layer_key(merging, step, key)``
      (:func:`~vtm_jax.models.encoder.encoder_steps`).
      With ``merging.trace_source`` set, the final source is sown as ``intermediates/source``
      (:func:`~vtm_jax.models.encoder.sow_source`), laid out as :meth:`source_layout` says.
    * ``token_plan(num_frames, image_size)``: the static token count entering and leaving each
      step (layer, or repeat of a duplicated layer), exactly what the forward pass produces.
    * ``analytic_macs(num_frames, image_size)``: ``{'embedding', 'layers', 'head', 'total'}``
      multiply-adds per clip (``layers`` one entry per step).
    * ``merging_layers()``: how many layers ``merging``'s per-layer r list covers.
    * ``source_layout()``: a :class:`SourceLayout`.
    * ``temporal_tables(image_size)``: the learned :class:`TemporalTable` s that change with
      the frame count (empty when positions are fixed or absent).
    * ``options``: the names of :data:`BACKBONE_OPTIONS` it reads; any other set away from its
      default is refused when the model is built.

    Fields: ``merging`` (static settings) and ``attention_fn`` (the attention backend); and,
    optionally, ``dtype``: the dtype activations and matmul inputs are computed in (float32
    by default; ``vtm_jax.models.layers.DTYPES``), with float32 parameters, softmax, merge
    arithmetic and logits. ``registry.build_model`` refuses bfloat16 for a backbone without it.
    """

    merging: MergingSettings
    attention_fn: AttentionFn
    options: ClassVar[tuple[str, ...]]

    def __call__(
        self, video: jax.Array, *, train: bool = False, merge_rng: jax.Array | None = None
    ) -> jax.Array: ...

    def token_plan(self, num_frames: int, image_size: int) -> list[LayerPlan]: ...

    def analytic_macs(self, num_frames: int, image_size: int) -> dict[str, Any]: ...

    def merging_layers(self) -> int: ...

    def source_layout(self) -> SourceLayout: ...

    def temporal_tables(self, image_size: int) -> list[TemporalTable]: ...


# ---------------------------------------------------------------------------------------------
# Input and embedding


def check_video_shape(shape: tuple[int, ...], patch_size: Sequence[int]) -> None:
    """A clear error for a video the embedding cannot cut into whole patches.

    ``patch_size`` is a tubelet ``(t, h, w)`` or a per-frame patch ``(h, w)``.
    """
    if len(shape) != 5 or shape[-1] != 3:
        raise UserError(f"expected a video batch [B, T, H, W, 3], got shape {tuple(shape)}")
    names = ("frames", "height", "width")[-len(patch_size) :]
    what = "tubelet size" if len(patch_size) == 3 else "patch size"
    sizes = shape[4 - len(patch_size) : 4]
    for name, size, patch in zip(names, sizes, patch_size, strict=True):
        if size % patch:
            raise UserError(f"{name} {size} is not a multiple of the {what} {patch}")


def check_classifier(classifier: str) -> None:
    if classifier not in CLASSIFIERS:
        raise UserError(f"unknown classifier {classifier!r}; valid: {', '.join(CLASSIFIERS)}")


def embed_tubelets(
    video: jax.Array, hidden_size: int, patch_size: Sequence[int], dtype: Any = jnp.float32
) -> jax.Array:
    """``[B, T, H, W, 3]`` to ``[B, t, h, w, D]``: the non-overlapping Conv ``embedding``,
    computed in ``dtype`` (the model's: its output is the first activation in that dtype).

    Call it inside a module's compact ``__call__``: the Conv becomes that module's child.
    """
    patch = tuple(patch_size)
    return nn.Conv(
        hidden_size, patch, strides=patch, padding="VALID", dtype=dtype, name="embedding"
    )(video)


def prepend_class_token(module: nn.Module, x: jax.Array, name: str = "cls") -> jax.Array:
    """A learned class token (parameter ``name``, zeros at init) before the tokens ``x``."""
    width = x.shape[-1]
    cls = module.param(name, nn.initializers.zeros, (1, 1, width))
    cls = jnp.broadcast_to(cls, (x.shape[0], 1, width)).astype(x.dtype)
    return jnp.concatenate([cls, x], axis=1)


# ---------------------------------------------------------------------------------------------
# Random draws and stepping

# The Flax RNG stream random modes draw from when no explicit key is given:
# ``model.apply(variables, video, rngs={"merge": key})``, as a trainer passes ``"dropout"``.
MERGE_STREAM = "merge"


def merge_key(module: nn.Module, merge_rng: jax.Array | None) -> jax.Array | None:
    """The base key of one call's random draws, in order of precedence: ``merge_rng`` when
    given (evaluation keys each video this way); else a key from the ``'merge'`` stream when
    the caller passes one, so a trainer's per-step ``rngs`` give a new draw each step; else
    None, and each step draws from ``PRNGKey(merging.seed)`` (:func:`~vtm_jax.merging.layer_key`).

    Call it once at the top of a backbone's ``__call__``, before any key is derived.
    """
    if merge_rng is not None:
        return merge_rng
    if module.has_rng(MERGE_STREAM):
        return module.make_rng(MERGE_STREAM)
    return None


def apply_in_steps(
    model: nn.Module,
    params: Any,
    videos: jax.Array,
    *,
    clips_per_step: int | None = None,
    merge_rng: jax.Array | None = None,
) -> jax.Array:
    """``model.apply`` over ``videos`` ``[B, ...]``, ``clips_per_step`` clips at a time.

    Why: on a CPU a whole batch's activations leave the last-level cache (ViViT-B's MLP
    activations are 38 MB a clip), and the elementwise work between the matmuls becomes bound
    by memory. Running the clips of a batch in steps of a few (a ``lax.map``, one compiled
    body) keeps them in cache: ViViT-B at batch 4 ran 3.0 s per clip in steps of one clip
    against 3.9 s as one batch (BENCHMARKS.md). Logits are unchanged for deterministic modes.
    Random modes draw per step, from ``fold_in(key, step)`` of the call's key (``merge_rng``,
    else ``PRNGKey(merging.seed)``), so their draws differ from a whole-batch call's.

    ``None`` (or a step of the whole batch) is one plain ``model.apply``; ``B`` must be a
    multiple of ``clips_per_step``.
    """
    batch = videos.shape[0]
    if clips_per_step is None or clips_per_step >= batch:
        return model.apply({"params": params}, videos, merge_rng=merge_rng)
    if clips_per_step < 1 or batch % clips_per_step:
        raise UserError(
            f"clips_per_step must divide the batch of {batch} clips, not {clips_per_step!r}"
        )
    steps = batch // clips_per_step
    key = merge_rng if merge_rng is not None else jax.random.PRNGKey(model.merging.seed)

    def one_step(args):
        index, clips = args
        step_rng = jax.random.fold_in(key, index)
        return model.apply({"params": params}, clips, merge_rng=step_rng)

    chunks = videos.reshape((steps, clips_per_step) + videos.shape[1:])
    logits = jax.lax.map(one_step, (jnp.arange(steps), chunks))
    return logits.reshape((batch,) + logits.shape[2:])


# ---------------------------------------------------------------------------------------------
# Output


def mean_pool(tokens: Tokens, *, weighted: bool) -> jax.Array:
    """Mean over tokens: unweighted as in the paper, or weighted by token sizes (float32
    arithmetic, the sizes' dtype; the mean comes back in the tokens' dtype)."""
    if not weighted or tokens.size is None:
        return tokens.x.mean(axis=1)
    mean = (tokens.x * tokens.size).sum(axis=1) / tokens.size.sum(axis=1)
    return mean.astype(tokens.x.dtype)


def pool(tokens: Tokens, *, class_token: bool, weighted: bool) -> jax.Array:
    """The class token when there is one, else :func:`mean_pool`."""
    return tokens.x[:, 0] if class_token else mean_pool(tokens, weighted=weighted)


def classifier_head(
    x: jax.Array,
    num_classes: int,
    representation_size: int | None = None,
    *,
    zero_init: bool = True,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """Optional ``pre_logits`` (Dense + tanh), then ``output_projection``: float32 logits.

    ``zero_init``: the output kernel starts at zero (Scenic's and these ports' choice); the
    original Motionformer keeps Flax's default. ``dtype``: the model's; the output matmul
    takes its inputs in it but accumulates into float32 and adds the float32 bias, so the
    logits keep float32's precision (bfloat16 logits would be off by up to 1/256 of their
    size, enough to swap close classes).
    """
    if representation_size is not None:
        x = nn.tanh(nn.Dense(representation_size, dtype=dtype, name="pre_logits")(x))
    init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
    return nn.Dense(
        num_classes,
        kernel_init=init,
        dtype=dtype,
        promote_dtype=_matmul_inputs_only,
        dot_general=functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32),
        name="output_projection",
    )(x)


def _matmul_inputs_only(inputs, kernel, bias, *, dtype=None):
    """Flax's ``promote_dtype`` for the output layer: inputs and kernel in ``dtype``, the
    bias left float32 (it is added to the float32 accumulator)."""
    dtype = dtype or jnp.float32
    return inputs.astype(dtype), kernel.astype(dtype), bias
