"""A test oracle of the paper's SlowFast test loaders, re-derived from their described behaviour.

Written from notes on the behaviour of the paper's ``slowfast/datasets`` (Kinetics with the
PyAV backend, SSv2 frame lists, EPIC-KITCHENS frame folders), never from vtm_jax. It does the
work the way those loaders do: a fresh PyAV container per view, a seek 1024 timestamp units
before the window and a decode that keeps the first frame past it, ``torch.linspace`` /
``clamp`` / ``long`` for the indices, normalisation before the resize, ``torch`` bilinear
``interpolate`` and crop offsets rounded up.

Every function returns ``(indices, views)``: the frame positions (display order in the whole
video, or EPIC frame numbers) per view and the float32 views ``[T, S, S, 3]``.
"""

from __future__ import annotations

import io
import math

import av
import numpy as np
import torch
from PIL import Image

TARGET_FPS = 30


def _positions_of_all_frames(data: bytes) -> list[int]:
    with av.open(io.BytesIO(data)) as container:
        return sorted(f.pts for f in container.decode(video=0))


def _spatial(frames_uint8, mean, std, short, crop, position):
    """Normalise, scale the short side (long side floored), crop (offsets ceiled)."""
    x = torch.as_tensor(np.ascontiguousarray(frames_uint8)).float() / 255.0
    x = (x - torch.tensor(mean)) / torch.tensor(std)
    x = x.permute(3, 0, 1, 2)  # C T H W, as the loaders hand it to spatial sampling
    h, w = x.shape[2], x.shape[3]
    if not ((w <= h and w == short) or (h <= w and h == short)):
        if w < h:
            size = (int(math.floor(h / w * short)), short)
        else:
            size = (short, int(math.floor(w / h * short)))
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    h, w = x.shape[2], x.shape[3]
    top, left = int(math.ceil((h - crop) / 2)), int(math.ceil((w - crop) / 2))
    if h > w:
        top = {0: 0, 1: top, 2: h - crop}[position]
    else:
        left = {0: 0, 1: left, 2: w - crop}[position]
    x = x[:, :, top : top + crop, left : left + crop]
    return x.permute(1, 2, 3, 0).numpy()


def _sample(start, end, num, available):
    index = torch.linspace(start, end, num)
    return torch.clamp(index, 0, available - 1).long().numpy()


def kinetics_view(
    data, *, num_frames, stride, clip, clips, crop_index, three, mean, std, short, crop
):
    """One view of a video file as the Kinetics loader (PyAV backend, test mode) makes it."""
    all_pts = _positions_of_all_frames(data)
    container = av.open(io.BytesIO(data))
    stream = container.streams.video[0]
    fps = float(stream.average_rate)
    length, duration = stream.frames, stream.duration
    if duration is None:
        frames = [f for f in container.decode(stream)]
        container.close()
        size = max(1.0, stride * num_frames / TARGET_FPS * fps)
        delta = max(len(frames) - size, 0)
        start = delta * clip / clips
        chosen = _sample(start, start + size - 1, num_frames, len(frames))
        picked = [frames[i] for i in chosen]
    else:
        window = max(1.0, np.ceil(stride * (num_frames - 1) / TARGET_FPS * fps))
        delta = max(length - window, 0)
        start = delta * clip / clips
        end = start + window - 1
        per_frame = duration / length
        start_pts, end_pts = int(start * per_frame), int(end * per_frame)
        container.seek(max(start_pts - 1024, 0), any_frame=False, backward=True, stream=stream)
        kept = {}
        for frame in container.decode(stream):
            if frame.pts < start_pts:
                continue
            kept[frame.pts] = frame
            if frame.pts > end_pts:
                break
        container.close()
        frames = [kept[p] for p in sorted(kept)]
        size = max(1.0, stride * num_frames / TARGET_FPS * fps)
        chosen = _sample(0.0, size - 1, num_frames, len(frames))
        picked = [frames[i] for i in chosen]
    pixels = np.stack([f.to_rgb().to_ndarray() for f in picked])
    indices = np.array([all_pts.index(f.pts) for f in picked])
    position = crop_index if three else 1
    return indices, _spatial(pixels, mean, std, short if not three else crop, crop, position)


def ssv2_view(paths, *, num_frames, view, crops, mean, std, crop):
    """One view of a frame list as the SSv2 loader (test mode) makes it."""
    segment = float(len(paths) - 1) / num_frames
    seq = []
    for i in range(num_frames):
        a, b = int(np.round(segment * i)), int(np.round(segment * (i + 1)))
        seq.append((a + b) // 2)
    pixels = np.stack([np.asarray(Image.open(paths[i]).convert("RGB")) for i in seq])
    return np.array(seq), _spatial(pixels, mean, std, crop, crop, view % crops)


def _timestamp(text):
    hours, minutes, rest = text.split(":")
    seconds, _, fraction = rest.partition(".")
    return int(hours) * 3600 + int(minutes) * 60 + int(seconds) + float(fraction) / 100


def epic_view(
    folder,
    video_id,
    start_ts,
    stop_ts,
    *,
    num_frames,
    stride,
    clip,
    clips,
    three,
    crop_index,
    mean,
    std,
    crop,
):
    """One view of a segment as the EPIC-KITCHENS loader (test mode) makes it."""
    fps = 50 if len(video_id.split("_")[1]) == 3 else 60
    first = int(round(_timestamp(start_ts) * fps))
    last = int(round(_timestamp(stop_ts) * fps))
    length = last - first
    size = num_frames * stride * fps / TARGET_FPS
    delta = max(length - size, 0)
    start = delta * clip / clips
    end = start + size - 1
    index = torch.linspace(start + 1, end + 1, num_frames)
    numbers = (first + torch.clamp(index, 0, length - 1).long()).numpy()
    pixels = np.stack(
        [np.asarray(Image.open(f"{folder}/frame_{n:010d}.jpg").convert("RGB")) for n in numbers]
    )
    position = crop_index if three else 1
    return numbers, _spatial(pixels, mean, std, crop, crop, position)
