"""Scalars for TensorBoard, written as Scenic writes them: through ``clu.metric_writers``.

``train`` and ``eval`` write their scalars (loss, accuracy, learning rate, test accuracy; the
evaluation metrics) with :func:`metric_writer`, which is clu's ``create_default_writer`` on
process 0: TensorBoard event files in the workdir, beside the JSON(L) files vtm-jax always
writes. clu's writer needs TensorFlow (its summary writer is ``tf.summary``), which vtm-jax
itself does not: both come with the ``tensorboard`` extra (``pip install
'vtm-jax[tensorboard]'``). Without them the run goes on without event files, and says so once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any, Protocol

from vtm_jax.errors import writing

INSTALL_HINT = "pip install 'vtm-jax[tensorboard]'"
EVENTS_PREFIX = "events.out.tfevents."  # TensorBoard's event files


class Writer(Protocol):
    """The part of clu's ``MetricWriter`` that vtm-jax uses."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class NoWriter:
    """Writes nothing: other processes than 0, or clu/TensorFlow not installed."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        del step, scalars

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


_warned = False


def tensorboard_available() -> bool:
    """Whether clu's metric writers import (clu and TensorFlow installed)."""
    return _import_metric_writers() is not None


def _import_metric_writers() -> Any:
    # TensorFlow only writes summary files here: keep it off the GPUs JAX uses and quiet
    # (oneDNN's start-up notice would be the only line on stderr of a clean run).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        import tensorflow as tf
        from clu import metric_writers
    except ImportError:
        return None
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # devices were initialised already (TF used elsewhere in the process)
        pass
    return metric_writers


def metric_writer(logdir: str, *, lead: bool = True) -> Writer:
    """clu's default writer (TensorBoard event files in ``logdir``) when ``lead`` (process 0)
    and clu and TensorFlow are installed; otherwise one that writes nothing, with a note on
    stderr the first time that the event files are missing."""
    global _warned
    if not lead:
        return NoWriter()
    metric_writers = _import_metric_writers()
    if metric_writers is None:
        if not _warned:
            print(
                f"vtm-jax: no TensorBoard event files: they need clu and TensorFlow ({INSTALL_HINT})",
                file=sys.stderr,
            )
            _warned = True
        return NoWriter()
    # Synchronous: a run that stops (or is killed) after a step has that step's scalars on disk.
    with writing(logdir):
        return NamedWriter(metric_writers.create_default_writer(logdir, asynchronous=False), logdir)


class NamedWriter:
    """A writer whose out of space and I/O errors are one line naming its event files' folder
    (``vtm_jax.errors.writing``), not TensorFlow's traceback."""

    def __init__(self, writer: Writer, logdir: str) -> None:
        self._writer = writer
        self._where = f"{logdir}/{EVENTS_PREFIX}*"

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        with writing(self._where):
            self._writer.write_scalars(step, scalars)

    def flush(self) -> None:
        with writing(self._where):
            self._writer.flush()

    def close(self) -> None:
        with writing(self._where):
            self._writer.close()
