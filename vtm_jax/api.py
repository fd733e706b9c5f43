"""The Python API: what ``import vtm_jax`` gives a notebook or a script.

::

    import vtm_jax

    model, params, record = vtm_jax.load(vtm_jax.demo_checkpoint())
    logits = vtm_jax.classify(model, params, clip, record=record)  # [T, H, W, 3] or a batch
    vtm_jax.top_k(logits, record.labels)
    fast = vtm_jax.classify(model, params, clip, record=record, merging={"mode": "merge", "r": 64})

Everything here is importable from the top-level package (``vtm_jax.load`` ...), lazily: the
package itself imports nothing until a name is used, so ``import vtm_jax`` stays instant. The
supported names are listed in docs/api.md; modules below them may move without notice. The
jobs are functions too, the same ones the command line calls: ``vtm_jax.evaluate``,
``eval_config``, ``train``, ``bench``, ``sweep``, ``demo``, ``predict``, ``visualize``,
``convert``, with ``load_config("vivit_tiny")``-style configs.
Bad arguments raise :class:`vtm_jax.UserError`, a ``ValueError``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.config.loading import load_config
from vtm_jax.config.shipped import shipped_configs
from vtm_jax.data.pipeline import eval_views
from vtm_jax.data.preprocessing import Preprocessing
from vtm_jax.errors import UserError
from vtm_jax.jobs.bench import bench, bench_settings
from vtm_jax.jobs.convert import convert
from vtm_jax.jobs.demo import run_demo as demo
from vtm_jax.jobs.demo import shipped_checkpoint as demo_checkpoint
from vtm_jax.jobs.evaluation.evaluate import evaluate
from vtm_jax.jobs.evaluation.from_config import eval_config
from vtm_jax.jobs.evaluation.spec import EvalSpec
from vtm_jax.jobs.predict import check_logits, forward, load_clip, predict, prepare_clip, top_k
from vtm_jax.jobs.sweep import run_sweep as sweep
from vtm_jax.jobs.training.train import train
from vtm_jax.jobs.visualize import visualize
from vtm_jax.merging import (
    RULES,
    MergingSettings,
    Rule,
    RuleOption,
    Tokens,
    merge_tokens,
    register_rule,
)
from vtm_jax.merging.matching import (
    Match,
    bipartite_soft_matching,
    cosine_scores,
    drop,
    merge_wavg,
    random_scores,
    unmerge,
)
from vtm_jax.merging.schedule import register_schedule
from vtm_jax.merging.settings import changed

__all__ = [
    "EvalSpec",
    "Match",
    "MergingSettings",
    "ModelRecord",
    "Preprocessing",
    "RULES",
    "Rule",
    "RuleOption",
    "Tokens",
    "UserError",
    "bench",
    "bench_settings",
    "bipartite_soft_matching",
    "classify",
    "convert",
    "cosine_scores",
    "demo",
    "demo_checkpoint",
    "drop",
    "eval_config",
    "eval_views",
    "evaluate",
    "load",
    "load_clip",
    "load_config",
    "merge_tokens",
    "merge_wavg",
    "predict",
    "prepare_clip",
    "random_scores",
    "register_rule",
    "register_schedule",
    "settings",
    "shipped_configs",
    "sweep",
    "token_counts",
    "top_k",
    "train",
    "unmerge",
    "visualize",
    "with_merging",
]

Merging = MergingSettings | Mapping[str, Any] | None


def settings(merging: Merging = None, **fields: Any) -> MergingSettings:
    """Merging settings from a ``MergingSettings``, a dict (a config's ``token_merging``
    block) or keywords: ``settings(mode="merge", r=64)``. ``None`` and no keywords: r=0.

    Keywords change ``merging``'s fields. Asking for merging (r above 0, a schedule, layer
    duplication) of settings whose mode is ``none`` without naming a mode gives mode ``merge``:
    ``settings(r=64).mode == "merge"``; a rule option that way is an error naming its modes
    (``vtm_jax.merging.settings.changed``).
    """
    if merging is not None and not isinstance(merging, (MergingSettings, Mapping)):
        raise UserError(
            f"merging must be MergingSettings, a dict or None, not {type(merging).__name__}"
        )
    if isinstance(merging, Mapping) and "mode" not in merging:
        merging, fields = None, {**merging, **fields}  # a dict without a mode: changes
    if not isinstance(merging, MergingSettings):
        merging = MergingSettings.from_dict(merging)
    return changed(merging, fields) if fields else merging


def load(
    checkpoint: str | os.PathLike,
    *,
    source: str | None = None,
    merging: Merging = None,
    attention: str = "auto",
    verify: bool = True,
    num_frames: int | None = None,
    image_size: int | None = None,
    num_heads: int | None = None,
    dtype: str | None = None,
) -> tuple[nn.Module, Any, ModelRecord]:
    """``(model, params, record)`` of a checkpoint, the parameters checked against the model.

    Args:
      checkpoint: a vtm-jax checkpoint directory (``vtm-jax convert`` or ``train`` wrote it;
        :func:`demo_checkpoint` is the shipped one). With ``source``, what ``vtm-jax convert
        --source SOURCE --input`` reads: a HuggingFace directory or a Hub repo id in the local
        cache (``hf``), a Scenic msgpack file, a ``.pyth``/``.pth`` file; converted in memory,
        nothing written.
      source: None for a checkpoint directory, else one of ``vtm_jax.checkpoints.convert.sources.SOURCES``.
      merging: the model's merging settings (``MergingSettings`` or a dict); None: those
        stored with the checkpoint (``record.token_merging``).
      attention: attention backend (``vtm_jax.models.attention.get_attention``).
      verify: check a checkpoint directory's digests and finiteness (slower for large ones).
      num_frames, image_size, num_heads: for sources whose files do not say them, as
        ``vtm-jax convert``'s flags.
      dtype: what the model computes in: ``float32`` (None, the default) or ``bfloat16``
        (activations and every matmul; parameters, softmax, merge arithmetic and logits stay
        float32, so the same parameters serve both). ``with_merging`` keeps it.
    """
    from vtm_jax.jobs.predict import load_model
    from vtm_jax.models.attention import get_attention
    from vtm_jax.models.registry import build_model

    path = os.fspath(checkpoint)
    if merging is not None:
        merging = settings(merging)
    if source is None:
        given = [
            name
            for name, value in (
                ("num_frames", num_frames),
                ("image_size", image_size),
                ("num_heads", num_heads),
            )
            if value is not None
        ]
        if given:
            raise UserError(
                f"{', '.join(given)} apply to a converted source (source=...); a checkpoint "
                "directory's model.json says them"
            )
        return load_model(path, merging, attention, verify=verify, dtype=dtype)
    from vtm_jax.checkpoints.convert.sources import load_source

    params, record = load_source(
        source, path, num_frames=num_frames, image_size=image_size, num_heads=num_heads
    )
    if merging is None:
        merging = MergingSettings.from_dict(record.token_merging)
    # load_source has checked the parameters against this architecture already.
    return build_model(record, merging, get_attention(attention), dtype), params, record


def with_merging(model: nn.Module, merging: Merging = None, **fields: Any) -> nn.Module:
    """``model`` with other merging settings (its parameters still fit: merging adds none).

    ``merging`` (settings or a dict) replaces the model's settings; keywords change fields of
    them, or of the model's own when ``merging`` is None: ``with_merging(model, r=32)``, which
    on a model whose mode is ``none`` also sets mode ``merge`` (see :func:`settings`). A
    setting the architecture would ignore is a UserError, as when a record is built.
    """
    from vtm_jax.models.registry import ARCHITECTURES, check_settings_apply

    if not isinstance(getattr(model, "merging", None), MergingSettings):
        raise UserError(f"{type(model).__name__} is not a vtm-jax model")
    new = settings(model.merging if merging is None else merging, **fields)
    names = [name for name, cls in ARCHITECTURES.items() if type(model) is cls]
    if names:  # a subclass or another module with `merging` is trusted to read its settings
        check_settings_apply(names[0], new)
    return model.clone(merging=new)


def classify(
    model: nn.Module,
    params: Any,
    video: Any,
    *,
    record: ModelRecord | None = None,
    merging: Merging = None,
) -> np.ndarray:
    """Logits of one clip ``[num_classes]``, or of a batch ``[B, num_classes]``.

    ``video``: a model-ready float array ``[T, S, S, 3]`` or ``[B, T, S, S, 3]`` (normalised,
    at the model's input size); raw uint8 pixels ``[T, H, W, 3]`` / ``[B, T, H, W, 3]``; or
    the path of a ``.npy`` or video file. Raw pixels and paths are sampled, resized, cropped
    and normalised as ``record`` says (one view), so they need ``record``.

    ``merging`` overrides the model's merging settings for this call (:func:`with_merging`).
    The compiled forward pass is cached per model and input shape, so calling again (with the
    same settings and batch size) runs without compiling; non-finite inputs or outputs are a
    UserError, never NaN scores.
    """
    if merging is not None:
        model = with_merging(model, merging)
    single = True
    if isinstance(video, str | os.PathLike):
        clips = load_clip(video, _need_record(record, "a path"))[None]
    else:
        array = np.asarray(video)
        if array.ndim == 5:
            single = False
            clips = np.stack([_ready(clip, record, f"clip {i}") for i, clip in enumerate(array)])
        else:
            clips = _ready(array, record, "the clip")[None]
    logits = forward(model, params, clips)
    logits = check_logits(logits, what="this input")
    return logits[0] if single else logits


def _ready(array: np.ndarray, record: ModelRecord | None, what: str) -> np.ndarray:
    """A model-ready clip: float arrays pass as they are (the model checks their shape)."""
    if record is not None:
        return prepare_clip(array, record, what=what)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise UserError(f"{what}: expected an array (T, H, W, 3), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        _need_record(None, f"raw {array.dtype} pixels")
    from vtm_jax.checkpoints.integrity import check_finite

    check_finite(array, what=what)
    return array.astype(np.float32)


def _need_record(record: ModelRecord | None, what: str) -> ModelRecord:
    if record is None:
        raise UserError(
            f"classify needs record= (from vtm_jax.load) to preprocess {what}; model-ready "
            "float clips need none"
        )
    return record


def token_counts(model: nn.Module, record: ModelRecord, merging: Merging = None) -> list[int]:
    """Tokens after each layer for one clip of the record's input size (the static plan the
    compiled model follows); ``merging`` overrides the model's settings."""
    if merging is not None:
        model = with_merging(model, merging)
    return [plan.tokens_out for plan in model.token_plan(record.num_frames, record.image_size)]
