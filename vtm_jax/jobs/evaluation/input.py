"""Evaluation input: this process's examples, read and preprocessed through grain, batched.

The source is random access (``len``, ``[i]``: one decoded example). grain reads the indices
of the process's shard that are not yet counted with ``workers`` threads or worker processes
(``read_ahead``), at most ``PREFETCH_BATCHES`` host batches ahead of the devices, so memory
holds a few batches of views whatever the size of the split. A corrupt video becomes a
:class:`Loaded` without views, with the reason, and is masked out of the batch; the results
list it.
"""

from __future__ import annotations

import atexit
import gc
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from vtm_jax.checkpoints.record import Head, ModelRecord
from vtm_jax.data.preprocessing import Preprocessing
from vtm_jax.errors import UserError
from vtm_jax.jobs.evaluation.state import Loaded

PREFETCH_BATCHES = 2
# Threads share this interpreter; processes each run their own, at the cost of starting them
# (seconds), pickling the source and sending every view through shared memory (BENCHMARKS.md).
WORKER_KINDS = ("threads", "processes")
_AT_EXIT: list = []  # what this module has registered with atexit
NONFINITE_INPUT = "pixels are not finite after preprocessing"


class ExampleLoader:
    """``index -> Loaded``: one example's labels and views, as the model takes them."""

    def __init__(
        self,
        source: Any,
        preprocessing: Preprocessing,
        heads: Sequence[Head],
        *,
        num_clips: int,
        three_crops: bool,
        view_shape: tuple[int, ...],
    ):
        self.source, self.preprocessing, self.heads = source, preprocessing, tuple(heads)
        self.num_clips, self.three_crops, self.view_shape = num_clips, three_crops, view_shape

    def __call__(self, index: int) -> Loaded:
        from vtm_jax.data.pipeline import CorruptVideo, eval_views

        example = self.source[index]
        video_id = example_id(example, index)
        labels = example_labels(example, self.heads, video_id)
        try:
            views = eval_views(
                example, self.preprocessing, num_clips=self.num_clips, three_crops=self.three_crops
            )
        except CorruptVideo as e:
            return Loaded(index, video_id, labels, None, str(getattr(e, "reason", e)))
        views = np.asarray(views, np.float32)
        if not np.isfinite(views).all():
            return Loaded(index, video_id, labels, None, NONFINITE_INPUT)
        if views.shape != self.view_shape:
            raise UserError(
                f"video {video_id}: preprocessing gave views of shape {views.shape}, "
                f"the model needs {self.view_shape}"
            )
        return Loaded(index, video_id, labels, views, None)


def loaded_batches(
    load: ExampleLoader,
    indices: range,
    host_batch: int,
    workers: int,
    worker_kind: str = "threads",
) -> Iterator[list[Loaded]]:
    """``load(i)`` for ``i`` in ``indices``, in order, in lists of up to ``host_batch``.

    grain's workers (``read_ahead``) read ahead at most ``PREFETCH_BATCHES`` batches; closing
    the iterator (or dropping it) stops them.
    """
    import grain

    if not len(indices):
        return iter(())
    dataset = grain.MapDataset.range(indices.start, indices.stop, indices.step).map(load)
    ahead = read_ahead(dataset, workers, worker_kind, PREFETCH_BATCHES * host_batch)
    return closing(iter(ahead.batch(host_batch, batch_fn=list)), worker_kind)


def check_worker_kind(kind: Any, where: str = "worker_kind") -> str:
    """``kind`` if it is one of :data:`WORKER_KINDS`; a one-line error naming them if not."""
    if kind not in WORKER_KINDS:
        raise UserError(f"{where} must be one of {', '.join(WORKER_KINDS)}, not {kind!r}")
    return kind


