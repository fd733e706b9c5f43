"""Classify clips with a checkpoint: load, preprocess, run (compiled once), top-5."""

from __future__ import annotations

import functools
import io
import os
from typing import Any

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np

from vtm_jax import paths
from vtm_jax.checkpoints.integrity import check_finite
from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.checkpoints.store import checkpoint_inputs, load_checkpoint
from vtm_jax.errors import UserError
from vtm_jax.merging import MergingSettings
from vtm_jax.models.registry import build_model


def prepare_clip(frames: Any, record: ModelRecord, *, what: str = "the clip") -> np.ndarray:
    """A model-ready float32 clip ``[T, S, S, 3]`` from an array ``[T, H, W, 3]``.

    A float array is taken as already normalised and must have the model's exact input shape;
    a uint8 array holds raw pixels and becomes one view under the record's preprocessing and
    input protocol (``vtm_jax.data.protocols``; ``centred`` for records that name none).
    ``what`` names the array in error messages.
    """
    frames = np.asarray(frames)
    expected = (record.num_frames, record.image_size, record.image_size, 3)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise UserError(f"{what}: expected an array (T, H, W, 3), got shape {frames.shape}")
    if np.issubdtype(frames.dtype, np.floating):
        if frames.shape != expected:
            raise UserError(
                f"{what}: a float array is taken as model-ready and must have shape "
                f"{expected}, got {frames.shape}"
            )
        check_finite(frames, what=what)
        with np.errstate(over="ignore"):  # said below, in words
            frames = frames.astype(np.float32)
        # float64 values beyond float32's range have become infinities.
        check_finite(frames, what=f"{what} (as float32)")
        return frames
    if frames.dtype != np.uint8:
        raise UserError(f"{what}: expected float (normalised) or uint8 pixels, got {frames.dtype}")
    return _one_view({"video": frames, "video_id": what}, record, what)


def _one_view(example: dict[str, Any], record: ModelRecord, what: str) -> np.ndarray:
    from vtm_jax.data.pipeline import eval_views

    expected = (record.num_frames, record.image_size, record.image_size, 3)
    clip = eval_views(example, record.resolve_preprocessing())[0]
    if clip.shape != expected:
        raise UserError(f"preprocessing gave shape {clip.shape}, the model needs {expected}")
    check_finite(clip, what=f"{what} after preprocessing")
    return clip


def load_clip(video: str | os.PathLike | np.ndarray, record: ModelRecord) -> np.ndarray:
    """A model-ready float32 clip ``[T, S, S, 3]`` from a ``.npy`` array, a video file or an
    array (:func:`prepare_clip` says how arrays are read)."""
    if not isinstance(video, str | os.PathLike):
        return prepare_clip(video, record)
    path = os.fspath(video)
    if not paths.is_file(path):
        raise UserError(f"no such file: {path}")
    raw = paths.read_bytes(path)  # local or remote (gs://): decoded from memory either way
    if path.endswith(".npy"):
        try:
            frames = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, EOFError, OSError) as e:
            raise UserError(f"cannot read {path} as a numpy array: {e}") from None
        return prepare_clip(frames, record, what=path)
    example = {"video": np.frombuffer(raw, np.uint8), "video_id": path}
    return _one_view(example, record, path)


def load_model(
    checkpoint: str,
    merging: MergingSettings | None = None,
    attention: str = "auto",
    *,
    verify: bool = True,
    dtype: str | None = None,
) -> tuple[Any, Any, ModelRecord]:
    """``(model, params, record)`` of a checkpoint, the parameters checked against the model.

    ``merging=None`` uses the record's stored settings; ``verify`` checks the checkpoint's
    digests (:func:`vtm_jax.checkpoints.store.load_checkpoint`). Missing, extra or mis-shaped
    parameters are a UserError naming them, before anything is compiled. ``dtype``: what the
    model computes in (``float32``, the default, or ``bfloat16``; parameters stay float32).
    """
    from vtm_jax.models.attention import get_attention
    from vtm_jax.models.registry import check_params_fit

    params, record = load_checkpoint(checkpoint, verify=verify)
    if merging is None:
        merging = MergingSettings.from_dict(record.token_merging)
    model = build_model(record, merging, get_attention(attention), dtype)
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


@functools.partial(jax.jit, static_argnums=0)
def _apply(model: Any, params: Any, videos: jax.Array) -> jax.Array:
    return model.apply({"params": params}, videos)


