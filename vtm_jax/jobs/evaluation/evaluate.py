"""Evaluate a checkpoint on a dataset split: multi-view, every local device, every process.

The loop follows Scenic's eval step. Each process takes its own contiguous shard of the
examples (``shard_indices``) and reads it through grain (``evaluation.input``). Within a
process, each host batch is padded to a full ``local_devices x batch_size`` with a
``batch_mask`` (1 = real example) and split over the ``batch`` axis of a mesh of the local
devices (``vtm_jax.runtime.mesh``). One jitted step runs the forward pass on each device's
share, and the metric sums are ``psum``-ed over the axis, so the step returns the process's
numbers (``evaluation.loop``). The mesh spans only the local devices, so processes never wait
on one another during the run.
Their partial sums are combined once at the end (``multihost_utils.process_allgather``), and
process 0 writes the final results.

Multi-view testing follows Scenic's ``test_step``. All views of a video (``num_clips``
temporal clips x 1 or 3 spatial crops) are averaged before the metrics: the logits by default,
or each head's softmax probabilities with ``softmax_views=True`` (Scenic's
``multicrop_softmax_logits``). The mean equals Scenic's sum over views divided by the number of
views. In multi-head checkpoints (EPIC-KITCHENS verb and noun, ``class_splits``) each head's
slice of the logits is averaged (after its own softmax, with ``softmax_views``) and ranked on
its own; the action (joint) top-1 counts a video only when every head's top-1 is right
(``evaluation.metrics``).

Results are written to ``results_path`` as JSON after every batch, atomically (temp file, then
rename). A rerun with the same path resumes: the run must be the same (checkpoint, merging,
dataset, preprocessing, views), the examples already counted are skipped, and the sums
continue from the file. An interrupted run therefore ends with the same numbers as an
uninterrupted one. With several processes, each process keeps its own progress file,
``results_path + '.process<i>'``, and only process 0 writes ``results_path``
(``evaluation.results``).
While a run writes ``results_path``, process 0 holds ``<results_path>.lock``
(:mod:`vtm_jax.runtime.lock`): a second run on the same path is refused, not interleaved.

Random merging modes draw their scores per forward pass. Their numbers depend on the batch
size per device, but not on the number of devices or processes.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax

from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.checkpoints.store import checkpoint_inputs, load_checkpoint
from vtm_jax.data.preprocessing import Preprocessing
from vtm_jax.errors import UserError
from vtm_jax.jobs.evaluation import input as eval_input
from vtm_jax.jobs.evaluation import loop
from vtm_jax.jobs.evaluation import results as store
from vtm_jax.jobs.evaluation.input import NONFINITE_INPUT, PREFETCH_BATCHES
from vtm_jax.jobs.evaluation.metrics import TOP_K, format_results, view_metrics
from vtm_jax.jobs.evaluation.results import combine_scores, scores_path_for
from vtm_jax.jobs.evaluation.spec import ENSEMBLES, EvalSpec
from vtm_jax.jobs.evaluation.state import (
    NONFINITE_OUTPUT,
    RESULTS_FORMAT,
    RESULTS_VERSION,
    EvalState,
    merge_states,
)
from vtm_jax.merging import MergingSettings, is_random
from vtm_jax.merging.methods import rlt
from vtm_jax.outputs import write_json
from vtm_jax.paths import absolute
from vtm_jax.runtime import lock
from vtm_jax.runtime import mesh as device_mesh

__all__ = [
    "ENSEMBLES",
    "NONFINITE_INPUT",
    "NONFINITE_OUTPUT",
    "PREFETCH_BATCHES",
    "RESULTS_FORMAT",
    "RESULTS_VERSION",
    "TOP_K",
    "EvalSpec",
    "combine_scores",
    "evaluate",
    "format_results",
    "scores_path_for",
    "view_metrics",
]


def evaluate(
    checkpoint_dir: str,
    source: Any,
    spec: EvalSpec | None = None,
    *,
    on_batch: Callable[[EvalState], None] | None = None,
    scenic_record: ModelRecord | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Top-1 and top-5 (per head, plus action top-1) of a checkpoint on ``source``.

    Args:
      checkpoint_dir: a vtm-jax checkpoint directory.
      source: random-access examples (``len``, ``[i]``) as ``data.datasets.open_split`` returns.
      spec: how to evaluate (:class:`~vtm_jax.jobs.evaluation.spec.EvalSpec`); or give its fields
        as keyword ``options`` (``batch_size=2, num_clips=4, results_path=...``).
      on_batch: called with the running state after each batch is saved.
      scenic_record: ``checkpoint_dir`` is a bare Scenic checkpoint and this record, from its
        Scenic config, describes the model (``vtm_jax.config.scenic_checkpoint.checkpoint_record``).

    Returns:
      The results, the same on every process: ``metrics`` (fractions), ``sums`` (counts),
      ``skipped`` (corrupt videos and why), ``video_ids``, run description and timing.
    """
    if spec is None:
        spec = EvalSpec(**options)
    elif options:
        spec = dataclasses.replace(spec, **options)
    spec.check_outputs(checkpoint_inputs(checkpoint_dir))  # before anything is loaded
    with lock.hold(results_lock(spec.results_path), f"results_path {spec.results_path}"):
        return _evaluate(checkpoint_dir, source, spec, on_batch, scenic_record)


