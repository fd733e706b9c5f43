"""The results file: the run it describes, progress state, resume, multi-host merge, scores.

A run's state is a JSON dict (``format`` ``vtm-jax-eval``, ``version`` 1) rewritten after every
batch. A rerun with the same path resumes it when the ``run`` entry (checkpoint, parameters
digest, merging, dataset, preprocessing, views, ...) is the same; each process of a multi-host
run keeps its own ``<results>.process<i>`` file, and process 0 writes the merged results.
Paths go through ``etils.epath``, so results may live in a bucket (``gs://...``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from etils import epath

from vtm_jax.checkpoints.record import Head
from vtm_jax.errors import UserError
from vtm_jax.jobs.evaluation.metrics import sum_names, with_metrics
from vtm_jax.merging import MergingSettings
from vtm_jax.outputs import atomic_file
from vtm_jax.paths import absolute

RESULTS_FORMAT = "vtm-jax-eval"
RESULTS_VERSION = 1
NONFINITE_OUTPUT = "the model's output is not finite (overflow in the input or the parameters)"


class Loaded(NamedTuple):
    """One example read and preprocessed; ``views`` is None for a corrupt video."""

    index: int
    video_id: str
    labels: list[int]
    views: np.ndarray | None
    reason: str | None


def start_state(
    run: dict,
    info: dict,
    heads: Sequence[Head],
    shard: Sequence[int],
    process: int,
    processes: int,
) -> dict[str, Any]:
    """A fresh state for this process's ``shard``: nothing done, every count zero."""
    state: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "complete": len(shard) == 0,
        "run": run,
        "info": info,
        "done": 0,
        "sums": {k: 0 for k in sum_names(heads)},
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
    if run["confusion_matrix"]:
        state["confusion_matrix"] = {
            name or "label": np.zeros((stop - start,) * 2, np.int64).tolist()
            for name, start, stop in heads
        }
    return state


def state_path_for(results_path: str | None, process: int, processes: int) -> str | None:
    """Where this process keeps its progress: the results file itself when it runs alone."""
    if results_path is None:
        return None
    return results_path if processes == 1 else f"{results_path}.process{process}"


def resume(
    state: dict[str, Any],
    results_path: str | None,
    state_path: str | None,
    overwrite: bool,
    processes: int,
) -> dict[str, Any]:
    """The saved state to continue from, or ``state`` itself when starting afresh."""
    if results_path is None or overwrite:
        return state
    parent = epath.Path(absolute(results_path)).parent
    if not parent.is_dir():
        raise UserError(f"cannot write {results_path}: no directory {parent}")
    final = read_results(results_path)
    if final is not None:
        check_same_run(final, state["run"], results_path)
    if processes == 1:
        return _continue_from(final, state) if final is not None else state
    saved = read_results(state_path)
    if saved is None:
        return state
    check_same_run(saved, state["run"], state_path)
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


def read_results(path: str | None) -> dict[str, Any] | None:
    """The results file at ``path``; None when there is none; an error when it is not one."""
    if path is None or not epath.Path(path).exists():
        return None
    try:
        saved = json.loads(epath.Path(path).read_text(encoding="utf-8"))
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


def check_same_run(saved: dict[str, Any], run: dict[str, Any], path: str) -> None:
    """A saved state resumes only the run that wrote it, on the same parameters."""
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
    if isinstance(old.get("token_merging"), dict):
        # Files written before rules had options keep hybrid's threshold at the top level:
        # read back as settings, they name the same run as the rewritten form.
        old = {**old, "token_merging": _settings_dict(old["token_merging"], path)}
    differ = sorted(k for k in set(old) | set(run) if old.get(k) != run.get(k))
    if differ:
        raise UserError(
            f"{path} holds the results of a different run ({', '.join(differ)} differ); "
            "choose another results path or pass overwrite=True"
        )


def _settings_dict(values: dict[str, Any], path: str) -> dict[str, Any]:
    try:
        return MergingSettings.from_dict(values).to_dict()
    except UserError as err:
        raise UserError(f"{path}: its token_merging is not valid ({err})") from None


def update_state(
    state: dict[str, Any],
    loaded: Sequence[Loaded],
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
        best = [top[h][row] for h in range(len(heads))]
        if "confusion_matrix" in state:
            for h, name in enumerate(names):
                state["confusion_matrix"][name][item.labels[h]][int(best[h][0])] += 1
        if "predictions" in state:
            state["predictions"].append(_prediction(item, names, best))


def _prediction(item: Loaded, names: list[str], best: list[np.ndarray]) -> dict[str, Any]:
    entry: dict[str, Any] = {"index": item.index, "video_id": item.video_id}
    if len(names) == 1:
        entry.update(label=item.labels[0], top5=best[0].tolist())
    else:
        entry.update(
            label=dict(zip(names, item.labels, strict=True)),
            top5=dict(zip(names, [b.tolist() for b in best], strict=True)),
        )
    return entry


def merge_states(states: list[dict[str, Any]], run: dict, info: dict) -> dict[str, Any]:
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
    return with_metrics(merged)


def allgather_json(value: Any) -> list[Any]:
    """Every process's JSON-able ``value``, in process order (a collective: all must call)."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([data.size], np.int32))
    lengths = np.asarray(lengths).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:n])) for row, n in zip(gathered, lengths, strict=True)]


def save_score_chunk(
    directory: str, loaded: Sequence[Loaded], scores: np.ndarray, finite: np.ndarray
) -> None:
    """One batch's per-video scores, named by its first example: a resumed run that redoes
    the batch writes the same file again. Skipped videos (corrupt, non-finite) are left out."""
    rows = [row for row, item in enumerate(loaded) if item.views is not None and finite[row]]
    path = os.fspath(epath.Path(directory) / f"{loaded[0].index:010d}.npz")
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
    files = sorted(
        (p for p in epath.Path(directory).iterdir() if p.name.endswith(".npz")),  # not a .tmp
        key=lambda p: p.name,
    )
    parts = []
    for file in files:
        with file.open("rb") as f:
            parts.append(dict(np.load(f)))
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


def prepare_scores_dir(results_path: str, fresh: bool) -> str:
    """The directory of per-batch score files; emptied when a single process starts afresh."""
    directory = epath.Path(scores_path_for(results_path) + ".parts")
    if fresh and directory.exists():
        directory.rmtree()  # nothing of an earlier run is kept
    directory.mkdir(parents=True, exist_ok=True)
    return os.fspath(directory)


def jsonable(value: Any) -> Any:
    """Tuples to lists, numpy scalars to numbers: as the value reads back from JSON."""
    return json.loads(json.dumps(value, default=lambda v: np.asarray(v).tolist()))
