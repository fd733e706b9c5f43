"""Evaluation input: this process's examples, read and preprocessed through grain, batched.

The source is random access (``len``, ``[i]``: one decoded example). grain reads the indices
of the process's shard that are not yet counted in ``worker`` threads, at most
``PREFETCH_BATCHES`` host batches ahead of the devices, so memory holds a few batches of views
whatever the size of the split. A corrupt video becomes a :class:`Loaded` without views, with
the reason, and is masked out of the batch; the results list it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from vtm_jax.checkpoints.record import Head, ModelRecord
from vtm_jax.data.preprocessing import Preprocessing
from vtm_jax.errors import UserError
from vtm_jax.jobs.evaluation.state import Loaded

PREFETCH_BATCHES = 2
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
    load: ExampleLoader, indices: range, host_batch: int, workers: int
) -> Iterator[list[Loaded]]:
    """``load(i)`` for ``i`` in ``indices``, in order, in lists of up to ``host_batch``.

    grain's threads read ahead at most ``PREFETCH_BATCHES`` batches; closing the iterator (or
    dropping it) stops them.
    """
    import grain

    if not len(indices):
        return iter(())
    options = grain.ReadOptions(
        num_threads=max(1, workers), prefetch_buffer_size=PREFETCH_BATCHES * host_batch
    )
    dataset = (
        grain.MapDataset.range(indices.start, indices.stop, indices.step)
        .map(load)
        .to_iter_dataset(options)
        .batch(host_batch, batch_fn=list)
    )
    return iter(dataset)


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