def results_lock(results_path: str | None) -> str | None:
    """The lock file of a results path (taken by process 0 only): ``<results>.lock``."""
    if results_path is None or jax.process_index() != 0:
        return None
    return results_path + ".lock"


def _evaluate(
    checkpoint_dir: str,
    source: Any,
    spec: EvalSpec,
    on_batch: Callable[[EvalState], None] | None,
    scenic_record: ModelRecord | None,
) -> dict[str, Any]:
    """:func:`evaluate` with its spec, holding the results path's lock."""
    started = time.perf_counter()
    params, record, merging, prep, frames = _load(checkpoint_dir, spec, scenic_record)
    heads = record.heads()
    eval_input.check_source_classes(source, record, heads)
    num_examples = len(source) if spec.limit is None else min(spec.limit, len(source))
    run = _run_description(checkpoint_dir, source, spec, record, merging, prep, frames)
    run["num_examples"] = num_examples  # in its place: the run's key order stays the file's
    process, processes = jax.process_index(), jax.process_count()
    from vtm_jax.data.pipeline import shard_indices

    shard = shard_indices(num_examples, process, processes)
    info = _run_info(run, record, spec)
    state_path = store.state_path_for(spec.results_path, process, processes)
    state = EvalState.start(run, info, heads, shard, process, processes)
    state = _resumed(state, spec, state_path, shard, processes)

    mesh = device_mesh.local_mesh()
    step = _compiled_step(record, merging, params, heads, spec, mesh)
    view_shape = (spec.views, record.num_frames, record.image_size, record.image_size, 3)
    load = eval_input.ExampleLoader(
        source,
        prep,
        heads,
        num_clips=spec.num_clips,
        three_crops=spec.three_crops,
        view_shape=view_shape,
    )
    scores_dir = None
    if spec.save_scores:
        fresh = state.done == 0 and processes == 1
        scores_dir = store.prepare_scores_dir(spec.results_path, fresh)
    loop.run_shard(
        state,
        shard,
        load,
        step,
        device_mesh.replicate(params, mesh),
        mesh=mesh,
        batch_size=spec.batch_size,
        heads=heads,
        state_path=state_path,
        progress=spec.progress and process == 0,
        workers=spec.workers or min(8, os.cpu_count() or 1),
        worker_kind=spec.worker_kind,
        on_batch=on_batch,
        started=started,
        scores_dir=scores_dir,
    )
    return _finish(state, run, info, source, spec, heads, scores_dir)