def forward(model: Any, params: Any, videos: Any, *, where: str | None = None) -> jax.Array:
    """Logits ``[B, num_classes]`` of model-ready clips ``[B, T, S, S, 3]``.

    The model is a static argument of one module-level ``jax.jit``: Flax modules compare by
    their fields, so calls with the same model (or an equal one, rebuilt from the same
    checkpoint and settings) and the same input shape reuse one compiled program, across
    calls and across loads. ``where``: the checkpoint the parameters came from, named when
    its model.json does not describe them.
    """
    try:
        return _apply(model, params, jnp.asarray(videos))
    except flax.errors.FlaxError as e:
        # A model.json that does not fit the stored parameters (edited by hand, mixed up), or
        # a library caller's parameters of another model.
        if where is None:
            message = f"the parameters do not fit {type(model).__name__}: {e}"
        else:
            message = f"{where}: parameters do not fit model.json: {e}"
        raise UserError(message.splitlines()[0]) from None


def predict(
    checkpoint: str,
    video: str | os.PathLike | np.ndarray,
    merging: MergingSettings | None = None,
    attention: str = "auto",
    *,
    verify: bool = True,
    dtype: str | None = None,
) -> tuple[np.ndarray, ModelRecord]:
    """Logits ``[num_classes]`` of one clip (a ``.npy`` or video path, or an array), and the
    checkpoint record.

    Non-finite input values, or a model output that overflows, are a UserError, never NaN
    scores. The compiled forward pass is reused by later calls with the same checkpoint and
    settings (:func:`forward`). ``dtype``: as :func:`load_model`'s.
    """
    model, params, record = load_model(checkpoint, merging, attention, verify=verify, dtype=dtype)
    clip = load_clip(video, record)
    logits = forward(model, params, clip[None], where=checkpoint)
    what = os.fspath(video) if isinstance(video, str | os.PathLike) else "the clip"
    return check_logits(logits[0], what=what), record


def merging_line(record: ModelRecord, merging: MergingSettings) -> str:
    """``mode=... r=... schedule=...`` as the model runs it on the record's clip: the r each
    step removes after the model's per-layer clamp (one number when all are equal), and the r
    asked for where the clamp lowered it."""
    model = build_model(record, merging)
    applied = [step.r for step in model.token_plan(record.num_frames, record.image_size)]
    shown = str(applied[0]) if len(set(applied)) == 1 else ",".join(map(str, applied))
    line = f"mode={merging.mode} r={shown} schedule={merging.schedule}"
    asked = [r for _, r in merging.layer_steps(model.merging_layers())]
    if any(done < r for done, r in zip(applied, asked, strict=False)):
        r = merging.r
        given = ",".join(map(str, r)) if isinstance(r, list | tuple) else str(r)
        line += f" (asked r={given}: a layer removes at most what its tokens allow)"
    return line


def top_k(logits: np.ndarray, labels: list[str] | None, k: int = 5) -> list[tuple[int, str, float]]:
    """The k best classes as ``(index, label, probability)``."""
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits)))
    best = np.argsort(-probs, kind="stable")[:k]
    return [(int(i), labels[i] if labels else str(i), float(probs[i])) for i in best]


def _holds_logits(path: str, num_classes: int) -> bool:
    """Whether ``path`` is a ``.npy`` of ``num_classes`` floats, as ``--save-logits`` writes."""
    try:
        with paths.open_file(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    except (OSError, ValueError):  # a directory, not an .npy file ...
        return False
    return tuple(shape) == (num_classes,) and dtype.kind == "f"


def check_logits_output(
    path: str,
    record: ModelRecord,
    *,
    video: str | os.PathLike,
    checkpoint: str,
    what: str = "--save-logits",
    overwrite: bool = False,
) -> None:
    """Before the model runs: ``path`` may take the logits (``vtm_jax.outputs.claim_outputs``).

    An existing file is replaced when it holds what predict writes there (a ``.npy`` vector of
    the checkpoint's class count: an ``.npy`` carries no other mark), or with ``overwrite``;
    the clip or the checkpoint being read is refused always."""
    from vtm_jax.outputs import claim_outputs

    def owner(existing: str) -> str | None:
        if _holds_logits(existing, record.num_classes):
            return None
        return f"exists and is not logits of this checkpoint's {record.num_classes} classes"

    inputs = {"--video": os.fspath(video), **checkpoint_inputs(checkpoint)}
    claim_outputs({path: owner}, what=what, overwrite=overwrite, inputs=inputs)
