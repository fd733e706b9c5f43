"""Training batches streamed through grain, in an order fixed by ``(seed, step)``.

Step ``s`` reads the examples ``batch_indices(seed, s, batch_size, n)``: each epoch is a fresh
permutation of the split (its tail that does not fill a batch is left out), so a run resumed
at step ``s`` reads exactly the batches an uninterrupted run reads from ``s`` on. grain decodes
examples in worker threads or processes (``evaluation.input.read_ahead``: the same order
either way), at most ``PREFETCH_BATCHES`` batches ahead, so memory holds a few batches whatever
the size of the split.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np

from vtm_jax.data.preprocessing import Preprocessing

PREFETCH_BATCHES = 2


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The example order of one epoch: fixed by ``(seed, epoch)``, so resuming repeats it."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(seed: int, step: int, batch_size: int, num_examples: int) -> np.ndarray:
    """Example indices of training step ``step`` (epochs are whole batches; the tail of each
    epoch's order that does not fill a batch is left out, as with ``drop_remainder``)."""
    per_epoch = num_examples // batch_size
    epoch, index = divmod(step, per_epoch)
    return epoch_order(seed, epoch, num_examples)[index * batch_size : (index + 1) * batch_size]


class TrainExamples:
    """``position -> example``: position ``step * batch_size + j`` is row ``j`` of step
    ``step``'s batch, decoded to one model-ready clip and its label."""

    def __init__(self, source: Any, preprocessing: Preprocessing, seed: int, batch_size: int):
        self.source, self.preprocessing = source, preprocessing
        self.seed, self.batch_size, self.num_examples = seed, batch_size, len(source)
        self._cache()

    def _cache(self) -> None:
        # One epoch's permutation at a time is kept: a lookup per example stays cheap.
        self._order = functools.lru_cache(maxsize=2)(self._epoch)

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes get the examples pickled; the cache is rebuilt there, not sent.
        state = dict(self.__dict__)
        del state["_order"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cache()

    def _epoch(self, epoch: int) -> np.ndarray:
        return epoch_order(self.seed, epoch, self.num_examples)

    def index(self, position: int) -> int:
        """The example index at ``position`` (the same as :func:`batch_indices`)."""
        step, row = divmod(position, self.batch_size)
        epoch, within = divmod(step, self.num_examples // self.batch_size)
        return int(self._order(epoch)[within * self.batch_size + row])

    def __call__(self, position: int) -> dict[str, np.ndarray]:
        from vtm_jax.data.pipeline import eval_views

        example = self.source[self.index(position)]
        clip = np.asarray(eval_views(example, self.preprocessing)[0], np.float32)
        return {"inputs": clip, "label": np.int32(example["label"])}


def train_batches(
    examples: TrainExamples,
    start_step: int,
    total_steps: int,
    workers: int,
    worker_kind: str = "threads",
) -> Iterator[dict[str, np.ndarray]]:
    """The batches of steps ``start_step`` to ``total_steps - 1``, stacked, in order, read by
    ``workers`` threads or processes (``worker_kind``)."""
    import grain

    from vtm_jax.jobs.evaluation.input import closing, read_ahead

    size = examples.batch_size
    dataset = grain.MapDataset.range(start_step * size, total_steps * size).map(examples)
    ahead = read_ahead(dataset, workers, worker_kind, PREFETCH_BATCHES * size)
    return closing(iter(ahead.batch(size, drop_remainder=True)), worker_kind)
