"""Short-side resize, crops and normalisation of frames, on the host with numpy.

The resize is plain bilinear with half-pixel centres and no antialiasing: what torch's
``interpolate(mode="bilinear", align_corners=False)`` (the paper's SlowFast loaders) and
``tf.image.resize(method="bilinear")`` (Scenic's DMVR pipeline) compute. It is separable and
touches only the two source pixels each output pixel reads, so resizing only the rows and
columns a crop keeps costs about as much as copying the crop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vtm_jax.errors import UserError


def short_side_size(
    height: int, width: int, size: int, rounding: str = "slowfast"
) -> tuple[int, int]:
    """The frame size after resizing the short side to ``size``, the long side rounded so.

    ``rounding``: ``slowfast`` floors ``long / short * size`` in floating point (the paper's
    loaders), ``dmvr`` floors ``long * size // short`` in integers (Scenic's), ``round``
    rounds (vtm-jax 0.1). They differ only where the exact value is a whole number.
    """
    short, long = min(height, width), max(height, width)
    if rounding == "slowfast":
        new_long = int(math.floor(long / short * size))
    elif rounding == "dmvr":
        new_long = max(size, long * size // short)
    elif rounding == "round":
        new_long = max(size, round(long * (size / short)))
    else:
        raise UserError(f"unknown rounding {rounding!r}; valid: slowfast, dmvr, round")
    return (size, new_long) if height <= width else (new_long, size)


def bilinear_taps(
    in_size: int, out_size: int, style: str = "torch"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output pixel: the two source pixels it reads and the weight of the second.

    Half-pixel centres, in float32 as the libraries compute them: source coordinate
    ``(i + 0.5) * (in_size / out_size) - 0.5``. ``torch`` clamps it at 0 before splitting it
    (``interpolate``, align_corners=False); ``tf`` splits it at its floor and clamps the two
    neighbours (``tf.image.resize``). They read the same pixels with the same weights; the
    float32 rounding of the weights is each library's own.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    source = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    if style == "torch":
        source = np.maximum(source, np.float32(0))
        low = np.minimum(np.floor(source), in_size - 1).astype(np.int64)
        high = np.minimum(low + 1, in_size - 1)
        return low, high, (source - low.astype(np.float32)).astype(np.float32)
    if style == "tf":
        floor = np.floor(source)
        low = np.maximum(floor, 0).astype(np.int64)
        high = np.minimum(np.ceil(source), in_size - 1).astype(np.int64)
        return low, high, (source - floor).astype(np.float32)
    raise UserError(f"unknown resize style {style!r}; valid: torch, tf")


def crop_pixels(
    frames: np.ndarray,
    resized: tuple[int, int],
    top: int,
    left: int,
    size: int | tuple[int, int],
    *,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1 / 255, 1 / 255, 1 / 255),
    truncate: bool = False,
    style: str = "torch",
) -> np.ndarray:
    """Frames ``[T, H, W, 3]`` resized to ``resized`` (h, w), the ``size`` square (or
    ``(height, width)`` window) at (``top``, ``left``) of the result, normalised to
    ``(x / 255 - mean) / std``; float32.

    Only the pixels inside the crop are computed. ``truncate`` rounds the resized pixels down
    to integers before normalising, as DMVR's cast back to uint8 does; the interpolation then
    follows ``tf.image.resize`` to the last bit (``style="tf"``: each row is interpolated
    across, then down, as ``a + (b - a) * w``), since truncation would turn a last-bit
    difference into a whole level. The defaults of ``mean`` and ``std`` leave the pixels in
    [0, 255].
    """
    h, w = frames.shape[1:3]
    new_h, new_w = resized
    height, width = (size, size) if isinstance(size, int) else size
    if top < 0 or left < 0 or top + height > new_h or left + width > new_w:
        raise UserError(f"crop {size} at ({top}, {left}) does not fit frames {new_h}x{new_w}")
    if (new_h, new_w) == (h, w):
        frames = frames[:, top : top + height, left : left + width]
        top = left = 0
        h, w = new_h, new_w = height, width
    y0, y1, wy = (a[top : top + height] for a in bilinear_taps(h, new_h, style))
    x0, x1, wx = (a[left : left + width] for a in bilinear_taps(w, new_w, style))
    scale = np.float32(1 / 255) / np.asarray(std, np.float32)
    shift = np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    kernel = _crop_kernel_truncated if truncate else _crop_kernel
    return np.asarray(kernel(frames, y0, y1, wy, x0, x1, wx, scale, shift, np.float32(1)))


@jax.jit
def _crop_kernel(frames, y0, y1, wy, x0, x1, wx, scale, shift, one):
    # Compiled once per frame size: numpy's gathers cost ten times as much, and this runs
    # once per view in every evaluation.
    del one
    pixels = frames.astype(jnp.float32)
    left, right = pixels[:, :, x0], pixels[:, :, x1]
    across = left + (right - left) * wx[None, None, :, None]
    top, bottom = across[:, y0], across[:, y1]
    return (top + (bottom - top) * wy[:, None, None]) * scale - shift


@jax.jit
def _crop_kernel_truncated(frames, y0, y1, wy, x0, x1, wx, scale, shift, one):
    # Before the truncation every product must be rounded on its own, as in TensorFlow's
    # kernel, but XLA fuses a product and the sum after it into one multiply-add (an
    # optimization barrier does not stop it). Multiplying the rounded product by a runtime
    # 1 makes any fused multiply-add exact: fma(p, 1, a) rounds a + p once, as TensorFlow.
    pixels = frames.astype(jnp.float32)
    left, right = pixels[:, :, x0], pixels[:, :, x1]
    across = left + ((right - left) * wx[None, None, :, None]) * one
    top, bottom = across[:, y0], across[:, y1]
    return jnp.floor(top + ((bottom - top) * wy[:, None, None]) * one) * scale - shift


def crop_offsets(height: int, width: int, size: int, position: int, centre: str) -> tuple[int, int]:
    """(top, left) of crop ``position`` 0, 1 or 2 (start, centre, end of the long side).

    ``centre`` rounds the centre offsets: ``ceil`` (SlowFast's ``uniform_crop``, DMVR's three
    crops) or ``floor`` (DMVR's and Scenic's single central crop, vtm-jax 0.1). A square frame
    counts as landscape, as in SlowFast.
    """
    if size > min(height, width):
        raise UserError(f"crop size {size} is larger than the frames {height}x{width}")
    rounder = {"ceil": math.ceil, "floor": math.floor}[centre]
    top, left = int(rounder((height - size) / 2)), int(rounder((width - size) / 2))
    if position == 1:
        return top, left
    end = position == 2
    if height > width:
        return (height - size if end else 0), left
    return top, (width - size if end else 0)
