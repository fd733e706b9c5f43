"""Evaluate a checkpoint on a dataset split: multi-view, every local device, every process.

The loop follows Scenic's eval step. Each process takes its own contiguous shard of the
examples (``shard_indices``). Within a process, each host batch is padded to a full
``local_devices x batch_size`` with a ``batch_mask`` (1 = real example) and reshaped to
``[local_devices, batch_size, ...]``. ``jax.pmap`` runs the forward pass, and the metric sums
are ``psum``-ed over the ``'batch'`` axis, so every device returns the process's numbers for
that step. The pmap spans only the local devices, so processes never wait on one another
during the run. Their partial sums are combined once at the end
(``multihost_utils.process_allgather``), and process 0 writes the final results.

Multi-view testing follows Scenic's ``test_step``. All views of a video (``num_clips``
temporal clips x 1 or 3 spatial crops) are averaged before the metrics: the logits by default,
or each head's softmax probabilities with ``softmax_views=True`` (Scenic's
``multicrop_softmax_logits``). The mean equals Scenic's sum over views divided by the number of
views. In multi-head checkpoints (EPIC-KITCHENS verb and noun, ``class_splits``) each head's
slice of the logits is averaged (after its own softmax, with ``softmax_views``) and ranked on
its own; the action (joint) top-1 counts a video only when every head's top-1 is right.

Results are written to ``results_path`` as JSON after every batch, atomically (temp file, then
``os.replace``). A rerun with the same path resumes: the run must be the same (checkpoint,
merging, dataset, preprocessing, views), the examples already counted are skipped, and the sums
continue from the file. An interrupted run therefore ends with the same numbers as an
uninterrupted one. With several processes, each process keeps its own progress file,
``results_path + '.process<i>'``, and only process 0 writes ``results_path``.

Random reduction modes draw their scores per forward pass. Their numbers depend on the batch
size per device, but not on the number of devices or processes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vtm_jax.checkpoint import load_checkpoint
from vtm_jax.errors import UserError
from vtm_jax.outputs import atomic_file, check_output_file, write_json
from vtm_jax.record import Head, ModelRecord
from vtm_jax.reduction import ReductionSettings, is_random

RESULTS_FORMAT = "vtm-jax-eval"
RESULTS_VERSION = 1
TOP_K = 5
ENSEMBLES = ("sum", "max")
PREFETCH_BATCHES = 2
NONFINITE_INPUT = "pixels are not finite after preprocessing"
NONFINITE_OUTPUT = "the model's output is not finite (overflow in the input or the parameters)"


def evaluate(
    checkpoint_dir: str,
    source: Any,
    *,
    merging: ReductionSettings | None = None,
    preprocessing: dict[str, Any] | None = None,
    batch_size: int = 1,
    num_clips: int = 1,
    three_crops: bool = False,
    results_path: str | None = None,
    attention: str = "auto",
    progress: bool = True,
    limit: int | None = None,
    overwrite: bool = False,
    dataset: str | None = None,
    softmax_views: bool = False,
    ensemble: str = "sum",
    confusion_matrix: bool = False,
    predictions: bool = False,
    save_scores: bool = False,
    workers: int | None = None,
    on_batch: Callable[[dict[str, Any]], None] | None = None,
    scenic_record: ModelRecord | None = None,
    verify: bool = True,
    position_embeddings: str = "paper",
) -> dict[str, Any]:
    """Top-1 and top-5 (per head, plus action top-1) of a checkpoint on ``source``.

    Args:
      checkpoint_dir: a vtm-jax checkpoint directory.
      source: random-access examples (``len``, ``[i]``) as ``data.datasets.open_split`` returns.
      merging: reduction settings; ``None`` uses the checkpoint's stored ``token_merging``.
      preprocessing: entries that override the checkpoint's preprocessing record.
      batch_size: videos per device per step (each with all its views).
      num_clips, three_crops: views per video (temporal clips x 1 or 3 spatial crops).
      results_path: JSON results, rewritten after every batch; an existing file of the same run
        is resumed, and a file of a different run is an error unless ``overwrite``.
      attention: attention backend (``vtm_jax.attention.get_attention``).
      progress: show a progress bar (process 0 only).
      limit: evaluate only the first ``limit`` examples of ``source``.
      dataset: a name for the data in the results, e.g. ``'kinetics400/validation'``. The
        default is taken from the source's ``name`` and ``split``.
      softmax_views: average each head's softmax probabilities over views, not its logits.
      ensemble: how views combine: ``sum`` (SlowFast's default, Scenic's mean) or ``max``
        (SlowFast's ``ENSEMBLE_METHOD max``); see :func:`view_metrics`.
      save_scores: also write each video's combined scores, labels and id to
        ``<results stem>.scores.npz`` (:func:`combine_scores`); needs ``results_path``.
      confusion_matrix, predictions: also keep a confusion matrix per head (rows: true class),
        and per video its label(s) and top-5 classes.
      workers: threads that read and decode videos ahead of the devices.
      on_batch: called with the running state after each batch is saved.
      scenic_record: ``checkpoint_dir`` is a bare Scenic checkpoint and this record, from its
        Scenic config, describes the model (``vtm_jax.scenic.checkpoint.checkpoint_record``).
      verify: check the checkpoint's digests on load (``checkpoint.load_checkpoint``). The
        results name the parameters by their content digest either way, and a resume against
        other parameters is refused.
      position_embeddings: when ``preprocessing`` asks for another frame count than the
        checkpoint's, what becomes of the learned temporal positions that no longer fit:
        ``paper`` (zeros, as the paper's loader) or ``interpolate`` (see :mod:`vtm_jax.frames`).

    Returns:
      The results, the same on every process: ``metrics`` (fractions), ``sums`` (counts),
      ``skipped`` (corrupt videos and why), ``video_ids``, run description and timing.
    """
    from vtm_jax.attention import get_attention
    from vtm_jax.data.pipeline import CorruptVideo, eval_views, shard_indices
    from vtm_jax.models.registry import build_model, check_params_fit

    for name, value, low in (("batch_size", batch_size, 1), ("num_clips", num_clips, 1)):
        if not isinstance(value, int) or value < low:
            raise UserError(f"{name} must be an integer >= {low}, not {value!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit must be a positive integer (or unset), not {limit!r}")
    if ensemble not in ENSEMBLES:
        raise UserError(f"unknown ensemble {ensemble!r}; valid: {', '.join(ENSEMBLES)}")
    if save_scores and results_path is None:
        raise UserError("save_scores needs a results_path (the scores go beside it)")
    if results_path is not None:  # before anything is loaded or compiled
        check_output_file(results_path, what="results_path")
        if save_scores:
            check_output_file(scores_path_for(results_path), what="scores file")
    start_time = time.perf_counter()
    params, record = load_checkpoint(checkpoint_dir, scenic_record=scenic_record, verify=verify)
    if merging is None:
        merging = ReductionSettings.from_dict(record.token_merging)
    prep = record.resolve_preprocessing(preprocessing)
    frames = None
    if prep["num_frames"] != record.num_frames:
        from vtm_jax.frames import change_frames

        frames = {
            "checkpoint": record.num_frames,
            "evaluated": prep["num_frames"],
            "position_embeddings": position_embeddings,
        }
        params, record = change_frames(params, record, prep["num_frames"], position_embeddings)
        if progress and jax.process_index() == 0:  # never silent: accuracy changes with it
            import sys

            print(
                f"vtm-jax: evaluating a {frames['checkpoint']}-frame checkpoint on "
                f"{frames['evaluated']} frames; position embeddings: {position_embeddings}",
                file=sys.stderr,
            )
    heads = record.heads()
    _check_source_classes(source, record, heads)
    num_examples = len(source) if limit is None else min(limit, len(source))
    views = num_clips * (3 if three_crops else 1)
    run = _jsonable(
        {
            "checkpoint": os.path.abspath(checkpoint_dir),
            # The parameters by content: another checkpoint put at the same path is another run.
            "params_digest": record.params_digest,
            "architecture": record.architecture,
            "dataset": dataset or _dataset_name(source),
            "num_examples": num_examples,
            "preprocessing": prep,
            "num_clips": num_clips,
            "three_crops": three_crops,
            "view_average": "softmax" if softmax_views else "logits",
            "ensemble": ensemble,
            "save_scores": save_scores,
            "token_merging": merging.to_dict(),
            "confusion_matrix": confusion_matrix,
            "predictions": predictions,
            # Random modes draw per device batch (keyed by its first example): the batch
            # size decides which videos share a draw, so it is part of such a run.
            "batch_size_per_device": batch_size if is_random(merging) else None,
            # Where the data came from, so a rebuilt or different dataset is not resumed.
            "source": _source_fingerprint(source),
            # Only present when the frame count differs, so older results files still resume.
            **({"frames": frames} if frames else {}),
        }
    )
    process, processes = jax.process_index(), jax.process_count()
    local_devices = jax.local_devices()
    shard = list(shard_indices(num_examples, process, processes))
    info = {
        "checkpoint": run["checkpoint"],
        "architecture": record.architecture,
        "model": record.model,
        "platform": local_devices[0].platform,
        "device_kind": local_devices[0].device_kind,
        "devices": jax.device_count(),
        "processes": processes,
        "batch_size_per_device": batch_size,
        "views_per_video": views,
        "attention": attention,
        "jax": jax.__version__,
    }

    state_path = None
    if results_path is not None:
        state_path = results_path if processes == 1 else f"{results_path}.process{process}"
    state = _start_state(run, info, heads, shard, process, processes, confusion_matrix)
    problem = None
    try:
        state = _resume(state, results_path, state_path, overwrite, processes)
    except UserError as e:
        problem = str(e)
    # Every process must agree before any of them starts; otherwise the others would wait
    # forever for the final gather.
    problems = [problem] if processes == 1 else _allgather_json(problem)
    for i, message in enumerate(problems):
        if message is not None:
            raise UserError(message if i == process else f"process {i}: {message}")

    model = build_model(record, merging, get_attention(attention))
    check_params_fit(model, params, record.input)
    step = jax.pmap(
        functools.partial(
            _eval_step,
            model=model,
            heads=tuple(heads),
            softmax_views=softmax_views,
            ensemble=ensemble,
            seed=merging.seed,
        ),
        axis_name="batch",
        devices=local_devices,
    )
    expected = (views, record.num_frames, record.image_size, record.image_size, 3)

    def load(index: int) -> _Loaded:
        example = source[index]
        video_id = _video_id(example, index)
        labels = _labels(example, heads, video_id)
        try:
            clip_views = eval_views(example, prep, num_clips=num_clips, three_crops=three_crops)
        except CorruptVideo as e:
            return _Loaded(index, video_id, labels, None, str(getattr(e, "reason", e)))
        clip_views = np.asarray(clip_views, np.float32)
        if not np.isfinite(clip_views).all():
            return _Loaded(index, video_id, labels, None, NONFINITE_INPUT)
        if clip_views.shape != expected:
            raise UserError(
                f"video {video_id}: preprocessing gave views of shape {clip_views.shape}, "
                f"the model needs {expected}"
            )
        return _Loaded(index, video_id, labels, clip_views, None)

    scores_dir = None
    if save_scores:
        scores_dir = scores_path_for(results_path) + ".parts"
        if state["done"] == 0 and processes == 1:
            shutil.rmtree(scores_dir, ignore_errors=True)  # nothing of an earlier run is kept
        os.makedirs(scores_dir, exist_ok=True)
    _run_shard(
        state,
        shard,
        load,
        step,
        _replicate(params, local_devices),
        view_shape=expected,
        batch_size=batch_size,
        heads=heads,
        state_path=state_path,
        progress=progress and process == 0,
        workers=workers or min(8, os.cpu_count() or 1),
        on_batch=on_batch,
        started=start_time,
        scores_dir=scores_dir,
    )
    states = [state] if processes == 1 else _allgather_json(state)
    results = _merge_states(states, run, info)
    # Videos the annotations list but the dataset build did not find: not in the accuracy.
    results["missing"] = sorted(map(str, getattr(source, "missing", None) or []))
    if results_path is not None and process == 0:
        if scores_dir is not None:
            # With several hosts, every process's parts must be in this directory by now
            # (a shared file system).
            combine_scores(scores_dir, scores_path_for(results_path), heads)
            results["scores_path"] = scores_path_for(results_path)
        write_json(results_path, results)
    if results["sums"]["count"] == 0:
        # Not a 0% accuracy: there is nothing to measure.
        reasons = sorted({item["reason"] for item in results["skipped"]})
        raise UserError(
            f"no video was evaluated: {len(results['skipped'])} of {num_examples} skipped"
            + (f" ({'; '.join(reasons[:3])})" if reasons else "")
        )
    return results


def _source_fingerprint(source: Any) -> dict[str, Any]:
    """What identifies the examples: the dataset's name, split, builder config, version, place."""
    info = getattr(source, "info", None)
    fingerprint = {"length": len(source), **getattr(source, "fingerprint", {})}
    if info is not None:
        fingerprint.update(
            name=getattr(info, "name", None),
            config=getattr(info, "config_name", None),
            version=str(getattr(info, "version", "")),
            data_dir=str(getattr(info, "data_dir", "")),
        )
    return fingerprint


class _Loaded(NamedTuple):
    """One example read and preprocessed; ``views`` is None for a corrupt video."""

    index: int
    video_id: str
    labels: list[int]
    views: np.ndarray | None
    reason: str | None


def _run_shard(
    state: dict[str, Any],
    shard: Sequence[int],
    load: Callable[[int], _Loaded],
    step: Callable,
    device_params: Any,
    *,
    view_shape: tuple[int, ...],
    batch_size: int,
    heads: Sequence[Head],
    state_path: str | None,
    progress: bool,
    workers: int,
    on_batch: Callable[[dict[str, Any]], None] | None,
    started: float,
    scores_dir: str | None = None,
) -> None:
    """Evaluate the examples of ``shard`` not yet in ``state``, saving it after every batch.

    Videos are read and decoded in ``workers`` threads, up to PREFETCH_BATCHES batches ahead
    of the devices. With ``scores_dir``, each batch's per-video scores are written there
    before the state that counts them (``_save_score_chunk``).
    """
    devices = jax.local_device_count()
    host_batch = batch_size * devices
    remaining = shard[state["done"] :]
    chunks = iter([remaining[i : i + host_batch] for i in range(0, len(remaining), host_batch)])
    bar = _progress_bar(len(shard), state["done"]) if progress else None
    session_start, session_clips, wall_before = time.perf_counter(), 0, state["wall_s"]
    pool = concurrent.futures.ThreadPoolExecutor(workers)
    pending: collections.deque = collections.deque()

    def submit_next() -> None:
        chunk = next(chunks, None)
        if chunk is not None:
            pending.append([pool.submit(load, i) for i in chunk])

    try:
        for _ in range(PREFETCH_BATCHES):
            submit_next()
        while pending:
            loaded = [future.result() for future in pending.popleft()]
            submit_next()
            batch = _shard(_host_batch(loaded, host_batch, view_shape, len(heads)), devices)
            sums, top, scores, finite = jax.device_get(step(device_params, batch))
            finite = finite.reshape(host_batch)
            if scores_dir is not None:
                _save_score_chunk(scores_dir, loaded, scores.reshape(host_batch, -1), finite)
            _update_state(
                state,
                loaded,
                {k: int(v[0]) for k, v in sums.items()},  # psum-ed: every device holds them
                [t.reshape(host_batch, -1) for t in top],
                heads,
                finite,
            )
            clips = view_shape[0] * sum(1 for item in loaded if item.views is not None)
            session_clips += clips
            state["clips"] += clips
            state["wall_s"] = wall_before + time.perf_counter() - started
            state["complete"] = state["done"] == len(shard)
            if state_path is not None:
                write_json(state_path, _with_metrics(state))
            if bar is not None:
                bar.update(len(loaded))
                rate = session_clips / max(time.perf_counter() - session_start, 1e-9)
                bar.set_postfix_str(f"{rate:.3g} clips/s")
            if on_batch is not None:
                on_batch(state)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    state["wall_s"] = wall_before + time.perf_counter() - started


def _save_score_chunk(
    directory: str, loaded: Sequence[_Loaded], scores: np.ndarray, finite: np.ndarray
) -> None:
    """One batch's per-video scores, named by its first example: a resumed run that redoes
    the batch writes the same file again. Skipped videos (corrupt, non-finite) are left out."""
    rows = [row for row, item in enumerate(loaded) if item.views is not None and finite[row]]
    path = os.path.join(directory, f"{loaded[0].index:010d}.npz")
    with atomic_file(path, "wb") as f:
        np.savez(
            f,
            index=np.array([loaded[r].index for r in rows], np.int64),
            video_id=np.array([loaded[r].video_id for r in rows], dtype=str),
            labels=np.array([loaded[r].labels for r in rows], np.int64).reshape(len(rows), -1),
            scores=scores[rows].astype(np.float32),
        )


def combine_scores(directory: str, path: str, heads: Sequence[Head]) -> None:
    """The per-batch score files of ``directory`` as one ``.npz`` in dataset order:
    ``index``, ``video_id``, ``labels`` ``[N, heads]``, ``scores`` ``[N, classes]`` (each
    head's views combined as the metrics saw them), ``head_names`` and ``head_bounds``."""
    names = sorted(f for f in os.listdir(directory) if f.endswith(".npz"))  # not a leftover .tmp
    parts = [np.load(os.path.join(directory, f)) for f in names]
    parts = [p for p in parts if p["index"].size]
    keys = ("index", "video_id", "labels", "scores")
    merged = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0) for k in keys}
    order = np.argsort(merged["index"], kind="stable")
    with atomic_file(path, "wb") as f:
        np.savez(
            f,
            **{k: v[order] for k, v in merged.items()},
            head_names=np.array([name or "label" for name, _, _ in heads], dtype=str),
            head_bounds=np.array([[start, stop] for _, start, stop in heads], np.int64),
        )


