"""TensorBoard event files read back: what ``vtm_jax.jobs.tensorboard`` wrote through clu."""

from __future__ import annotations

import os


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """``tag -> [(step, value), ...]`` of every scalar in the event files of ``logdir``.

    clu writes with ``tf.summary.scalar``, which stores each value as a tensor event.
    """
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    files = [f for f in os.listdir(logdir) if f.startswith("events.out.tfevents.")]
    assert files, f"no TensorBoard event files in {logdir}"
    accumulator = event_accumulator.EventAccumulator(
        os.fspath(logdir), size_guidance={event_accumulator.TENSORS: 0}
    )
    accumulator.Reload()
    return {
        tag: [
            (e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
            for e in accumulator.Tensors(tag)
        ]
        for tag in accumulator.Tags()["tensors"]
    }
