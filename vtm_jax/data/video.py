"""Decode videos with PyAV and turn frames into model-ready clips."""

from __future__ import annotations

from typing import Any

import numpy as np

from vtm_jax.errors import UserError


def read_video(path: str) -> np.ndarray:
    """All frames of a video file as uint8 ``[T, H, W, 3]``."""
    try:
        import av
    except ImportError:
        raise UserError("reading video files needs PyAV: pip install 'vtm-jax[video]'") from None
    try:
        with av.open(path) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except FileNotFoundError:
        raise UserError(f"no such file: {path}") from None
    except (av.error.FFmpegError, IndexError, ValueError) as e:
        raise UserError(f"cannot decode {path}: {e}") from None
    if not frames:
        raise UserError(f"{path} has no video frames")
    return np.stack(frames)


def sample_indices(total: int, num_frames: int, stride: int) -> np.ndarray:
    """``num_frames`` indices ``stride`` apart, centred in a video of ``total`` frames.

    A video shorter than that span is sampled with the largest stride that fits, so every
    sampled frame is distinct; fewer than ``num_frames`` frames is an error.
    """
    if total < num_frames:
        raise UserError(f"the video has {total} frames; the model needs {num_frames}")
    if num_frames > 1:
        stride = max(1, min(stride, (total - 1) // (num_frames - 1)))
    span = (num_frames - 1) * stride + 1
    start = (total - span) // 2
    return start + stride * np.arange(num_frames)


def resize_short_side(frames: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of float frames ``[T, H, W, C]`` so that the short side is ``size``."""
    import jax

    t, h, w, c = frames.shape
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) == (h, w):
        return frames
    # Plain bilinear, no antialiasing: what the paper's SlowFast loaders (torch interpolate,
    # align_corners=False) and Scenic's input pipeline (tf.image.resize) do.
    resized = jax.image.resize(frames, (t, new_h, new_w, c), method="bilinear", antialias=False)
    return np.asarray(resized)


def center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    h, w = frames.shape[1:3]
    top, left = (h - size) // 2, (w - size) // 2
    return frames[:, top : top + size, left : left + size]


def preprocess(frames: np.ndarray, preprocessing: dict[str, Any]) -> np.ndarray:
    """uint8 frames ``[T, H, W, 3]`` to a normalised float32 clip, as the model's record says.

    Keys of ``preprocessing``: ``num_frames``, ``stride``, ``min_resize``, ``crop_size``,
    ``mean`` and ``std`` (per channel, on pixels scaled to [0, 1]).
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise UserError(f"expected frames [T, H, W, 3], got shape {frames.shape}")
    missing = {"num_frames", "stride", "min_resize", "crop_size", "mean", "std"} - set(
        preprocessing
    )
    if missing:
        raise UserError(f"preprocessing lacks {', '.join(sorted(missing))}")
    indices = sample_indices(frames.shape[0], preprocessing["num_frames"], preprocessing["stride"])
    clip = frames[indices]
    clip = clip.astype(np.float32) / 255.0
    clip = resize_short_side(clip, preprocessing["min_resize"])
    clip = center_crop(clip, preprocessing["crop_size"])
    mean = np.asarray(preprocessing["mean"], np.float32)
    std = np.asarray(preprocessing["std"], np.float32)
    return (clip - mean) / std