def scores_path_for(results_path: str) -> str:
    """Where the per-video scores of ``results_path`` go: ``<stem>.scores.npz``."""
    stem = results_path[:-5] if results_path.endswith(".json") else results_path
    return stem + ".scores.npz"


def view_metrics(
    logits: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    heads: Sequence[Head],
    *,
    softmax_views: bool = False,
    ensemble: str = "sum",
) -> tuple[dict[str, jax.Array], list[jax.Array], jax.Array]:
    """Metric counts of one batch, each head's top-k classes and each video's scores.

    ``logits`` ``[B, V, C]`` (V views per video), ``labels`` ``[B, heads]``, ``mask`` ``[B]``
    (1 = real). Each head's views (logits, or softmax probabilities with ``softmax_views``)
    are combined by ``ensemble``: ``sum`` (SlowFast's default; the same ranking as the mean)
    or ``max`` (SlowFast's: the elementwise maximum over views and zero, as its meter starts
    from zeros). Returns ``(sums, top, scores)``: integer counts keyed ``count``, ``top1``,
    ``top5`` (multi-head: ``<head>_top1``, ``<head>_top5``, and ``action_top1`` /
    ``action_top5``, where every head is right within its top-k, as SlowFast's multitask
    accuracy), per head ``[B, k]`` class indices best first (ties: lower index), and the
    combined scores ``[B, C]`` (views averaged for ``sum``).
    """
    real = mask > 0
    sums = {"count": real.sum(dtype=jnp.int32)}
    top, combined = [], []
    all_right = {1: real, TOP_K: real}
    for h, (name, start, stop) in enumerate(heads):
        scores = logits[..., start:stop].astype(jnp.float32)
        if softmax_views:
            scores = jax.nn.softmax(scores, axis=-1)
        if ensemble == "max":
            scores = jnp.maximum(scores.max(axis=1), 0.0)
        else:
            scores = scores.mean(axis=1)
        _, best = jax.lax.top_k(scores, min(TOP_K, stop - start))
        label = labels[:, h]
        hits = {1: best[:, 0] == label, TOP_K: (best == label[:, None]).any(-1)}
        prefix = f"{name}_" if name else ""
        for k, hit in hits.items():
            sums[f"{prefix}top{k}"] = (hit & real).sum(dtype=jnp.int32)
            all_right[k] = all_right[k] & hit
        top.append(best)
        combined.append(scores)
    if len(heads) > 1:
        for k in (1, TOP_K):
            sums[_joint_name(heads, k)] = all_right[k].sum(dtype=jnp.int32)
    return sums, top, jnp.concatenate(combined, axis=-1)


