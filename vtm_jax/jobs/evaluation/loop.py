"""The device loop: one jitted step over this process's devices, progress saved per batch.

Each host batch is padded to ``local devices x batch_size`` with a ``batch_mask`` and split
over the ``batch`` axis of the process's mesh (:mod:`vtm_jax.runtime.mesh`). Each device runs
:func:`eval_step` on its share (a ``shard_map`` inside the jit: random modes draw per device
batch) and the metric sums are ``psum``-ed, so the step returns the process's numbers. The
mesh spans only the local devices: processes never wait on one another during the run.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from vtm_jax.checkpoints.record import Head
from vtm_jax.jobs.evaluation import input as eval_input
from vtm_jax.jobs.evaluation.metrics import view_metrics, with_metrics
from vtm_jax.jobs.evaluation.results import save_score_chunk
from vtm_jax.jobs.evaluation.state import EvalState, Loaded
from vtm_jax.models.base import apply_in_steps
from vtm_jax.outputs import write_json
from vtm_jax.runtime import mesh as device_mesh


def eval_step(
    params: Any,
    batch: dict[str, jax.Array],
    *,
    model: Any,
    heads: Sequence[Head],
    softmax_views: bool = False,
    ensemble: str = "sum",
    seed: int = 0,
    clips_per_step: int | None = None,
) -> tuple[dict[str, jax.Array], list[jax.Array], jax.Array, jax.Array]:
    """One device's share of a step: ``(sums, top, scores, finite)``, sums ``psum``-ed.

    ``batch``: ``inputs`` ``[B, V, T, S, S, 3]``, ``labels`` ``[B, heads]``, ``batch_mask``
    ``[B]``, ``example_index`` ``[B]`` (``input.host_batch``). Random modes get a fresh draw
    per device batch, keyed by the dataset index of its first example: videos do not all share
    one random pattern, and the draw does not depend on how many devices or processes run.
    """
    videos = batch["inputs"]
    b, v = videos.shape[:2]
    merge_rng = jax.random.fold_in(jax.random.PRNGKey(seed), batch["example_index"][0])
    clips = videos.reshape((b * v,) + videos.shape[2:])
    logits = apply_in_steps(
        model, params, clips, clips_per_step=clips_per_step, merge_rng=merge_rng
    )
    logits = logits.reshape(b, v, -1)
    # A video whose logits overflowed is skipped (and listed), not counted with NaN scores.
    finite = jnp.isfinite(logits).all(axis=(1, 2))
    sums, top, scores = view_metrics(
        logits,
        batch["labels"],
        batch["batch_mask"] * finite,
        heads,
        softmax_views=softmax_views,
        ensemble=ensemble,
    )
    return jax.lax.psum(sums, device_mesh.BATCH), top, scores, finite


def compiled_step(
    model: Any, heads: Sequence[Head], mesh: jax.sharding.Mesh, **options: Any
) -> Callable:
    """:func:`eval_step` over ``mesh``: parameters whole on every device, the batch split.

    ``options``: :func:`eval_step`'s keywords (``softmax_views``, ``ensemble``, ``seed``,
    ``clips_per_step``). Training's test accuracy runs the same step.
    """
    split, whole = PartitionSpec(device_mesh.BATCH), PartitionSpec()
    fn = functools.partial(eval_step, model=model, heads=tuple(heads), **options)
    return device_mesh.per_device_step(
        fn, mesh, in_specs=(whole, split), out_specs=(whole, split, split, split)
    )


class _Progress:
    """The bar (process 0) and the wall time of a run that may span several sessions."""

    def __init__(self, state: EvalState, total: int, show: bool, started: float):
        self.state, self.started, self.wall_before = state, started, state.wall_s
        self.session_start, self.session_clips = time.perf_counter(), 0
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=state.done, unit="video", dynamic_ncols=True, desc="eval"
            )

    def add(self, videos: int, clips: int) -> None:
        self.session_clips += clips
        self.state.clips += clips
        self.tick()
        if self.bar is not None:
            self.bar.update(videos)
            rate = self.session_clips / max(time.perf_counter() - self.session_start, 1e-9)
            self.bar.set_postfix_str(f"{rate:.3g} clips/s")

    def tick(self) -> None:
        self.state.wall_s = self.wall_before + time.perf_counter() - self.started

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.tick()


def run_shard(
    state: EvalState,
    shard: range,
    load: eval_input.ExampleLoader,
    step: Callable,
    device_params: Any,
    *,
    mesh: jax.sharding.Mesh,
    batch_size: int,
    heads: Sequence[Head],
    state_path: str | None,
    progress: bool,
    workers: int,
    on_batch: Callable[[EvalState], None] | None,
    started: float,
    scores_dir: str | None = None,
    worker_kind: str = "threads",
) -> None:
    """Evaluate the examples of ``shard`` not yet in ``state``, saving it after every batch.

    Videos are read and decoded through grain (``evaluation.input.loaded_batches``). With
    ``scores_dir``, each batch's per-video scores are written there before the state that
    counts them.
    """
    host_batch = batch_size * mesh.size
    rest = shard[state.done :]
    batches = eval_input.loaded_batches(load, rest, host_batch, workers, worker_kind)
    meter = _Progress(state, len(shard), progress, started)
    try:
        for loaded in batches:
            batch = eval_input.host_batch(loaded, host_batch, load.view_shape, len(heads))
            outputs = jax.device_get(step(device_params, device_mesh.put_batch(batch, mesh)))
            _count(state, loaded, outputs, heads, host_batch, scores_dir)
            meter.add(len(loaded), load.view_shape[0] * sum(i.views is not None for i in loaded))
            state.complete = state.done == len(shard)
            if state_path is not None:
                write_json(state_path, with_metrics(state.to_json()))
            if on_batch is not None:
                on_batch(state)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # grain's reader threads or processes stop with it
        meter.close()


def _count(
    state: EvalState,
    loaded: Sequence[Loaded],
    outputs: tuple,
    heads: Sequence[Head],
    host_batch: int,
    scores_dir: str | None,
) -> None:
    """One step's outputs into the state (and its scores into ``scores_dir``)."""
    sums, top, scores, finite = outputs
    finite = finite.reshape(host_batch)
    if scores_dir is not None:
        save_score_chunk(scores_dir, loaded, scores.reshape(host_batch, -1), finite)
    state.add(
        loaded,
        {k: int(v) for k, v in sums.items()},
        [t.reshape(host_batch, -1) for t in top],
        heads,
        finite,
    )
