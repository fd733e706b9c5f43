"""Test-time input protocols: which frames and pixels of a video make each model input.

A protocol turns one video (a frame reader) into views: ``num_clips`` temporal clips of
``num_frames`` frames, each resized on its short side and cut into 1 or 3 square crops,
normalised. Views come in the order the protocol's own pipeline makes them: clip-major
(clip 0 crop 0, clip 0 crop 1, ..., clip 1 crop 0) for ``paper`` and ``centred``, crop-major
for ``scenic``; evaluation averages them, so the order only matters for comparisons.

* ``paper``: the paper's SlowFast test loaders, exactly (docs/protocols.md). Which loader
  depends on the dataset (``paper_loader``): ``kinetics`` (video files: clip windows from the
  container's timestamps, spans normalised to 30 fps, the first clip starting at frame 0),
  ``ssv2`` (frames at 30 fps, the middle frame of equal segments, the left/top crop for one
  view) or ``epic_kitchens`` (the recordings' frame folders at 50 or 60 fps, sampled from the
  segment's start). Long sides are floored, crop offsets ceiled.
* ``scenic``: Scenic's DMVR test pipeline: clips ``stride`` frames apart from a centred (or
  ``linspace``d) offset, wrapping round in short videos; a floored resize of the short side
  whose pixels are truncated back to integers; a floored central crop, or three crops with
  ceiled centres; ``x * 2 / 255 - 1``. Several views only on a split named ``test``.
* ``centred``: vtm-jax 0.1's own: one centred clip with whole-frame strides (shrunk for short
  videos), rounded long side, floored crop offsets. The shipped demo checkpoint was trained and
  measured with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from vtm_jax.data import spatial
from vtm_jax.data.preprocessing import PREPROCESSING_FIELDS, Preprocessing
from vtm_jax.data.readers import ArrayFrames, CorruptVideo, FrameFolder, VideoBytes
from vtm_jax.errors import UserError

TARGET_FPS = 30  # SlowFast's DATA.TARGET_FPS: clip spans are measured at this rate

Reader = ArrayFrames | FrameFolder | VideoBytes

# docs/method.md §3.8: frames per clip, sampling stride per dataset, mean / std on [0, 1] pixels.
# TimeSformer's EPIC-KITCHENS stride is not recorded in the paper's configs; 8 as for SSv2.
PAPER_MODEL_INPUTS = {
    "vivit": (32, {"k400": 2, "ssv2": 1, "ek100": 2}, (0.45,) * 3, (0.225,) * 3),
    "videomae": (
        16,
        {"k400": 1, "ssv2": 1, "ek100": 2},
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
    ),
    "timesformer": (8, {"k400": 32, "ssv2": 8, "ek100": 8}, (0.45,) * 3, (0.225,) * 3),
    "motionformer": (16, {"k400": 4, "ssv2": 4, "ek100": 4}, (0.5,) * 3, (0.5,) * 3),
}


def paper_loader_for(dataset: str) -> str:
    """Which of the paper's loaders reads ``dataset`` (Kinetics' for any other video files)."""
    if dataset.startswith("ssv2"):
        return "ssv2"
    if dataset.startswith("epic_kitchens"):
        return "epic_kitchens"
    return "kinetics"


@dataclasses.dataclass(frozen=True)
class ViewSpec(Preprocessing):
    """What a protocol needs to know besides the video: the preprocessing (its ``paper_loader``
    and ``is_test_split`` defaults filled in: ``kinetics``, and true, since Scenic's DMVR
    multi-view pipeline runs on the test split only) and the views."""

    num_clips: int = 1
    three_crops: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "paper_loader", self.paper_loader or "kinetics")
        if self.is_test_split is None:
            object.__setattr__(self, "is_test_split", True)
        if self.num_clips < 1:
            raise UserError(f"num_clips must be positive, got {self.num_clips}")

    @classmethod
    def from_preprocessing(
        cls, prep: Preprocessing, *, num_clips: int = 1, three_crops: bool = False
    ) -> ViewSpec:
        entries = {name: getattr(prep, name) for name in PREPROCESSING_FIELDS}
        return cls(**entries, num_clips=int(num_clips), three_crops=bool(three_crops))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where each view comes from: frame positions per clip, then per view a clip and a crop.

    ``crops`` are 0, 1, 2 = start, centre, end of the long side. ``centre`` rounds the centre
    offsets (``ceil`` or ``floor``), ``long_side`` rounds the resized long side
    (``spatial.short_side_size``), and ``uint8_resize`` truncates the resized pixels back to
    integers with TensorFlow's interpolation (DMVR).
    """

    clips: np.ndarray  # [num_clips, num_frames] positions in the reader
    short_side: int
    views: tuple[tuple[int, int], ...]  # (clip, crop)
    centre: str = "ceil"
    long_side: str = "slowfast"
    uint8_resize: bool = False