def format_results(results: dict[str, Any]) -> str:
    """A readable summary: the run, a table of metrics, skipped videos and timing."""
    run, info, sums = results["run"], results["info"], results["sums"]
    merging = run["token_merging"]
    defaults = ReductionSettings().to_dict()
    lines = [
        f"checkpoint: {run['checkpoint']} ({run['architecture']})",
        f"dataset: {run['dataset']}, {run['num_examples']} videos "
        f"({sums['count']} evaluated, {len(results['skipped'])} skipped)"
        + ("" if results.get("complete") else f", {results['done']} done so far"),
        f"views: {run['num_clips']} clip(s) x {3 if run['three_crops'] else 1} crop(s), "
        f"mean of {run['view_average']}; input protocol {_protocol_name(run['preprocessing'])}",
        "token merging: "
        + ", ".join(
            f"{k}={v}" for k, v in merging.items() if k in ("mode", "r") or v != defaults.get(k)
        ),
        "",
        "| metric | value | correct / evaluated |",
        "|---|---|---|",
    ]
    for name, value in results["metrics"].items():
        lines.append(f"| {name} | {100 * value:.2f}% | {sums[name]} / {sums['count']} |")
    if results["skipped"]:
        lines.append("")
        lines.append(f"skipped {len(results['skipped'])} corrupt video(s):")
        for item in results["skipped"][:10]:
            lines.append(f"  {item['video_id']}: {item['reason']}")
        if len(results["skipped"]) > 10:
            lines.append(f"  ... and {len(results['skipped']) - 10} more")
    if results.get("missing"):
        lines.append(
            f"{len(results['missing'])} listed video(s) were not found when the dataset was "
            "built and are not counted (see the results file)"
        )
    lines.append("")
    lines.append(
        f"{info['devices']} {info['device_kind']} device(s) in {info['processes']} process(es), "
        f"batch {info['batch_size_per_device']} per device; {results['wall_s']:.1f} s, "
        f"{results['clips_per_s']:.3g} clips/s"
    )
    return "\n".join(lines)


