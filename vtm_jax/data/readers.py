"""Frame readers: random access to the frames of an encoded video, a frame folder or an array.

Every reader says how many frames it has (``count``), at what rate (``fps``, None where
unknown) and returns the frames at given positions as uint8 ``[n, H, W, 3]``, decoding only
what those positions need. ``VideoBytes`` also exposes what the paper's SlowFast loader reads
from the container (the header's frame count and duration and each frame's timestamp),
because its clip windows are computed from them.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from vtm_jax.errors import UserError


class CorruptVideo(UserError):
    """A stored video that cannot be decoded (the evaluator skips, counts and lists these)."""

    def __init__(self, video_id: str, reason: str):
        self.video_id = video_id
        self.reason = reason
        super().__init__(f"cannot decode video {video_id}: {reason}")


def _import_av() -> Any:
    try:
        import av
    except ImportError:
        raise UserError("decoding videos needs PyAV: pip install 'vtm-jax[video]'") from None
    return av


def _failure(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0]


class ArrayFrames:
    """Frames already decoded, uint8 ``[T, H, W, 3]`` (the synthetic dataset); no frame rate."""

    def __init__(self, video: np.ndarray, video_id: str = "?", fps: float | None = None):
        if video.ndim != 4 or video.shape[-1] != 3:
            raise UserError(f"video {video_id}: expected frames [T, H, W, 3], got {video.shape}")
        if video.shape[0] == 0:
            raise CorruptVideo(video_id, "no frames")
        self.video, self.video_id, self.fps = video, video_id, fps
        self.count = int(video.shape[0])

    def frames(self, positions: Sequence[int]) -> np.ndarray:
        return self.video[np.asarray(positions, np.int64)]


class FrameFolder:
    """A video stored as one image file per frame (SSv2's and EPIC-KITCHENS' JPEG folders).

    Either ``paths`` lists the frame files in display order (positions index it), or
    ``template`` names a frame by its number (``template.format(n)``; positions are frame
    numbers, as EPIC-KITCHENS' 1-based ``frame_0000000001.jpg``). Only the files asked for
    are read.
    """

    def __init__(
        self,
        paths: Sequence[str] | None = None,
        fps: float | None = None,
        video_id: str = "?",
        *,
        template: str | None = None,
    ):
        if (paths is None) == (template is None):
            raise UserError(f"video {video_id}: give frame paths or a frame name template")
        if paths is not None and not paths:
            raise CorruptVideo(video_id, "no frame files")
        self.paths = list(paths) if paths is not None else None
        self.template, self.fps, self.video_id = template, fps, video_id
        self.count = len(self.paths) if self.paths is not None else None

    def path(self, position: int) -> str:
        return self.paths[position] if self.paths is not None else self.template.format(position)

    def frames(self, positions: Sequence[int]) -> np.ndarray:
        from PIL import Image

        decoded: dict[int, np.ndarray] = {}
        for position in sorted(set(int(p) for p in positions)):
            path = self.path(position)
            try:
                with _open_frame(path) as frame, Image.open(frame) as image:
                    decoded[position] = np.asarray(image.convert("RGB"))
            except FileNotFoundError:
                raise CorruptVideo(self.video_id, f"missing frame {path}") from None
            except Exception as e:  # Pillow raises many types for damaged files
                raise CorruptVideo(self.video_id, f"{path}: {_failure(e)}") from None
        shapes = {frame.shape for frame in decoded.values()}
        if len(shapes) > 1:
            raise CorruptVideo(self.video_id, f"frames of different sizes {sorted(shapes)}")
        return np.stack([decoded[int(p)] for p in positions])


def _open_frame(path: str) -> Any:
    """A frame file for Pillow: a local one by name, a remote one (``gs://``) as its bytes."""
    from vtm_jax import paths

    if paths.is_remote(path):
        return io.BytesIO(paths.read_bytes(path))
    return contextlib.nullcontext(path)


class VideoBytes:
    """An encoded video file held in memory, decoded with PyAV.

    Attributes read from the container, as SlowFast's PyAV loader reads them: ``fps`` (the
    stream's average rate), ``declared_frames`` (the header's frame count, 0 where absent),
    ``duration`` (the stream's duration in its time base, None where absent) and ``pts``
    (every frame's presentation timestamp in display order, read by demuxing, not decoding;
    ``packet_durations`` alongside). ``count`` is the number of frames really there. The
    container stays open for ``frames`` until ``close``.
    """

    def __init__(self, data: bytes | np.ndarray, video_id: str = "?"):
        self.video_id = video_id
        raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
        if not raw:
            raise CorruptVideo(video_id, "the stored file is empty")
        av = _import_av()
        self._container = None
        try:
            self._container = av.open(io.BytesIO(raw))
            if not self._container.streams.video:
                raise CorruptVideo(video_id, "no video stream")
            stream = self._container.streams.video[0]
            self.fps = float(stream.average_rate) if stream.average_rate else None
            self.declared_frames = int(stream.frames or 0)
            self.duration = stream.duration
            self.time_base = stream.time_base
            packets = sorted(
                (p.pts, p.duration or 0)
                for p in self._container.demux(stream)
                if p.pts is not None and p.size
            )
        except CorruptVideo:
            self.close()
            raise
        except Exception as e:  # PyAV raises many exception types for damaged data
            self.close()
            raise CorruptVideo(video_id, _failure(e)) from None
        self.pts = np.asarray([p[0] for p in packets], np.int64)
        self.packet_durations = np.asarray([p[1] for p in packets], np.int64)
        self.count = int(self.pts.size)
        if self.count == 0:
            self.close()
            raise CorruptVideo(video_id, "no decodable frames")

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def __enter__(self) -> VideoBytes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def frames(self, positions: Sequence[int]) -> np.ndarray:
        """The frames at ``positions`` (indices into ``pts``), decoding one run per gap."""
        if self._container is None:
            raise UserError(f"video {self.video_id} is closed")
        wanted = sorted(set(int(p) for p in positions))
        if wanted[0] < 0 or wanted[-1] >= self.count:
            raise UserError(f"video {self.video_id}: frame {wanted[-1]} of {self.count}")
        decoded: dict[int, np.ndarray] = {}
        for run in _runs(wanted, gap=64):
            decoded.update(self._decode_run(run))
        missing = [p for p in wanted if p not in decoded]
        if missing:
            raise CorruptVideo(self.video_id, f"frame {missing[0]} could not be decoded")
        first = decoded[wanted[0]]
        out = np.empty((len(positions), *first.shape), first.dtype)
        for i, p in enumerate(positions):
            out[i] = decoded[int(p)]
        return out

    def _decode_run(self, positions: list[int]) -> dict[int, np.ndarray]:
        wanted = {int(self.pts[p]): p for p in positions}
        last = int(self.pts[positions[-1]])
        out: dict[int, np.ndarray] = {}
        container = self._container
        stream = container.streams.video[0]
        try:
            # The keyframe at or before the first frame wanted. (Frame threading is left off:
            # with it, converting the frames to RGB costs more than it saves on decoding.)
            container.seek(int(self.pts[positions[0]]), stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.pts in wanted:
                    out[wanted[frame.pts]] = frame.to_ndarray(format="rgb24")
                if frame.pts is not None and frame.pts >= last:
                    break
        except Exception as e:  # PyAV raises many exception types for damaged data
            raise CorruptVideo(self.video_id, _failure(e)) from None
        return out


def _runs(positions: list[int], gap: int) -> list[list[int]]:
    """Sorted positions split where two are more than ``gap`` apart (a seek is cheaper)."""
    runs = [[positions[0]]]
    for p in positions[1:]:
        if p - runs[-1][-1] > gap:
            runs.append([p])
        else:
            runs[-1].append(p)
    return runs


def reader_for(example: dict[str, Any]) -> ArrayFrames | FrameFolder | VideoBytes:
    """The reader of a dataset example: ``frame_paths`` or ``frame_template`` (a frame
    folder), ``video_path`` (a video file) or ``video`` (encoded bytes or decoded frames)."""
    video_id = as_text(example.get("video_id", "?"))
    if "video_path" in example:
        return VideoBytes(_file_bytes(as_text(example["video_path"]), video_id), video_id)
    if "frame_paths" in example:
        return FrameFolder(list(example["frame_paths"]), example.get("fps"), video_id)
    if "frame_template" in example:
        return FrameFolder(None, example.get("fps"), video_id, template=example["frame_template"])
    if "video" not in example:
        raise UserError(f"example {video_id} has neither 'video' nor 'frame_paths'")
    video = np.asarray(example["video"])
    if video.ndim == 4 and video.shape[-1] == 3:
        return ArrayFrames(video, video_id, example.get("fps"))
    if video.ndim == 1 and video.dtype == np.uint8:
        return VideoBytes(video, video_id)
    raise UserError(
        f"video {video_id}: expected frames [T, H, W, 3] or encoded bytes, "
        f"got {video.dtype} {video.shape}"
    )


def _file_bytes(path: str, video_id: str) -> bytes:
    """A video file's bytes; one that cannot be read is skipped like a corrupt one."""
    from vtm_jax import paths

    try:
        return paths.read_bytes(path)
    except OSError as e:
        raise CorruptVideo(video_id, f"cannot read {path}: {_failure(e)}") from None


def as_text(value: Any) -> str:
    """A string from a str, bytes or 0-d array field (TFDS gives text back as bytes)."""
    if isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
