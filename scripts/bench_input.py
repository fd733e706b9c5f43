"""Cost of making a view against the cost of decoding its frames, on Kinetics-like clips; and
the input pipeline's clips/s with worker threads against worker processes.

  .venv/bin/python scripts/bench_input.py [--repeats 7]
  .venv/bin/python scripts/bench_input.py --pipeline [--workers 1 2 all] [--clips 96]

For each source (10 s of H.264 at 30 fps, 340x256 and 640x360) it times, in one run: opening
the file and decoding the 64 frames the paper's single ViViT view spans (the floor any loader
pays), ``eval_views`` under the ``paper`` protocol for 1 view (ViViT: 32 frames at stride 2,
short side 256, crop 224) and for 4 clips x 3 crops, and the ``scenic`` protocol's 4 x 3.
Medians over the repeats, after one warm-up (which compiles the crop kernel per frame size),
of the process's CPU time (all its threads): the cost of a view, which another process on a
shared machine disturbs far less than it disturbs wall time (``--wall`` for wall time).

``--pipeline`` reads ``--clips`` of those files through evaluation's own reader
(``vtm_jax.jobs.evaluation.input``: one paper view per clip, host batches of 8 assembled as
evaluation assembles them) with each worker count, threads then processes, alternately. It
reports clips/s over wall time from the third batch to the last (the time to the first batch,
reported apart, holds the worker processes' start: an interpreter importing grain and JAX)
and clips per CPU second over the same span (this process and its worker processes, all
threads): the per-core rate, which the machine's other work disturbs less.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import multiprocessing
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


PAPER = Preprocessing(
    protocol="paper",
    paper_loader="kinetics",
    num_frames=32,
    stride=2,
    min_resize=256,
    crop_size=224,
    mean=(0.45,) * 3,
    std=(0.225,) * 3,
)
SOURCES = ((340, 256), (640, 360))
HOST_BATCH = 8  # the paper's batch: one host batch of evaluation
SKIP = 2  # batches read before the timing starts


def views_table(repeats: int, clock) -> None:
    """The cost of one view and of 4 x 3 views against the decoding floor, per source."""
    scenic = dataclasses.replace(PAPER, protocol="scenic", mean=(0.5,) * 3, std=(0.5,) * 3)
    print(
        "| source | decode 64 frames (ms) | paper 1x1 (ms) | ratio | paper 4x3 (ms) | scenic 4x3 (ms) |"
    )
    print("|---|---|---|---|---|---|")
    for width, height in SOURCES:
        data = encode(width, height)
        example = {"video": np.frombuffer(data, np.uint8), "video_id": "bench"}
        floor = median_ms(lambda d=data: decode_frames(d, 64), repeats, clock)
        one = median_ms(lambda e=example: eval_views(e, PAPER), repeats, clock)
        many = median_ms(
            lambda e=example: eval_views(e, PAPER, num_clips=4, three_crops=True), repeats, clock
        )
        dmvr = median_ms(
            lambda e=example: eval_views(e, scenic, num_clips=4, three_crops=True), repeats, clock
        )
        print(
            f"| {width}x{height} | {floor:.1f} | {one:.1f} | {one / floor:.2f}x | {many:.1f} "
            f"| {dmvr:.1f} |"
        )


class ClipSource:
    """``count`` examples that all hold one encoded file (a worker process gets its bytes)."""

    def __init__(self, data: bytes, count: int):
        self.data, self.count = data, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        video = np.frombuffer(self.data, np.uint8)
        return {"video": video, "video_id": f"clip{index}", "label": np.int64(0)}


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its live worker processes."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for child in multiprocessing.active_children():
        try:
            with open(f"/proc/{child.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # it has just ended
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def read_rate(load, clips: int, workers: int, kind: str) -> dict:
    """Read ``clips`` through evaluation's reader. The rates run from the arrival of batch
    ``SKIP`` to that of the last: by then the read-ahead that built up while the first
    batches were copied is spent, and arrivals follow the reading."""
    from vtm_jax.jobs.evaluation.input import host_batch, loaded_batches

    began = time.perf_counter()
    batches = loaded_batches(load, range(clips), HOST_BATCH, workers, kind)
    marks = {}
    for number, loaded in enumerate(batches):
        if number in (0, SKIP, clips // HOST_BATCH - 1):
            marks[number] = (time.perf_counter(), cpu_seconds())
        host_batch(loaded, HOST_BATCH, load.view_shape, 1)  # as evaluation copies a batch
        del loaded  # its shared memory is released before the reader closes, not after
    batches.close()
    (first, _), (start, start_cpu), (last, last_cpu) = (marks[k] for k in sorted(marks))
    counted = clips - (SKIP + 1) * HOST_BATCH
    return {
        "start_s": first - began,
        "clips_per_s": counted / (last - start),
        "clips_per_cpu_s": counted / (last_cpu - start_cpu),
    }


def machine() -> str:
    model = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} CPUs, load average {load}"


def pipeline_table(worker_counts: list[int], clips: int) -> None:
    """Threads against processes at each worker count, alternately, per source."""
    from vtm_jax.jobs.evaluation.input import ExampleLoader

    print(f"{machine()}; {clips} clips per reading, host batch {HOST_BATCH}, paper view 1x1")
    print(
        "| source | workers | threads clips/s | processes clips/s | processes / threads "
        "| threads clips/CPU-s | processes clips/CPU-s | start threads s | start processes s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for width, height in SOURCES:
        source = ClipSource(encode(width, height), clips)
        view_shape = (1, PAPER.num_frames, PAPER.crop_size, PAPER.crop_size, 3)
        load = ExampleLoader(
            source, PAPER, [(None, 0, 1)], num_clips=1, three_crops=False, view_shape=view_shape
        )
        eval_views(source[0], PAPER)  # compiles this process's crop kernel for the frame size
        for workers in worker_counts:
            t, p = (read_rate(load, clips, workers, kind) for kind in ("threads", "processes"))
            print(
                f"| {width}x{height} | {workers} | {t['clips_per_s']:.2f} | {p['clips_per_s']:.2f} "
                f"| {p['clips_per_s'] / t['clips_per_s']:.2f}x | {t['clips_per_cpu_s']:.2f} "
                f"| {p['clips_per_cpu_s']:.2f} | {t['start_s']:.1f} | {p['start_s']:.1f} |",
                flush=True,
            )


def worker_counts(values: list[str]) -> list[int]:
    """``1 2 all`` as distinct counts, ``all`` being this machine's CPU count."""
    counts = [(os.cpu_count() or 1) if v == "all" else int(v) for v in values]
    return sorted(set(counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--wall", action="store_true", help="wall time instead of CPU time")
    parser.add_argument("--pipeline", action="store_true", help="threads against processes")
    parser.add_argument("--workers", nargs="+", default=["1", "2", "all"])
    parser.add_argument("--clips", type=int, default=96, help="a multiple of 8, at least 32")
    args = parser.parse_args()
    if args.pipeline:
        least = (SKIP + 2) * HOST_BATCH
        if args.clips < least or args.clips % HOST_BATCH:
            parser.error(f"--clips must be a multiple of {HOST_BATCH}, at least {least}")
        pipeline_table(worker_counts(args.workers), args.clips)
    else:
        views_table(args.repeats, time.perf_counter if args.wall else time.process_time)


if __name__ == "__main__":
    main()