def _protocol_name(prep: dict[str, Any]) -> str:
    protocol = prep.get("protocol", "centred")
    if protocol == "paper":
        return f"paper ({prep.get('paper_loader', 'kinetics')} loader)"
    return protocol


def _eval_step(params, batch, *, model, heads, softmax_views, ensemble, seed):
    """One device's share of a step; sums are psum-ed, so each device holds the process's.

    Random modes get a fresh draw per device batch, keyed by the dataset index of its first
    example: videos do not all share one random pattern, and the draw does not depend on how
    many devices or processes run.
    """
    videos = batch["inputs"]  # [B, V, T, S, S, 3]
    b, v = videos.shape[:2]
    merge_rng = jax.random.fold_in(jax.random.PRNGKey(seed), batch["example_index"][0])
    logits = model.apply(
        {"params": params}, videos.reshape((b * v,) + videos.shape[2:]), merge_rng=merge_rng
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
    return jax.lax.psum(sums, axis_name="batch"), top, scores, finite


def _joint_name(heads: Sequence[Head], k: int = 1) -> str:
    joint = "action" if [h[0] for h in heads] == ["verb", "noun"] else "joint"
    return f"{joint}_top{k}"


def _replicate(params: Any, devices: Sequence[jax.Device]) -> Any:
    """One copy of every parameter on each device, laid out as pmap expects."""
    mesh = jax.sharding.Mesh(np.array(devices), ("replica",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("replica"))

    def put(x):
        x = np.asarray(x)[None]
        shards = [jax.device_put(x, d) for d in devices]
        return jax.make_array_from_single_device_arrays(
            (len(devices),) + x.shape[1:], sharding, shards
        )

    return jax.tree.map(put, params)


def _host_batch(
    loaded: Sequence[_Loaded], host_batch: int, view_shape: tuple[int, ...], num_heads: int
) -> dict[str, np.ndarray]:
    """Scenic's ``maybe_pad_batch``: zero rows fill the batch; corrupt videos are masked too."""
    inputs = np.zeros((host_batch,) + view_shape, np.float32)
    labels = np.zeros((host_batch, num_heads), np.int32)
    mask = np.zeros((host_batch,), np.int32)
    example_index = np.zeros((host_batch,), np.int32)
    for row, item in enumerate(loaded):
        example_index[row] = item.index
        if item.views is not None:
            inputs[row], labels[row], mask[row] = item.views, item.labels, 1
    return {"inputs": inputs, "labels": labels, "batch_mask": mask, "example_index": example_index}


def _shard(batch: dict[str, np.ndarray], devices: int) -> dict[str, np.ndarray]:
    """Scenic's ``shard``: ``(host_batch, ...)`` to ``(devices, host_batch // devices, ...)``."""
    return {k: v.reshape((devices, -1) + v.shape[1:]) for k, v in batch.items()}


def _start_state(
    run: dict,
    info: dict,
    heads: Sequence[Head],
    shard: Sequence[int],
    process: int,
    processes: int,
    confusion_matrix: bool,
) -> dict[str, Any]:
    state: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "complete": len(shard) == 0,
        "run": run,
        "info": info,
        "done": 0,
        "sums": {k: 0 for k in _sum_names(heads)},
        "skipped": [],
        "video_ids": [],
        "clips": 0,
        "wall_s": 0.0,
    }
    if processes > 1:
        state["shard"] = {
            "process": process,
            "processes": processes,
            "examples": len(shard),
            "first": shard[0] if shard else None,
        }
    if run["predictions"]:
        state["predictions"] = []
    if confusion_matrix:
        state["confusion_matrix"] = {
            name or "label": np.zeros((stop - start,) * 2, np.int64).tolist()
            for name, start, stop in heads
        }
    return state


def _sum_names(heads: Sequence[Head]) -> list[str]:
    names = ["count"]
    for name, _, _ in heads:
        prefix = f"{name}_" if name else ""
        names += [prefix + "top1", prefix + f"top{TOP_K}"]
    if len(heads) > 1:
        names += [_joint_name(heads, 1), _joint_name(heads, TOP_K)]
    return names


def _resume(
    state: dict[str, Any],
    results_path: str | None,
    state_path: str | None,
    overwrite: bool,
    processes: int,
) -> dict[str, Any]:
    """The saved state to continue from, or ``state`` itself when starting afresh."""
    if results_path is None or overwrite:
        return state
    parent = os.path.dirname(os.path.abspath(results_path))
    if not os.path.isdir(parent):
        raise UserError(f"cannot write {results_path}: no directory {parent}")
    final = _read_results(results_path)
    if final is not None:
        _check_same_run(final, state["run"], results_path)
    if processes == 1:
        return _continue_from(final, state) if final is not None else state
    saved = _read_results(state_path)
    if saved is None:
        return state
    _check_same_run(saved, state["run"], state_path)
    if saved.get("shard") != state["shard"]:
        raise UserError(
            f"{state_path} was written by a run split over other processes "
            f"({saved.get('shard')}); rerun it the same way, choose another results path, "
            "or pass overwrite=True"
        )
    return _continue_from(saved, state)


def _continue_from(saved: dict[str, Any], fresh: dict[str, Any]) -> dict[str, Any]:
    saved = dict(saved)
    saved.pop("metrics", None)
    saved.pop("clips_per_s", None)
    saved["info"] = fresh["info"]  # this session's devices and batch size
    if set(saved["sums"]) != set(fresh["sums"]):
        raise UserError("the saved results have other metrics than this run; pass overwrite=True")
    return saved


def _read_results(path: str | None) -> dict[str, Any] | None:
    if path is None or not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        saved = None
    if not isinstance(saved, dict) or saved.get("format") != RESULTS_FORMAT:
        raise UserError(
            f"{path} exists and is not a vtm-jax results file; choose another results path "
            "or pass overwrite=True"
        )
    if saved.get("version") != RESULTS_VERSION:
        raise UserError(
            f"{path} has results format version {saved.get('version')}; pass overwrite=True"
        )
    return saved


def _check_same_run(saved: dict[str, Any], run: dict[str, Any], path: str) -> None:
    old = saved.get("run") or {}
    if old.get("params_digest") != run.get("params_digest"):
        # Said on its own: the path may be the same while the parameters are not.
        before = old.get("params_digest")
        raise UserError(
            f"{path} was computed with other parameters than {run['checkpoint']} holds now "
            + (
                f"(params_digest {str(before)[:19]}..., now {run['params_digest'][:19]}...)"
                if before
                else "(it records no params_digest: written by an older vtm-jax)"
            )
            + "; choose another results path or pass overwrite=True"
        )
    differ = sorted(k for k in set(old) | set(run) if old.get(k) != run.get(k))
    if differ:
        raise UserError(
            f"{path} holds the results of a different run ({', '.join(differ)} differ); "
            "choose another results path or pass overwrite=True"
        )


def _update_state(
    state: dict[str, Any],
    loaded: Sequence[_Loaded],
    sums: dict[str, int],
    top: list[np.ndarray],
    heads: Sequence[Head],
    finite: np.ndarray | None = None,
) -> None:
    """Add one batch: its counts, ids, skipped videos, predictions and confusion counts.

    ``finite[row]`` False: the model's output for that video was not finite; it is skipped
    like a corrupt video.
    """
    for key, value in sums.items():
        state["sums"][key] += value
    state["done"] += len(loaded)
    names = [name or "label" for name, _, _ in heads]
    for row, item in enumerate(loaded):
        reason = item.reason
        if item.views is not None and finite is not None and not finite[row]:
            reason = NONFINITE_OUTPUT
        if item.views is None or reason is not None:
            state["skipped"].append(
                {"index": item.index, "video_id": item.video_id, "reason": reason}
            )
            continue
        state["video_ids"].append(item.video_id)
        if "confusion_matrix" in state:
            for h, name in enumerate(names):
                state["confusion_matrix"][name][item.labels[h]][int(top[h][row, 0])] += 1
        if "predictions" in state:
            best = [top[h][row].tolist() for h in range(len(heads))]
            entry: dict[str, Any] = {"index": item.index, "video_id": item.video_id}
            if len(heads) == 1:
                entry.update(label=item.labels[0], top5=best[0])
            else:
                entry.update(
                    label=dict(zip(names, item.labels, strict=True)),
                    top5=dict(zip(names, best, strict=True)),
                )
            state["predictions"].append(entry)


def _merge_states(states: list[dict[str, Any]], run: dict, info: dict) -> dict[str, Any]:
    """All processes' partial results combined, in process order, with the final metrics."""
    merged: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "complete": all(s["complete"] for s in states),
        "run": run,
        "info": info,
        "done": sum(s["done"] for s in states),
        "sums": {k: sum(s["sums"][k] for s in states) for k in states[0]["sums"]},
        "skipped": [item for s in states for item in s["skipped"]],
        "video_ids": [v for s in states for v in s["video_ids"]],
        "clips": sum(s["clips"] for s in states),
        "wall_s": max(s["wall_s"] for s in states),  # the processes ran side by side
    }
    if "predictions" in states[0]:
        merged["predictions"] = [p for s in states for p in s["predictions"]]
    if "confusion_matrix" in states[0]:
        merged["confusion_matrix"] = {
            name: np.sum([np.asarray(s["confusion_matrix"][name]) for s in states], axis=0).tolist()
            for name in states[0]["confusion_matrix"]
        }
    if len(states) > 1:
        merged["per_process"] = [
            {"done": s["done"], "wall_s": s["wall_s"], **s.get("shard", {})} for s in states
        ]
    return _with_metrics(merged)


