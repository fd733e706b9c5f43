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
    if any(isinstance(values.get(k), str) and ":" in values[k] for k in ("mode", "r_schedule")):
        return values  # a module:attribute a data file names is compared, never imported
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


def combine_scores(
    directory: str, path: str, heads: Sequence[Head], expected: Sequence[int] | None = None
) -> None:
    """The per-batch score files of ``directory`` as one ``.npz`` in dataset order:
    ``index``, ``video_id``, ``labels`` ``[N, heads]``, ``scores`` ``[N, classes]`` (each
    head's views combined as the metrics saw them), ``head_names`` and ``head_bounds``.

    ``expected``: the indices of the videos the results count; only their rows are kept
    (once each), and the file written is read back and must hold exactly them."""
    parts = [p for p in _read_parts(directory) if p["index"].size]
    keys = ("index", "video_id", "labels", "scores")
    merged = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0) for k in keys}
    order = np.argsort(merged["index"], kind="stable")
    if expected is not None:
        wanted = np.isin(merged["index"][order], np.asarray(list(expected), np.int64))
        order = order[wanted]
        _, first = np.unique(merged["index"][order], return_index=True)
        order = order[first]  # a batch written twice (a resumed run redid it) counts once
    with atomic_file(path, "wb") as f:
        np.savez(
            f,
            **{k: v[order] for k, v in merged.items()},
            head_names=np.array([name or "label" for name, _, _ in heads], dtype=str),
            head_bounds=np.array([[start, stop] for _, start, stop in heads], np.int64),
        )
    if expected is not None and _file_indices(path) != set(expected):
        raise UserError(
            f"{path}: the scores written are not those of the {len(set(expected))} videos "
            "the results count; rerun with --overwrite (overwrite=True) to start afresh"
        )


def finish_scores(
    directory: str, path: str, heads: Sequence[Head], expected: Sequence[int]
) -> None:
    """The scores file of a finished run, then its parts removed. From the parts when they
    hold every video the results count; a complete scores file already there (the parts
    gone) is kept; anything else is an error naming what is missing."""
    wanted = set(expected)
    missing = wanted - _part_indices(directory)
    if not missing:
        combine_scores(directory, path, heads, expected=sorted(wanted))
    elif _file_indices(path) != wanted:
        raise UserError(_missing_scores(path, directory, missing, len(wanted)))
    if epath.Path(directory).exists():
        epath.Path(directory).rmtree()  # scratch: the scores file is complete


def check_score_parts(state: EvalState, shard: Sequence[int], results_path: str) -> None:
    """Before a resumed run goes on: every video its saved state counts has its scores in
    the parts (or, for a finished run, in the scores file), else one line saying so."""
    skipped = {item["index"] for item in state.skipped}
    counted = {int(i) for i in shard[: state.done]} - skipped
    if not counted:
        return
    path = scores_path_for(results_path)
    missing = counted - _part_indices(path + ".parts")
    if missing and not (state.complete and missing <= _file_indices(path)):
        raise UserError(_missing_scores(path, path + ".parts", missing, len(counted)))


def _missing_scores(path: str, directory: str, missing: set[int], counted: int) -> str:
    first = ", ".join(str(i) for i in sorted(missing)[:3])
    return (
        f"{path} would be incomplete: the scores of {len(missing)} of the {counted} videos "
        f"the results count (dataset indices {first}{', ...' if len(missing) > 3 else ''}) "
        f"are neither in {directory} nor in {path} (the parts were deleted or lost); "
        "rerun with --overwrite (overwrite=True) to start afresh"
    )


def _read_parts(directory: str) -> list[dict[str, np.ndarray]]:
    """The readable per-batch score files of ``directory`` in name order (none: empty)."""
    root = epath.Path(directory)
    if not root.is_dir():
        return []
    parts = []
    for file in sorted(root.iterdir(), key=lambda p: p.name):
        if not file.name.endswith(".npz"):  # not a .tmp
            continue
        try:
            with file.open("rb") as f:
                parts.append(dict(np.load(f, allow_pickle=False)))
        except (OSError, ValueError, EOFError):
            continue  # damaged: its videos count as missing
    return parts


def _part_indices(directory: str) -> set[int]:
    return {int(i) for part in _read_parts(directory) for i in part["index"].tolist()}


def _file_indices(path: str) -> set[int]:
    """The video indices of a scores file; empty when there is none or it is unreadable."""
    try:
        with epath.Path(path).open("rb") as f:
            return {int(i) for i in np.load(f, allow_pickle=False)["index"].tolist()}
    except (OSError, ValueError, EOFError, KeyError):
        return set()


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
