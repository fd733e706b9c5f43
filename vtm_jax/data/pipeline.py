"""Evaluation input: the views of each example, sharded over processes and batched.

Which frames and crops make the views is the protocol's business (``vtm_jax.data.protocols``:
the paper's SlowFast loaders, Scenic's DMVR pipeline, or vtm-jax 0.1's centred clips). Views
are ordered clip-major: ``[clip0-crop0, clip0-crop1, ..., clip1-crop0, ...]``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from vtm_jax.data.protocols import (
    PREPROCESSING_KEYS,
    ViewSpec,
    clip_indices,
    make_views,
    segment_indices,
)
from vtm_jax.data.readers import CorruptVideo, VideoBytes, as_text, reader_for
from vtm_jax.errors import UserError

__all__ = [
    "CorruptVideo",
    "as_text",
    "clip_indices",
    "decode_bytes",
    "eval_loader",
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


def check_preprocessing(preprocessing: Mapping[str, Any]) -> None:
    missing = [k for k in PREPROCESSING_KEYS if k not in preprocessing]
    if missing:
        raise UserError(f"preprocessing lacks {', '.join(missing)}")


def eval_views(
    example: Mapping[str, Any],
    preprocessing: Mapping[str, Any],
    *,
    num_clips: int = 1,
    three_crops: bool = False,
) -> np.ndarray:
    """Normalised float32 views ``[num_clips * crops, T, S, S, 3]`` of one example.

    ``example`` holds ``video`` (uint8 frames ``[T, H, W, 3]`` or encoded file bytes as a
    uint8 1-D array) or ``frame_paths`` (a frame folder); ``preprocessing`` is a checkpoint
    record's (``num_frames``, ``stride``, ``min_resize``, ``crop_size``, per-channel ``mean``
    and ``std`` on pixels scaled to [0, 1], and the ``protocol`` that picks the frames and
    crops: ``vtm_jax.data.protocols``). Raises :class:`CorruptVideo` when the video cannot be
    decoded.
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


class _Subset:
    """Random access to ``source`` restricted to ``indices``, for grain."""

    def __init__(self, source: Any, indices: Sequence[int]):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.source[self.indices[i]]


def eval_loader(
    source: Any,
    indices: Sequence[int],
    preprocessing: Mapping[str, Any],
    *,
    batch_size: int,
    num_clips: int = 1,
    three_crops: bool = False,
    num_threads: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of views of ``source[indices]``, in order, decoded in ``num_threads`` threads.

    Each batch is a dict with ``inputs`` ``[batch_size, views, T, S, S, 3]``, ``label`` (and
    ``verb`` / ``noun`` where the examples have them) int64 ``[batch_size]``, ``video_id`` str
    ``[batch_size]``, ``mask`` bool ``[batch_size]`` (False for padding and corrupt videos) and
    ``error`` str ``[batch_size]`` (why a video was skipped; empty otherwise). The last batch is
    padded to ``batch_size`` with masked zeros, as Scenic's ``maybe_pad_batch`` does.
    """
    import grain

    if batch_size < 1:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    check_preprocessing(preprocessing)
    crops = 3 if three_crops else 1
    size = int(preprocessing["crop_size"])
    shape = (num_clips * crops, int(preprocessing["num_frames"]), size, size, 3)

    def prepare(example: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "video_id": as_text(example.get("video_id", "?")),
            "mask": True,
            "error": "",
        }
        for key in ("label", "verb", "noun"):
            if key in example:
                out[key] = np.int64(example[key])
        try:
            out["inputs"] = eval_views(
                example, preprocessing, num_clips=num_clips, three_crops=three_crops
            )
        except CorruptVideo as e:
            out["inputs"] = np.zeros(shape, np.float32)
            out["mask"], out["error"] = False, e.reason
        return out

    def stack(items: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        return {key: np.stack([item[key] for item in items]) for key in items[0]}

    options = grain.ReadOptions(
        num_threads=max(1, num_threads), prefetch_buffer_size=max(2 * batch_size, num_threads)
    )
    dataset = (
        grain.MapDataset.source(_Subset(source, indices))
        .map(prepare)
        .to_iter_dataset(options)
        .batch(batch_size, batch_fn=stack)
    )
    for batch in dataset:
        missing = batch_size - len(batch["mask"])
        if missing:
            batch = {key: _pad(value, missing) for key, value in batch.items()}
        yield batch


def _pad(value: np.ndarray, count: int) -> np.ndarray:
    filler = np.zeros((count, *value.shape[1:]), value.dtype)
    if value.dtype.kind == "i" and value.ndim == 1:
        filler[:] = -1
    return np.concatenate([value, filler])