def _with_metrics(state: dict[str, Any]) -> dict[str, Any]:
    sums = state["sums"]
    count = sums["count"]
    metrics = {k: (v / count if count else 0.0) for k, v in sums.items() if k != "count"}
    clips_per_s = state["clips"] / state["wall_s"] if state["wall_s"] > 0 else 0.0
    return {**state, "metrics": metrics, "clips_per_s": clips_per_s}


def _allgather_json(value: Any) -> list[Any]:
    """Every process's JSON-able ``value``, in process order (a collective: all must call)."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([data.size], np.int32))
    lengths = np.asarray(lengths).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:n])) for row, n in zip(gathered, lengths, strict=True)]


def _progress_bar(total: int, done: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="video", dynamic_ncols=True, desc="eval")


def _check_source_classes(source: Any, record: ModelRecord, heads: Sequence[Head]) -> None:
    """A source that says its class count must agree with the checkpoint's classifier."""
    ours = [stop - start for _, start, stop in heads]
    theirs = getattr(source, "class_splits", None)
    if theirs is None:
        theirs = getattr(source, "num_classes", None)
    if not theirs:  # a source that does not know its classes
        return
    theirs = [int(v) for v in theirs] if isinstance(theirs, (list, tuple)) else [int(theirs)]
    if theirs != ours:
        raise UserError(
            f"the dataset has classes {theirs}, the checkpoint's classifier {ours}"
            + (f" (class_splits {record.class_splits})" if record.class_splits else "")
        )


def _dataset_name(source: Any) -> str:
    name, split = getattr(source, "name", None), getattr(source, "split", None)
    if name is None:
        return type(source).__name__
    return f"{name}/{split}" if split is not None else str(name)


def _video_id(example: dict[str, Any], index: int) -> str:
    value = example.get("video_id")
    if value is None:
        return str(index)
    if isinstance(value, np.ndarray):
        value = value.item() if value.ndim == 0 else value.tobytes()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _labels(example: dict[str, Any], heads: Sequence[Head], video_id: str) -> list[int]:
    labels = []
    for name, start, stop in heads:
        key = name if len(heads) > 1 else "label"
        if key not in example:
            raise UserError(f"video {video_id} has no {key!r} label")
        value = int(np.asarray(example[key]))
        if not 0 <= value < stop - start:
            raise UserError(
                f"video {video_id}: {key} {value} is outside the classifier's [0, {stop - start})"
            )
        labels.append(value)
    return labels


def _jsonable(value: Any) -> Any:
    """Tuples to lists, numpy scalars to numbers: as the value reads back from JSON."""
    return json.loads(json.dumps(value, default=lambda v: np.asarray(v).tolist()))