def make_views(reader: Reader, example: Mapping[str, Any], spec: ViewSpec) -> np.ndarray:
    """Normalised float32 views ``[views, T, S, S, 3]`` of one video under ``spec``."""
    try:
        plan = plan_views(reader, example, spec)
        return render(reader, plan, spec)
    finally:
        if isinstance(reader, VideoBytes):
            reader.close()


def plan_views(reader: Reader, example: Mapping[str, Any], spec: ViewSpec) -> Plan:
    if spec.protocol == "paper":
        return paper_plan(reader, example, spec)
    if spec.protocol == "scenic":
        return scenic_plan(reader, spec)
    return centred_plan(reader, spec)


def render(reader: Reader, plan: Plan, spec: ViewSpec) -> np.ndarray:
    """Decode the planned frames once, then resize, crop and normalise every view.

    A clip with one crop resizes only the pixels of that crop; a clip with three resizes the
    window they span once and slices it.
    """
    positions = np.unique(plan.clips)
    frames = reader.frames(positions)
    h, w = frames.shape[1:3]
    resized = spatial.short_side_size(h, w, plan.short_side, plan.long_side)
    size = spec.crop_size
    views = np.empty((len(plan.views), spec.num_frames, size, size, 3), np.float32)
    pixels = functools.partial(
        spatial.crop_pixels,
        mean=spec.mean,
        std=spec.std,
        truncate=plan.uint8_resize,
        style="tf" if plan.uint8_resize else "torch",
    )
    with _on_host():
        for clip in range(len(plan.clips)):
            where = [v for v, (c, _) in enumerate(plan.views) if c == clip]
            if not where:
                continue
            rows = np.searchsorted(positions, plan.clips[clip])
            # One clip of distinct frames (the usual single view) needs no gathered copy.
            same = rows.size == len(frames) and np.array_equal(rows, np.arange(rows.size))
            clip_frames = frames if same else frames[rows]
            corners = [
                spatial.crop_offsets(*resized, size, plan.views[v][1], plan.centre) for v in where
            ]
            if len(where) == 1:
                views[where[0]] = pixels(clip_frames, resized, *corners[0], size)
                continue
            top, left = (min(c[i] for c in corners) for i in (0, 1))
            bottom, right = (max(c[i] for c in corners) + size for i in (0, 1))
            window = pixels(clip_frames, resized, top, left, (bottom - top, right - left))
            for v, (y, x) in zip(where, corners, strict=True):
                views[v] = window[:, y - top : y - top + size, x - left : x - left + size]
    return views


def _on_host():
    """Input work stays on the host CPU, even when the default JAX device is an accelerator."""
    import jax

    try:
        return jax.default_device(jax.local_devices(backend="cpu")[0])
    except RuntimeError:
        return contextlib.nullcontext()