def _compiled_step(
    record: ModelRecord,
    merging: MergingSettings,
    params: Any,
    heads: list,
    spec: EvalSpec,
    mesh: jax.sharding.Mesh,
) -> Any:
    """The model with its merging, checked against the parameters, as a step over ``mesh``."""
    from vtm_jax.models.attention import get_attention
    from vtm_jax.models.registry import build_model, check_params_fit

    def make(settings: MergingSettings) -> Any:
        model = build_model(record, settings, get_attention(spec.attention), spec.dtype)
        check_params_fit(model, params, record.input)
        return loop.compiled_step(
            model,
            heads,
            mesh,
            softmax_views=spec.softmax_views,
            ensemble=spec.ensemble,
            seed=merging.seed,
            clips_per_step=spec.clips_per_step,
        )

    if rlt.asks_for_buckets(merging):
        return _BucketedStep(make, merging, record.model.get("patch_size"))
    return make(merging)


class _BucketedStep:
    """rlt with buckets: each batch's token length picked on the host from its pixels, one
    compiled step per length (``merging.methods.rlt.batch_settings``). The kept count is read
    from the whole (global) batch, so every process picks the same length."""

    def __init__(self, make: Any, merging: MergingSettings, patch_size: Any):
        self.make, self.merging, self.patch_size = make, merging, patch_size
        self.steps: dict[MergingSettings, Any] = {}

    def __call__(self, params: Any, batch: dict[str, Any]) -> Any:
        inputs = batch["inputs"]
        clips = inputs.reshape((-1,) + tuple(inputs.shape[2:]))
        settings = rlt.batch_settings(self.merging, clips, self.patch_size)
        if settings not in self.steps:
            self.steps[settings] = self.make(settings)
        return self.steps[settings](params, batch)


def _override(spec: EvalSpec) -> dict[str, Any] | None:
    return None if spec.preprocessing is None else dict(spec.preprocessing)


def _load(
    checkpoint_dir: str, spec: EvalSpec, scenic_record: ModelRecord | None
) -> tuple[Any, ModelRecord, MergingSettings, Preprocessing, dict[str, Any] | None]:
    """Parameters and record, at the frame count the preprocessing asks for; the merging,
    the preprocessing and, when it changes the frame count, how."""
    params, record = load_checkpoint(
        checkpoint_dir, scenic_record=scenic_record, verify=spec.verify
    )
    merging = spec.merging
    if merging is None:
        merging = MergingSettings.from_dict(record.token_merging)
    prep = record.resolve_preprocessing(_override(spec))
    if prep.num_frames == record.num_frames:
        return params, record, merging, prep, None
    from vtm_jax.checkpoints.frame_count import change_frames

    frames = {
        "checkpoint": record.num_frames,
        "evaluated": prep.num_frames,
        "position_embeddings": spec.position_embeddings,
    }
    params, record = change_frames(params, record, prep.num_frames, spec.position_embeddings)
    if spec.progress and jax.process_index() == 0:  # never silent: accuracy changes with it
        print(
            f"vtm-jax: evaluating a {frames['checkpoint']}-frame checkpoint on "
            f"{frames['evaluated']} frames; position embeddings: {spec.position_embeddings}",
            file=sys.stderr,
        )
    return params, record, merging, prep, frames


