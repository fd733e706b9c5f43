"""Training and fine-tuning with optax, optionally with token merging in the forward pass.

``train(config, workdir)`` reads a config in Scenic's schema (``optimizer``,
``optimizer_configs``, ``lr_configs``, ``batch_size``, ``num_training_epochs`` or
``num_training_steps``, ``max_grad_norm``, ``log_eval_steps``, ``checkpoint_steps``,
``rng_seed``) and trains data-parallel over the local devices (the batch is sharded over the
``batch`` axis of ``runtime.mesh``, the parameters replicated). ``config.training.token_merging`` merges tokens
while training: gradients flow through the merged values, the merge indices are constants
(they are computed under ``stop_gradient``), as in the paper's ``train_net`` path.

The examples stream through grain (``training.input``): nothing holds the split in memory. The
order of the training examples is a pure function of ``(rng_seed, step)``, and the optimiser
state is checkpointed with orbax's CheckpointManager every ``checkpoint_steps``, so a run that
is killed resumes from its last checkpoint and ends with the same parameters as one that was
never interrupted. The test accuracy is evaluation's top-1 (``evaluation.loop.compiled_step``).
Scalars go to ``train_log.jsonl`` and, through ``clu.metric_writers``, to TensorBoard event
files in the workdir. When it ends, the parameters are exported as a vtm-jax checkpoint
directory (``workdir/model``) whose record says how it was trained.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from etils import epath

from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.data.preprocessing import Preprocessing
from vtm_jax.errors import UserError, writing
from vtm_jax.jobs.evaluation.input import check_worker_kind
from vtm_jax.jobs.evaluation.loop import compiled_step
from vtm_jax.jobs.training.input import (
    TrainExamples,
    batch_indices,
    epoch_order,
    train_batches,
)
from vtm_jax.jobs.training.optim import (
    OPTIMIZERS,
    learning_rate,
    learning_rate_schedule,
    make_optimizer,
)
from vtm_jax.jobs.training.steps import compiled_train_step, cross_entropy, init_state
from vtm_jax.jobs.training.workdir import (
    LOG_FILE,
    MODEL_DIR,
    STATE_DIR,
    check_same_config,
    claim_workdir,
    clear_run,
)
from vtm_jax.merging import MergingSettings
from vtm_jax.outputs import atomic_file
from vtm_jax.paths import absolute, join
from vtm_jax.runtime import mesh as device_mesh

__all__ = [
    "OPTIMIZERS",
    "batch_indices",
    "cross_entropy",
    "epoch_order",
    "learning_rate_schedule",
    "make_optimizer",
    "train",
]

LOG_EVERY = 10  # steps between log lines (reading metrics back from the device costs a sync)
LOCK_FILE = "vtm-jax.lock"  # held in the workdir while a run writes it


def _positive_int(value: Any, name: str) -> int:
    """A count from a config: a positive integer (a float such as Scenic's 30.0 if whole)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, not {value!r}")
    return value


def _steps(config: ml_collections.ConfigDict, num_examples: int, batch_size: int) -> int:
    if config.get("num_training_steps") is not None:
        return _positive_int(config.num_training_steps, "num_training_steps")
    epochs = config.get("num_training_epochs")
    if epochs is None:
        raise UserError("train needs config.num_training_epochs or config.num_training_steps")
    return _positive_int(epochs, "num_training_epochs") * (num_examples // batch_size)


@dataclasses.dataclass
class _Run:
    """One training run's pieces: data, models, compiled steps and where they write."""

    config: ml_collections.ConfigDict
    workdir: str
    record: ModelRecord
    preprocessing: Preprocessing
    train_source: Any
    test_source: Any
    merging: MergingSettings
    batch_size: int
    total_steps: int
    workers: int
    worker_kind: str
    train_step: Callable
    eval_step: Callable
    init: Callable
    mesh: jax.sharding.Mesh


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    train_source: Any = None,
    test_source: Any = None,
    on_step: Callable[[int], None] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train the model a config describes on its dataset's train split; returns the summary.

    ``train_source`` / ``test_source``: random-access splits to use instead of the ones the
    config names (``data.datasets.open_split``). ``on_step(step)`` is called after every step
    (tests use it to interrupt a run). A workdir holding another run's files (or files no
    run's ``config.json`` vouches for) is refused unless ``overwrite``, which removes them and
    starts afresh (``training.workdir``). One run at a time: the workdir's lock
    (``vtm-jax.lock``, :mod:`vtm_jax.runtime.lock`) is held until it ends.
    """
    from vtm_jax.outputs import check_output_dir
    from vtm_jax.runtime import lock

    # Before the data is built or decoded: the workdir must take checkpoints and the model,
    # and hold nothing but this run's (or be overwritten).
    check_output_dir(workdir, what="--workdir")
    data_dir = (config.get("dataset_configs") or {}).get("data_dir")
    replace = claim_workdir(
        workdir, config, overwrite=overwrite, inputs={"the dataset's data_dir": data_dir}
    )
    _positive_int(config.get("batch_size"), "batch_size")
    _steps(config, num_examples=1, batch_size=1)  # the run's length checked before any data
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    with lock.hold(workdir_lock(workdir), f"--workdir {workdir}"):
        return _train(config, workdir, replace, train_source, test_source, on_step, progress)


def workdir_lock(workdir: str) -> str | None:
    """The lock file a training run holds in its workdir (process 0 only)."""
    return join(workdir, LOCK_FILE) if jax.process_index() == 0 else None


def _train(
    config: ml_collections.ConfigDict,
    workdir: str,
    replace: bool,
    train_source: Any,
    test_source: Any,
    on_step: Callable[[int], None] | None,
    progress: bool,
) -> dict[str, Any]:
    """:func:`train` once the workdir is claimed and locked."""
    import orbax.checkpoint as ocp

    from vtm_jax.checkpoints.store import checkpoint_loads, save_checkpoint

    run = _set_up(config, workdir, train_source, test_source)
    if replace:
        clear_run(workdir)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    check_same_config(workdir, config)
    manager = ocp.CheckpointManager(
        absolute(join(workdir, STATE_DIR)),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
    )
    state = device_mesh.replicate(run.init(), run.mesh)
    start = 0
    if manager.latest_step() is not None:
        start = int(manager.latest_step())
        state = manager.restore(start, args=ocp.args.StandardRestore(state))
        state = device_mesh.replicate(state, run.mesh)
        print(f"resuming from step {start} of {run.total_steps}")
    began = time.time()
    try:
        state = _train_loop(run, state, start, manager, on_step, progress)
    finally:
        manager.close()
    accuracy = _test_accuracy(run, state["params"])
    summary = {
        "steps": run.total_steps,
        "test_accuracy": accuracy,
        "test_examples": len(run.test_source),
        "train_examples": len(run.train_source),
        "train_token_merging": run.merging.to_dict(),
        "seconds_this_run": round(time.time() - began, 1),
    }
    export = join(workdir, MODEL_DIR)
    if not checkpoint_loads(export):  # missing, unfinished or damaged: exported again
        params = jax.device_get(state["params"])
        record = _export_record(config, run.record, run.train_source, summary)
        save_checkpoint(export, params, record, overwrite=True)
    print(f"test accuracy {accuracy:.4f} on {len(run.test_source)} examples; model in {export}")
    return summary


def _set_up(config: ml_collections.ConfigDict, workdir: str, train_source, test_source) -> _Run:
    """The record, the splits, the models and the compiled steps a config describes."""
    from vtm_jax.config.loading import preprocessing_from_config, record_from_config
    from vtm_jax.models.attention import get_attention
    from vtm_jax.models.registry import build_model

    data_config = config.dataset_configs
    record = dataclasses.replace(
        record_from_config(config), preprocessing=preprocessing_from_config(data_config)
    )
    train_source, test_source = _sources(config, train_source, test_source)
    if train_source.num_classes != record.num_classes:
        raise UserError(
            f"the model has {record.num_classes} classes, {config.dataset_name} "
            f"has {train_source.num_classes}"
        )
    training = config.get("training", {}) or {}
    merging = MergingSettings.from_dict(training.get("token_merging"))
    attention = get_attention(training.get("attention", "auto"))
    dtype = training.get("dtype", "float32")  # the compute dtype; parameters stay float32
    model = build_model(record, merging, attention, dtype)
    eval_model = build_model(record, MergingSettings(), attention, dtype)
    mesh = device_mesh.local_mesh()
    batch_size = int(config.batch_size)
    if batch_size % mesh.size:
        raise UserError(f"batch_size {batch_size} is not a multiple of the {mesh.size} devices")
    if batch_size > len(train_source):
        raise UserError(f"batch_size {batch_size} exceeds the {len(train_source)} train examples")
    total_steps = _steps(config, len(train_source), batch_size)
    optimizer = make_optimizer(config, total_steps)
    seed = int(config.get("rng_seed", 0))
    smoothing = float(config.get("label_smoothing", 0.0) or 0.0)
    clip_shape = (record.num_frames, record.image_size, record.image_size, 3)
    heads = ((None, 0, record.num_classes),)  # training fits the single ``label`` head
    return _Run(
        config=config,
        workdir=workdir,
        record=record,
        preprocessing=record.resolve_preprocessing(),
        train_source=train_source,
        test_source=test_source,
        merging=merging,
        batch_size=batch_size,
        total_steps=total_steps,
        workers=int(training.get("workers") or min(8, os.cpu_count() or 1)),
        worker_kind=check_worker_kind(
            training.get("worker_kind", "threads"), "training.worker_kind"
        ),
        train_step=compiled_train_step(
            model, optimizer, mesh, smoothing=smoothing, merge_seed=merging.seed
        ),
        eval_step=compiled_step(eval_model, heads, mesh),
        init=functools.partial(init_state, eval_model, optimizer, seed, clip_shape),
        mesh=mesh,
    )


def _sources(config: ml_collections.ConfigDict, train_source, test_source) -> tuple[Any, Any]:
    """The train and test splits: the ones given, else the ones the config names."""
    from vtm_jax.data.datasets import open_split

    data_config = config.dataset_configs

    def opened(split: str) -> Any:
        return open_split(
            config.dataset_name,
            split,
            data_dir=data_config.data_dir,
            manual_dir=data_config.get("manual_dir"),
            config=(data_config.get("builder_options") or {}) or None,
        )

    if train_source is None:
        train_source = opened("train")
    if test_source is None:
        test_source = opened(data_config.get("split", "test"))
    return train_source, test_source


def _train_loop(run: _Run, state: Any, start: int, manager: Any, on_step, progress: bool) -> Any:
    """Steps ``start`` to the end, streaming batches; logs, tests and checkpoints on the way."""
    from tqdm import tqdm

    from vtm_jax.jobs.tensorboard import metric_writer

    log_path = join(run.workdir, LOG_FILE)
    _trim_log(log_path, start)
    eval_every = int(run.config.get("log_eval_steps", 0) or 0)
    save_every = int(run.config.get("checkpoint_steps", 0) or 0) or run.total_steps
    seed = int(run.config.get("rng_seed", 0))
    examples = TrainExamples(run.train_source, run.preprocessing, seed, run.batch_size)
    batches = train_batches(examples, start, run.total_steps, run.workers, run.worker_kind)
    bar = tqdm(
        total=run.total_steps,
        initial=start,
        desc="train",
        unit="step",
        disable=not progress,
        file=sys.stdout,
        dynamic_ncols=True,
    )
    # TensorBoard event files in the workdir, as Scenic's trainers write them (the JSONL log
    # stays the record that a resumed run trims and rewrites).
    writer = metric_writer(run.workdir, lead=jax.process_index() == 0)
    try:
        with epath.Path(log_path).open("a") as log:
            for done, batch in enumerate(batches, start + 1):
                state, step_metrics = run.train_step(state, device_mesh.put_batch(batch, run.mesh))
                test_now = (eval_every and done % eval_every == 0) or done == run.total_steps
                if done % LOG_EVERY == 0 or test_now:
                    entry = _log_entry(run, state, done, step_metrics, test_now, bar)
                    with writing(log_path):  # a full disk: one line naming the file
                        log.write(json.dumps(entry) + "\n")
                        log.flush()
                    writer.write_scalars(done, {k: v for k, v in entry.items() if k != "step"})
                    writer.flush()
                if done % save_every == 0 or done == run.total_steps:
                    _save_state(manager, done, state, join(run.workdir, STATE_DIR))
                bar.update(1)
                if on_step is not None:
                    on_step(done)
    finally:
        batches.close()  # grain's reader threads or processes stop with it
        bar.close()
        writer.close()
    return state


def _save_state(manager: Any, step: int, state: Any, state_dir: str) -> None:
    """Checkpoint ``state`` at ``step``; a failed save (a full disk) is one line naming the
    directory, and leaves the earlier checkpoints and no orbax temporary folder."""
    import orbax.checkpoint as ocp

    try:
        with writing(state_dir):
            manager.save(step, args=ocp.args.StandardSave(state))
            manager.wait_until_finished()
    except BaseException:
        for path in epath.Path(state_dir).glob("*.orbax-checkpoint-tmp*"):
            path.rmtree() if path.is_dir() else path.unlink()
        raise


def _log_entry(run: _Run, state: Any, done: int, step_metrics: dict, test_now: bool, bar) -> dict:
    """The step's log line: loss, accuracy, learning rate and, when due, the test accuracy."""
    metrics = {k: float(v) for k, v in step_metrics.items()}
    bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}")
    entry = {"step": done, "lr": learning_rate(run.config, run.total_steps, done), **metrics}
    if test_now:
        entry["test_accuracy"] = _test_accuracy(run, state["params"])
        bar.write(
            f"step {done}: loss {metrics['loss']:.4f}, test accuracy {entry['test_accuracy']:.4f}"
        )
    return entry


def _test_accuracy(run: _Run, params: Any) -> float:
    """Evaluation's top-1 on the test split (one centred view), streamed through grain."""
    from vtm_jax.jobs.evaluation import input as eval_input

    record = run.record
    heads = [(None, 0, record.num_classes)]
    view_shape = (1, record.num_frames, record.image_size, record.image_size, 3)
    load = eval_input.ExampleLoader(
        run.test_source,
        run.preprocessing,
        heads,
        num_clips=1,
        three_crops=False,
        view_shape=view_shape,
    )
    counts = {"count": 0, "top1": 0}
    indices = range(len(run.test_source))
    reading = eval_input.loaded_batches(load, indices, run.batch_size, run.workers, run.worker_kind)
    try:
        for loaded in reading:
            # A fixed shape (the last batch padded and masked): one compile for every batch.
            batch = eval_input.host_batch(loaded, run.batch_size, view_shape, len(heads))
            sums, _, _, _ = run.eval_step(params, device_mesh.put_batch(batch, run.mesh))
            for key in counts:
                counts[key] += int(sums[key])
    finally:
        getattr(reading, "close", lambda: None)()  # worker processes end now, not at collection
    return counts["top1"] / counts["count"] if counts["count"] else 0.0


def _export_record(
    config: ml_collections.ConfigDict,
    record: ModelRecord,
    source: Any,
    summary: dict[str, Any],
) -> ModelRecord:
    eval_merging = MergingSettings.from_dict(config.get("token_merging"))
    return dataclasses.replace(
        record,
        labels=source.labels,
        class_splits=source.class_splits,
        token_merging=eval_merging.to_dict(),
        trained={"config": json.loads(config.to_json_best_effort()), **summary},
    )


def _trim_log(path: str, step: int) -> None:
    """Drop log lines past the checkpoint a resumed run restarts from (they are redone)."""
    if not epath.Path(path).exists():
        return
    text = epath.Path(path).read_text()
    lines = [line + "\n" for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if _logged_step(line) <= step]
    with atomic_file(path) as f:
        f.writelines(lines)


def _logged_step(line: str) -> float:
    """The step of a log line; a line cut short (a disk that filled up) is past every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