# --- paper: the SlowFast test loaders -------------------------------------------------------


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` in float32, bit for bit as torch's CPU kernel.

    The first half counts up from ``start``, the second down from ``end``, each element
    rounded once (torch's kernel compiles to fused multiply-adds): the truncated frame
    indices the paper's loaders take depend on the last bit.
    """
    lo, hi = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([lo], np.float32)
    step = np.float64(np.float32((hi - lo) / np.float32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    up = (np.float64(lo) + step * i).astype(np.float32)
    down = (np.float64(hi) - step * (steps - 1 - i)).astype(np.float32)
    return np.where(np.arange(steps) < steps // 2, up, down)


def sample_span(start: float, end: float, num_frames: int, available: int) -> np.ndarray:
    """SlowFast's ``temporal_sampling``: an evenly spaced float32 ramp, clamped, truncated."""
    ramp = torch_linspace(start, end, num_frames)
    return np.clip(ramp, np.float32(0), np.float32(available - 1)).astype(np.int64)


def clip_window(total: float, clip_size: float, clip: int, num_clips: int) -> tuple[float, float]:
    """SlowFast's ``get_start_end_idx`` without offset sampling: clip ``clip`` of ``num_clips``
    starts at ``max(total - clip_size, 0) * clip / num_clips`` (the first at frame 0)."""
    delta = max(total - clip_size, 0)
    start = delta * clip / num_clips
    return start, start + clip_size - 1


def kinetics_clip(
    reader: Reader, num_frames: int, stride: int, clip: int, clips: int
) -> np.ndarray:
    """Positions of one clip as SlowFast's Kinetics loader (PyAV backend) takes them."""
    fps = float(reader.fps) if reader.fps else float(TARGET_FPS)
    duration = getattr(reader, "duration", None)
    declared = getattr(reader, "declared_frames", 0)
    sample_size = max(1.0, stride * num_frames / TARGET_FPS * fps)
    if duration is None or not declared:
        # No duration in the container: the whole video is decoded, then one window of it.
        # (SlowFast would divide by a zero frame count; vtm-jax takes the whole-video path.)
        start, end = clip_window(reader.count, sample_size, clip, clips)
        return sample_span(start, end, num_frames, reader.count)
    # Selective decoding: a window of ceil(span) frames (measured at 30 fps) read by
    # timestamp, plus the first frame past it, then sampled from its first frame.
    decode_size = max(1.0, math.ceil(stride * (num_frames - 1) / TARGET_FPS * fps))
    start, end = clip_window(declared, decode_size, clip, clips)
    per_frame = duration / declared
    start_pts, end_pts = int(start * per_frame), int(end * per_frame)
    first = int(np.searchsorted(reader.pts, start_pts, side="left"))
    stop = min(int(np.searchsorted(reader.pts, end_pts, side="right")) + 1, reader.count)
    if stop <= first:
        raise CorruptVideo(reader.video_id, f"no frames in the window of clip {clip}")
    _, span_end = clip_window(stop - first, sample_size, 0, 1)
    return first + sample_span(0.0, span_end, num_frames, stop - first)


def segment_middles(total: int, num_frames: int) -> np.ndarray:
    """SlowFast's SSv2 test sampling: the middle frame of each of ``num_frames`` segments."""
    if total < 1:
        raise UserError("the video has no frames")
    size = float(total - 1) / num_frames
    bounds = [int(np.round(size * i)) for i in range(num_frames + 1)]
    return np.array([(a + b) // 2 for a, b in zip(bounds[:-1], bounds[1:], strict=True)])


def resampled_positions(reader: VideoBytes, fps: int = TARGET_FPS) -> np.ndarray:
    """The source frame of each frame a constant-rate re-timing to ``fps`` writes.

    What ``ffmpeg -i video -r 30 frame_%05d.jpg`` (SSv2's frame extraction) does: each source
    frame is repeated to fill its packet's duration on the new clock, the count rounded so
    that the output keeps up with the source's timestamps. Checked against ffmpeg 5.1 on WebM
    at 12, 15 and 24 fps and H.264 at 25 fps (docs/protocols.md); the paper's own frames came
    from ffmpeg 4.1.3, so frame folders are the exact route.
    """
    tick = float(reader.time_base) * fps
    start = int(reader.pts[0])
    positions: list[int] = []
    for i, (pts, duration) in enumerate(zip(reader.pts, reader.packet_durations, strict=True)):
        length = float(np.rint(duration * tick)) if duration else 0.0
        length = length if length > 0 else 1.0
        behind = (int(pts) - start) * tick - len(positions)
        total = behind + length
        if behind < 0 < total:
            behind, length = 0.0, length + behind
        repeats = 1 if -1.1 <= total <= 1.1 else (0 if total < -1.1 else math.floor(total + 0.5))
        positions.extend([i] * repeats)
    return np.asarray(positions or [0], np.int64)


def epic_clip(example: Mapping[str, Any], num_frames: int, stride: int, clip: int, clips: int):
    """Frame numbers of one clip as SlowFast's EPIC-KITCHENS loader takes them (1-based)."""
    fps, start_frame = float(example["fps"]), int(example["segment_start"])
    length = int(example["segment_frames"])
    size = num_frames * stride * fps / TARGET_FPS
    start, end = clip_window(length, size, clip, clips)
    # The window is shifted to 1-based frame numbers, but clamped as if 0-based.
    ramp = torch_linspace(start + 1, end + 1, num_frames)
    high = np.float32(length - 1)
    if high < 0:  # torch.clamp with min > max gives max
        ramp = np.full_like(ramp, high)
    return start_frame + np.clip(ramp, np.float32(0), high).astype(np.int64)


def paper_plan(reader: Reader, example: Mapping[str, Any], spec: ViewSpec) -> Plan:
    crops = 3 if spec.three_crops else 1
    T, stride, V = spec.num_frames, spec.stride, spec.num_clips
    if spec.paper_loader == "ssv2":
        if isinstance(reader, VideoBytes):
            at_30 = resampled_positions(reader)
            clip = at_30[segment_middles(len(at_30), T)]
        else:
            clip = segment_middles(reader.count, T)
        # Every view has the same frames; the crop is the view index modulo the crops, so a
        # single view takes the left (or top) crop.
        views = tuple((v // crops, v % crops) for v in range(V * crops))
        return Plan(np.tile(clip, (V, 1)), spec.crop_size, views)
    if spec.paper_loader == "epic_kitchens" and "segment_start" in example:
        clips = np.stack([epic_clip(example, T, stride, k, V) for k in range(V)])
        short = spec.crop_size
    else:
        clips = np.stack([kinetics_clip(reader, T, stride, k, V) for k in range(V)])
        # Kinetics: one view at the short side of training's smallest scale; three crops at
        # the crop size. EPIC-KITCHENS segment files: the crop size.
        short = (
            spec.min_resize if crops == 1 and spec.paper_loader == "kinetics" else spec.crop_size
        )
    positions = (1,) if crops == 1 else (0, 1, 2)
    return Plan(clips, short, tuple((k, p) for k in range(V) for p in positions))


# --- centred: vtm-jax 0.1 -------------------------------------------------------------------


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


def segment_indices(total: int, num_frames: int, num_clips: int = 1) -> np.ndarray:
    """The middle frame of each of ``num_frames`` equal segments of the video, per clip."""
    return np.tile(segment_middles(total, num_frames), (num_clips, 1))


def centred_plan(reader: Reader, spec: ViewSpec) -> Plan:
    if spec.sampling == "segments":
        clips = segment_indices(reader.count, spec.num_frames, spec.num_clips)
    else:
        clips = clip_indices(reader.count, spec.num_frames, spec.stride, spec.num_clips)
    positions = (0, 1, 2) if spec.three_crops else (1,)
    views = tuple((k, p) for k in range(spec.num_clips) for p in positions)
    return Plan(clips, spec.min_resize, views, centre="floor", long_side="round")


# --- scenic: DMVR's test pipeline -----------------------------------------------------------


def scenic_clips(total: int, num_frames: int, stride: int, num_clips: int) -> np.ndarray:
    """DMVR's test sampling: frames ``stride`` apart from offset ``o``, wrapping round.

    One clip: ``o = (total - num_frames * stride) // 2`` (not less than 0). Several: offsets
    ``int(linspace(0, max(total - num_frames * stride, 0), num_clips))`` in float32. A video
    shorter than the span keeps the stride and wraps to its first frame (indices mod total).
    """
    room = total - num_frames * stride
    if num_clips == 1:
        offsets = np.array([max(0, room // 2)])
    else:
        room = np.float32(max(room, 0))
        step = room / np.float32(num_clips - 1)
        offsets = (step * np.arange(num_clips, dtype=np.float32)).astype(np.int64)
        offsets[-1] = int(room)  # tf.linspace puts the last point exactly on the end
    return (offsets[:, None] + stride * np.arange(num_frames)[None, :]) % total


def scenic_plan(reader: Reader, spec: ViewSpec) -> Plan:
    if not spec.is_test_split and (spec.num_clips > 1 or spec.three_crops):
        raise UserError(
            "Scenic makes several views per video only on a split named 'test'; on other "
            "splits it takes one central clip and crop (set num_test_clips=1 and "
            "do_three_spatial_crops=False, or evaluate the 'test' split)"
        )
    if reader.count is None:
        raise UserError(f"video {reader.video_id}: the scenic protocol needs its frame count")
    clips = scenic_clips(reader.count, spec.num_frames, spec.stride, spec.num_clips)
    if spec.three_crops:  # crop-major, as Scenic's three_spatial_crops stacks them
        views = tuple((k, p) for p in (0, 1, 2) for k in range(spec.num_clips))
        centre = "ceil"
    else:
        views = tuple((k, 1) for k in range(spec.num_clips))
        centre = "floor"  # tf.image.resize_with_crop_or_pad
    return Plan(clips, spec.min_resize, views, centre=centre, long_side="dmvr", uint8_resize=True)
