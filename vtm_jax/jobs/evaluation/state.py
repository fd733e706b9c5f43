"""The state of an evaluation run: what is counted so far, as one typed object.

:class:`EvalState` is what the device loop adds each batch to, what the results file holds
(``to_json``, rewritten after every batch) and what a resumed run continues from
(``from_json``). :func:`merge_states` combines every process's state into the final results.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from vtm_jax.checkpoints.record import Head
from vtm_jax.jobs.evaluation.metrics import sum_names, with_metrics

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


@dataclasses.dataclass
class EvalState:
    """One process's progress: the run it belongs to, the counts, the videos seen.

    ``run`` is what a resume must match entry for entry; ``info`` this session's machine.
    ``shard`` (several processes only) says which examples are this process's;
    ``predictions`` and ``confusion_matrix`` are kept only when the run asks for them.
    """

    run: dict[str, Any]
    info: dict[str, Any]
    sums: dict[str, int]
    complete: bool = False
    done: int = 0
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    video_ids: list[str] = dataclasses.field(default_factory=list)
    clips: int = 0
    wall_s: float = 0.0
    shard: dict[str, Any] | None = None
    predictions: list[dict[str, Any]] | None = None
    confusion_matrix: dict[str, list[list[int]]] | None = None

    @classmethod
    def start(
        cls,
        run: dict[str, Any],
        info: dict[str, Any],
        heads: Sequence[Head],
        shard: Sequence[int],
        process: int,
        processes: int,
    ) -> EvalState:
        """A fresh state for this process's ``shard``: nothing done, every count zero."""
        return cls(
            run=run,
            info=info,
            sums={k: 0 for k in sum_names(heads)},
            complete=len(shard) == 0,
            shard=None
            if processes == 1
            else {
                "process": process,
                "processes": processes,
                "examples": len(shard),
                "first": shard[0] if shard else None,
            },
            predictions=[] if run["predictions"] else None,
            confusion_matrix={
                name or "label": np.zeros((stop - start,) * 2, np.int64).tolist()
                for name, start, stop in heads
            }
            if run["confusion_matrix"]
            else None,
        )

    def to_json(self) -> dict[str, Any]:
        """The results file's object, in the order vtm-jax has always written it."""
        data: dict[str, Any] = {
            "format": RESULTS_FORMAT,
            "version": RESULTS_VERSION,
            "complete": self.complete,
            "run": self.run,
            "info": self.info,
            "done": self.done,
            "sums": self.sums,
            "skipped": self.skipped,
            "video_ids": self.video_ids,
            "clips": self.clips,
            "wall_s": self.wall_s,
        }
        for name in ("shard", "predictions", "confusion_matrix"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        return data

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> EvalState:
        """A saved state (a results file); what is derived from the counts is left out."""
        return cls(**{f.name: saved[f.name] for f in _FIELDS if f.name in saved})

    def add(
        self,
        loaded: Sequence[Loaded],
        sums: dict[str, int],
        top: list[np.ndarray],
        heads: Sequence[Head],
        finite: np.ndarray | None = None,
    ) -> None:
        """Add one batch: its counts, ids, skipped videos, predictions and confusion counts.

        ``finite[row]`` False: the model's output for that video was not finite; it is
        skipped like a corrupt video.
        """
        for key, value in sums.items():
            self.sums[key] += value
        self.done += len(loaded)
        names = [name or "label" for name, _, _ in heads]
        for row, item in enumerate(loaded):
            reason = item.reason
            if item.views is not None and finite is not None and not finite[row]:
                reason = NONFINITE_OUTPUT
            if item.views is None or reason is not None:
                self.skipped.append(
                    {"index": item.index, "video_id": item.video_id, "reason": reason}
                )
                continue
            self.video_ids.append(item.video_id)
            best = [top[h][row] for h in range(len(heads))]
            if self.confusion_matrix is not None:
                for h, name in enumerate(names):
                    self.confusion_matrix[name][item.labels[h]][int(best[h][0])] += 1
            if self.predictions is not None:
                self.predictions.append(_prediction(item, names, best))


_FIELDS = dataclasses.fields(EvalState)


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


def merge_states(states: list[EvalState], run: dict, info: dict) -> dict[str, Any]:
    """All processes' partial results combined, in process order, with the final metrics."""
    merged = EvalState(
        run=run,
        info=info,
        sums={k: sum(s.sums[k] for s in states) for k in states[0].sums},
        complete=all(s.complete for s in states),
        done=sum(s.done for s in states),
        skipped=[item for s in states for item in s.skipped],
        video_ids=[v for s in states for v in s.video_ids],
        clips=sum(s.clips for s in states),
        wall_s=max(s.wall_s for s in states),  # the processes ran side by side
    )
    if states[0].predictions is not None:
        merged.predictions = [p for s in states for p in s.predictions]
    if states[0].confusion_matrix is not None:
        merged.confusion_matrix = {
            name: np.sum([np.asarray(s.confusion_matrix[name]) for s in states], axis=0).tolist()
            for name in states[0].confusion_matrix
        }
    results = merged.to_json()
    if len(states) > 1:
        results["per_process"] = [
            {"done": s.done, "wall_s": s.wall_s, **(s.shard or {})} for s in states
        ]
    return with_metrics(results)
