"""The results file: the run it describes, progress state, resume, multi-host merge, scores.

A run's state (:class:`~.state.EvalState`) is written as a JSON object (``format``
``vtm-jax-eval``, ``version`` 1) after every batch. A rerun with the same path resumes it when the ``run`` entry (checkpoint, parameters
digest, merging, dataset, preprocessing, views, ...) is the same; each process of a multi-host
run keeps its own ``<results>.process<i>`` file, and process 0 writes the merged results.
Paths go through ``etils.epath``, so results may live in a bucket (``gs://...``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from vtm_jax.checkpoints.record import Head
from vtm_jax.errors import UserError
from vtm_jax.jobs.evaluation.state import RESULTS_FORMAT, RESULTS_VERSION, EvalState, Loaded
from vtm_jax.merging import MergingSettings
from vtm_jax.outputs import atomic_file
from vtm_jax.paths import absolute


def state_path_for(results_path: str | None, process: int, processes: int) -> str | None:
    """Where this process keeps its progress: the results file itself when it runs alone."""
    if results_path is None:
        return None
    return results_path if processes == 1 else f"{results_path}.process{process}"


def resume(
    state: EvalState,
    results_path: str | None,
    state_path: str | None,
    overwrite: bool,
    processes: int,
) -> EvalState:
    """The saved state to continue from, or ``state`` itself when starting afresh."""
    if results_path is None or overwrite:
        return state
    parent = epath.Path(absolute(results_path)).parent
    if not parent.is_dir():
        raise UserError(f"cannot write {results_path}: no directory {parent}")
    final = read_results(results_path)
    if final is not None:
        check_same_run(final, state.run, results_path)
    if processes == 1:
        return _continue_from(final, state) if final is not None else state
    saved = read_results(state_path)
    if saved is None:
        return state
    check_same_run(saved, state.run, state_path)
    if saved.get("shard") != state.shard:
        raise UserError(
            f"{state_path} was written by a run split over other processes "
            f"({saved.get('shard')}); rerun it the same way, choose another results path, "
            "or pass overwrite=True"
        )
    return _continue_from(saved, state)


def _continue_from(saved: dict[str, Any], fresh: EvalState) -> EvalState:
    if set(saved["sums"]) != set(fresh.sums):
        raise UserError("the saved results have other metrics than this run; pass overwrite=True")
    # This session's devices and batch size, the saved progress.
    return dataclasses.replace(EvalState.from_json(saved), info=fresh.info)


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
