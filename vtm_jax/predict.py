"""Classify one clip with a checkpoint: load, preprocess, run, top-5."""

from __future__ import annotations

import os
from typing import Any

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np

from vtm_jax.checkpoint import load_checkpoint
from vtm_jax.errors import UserError
from vtm_jax.integrity import check_finite
from vtm_jax.models.registry import build_model
from vtm_jax.record import ModelRecord
from vtm_jax.reduction import ReductionSettings


def load_clip(path: str, record: ModelRecord) -> np.ndarray:
    """A model-ready float32 clip ``[T, S, S, 3]`` from a ``.npy`` array or a video file.

    A float array is taken as already normalised and must have the model's exact input shape;
    uint8 arrays and video files become one view under the record's preprocessing and input
    protocol (``vtm_jax.data.protocols``; ``centred`` for records that name none).
    """
    from vtm_jax.data.pipeline import eval_views

    expected = (record.num_frames, record.image_size, record.image_size, 3)
    if not os.path.isfile(path):
        raise UserError(f"no such file: {path}")
    if path.endswith(".npy"):
        try:
            frames = np.load(path, allow_pickle=False)
        except (ValueError, EOFError, OSError) as e:
            raise UserError(f"cannot read {path} as a numpy array: {e}") from None
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise UserError(f"{path}: expected an array (T, H, W, 3), got shape {frames.shape}")
        if np.issubdtype(frames.dtype, np.floating):
            if frames.shape != expected:
                raise UserError(
                    f"{path}: a float array is taken as model-ready and must have shape "
                    f"{expected}, got {frames.shape}"
                )
            check_finite(frames, what=path)
            with np.errstate(over="ignore"):  # said below, in words
                frames = frames.astype(np.float32)
            # float64 values beyond float32's range have become infinities.
            check_finite(frames, what=f"{path} (as float32)")
            return frames
        if frames.dtype != np.uint8:
            raise UserError(
                f"{path}: expected float (normalised) or uint8 pixels, got {frames.dtype}"
            )
        example = {"video": frames, "video_id": path}
    else:
        with open(path, "rb") as f:
            example = {"video": np.frombuffer(f.read(), np.uint8), "video_id": path}
    clip = eval_views(example, record.resolve_preprocessing())[0]
    if clip.shape != expected:
        raise UserError(f"preprocessing gave shape {clip.shape}, the model needs {expected}")
    check_finite(clip, what=f"{path} after preprocessing")
    return clip


def load_model(
    checkpoint: str,
    merging: ReductionSettings | None = None,
    attention: str = "auto",
    *,
    verify: bool = True,
) -> tuple[Any, Any, ModelRecord]:
    """``(model, params, record)`` of a checkpoint, the parameters checked against the model.

    ``merging=None`` uses the record's stored settings; ``verify`` checks the checkpoint's
    digests (:func:`vtm_jax.checkpoint.load_checkpoint`). Missing, extra or mis-shaped
    parameters are a UserError naming them, before anything is compiled.
    """
    from vtm_jax.attention import get_attention
    from vtm_jax.models.registry import check_params_fit

    params, record = load_checkpoint(checkpoint, verify=verify)
    if merging is None:
        merging = ReductionSettings.from_dict(record.token_merging)
    model = build_model(record, merging, get_attention(attention))
    check_params_fit(model, params, record.input, where=checkpoint)
    return model, params, record


def check_logits(logits: Any, *, what: str) -> np.ndarray:
    """``logits`` as numpy; a UserError when any is NaN or infinite (no NaN answers)."""
    logits = np.asarray(logits)
    if not np.isfinite(logits).all():
        raise UserError(
            f"the model's output for {what} is not finite: the input's values or the "
            "parameters overflow float32"
        )
    return logits


def predict(
    checkpoint: str,
    video: str,
    merging: ReductionSettings | None = None,
    attention: str = "auto",
    *,
    verify: bool = True,
) -> tuple[np.ndarray, ModelRecord]:
    """Logits ``[num_classes]`` of one clip, and the checkpoint record.

    Non-finite input values, or a model output that overflows, are a UserError, never NaN
    scores.
    """
    model, params, record = load_model(checkpoint, merging, attention, verify=verify)
    clip = load_clip(video, record)
    try:
        logits = jax.jit(model.apply)({"params": params}, jnp.asarray(clip)[None])
    except flax.errors.FlaxError as e:
        # A model.json that does not fit the stored parameters (edited by hand, mixed up).
        raise UserError(
            f"{checkpoint}: parameters do not fit model.json: {e}".splitlines()[0]
        ) from None
    return check_logits(logits[0], what=video), record


def top_k(logits: np.ndarray, labels: list[str] | None, k: int = 5) -> list[tuple[int, str, float]]:
    """The k best classes as ``(index, label, probability)``."""
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits)))
    best = np.argsort(-probs, kind="stable")[:k]
    return [(int(i), labels[i] if labels else str(i), float(probs[i])) for i in best]