def _run_description(
    checkpoint_dir: str,
    source: Any,
    spec: EvalSpec,
    record: ModelRecord,
    merging: MergingSettings,
    prep: Preprocessing,
    frames: dict[str, Any] | None,
) -> dict[str, Any]:
    """What makes two runs the same run: a resume must match it entry for entry."""
    return store.jsonable(
        {
            "checkpoint": absolute(checkpoint_dir),
            # The parameters by content: another checkpoint put at the same path is another run.
            "params_digest": record.params_digest,
            "architecture": record.architecture,
            "dataset": spec.dataset or eval_input.dataset_name(source),
            "num_examples": None,  # the caller's, from the limit
            "preprocessing": prep.to_dict(),
            "num_clips": spec.num_clips,
            "three_crops": spec.three_crops,
            "view_average": "softmax" if spec.softmax_views else "logits",
            "ensemble": spec.ensemble,
            "save_scores": spec.save_scores,
            "token_merging": merging.to_dict(),
            "confusion_matrix": spec.confusion_matrix,
            "predictions": spec.predictions,
            # Random modes draw per device batch (keyed by its first example): the batch
            # size decides which videos share a draw, so it is part of such a run.
            "batch_size_per_device": spec.batch_size if is_random(merging) else None,
            # Where the data came from, so a rebuilt or different dataset is not resumed.
            "source": eval_input.source_fingerprint(source),
            # Only present when the frame count differs, so older results files still resume.
            **({"frames": frames} if frames else {}),
            # Stepping through a batch changes the draws of random modes, not other logits.
            **(
                {"clips_per_step": spec.clips_per_step}
                if spec.clips_per_step and is_random(merging)
                else {}
            ),
        }
    )


def _run_info(run: dict[str, Any], record: ModelRecord, spec: EvalSpec) -> dict[str, Any]:
    """This session's machine and settings (not part of what must match on resume)."""
    local_devices = jax.local_devices()
    return {
        "checkpoint": run["checkpoint"],
        "architecture": record.architecture,
        "model": record.model,
        "platform": local_devices[0].platform,
        "device_kind": local_devices[0].device_kind,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "batch_size_per_device": spec.batch_size,
        "views_per_video": spec.views,
        "clips_per_step": spec.clips_per_step,
        "attention": spec.attention,
        "dtype": spec.dtype,
        "jax": jax.__version__,
    }


def _resumed(
    state: EvalState, spec: EvalSpec, state_path: str | None, shard: range, processes: int
) -> EvalState:
    """The state to continue from; every process must agree before any of them starts,
    otherwise the others would wait forever for the final gather. With ``save_scores``, the
    scores of every video it counts must still be there."""
    problem, process = None, jax.process_index()
    try:
        state = store.resume(state, spec.results_path, state_path, spec.overwrite, processes)
        if spec.save_scores:
            store.check_score_parts(state, shard, spec.results_path)
    except UserError as e:
        problem = str(e)
    problems = [problem] if processes == 1 else store.allgather_json(problem)
    for i, message in enumerate(problems):
        if message is not None:
            raise UserError(message if i == process else f"process {i}: {message}")
    return state


def _finish(
    state: EvalState,
    run: dict[str, Any],
    info: dict[str, Any],
    source: Any,
    spec: EvalSpec,
    heads: list,
    scores_dir: str | None,
) -> dict[str, Any]:
    """Every process's state merged; process 0 writes the results (and combined scores)."""
    states = [state]
    if jax.process_count() > 1:
        states = [EvalState.from_json(s) for s in store.allgather_json(state.to_json())]
    results = merge_states(states, run, info)
    # Videos the annotations list but the dataset build did not find: not in the accuracy.
    results["missing"] = sorted(map(str, getattr(source, "missing", None) or []))
    if spec.results_path is not None and jax.process_index() == 0:
        if scores_dir is not None:
            # With several hosts, every process's parts must be in this directory by now
            # (a shared file system). Every process has finished its shard: the videos
            # evaluated are all but the skipped ones.
            skipped = {item["index"] for item in results["skipped"]}
            evaluated = [i for i in range(run["num_examples"]) if i not in skipped]
            store.finish_scores(scores_dir, scores_path_for(spec.results_path), heads, evaluated)
            results["scores_path"] = scores_path_for(spec.results_path)
        write_json(spec.results_path, results)
    if results["sums"]["count"] == 0:
        # Not a 0% accuracy: there is nothing to measure.
        reasons = sorted({item["reason"] for item in results["skipped"]})
        raise UserError(
            f"no video was evaluated: {len(results['skipped'])} of {run['num_examples']} "
            "skipped" + (f" ({'; '.join(reasons[:3])})" if reasons else "")
        )
    return results