def read_ahead(dataset: Any, workers: int, kind: str, buffer: int) -> Any:
    """A grain ``MapDataset`` read in order, about ``buffer`` elements ahead, as an
    ``IterDataset``: by ``workers`` threads of this process, or by ``workers`` processes.

    Processes (grain's ``mp_prefetch``): process ``i`` maps elements ``i, i + workers, ...`` one
    at a time, and they are taken round robin, so the order is the threads' order. The dataset
    (its functions and the source inside them) is pickled into each process once, when reading
    starts; arrays come back through shared memory.
    """
    import grain

    workers = max(1, workers)
    if check_worker_kind(kind) == "threads":
        options = grain.ReadOptions(num_threads=workers, prefetch_buffer_size=buffer)
        return dataset.to_iter_dataset(options)
    import cloudpickle
    from absl import flags

    try:  # as grain will, into each process: an error here is one line, not a worker's traceback
        cloudpickle.dumps(dataset)
    except Exception as e:
        raise UserError(
            f"worker_kind 'processes' sends the data source to each worker process, and this one "
            f"does not pickle ({type(e).__name__}: {e}); use worker_kind 'threads'"
        ) from None
    if not flags.FLAGS.is_parsed():  # grain's process reader reads its absl flags
        flags.FLAGS.mark_as_parsed()
    if _release_shared_memory not in _AT_EXIT:
        _AT_EXIT.append(atexit.register(_release_shared_memory))  # before multiprocessing's
    in_order = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    options = grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=-(-buffer // workers)
    )
    return in_order.mp_prefetch(options, worker_init_fn=_input_worker_init)


def closing(iterator: Any, kind: str) -> Iterator[Any]:
    """``iterator``'s items; its readers stop when they end or when this is closed (or
    dropped), not when the garbage collector finds them."""
    try:
        yield from iterator
    finally:
        iterator.close()
        if kind == "processes":
            # grain keeps its last elements in reference cycles: their shared memory is
            # freed now, not whenever the collector runs.
            gc.collect()


def _release_shared_memory() -> None:
    """Unlink the shared memory of worker processes' arrays before the interpreter exits:
    grain unlinks it in a background thread, and what is left for the exit is reported as
    leaked (then removed) by multiprocessing's resource tracker."""
    from grain._src.python.ipc import shared_memory_array

    gc.collect()
    pool = getattr(shared_memory_array.SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None:  # grain's one thread: after this no-op, earlier unlinks are done
        pool.apply(int)


def _input_worker_init(index: int, count: int) -> None:
    """A worker process does host work only: its JAX (the crop kernel) must not take an
    accelerator that the main process uses. The TFDS notes that opening a split silences in
    the main process (``data.datasets``) come again when a worker unpickles the split: they
    are silenced there too, without importing TFDS for sources that do not need it."""
    del index, count
    import logging

    import jax

    jax.config.update("jax_platforms", "cpu")
    notes = ("Using custom data configuration", "Variant folder")
    logging.getLogger("absl").addFilter(lambda record: not str(record.msg).startswith(notes))


def host_batch(
    loaded: Sequence[Loaded], size: int, view_shape: tuple[int, ...], num_heads: int
) -> dict[str, np.ndarray]:
    """Scenic's ``maybe_pad_batch``: zero rows fill the batch; corrupt videos are masked too."""
    inputs = np.zeros((size,) + view_shape, np.float32)
    labels = np.zeros((size, num_heads), np.int32)
    mask = np.zeros((size,), np.int32)
    example_index = np.zeros((size,), np.int32)
    for row, item in enumerate(loaded):
        example_index[row] = item.index
        if item.views is not None:
            inputs[row], labels[row], mask[row] = item.views, item.labels, 1
    return {"inputs": inputs, "labels": labels, "batch_mask": mask, "example_index": example_index}


def check_source_classes(source: Any, record: ModelRecord, heads: Sequence[Head]) -> None:
    """A source that says its class count must agree with the checkpoint's classifier.

    A source whose label ids depend on the checkpoint (``video_folder``: its class names
    matched to the checkpoint's by name) gets the checkpoint's names and head sizes first."""
    ours = [stop - start for _, start, stop in heads]
    if callable(bind := getattr(source, "use_checkpoint_classes", None)):
        bind(record.labels, ours)
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


def source_fingerprint(source: Any) -> dict[str, Any]:
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


def dataset_name(source: Any) -> str:
    """``name/split`` of a source that says them; its type's name otherwise."""
    name, split = getattr(source, "name", None), getattr(source, "split", None)
    if name is None:
        return type(source).__name__
    return f"{name}/{split}" if split is not None else str(name)


def example_id(example: dict[str, Any], index: int) -> str:
    """The example's ``video_id`` as text (its index when it has none)."""
    value = example.get("video_id")
    if value is None:
        return str(index)
    if isinstance(value, np.ndarray):
        value = value.item() if value.ndim == 0 else value.tobytes()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def example_labels(example: dict[str, Any], heads: Sequence[Head], video_id: str) -> list[int]:
    """One label per head (``label``, or ``verb`` / ``noun`` ...), checked against the head."""
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
