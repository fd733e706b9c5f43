"""Cost of making a view against the cost of decoding its frames, on Kinetics-like clips.

  .venv/bin/python scripts/bench_input.py [--repeats 7]

For each source (10 s of H.264 at 30 fps, 340x256 and 640x360) it times, in one run: opening
the file and decoding the 64 frames the paper's single ViViT view spans (the floor any loader
pays), ``eval_views`` under the ``paper`` protocol for 1 view (ViViT: 32 frames at stride 2,
short side 256, crop 224) and for 4 clips x 3 crops, and the ``scenic`` protocol's 4 x 3.
Medians over the repeats, after one warm-up (which compiles the crop kernel per frame size),
of the process's CPU time (all its threads): the cost of a view, which another process on a
shared machine disturbs far less than it disturbs wall time (``--wall`` for wall time).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import sys
import time

import av
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vtm_jax.data.pipeline import eval_views  # noqa: E402
from vtm_jax.data.preprocessing import Preprocessing  # noqa: E402


def encode(width: int, height: int, frames: int = 300, fps: int = 30) -> bytes:
    """A moving texture, so that the codec has real work to do."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height, width * 2, 3), np.uint8)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = np.ascontiguousarray(base[:, i : i + width])
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def decode_frames(data: bytes, count: int) -> None:
    with av.open(io.BytesIO(data)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i % 2 == 0:
                frame.to_ndarray(format="rgb24")
            if i + 1 >= count:
                break


def median_ms(fn, repeats: int, clock=time.process_time) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return 1000 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--wall", action="store_true", help="wall time instead of CPU time")
    args = parser.parse_args()
    clock = time.perf_counter if args.wall else time.process_time
    paper = Preprocessing(
        protocol="paper",
        paper_loader="kinetics",
        num_frames=32,
        stride=2,
        min_resize=256,
        crop_size=224,
        mean=(0.45,) * 3,
        std=(0.225,) * 3,
    )
    scenic = dataclasses.replace(paper, protocol="scenic", mean=(0.5,) * 3, std=(0.5,) * 3)
    print(
        "| source | decode 64 frames (ms) | paper 1x1 (ms) | ratio | paper 4x3 (ms) | scenic 4x3 (ms) |"
    )
    print("|---|---|---|---|---|---|")
    for width, height in ((340, 256), (640, 360)):
        data = encode(width, height)
        example = {"video": np.frombuffer(data, np.uint8), "video_id": "bench"}
        floor = median_ms(lambda d=data: decode_frames(d, 64), args.repeats, clock)
        one = median_ms(lambda e=example: eval_views(e, paper), args.repeats, clock)
        many = median_ms(
            lambda e=example: eval_views(e, paper, num_clips=4, three_crops=True),
            args.repeats,
            clock,
        )
        dmvr = median_ms(
            lambda e=example: eval_views(e, scenic, num_clips=4, three_crops=True),
            args.repeats,
            clock,
        )
        print(
            f"| {width}x{height} | {floor:.1f} | {one:.1f} | {one / floor:.2f}x | {many:.1f} "
            f"| {dmvr:.1f} |"
        )


if __name__ == "__main__":
    main()
