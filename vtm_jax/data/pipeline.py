"""The views of each example, and each process's share of the examples.

Which frames and crops make the views is the protocol's business (``vtm_jax.data.protocols``:
the paper's SlowFast loaders, Scenic's DMVR pipeline, or vtm-jax 0.1's centred clips). Views
are ordered clip-major: ``[clip0-crop0, clip0-crop1, ..., clip1-crop0, ...]``. Batching, prefetching
and padding are ``vtm_jax.jobs.evaluation.input``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from vtm_jax.data.preprocessing import Preprocessing
from vtm_jax.data.protocols import ViewSpec, clip_indices, make_views, segment_indices
from vtm_jax.data.readers import CorruptVideo, VideoBytes, as_text, reader_for
from vtm_jax.errors import UserError

__all__ = [
    "CorruptVideo",
    "as_text",
    "clip_indices",
    "decode_bytes",
    "eval_views",
    "segment_indices",
    "shard_indices",
]


def decode_bytes(data: np.ndarray | bytes, video_id: str = "?") -> np.ndarray:
    """All frames of an encoded video (file bytes) as uint8 ``[T, H, W, 3]``.

    Raises :class:`CorruptVideo` when the bytes cannot be decoded.
    """
    reader = VideoBytes(data, video_id)
    return reader.frames(range(reader.count))


def eval_views(
    example: Mapping[str, Any],
    preprocessing: Preprocessing,
    *,
    num_clips: int = 1,
    three_crops: bool = False,
) -> np.ndarray:
    """Normalised float32 views ``[num_clips * crops, T, S, S, 3]`` of one example.

    ``example`` holds ``video`` (uint8 frames ``[T, H, W, 3]`` or encoded file bytes as a
    uint8 1-D array) or ``frame_paths`` (a frame folder); ``preprocessing`` is a checkpoint
    record's (``ModelRecord.resolve_preprocessing``, or ``Preprocessing.from_dict``: frames,
    stride, resize, crop, per-channel ``mean`` and ``std`` on pixels scaled to [0, 1], and the
    ``protocol`` that picks the frames and crops: ``vtm_jax.data.protocols``). Raises
    :class:`CorruptVideo` when the video cannot be decoded.
    """
    spec = ViewSpec.from_preprocessing(preprocessing, num_clips=num_clips, three_crops=three_crops)
    return make_views(reader_for(example), example, spec)


def shard_indices(num_examples: int, process_index: int, process_count: int) -> range:
    """The contiguous block of example indices that process ``process_index`` evaluates.

    Blocks are disjoint, cover ``range(num_examples)`` and differ in length by at most one.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise UserError(f"process index {process_index} is not in [0, {process_count})")
    if num_examples < 0:
        raise UserError(f"num_examples must be >= 0, got {num_examples}")
    start = num_examples * process_index // process_count
    stop = num_examples * (process_index + 1) // process_count
    return range(start, stop)
