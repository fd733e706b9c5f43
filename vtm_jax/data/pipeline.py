"""Evaluation input: decode, sample multi-view clips, crop, normalise, shard and batch.

The views follow the multi-view test protocol of Scenic and SlowFast: ``num_clips`` temporal
clips spread uniformly over the video and, with ``three_crops``, three spatial crops along the
long side (left/top, centre, right/bottom) of each clip, after a short-side resize. Views are
ordered clip-major: ``[clip0-crop0, clip0-crop1, ..., clip1-crop0, ...]``.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from vtm_jax.data.video import center_crop, resize_short_side
from vtm_jax.errors import UserError

PREPROCESSING_KEYS = ("num_frames", "stride", "min_resize", "crop_size", "mean", "std")


class CorruptVideo(UserError):
    """A stored video that cannot be decoded (the evaluator skips, counts and lists these)."""

    def __init__(self, video_id: str, reason: str):
        self.video_id = video_id
        self.reason = reason
        super().__init__(f"cannot decode video {video_id}: {reason}")


def as_text(value: Any) -> str:
    """A string from a str, bytes or 0-d array field (TFDS gives text back as bytes)."""
    if isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


SAMPLINGS = ("stride", "segments")


def segment_indices(total: int, num_frames: int, num_clips: int = 1) -> np.ndarray:
    """The middle frame of each of ``num_frames`` equal segments of the video, per clip.

    Something-Something's test sampling in the paper's code (SlowFast's SSv2 loader): the whole
    video is covered whatever its length, and the stride plays no part.
    """
    if total < 1:
        raise UserError("the video has no frames")
    bounds = np.round(np.arange(num_frames + 1) * ((total - 1) / num_frames)).astype(np.int64)
    clip = (bounds[:-1] + bounds[1:]) // 2
    return np.tile(clip, (num_clips, 1))


def clip_indices(total: int, num_frames: int, stride: int, num_clips: int = 1) -> np.ndarray:
    """Frame indices ``[num_clips, num_frames]`` of clips spread uniformly over a video.

    Each clip has ``num_frames`` frames ``stride`` apart; a video shorter than that span gets the
    largest stride that fits. One clip is centred; several start at evenly spaced points from
    the first frame to the last possible start. A video with fewer than ``num_frames`` frames is
    stretched over its whole length, repeating frames, so that it is still evaluated.
    """
    if total < 1:
        raise UserError("the video has no frames")
    if num_frames < 1 or stride < 1 or num_clips < 1:
        raise UserError(
            f"num_frames, stride and num_clips must be positive, got "
            f"{num_frames}, {stride}, {num_clips}"
        )
    if total < num_frames:
        clip = np.round(np.linspace(0, total - 1, num_frames)).astype(np.int64)
        return np.tile(clip, (num_clips, 1))
    if num_frames > 1:
        stride = min(stride, (total - 1) // (num_frames - 1))
    span = (num_frames - 1) * stride + 1
    room = total - span
    if num_clips == 1:
        starts = np.array([room // 2])
    else:
        starts = np.round(np.linspace(0, room, num_clips)).astype(np.int64)
    return starts[:, None] + stride * np.arange(num_frames)[None, :]


def spatial_crops(frames: np.ndarray, size: int, three_crops: bool) -> list[np.ndarray]:
    """The centre crop, or three crops along the long side, of frames ``[T, H, W, C]``."""
    h, w = frames.shape[1:3]
    if size > min(h, w):
        raise UserError(f"crop size {size} is larger than the resized frames {h}x{w}")
    if not three_crops:
        return [center_crop(frames, size)]
    crops = []
    if h > w:
        top = (w - size) // 2
        for y in (0, (h - size) // 2, h - size):
            crops.append(frames[:, y : y + size, top : top + size])
    else:
        left = (h - size) // 2
        for x in (0, (w - size) // 2, w - size):
            crops.append(frames[:, left : left + size, x : x + size])
    return crops


def _frames_at(
    data: np.ndarray | bytes, video_id: str, choose: Callable[[int], np.ndarray]
) -> tuple[dict[int, np.ndarray], int]:
    """Decode encoded ``data``; ``choose(total)`` names the frames wanted as RGB arrays."""
    try:
        import av
    except ImportError:
        raise UserError("decoding videos needs PyAV: pip install 'vtm-jax[video]'") from None
    raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    if not raw:
        raise CorruptVideo(video_id, "the stored file is empty")

    def decode(known_total: int | None) -> tuple[dict[int, np.ndarray], int]:
        wanted = set(choose(known_total).tolist()) if known_total else None
        kept: dict[int, Any] = {}
        count = 0
        with av.open(io.BytesIO(raw)) as container:
            if not container.streams.video:
                raise CorruptVideo(video_id, "no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for count, frame in enumerate(container.decode(stream), start=1):
                if wanted is None:
                    kept[count - 1] = frame  # total unknown: keep the compact decoded frames
                elif count - 1 in wanted:
                    kept[count - 1] = frame.to_ndarray(format="rgb24")
        if wanted is None:
            if count == 0:
                return {}, 0
            wanted = set(choose(count).tolist())
            kept = {i: kept[i].to_ndarray(format="rgb24") for i in wanted}
        return kept, count

    try:
        with av.open(io.BytesIO(raw)) as container:
            if not container.streams.video:
                raise CorruptVideo(video_id, "no video stream")
            declared = container.streams.video[0].frames
        frames, total = decode(declared if declared > 0 else None)
        if total and declared > 0 and total != declared:
            # The header's frame count was wrong: sample again on the frames really there.
            frames, total = decode(total)
    except CorruptVideo:
        raise
    except Exception as e:  # PyAV raises many exception types for damaged data
        raise CorruptVideo(video_id, f"{type(e).__name__}: {e}".splitlines()[0]) from None
    if total == 0:
        raise CorruptVideo(video_id, "no decodable frames")
    return frames, total


def decode_bytes(data: np.ndarray | bytes, video_id: str = "?") -> np.ndarray:
    """All frames of an encoded video (file bytes) as uint8 ``[T, H, W, 3]``.

    Raises :class:`CorruptVideo` when the bytes cannot be decoded.
    """
    frames, total = _frames_at(data, video_id, lambda n: np.arange(n))
    return np.stack([frames[i] for i in range(total)])


def check_preprocessing(preprocessing: Mapping[str, Any]) -> None:
    missing = [k for k in PREPROCESSING_KEYS if k not in preprocessing]
    if missing:
        raise UserError(f"preprocessing lacks {', '.join(missing)}")


def _resize_on_host(frames: np.ndarray, size: int) -> np.ndarray:
    """Short-side resize on the host CPU, even when the default JAX device is an accelerator."""
    import jax

    try:
        cpu = jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return resize_short_side(frames, size)
    with jax.default_device(cpu):
        return resize_short_side(frames, size)


def eval_views(
    example: Mapping[str, Any],
    preprocessing: Mapping[str, Any],
    *,
    num_clips: int = 1,
    three_crops: bool = False,
) -> np.ndarray:
    """Normalised float32 views ``[num_clips * crops, T, S, S, 3]`` of one example.

    ``example['video']`` is uint8 frames ``[T, H, W, 3]`` or encoded file bytes (a uint8 1-D
    array); ``preprocessing`` is a checkpoint record's (``num_frames``, ``stride``,
    ``min_resize``, ``crop_size``, per-channel ``mean`` and ``std`` on pixels scaled to [0, 1]).
    Raises :class:`CorruptVideo` when the bytes cannot be decoded.
    """
    check_preprocessing(preprocessing)
    video_id = as_text(example.get("video_id", "?"))
    video = np.asarray(example["video"])
    num_frames, stride = int(preprocessing["num_frames"]), int(preprocessing["stride"])
    sampling = preprocessing.get("sampling", "stride")
    if sampling not in SAMPLINGS:
        raise UserError(f"unknown sampling {sampling!r}; valid: {', '.join(SAMPLINGS)}")

    def sample(total: int) -> np.ndarray:
        if sampling == "segments":
            return segment_indices(total, num_frames, num_clips)
        return clip_indices(total, num_frames, stride, num_clips)

    def choose(total: int) -> np.ndarray:
        return np.unique(sample(total))

    if video.ndim == 4 and video.shape[-1] == 3:
        total = video.shape[0]
        if total == 0:
            raise CorruptVideo(video_id, "no frames")
        frames = {int(i): video[i] for i in choose(total)}
    elif video.ndim == 1 and video.dtype == np.uint8:
        frames, total = _frames_at(video, video_id, choose)
    else:
        raise UserError(
            f"video {video_id}: expected frames [T, H, W, 3] or encoded bytes, "
            f"got {video.dtype} {video.shape}"
        )
    indices = sample(total)
    unique = np.unique(indices)
    stacked = np.stack([frames[int(i)] for i in unique]).astype(np.float32) / 255.0
    resized = _resize_on_host(stacked, int(preprocessing["min_resize"]))
    position = np.searchsorted(unique, indices)
    mean = np.asarray(preprocessing["mean"], np.float32)
    std = np.asarray(preprocessing["std"], np.float32)
    views = []
    for clip in position:
        views.extend(spatial_crops(resized[clip], int(preprocessing["crop_size"]), three_crops))
    return (np.stack(views) - mean) / std


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
