"""A test oracle of Scenic's ViViT test input pipeline (DMVR), re-derived from its behaviour.

Written in numpy from a description of Scenic's ``video_tfrecord_dataset`` and DMVR's
``processors`` (never from vtm_jax): the offsets and wrap-round of ``sample_sequence`` /
``sample_linspace_sequence``, ``resize_smallest`` (integer-floored long side, TensorFlow's
half-pixel bilinear in float32, cast back to uint8), the floored central crop or
``three_spatial_crops`` with ceiled centres, crop-major view order, and ``x * (2/255) - 1``.
The float32 interpolation follows TensorFlow's kernel operation by operation (no fused
multiply-adds), so the uint8 cast truncates the same values.
"""

from __future__ import annotations

import math

import numpy as np


def frame_indices(length: int, num_frames: int, stride: int, num_clips: int) -> np.ndarray:
    span = num_frames * stride
    if num_clips == 1:
        offsets = [max(0, math.floor((length - span) / 2))]
    else:
        room = np.float32(max(0, length - span))
        delta = room / np.float32(num_clips - 1)
        offsets = [int(np.float32(delta * np.float32(i))) for i in range(num_clips - 1)]
        offsets.append(int(room))
    return np.array([[(o + k * stride) % length for k in range(num_frames)] for o in offsets])


def _resize_tf_bilinear(frames: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """``tf.image.resize(..., 'bilinear')`` (half-pixel centres, no antialias), float32."""
    _, h, w, _ = frames.shape
    x = frames.astype(np.float32)

    def axis(n_in, n_out):
        scale = np.float32(n_in) / np.float32(n_out)
        pos = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
        lo = np.maximum(np.floor(pos), 0).astype(int)
        hi = np.minimum(np.ceil(pos), n_in - 1).astype(int)
        return lo, hi, (pos - np.floor(pos)).astype(np.float32)

    ylo, yhi, yl = axis(h, out_h)
    xlo, xhi, xl = axis(w, out_w)
    tl, tr = x[:, ylo][:, :, xlo], x[:, ylo][:, :, xhi]
    bl, br = x[:, yhi][:, :, xlo], x[:, yhi][:, :, xhi]
    xl = xl[None, None, :, None]
    top = tl + (tr - tl) * xl
    bottom = bl + (br - bl) * xl
    return top + (bottom - top) * yl[None, :, None, None]


def resize_smallest(frames: np.ndarray, size: int) -> np.ndarray:
    _, h, w, _ = frames.shape
    out_h, out_w = max(size, (h * size) // w), max(size, (w * size) // h)
    if (out_h, out_w) == (h, w):
        return frames
    return _resize_tf_bilinear(frames, out_h, out_w).astype(np.uint8)  # truncates


def views(frames: np.ndarray, *, num_frames, stride, num_clips, three_crops, min_resize, crop):
    """``(indices per view, views [V, T, crop, crop, 3])`` of decoded frames ``[L, H, W, 3]``."""
    clips = frame_indices(frames.shape[0], num_frames, stride, num_clips)
    out, order = [], []
    resized = [resize_smallest(frames[c], min_resize) for c in clips]
    if three_crops:
        for k in range(3):
            for c, clip in enumerate(resized):
                h, w = clip.shape[1:3]
                yc, xc = math.ceil((h - crop) / 2), math.ceil((w - crop) / 2)
                if h > w:
                    y, x = (0, yc, h - crop)[k], xc
                else:
                    y, x = yc, (0, xc, w - crop)[k]
                out.append(clip[:, y : y + crop, x : x + crop])
                order.append(clips[c])
    else:
        for c, clip in enumerate(resized):
            h, w = clip.shape[1:3]
            y, x = (h - crop) // 2, (w - crop) // 2
            out.append(clip[:, y : y + crop, x : x + crop])
            order.append(clips[c])
    pixels = np.stack(out).astype(np.float32)
    return np.stack(order), pixels * np.float32(2 / 255) - np.float32(1.0)
