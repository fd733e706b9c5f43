"""Training and fine-tuning with optax, optionally with token merging in the forward pass.

``train(config, workdir)`` reads a config in Scenic's schema (``optimizer``,
``optimizer_configs``, ``lr_configs``, ``batch_size``, ``num_training_epochs`` or
``num_training_steps``, ``max_grad_norm``, ``log_eval_steps``, ``checkpoint_steps``,
``rng_seed``) and trains data-parallel over the local devices (the batch is sharded over a
``data`` mesh axis, the parameters replicated). ``config.training.token_merging`` merges tokens
while training: gradients flow through the merged values, the merge indices are constants
(they are computed under ``stop_gradient``), as in the paper's ``train_net`` path.

The order of the training examples is a pure function of ``(rng_seed, epoch)``, and the
optimiser state is checkpointed with orbax's CheckpointManager every ``checkpoint_steps``, so a
run that is killed resumes from its last checkpoint and ends with the same parameters as one
that was never interrupted. Scalars go to ``train_log.jsonl`` and, through
``clu.metric_writers``, to TensorBoard event files in the workdir. When it ends, the
parameters are exported as a vtm-jax checkpoint directory (``workdir/model``) whose record
says how it was trained.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vtm_jax.errors import UserError
from vtm_jax.outputs import atomic_file, write_json
from vtm_jax.record import ModelRecord
from vtm_jax.reduction import ReductionSettings

OPTIMIZERS = ("momentum", "adamw")
STATE_DIR = "checkpoints"
MODEL_DIR = "model"
LOG_FILE = "train_log.jsonl"
LOG_EVERY = 10  # steps between log lines (reading metrics back from the device costs a sync)


def learning_rate_schedule(lr: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Linear warm-up to ``base_learning_rate`` then cosine decay to ``end_learning_rate``."""
    base = float(lr.get("base_learning_rate", 0.1))
    warmup = int(lr.get("warmup_steps", 0))
    if not 0 <= warmup < total_steps:
        raise UserError(f"lr_configs.warmup_steps {warmup} must be in [0, {total_steps})")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=base,
        warmup_steps=warmup,
        decay_steps=total_steps,
        end_value=float(lr.get("end_learning_rate", 0.0)),
    )


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """Gradient clipping, then SGD with momentum (L2 weight decay) or AdamW (decoupled)."""
    name = config.get("optimizer", "momentum")
    options = dict(config.get("optimizer_configs", {}) or {})
    schedule = learning_rate_schedule(config.get("lr_configs", {}) or {}, total_steps)
    decay = float(options.get("weight_decay", 0.0))
    parts = []
    if config.get("max_grad_norm"):
        parts.append(optax.clip_by_global_norm(float(config.max_grad_norm)))
    if name == "momentum":
        if decay:
            parts.append(optax.add_decayed_weights(decay))
        parts.append(
            optax.sgd(schedule, momentum=float(options.get("momentum", 0.9)), nesterov=False)
        )
    elif name == "adamw":
        parts.append(
            optax.adamw(
                schedule,
                b1=float(options.get("beta1", 0.9)),
                b2=float(options.get("beta2", 0.999)),
                weight_decay=decay,
            )
        )
    else:
        raise UserError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    return optax.chain(*parts)


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The example order of one epoch: fixed by ``(seed, epoch)``, so resuming repeats it."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(seed: int, step: int, batch_size: int, num_examples: int) -> np.ndarray:
    """Example indices of training step ``step`` (epochs are whole batches; the tail of each
    epoch's order that does not fill a batch is left out, as with ``drop_remainder``)."""
    per_epoch = num_examples // batch_size
    epoch, index = divmod(step, per_epoch)
    return epoch_order(seed, epoch, num_examples)[index * batch_size : (index + 1) * batch_size]


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


class _Data:
    """Model-ready clips of one split, decoded once (training reads each example many times)."""

    def __init__(self, source: Any, preprocessing: Mapping[str, Any]):
        from vtm_jax.data.pipeline import eval_views

        clips, labels = [], []
        for example in source:
            clips.append(eval_views(example, preprocessing)[0])
            labels.append(int(example["label"]))
        self.clips = np.stack(clips).astype(np.float32)
        self.labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.labels)


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


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    on_step: Callable[[int], None] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the model a config describes on its dataset's train split; returns the summary.

    ``on_step(step)`` is called after every step (tests use it to interrupt a run).
    """
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from vtm_jax.attention import get_attention
    from vtm_jax.checkpoint import save_checkpoint
    from vtm_jax.config import preprocessing_from_config, record_from_config
    from vtm_jax.data.datasets import open_split
    from vtm_jax.metrics import metric_writer
    from vtm_jax.models.registry import build_model
    from vtm_jax.outputs import check_output_dir

    # Before the data is built or decoded: the workdir must take checkpoints and the model.
    check_output_dir(workdir, what="--workdir")
    _positive_int(config.get("batch_size"), "batch_size")
    _steps(config, num_examples=1, batch_size=1)  # the run's length checked before any data
    data_config = config.dataset_configs
    record = dataclasses.replace(
        record_from_config(config), preprocessing=preprocessing_from_config(data_config)
    )
    preprocessing = record.resolve_preprocessing()
    opened = {
        split: open_split(
            config.dataset_name,
            split,
            data_dir=data_config.data_dir,
            manual_dir=data_config.get("manual_dir"),
            config=(data_config.get("builder_options") or {}) or None,
        )
        for split in ("train", data_config.get("split", "test"))
    }
    train_source, test_source = opened["train"], opened[data_config.get("split", "test")]
    if train_source.num_classes != record.num_classes:
        raise UserError(
            f"the model has {record.num_classes} classes, {config.dataset_name} "
            f"has {train_source.num_classes}"
        )
    train_data, test_data = _Data(train_source, preprocessing), _Data(test_source, preprocessing)

    training = config.get("training", {}) or {}
    merging = ReductionSettings.from_dict(training.get("token_merging"))
    attention = get_attention(training.get("attention", "auto"))
    model = build_model(record, merging, attention)
    eval_model = build_model(record, ReductionSettings(), attention)

    devices = jax.local_devices()
    batch_size = int(config.batch_size)
    if batch_size % len(devices):
        raise UserError(f"batch_size {batch_size} is not a multiple of the {len(devices)} devices")
    if batch_size > len(train_data):
        raise UserError(f"batch_size {batch_size} exceeds the {len(train_data)} train examples")
    total_steps = _steps(config, len(train_data), batch_size)
    seed = int(config.get("rng_seed", 0))
    optimizer = make_optimizer(config, total_steps)
    smoothing = float(config.get("label_smoothing", 0.0) or 0.0)
    mesh = Mesh(np.asarray(devices), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("data"))

    def init_state() -> dict[str, Any]:
        clip = jnp.zeros((1, *train_data.clips.shape[1:]), jnp.float32)
        params = eval_model.init(jax.random.PRNGKey(seed), clip)["params"]
        return {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}

    @jax.jit
    def train_step(state, clips, labels):
        merge_rng = jax.random.fold_in(jax.random.PRNGKey(merging.seed), state["step"])

        def loss_fn(params):
            logits = model.apply({"params": params}, clips, merge_rng=merge_rng)
            return cross_entropy(logits, labels, smoothing), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        accuracy = (logits.argmax(-1) == labels).mean()
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, {"loss": loss, "accuracy": accuracy}

    @jax.jit
    def predict(params, clips):
        return eval_model.apply({"params": params}, clips).argmax(-1)

    def test_accuracy(params) -> float:
        correct = 0
        step = batch_size
        for start in range(0, len(test_data), step):
            clips = test_data.clips[start : start + step]
            pad = step - len(clips)  # a fixed shape: one compile for every batch
            if pad:
                clips = np.concatenate([clips, np.zeros((pad, *clips.shape[1:]), clips.dtype)])
            predicted = np.asarray(predict(params, jax.device_put(clips, sharded)))
            correct += int(
                (predicted[: step - pad] == test_data.labels[start : start + step]).sum()
            )
        return correct / len(test_data)

    os.makedirs(workdir, exist_ok=True)
    _check_same_config(workdir, config)
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, STATE_DIR)),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
    )
    state = jax.device_put(init_state(), replicated)
    start = 0
    if manager.latest_step() is not None:
        start = int(manager.latest_step())
        state = manager.restore(start, args=ocp.args.StandardRestore(state))
        state = jax.device_put(state, replicated)
        print(f"resuming from step {start} of {total_steps}")
    log_path = os.path.join(workdir, LOG_FILE)
    _trim_log(log_path, start)
    eval_every = int(config.get("log_eval_steps", 0) or 0)
    save_every = int(config.get("checkpoint_steps", 0) or 0) or total_steps
    bar = tqdm(
        total=total_steps,
        initial=start,
        desc="train",
        unit="step",
        disable=not progress,
        file=sys.stdout,
        dynamic_ncols=True,
    )
    began = time.time()
    metrics: dict[str, float] = {}
    # TensorBoard event files in the workdir, as Scenic's trainers write them (the JSONL log
    # stays the record that a resumed run trims and rewrites).
    writer = metric_writer(workdir, lead=jax.process_index() == 0)
    with open(log_path, "a") as log:
        for step in range(start, total_steps):
            idx = batch_indices(seed, step, batch_size, len(train_data))
            clips = jax.device_put(train_data.clips[idx], sharded)
            labels = jax.device_put(train_data.labels[idx], sharded)
            state, step_metrics = train_step(state, clips, labels)
            done = step + 1
            evaluate_now = (eval_every and done % eval_every == 0) or done == total_steps
            if done % LOG_EVERY == 0 or evaluate_now:
                metrics = {k: float(v) for k, v in step_metrics.items()}
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}")
                entry = {"step": done, "lr": _lr(config, total_steps, done), **metrics}
                if evaluate_now:
                    entry["test_accuracy"] = test_accuracy(state["params"])
                    bar.write(
                        f"step {done}: loss {metrics['loss']:.4f}, "
                        f"test accuracy {entry['test_accuracy']:.4f}"
                    )
                log.write(json.dumps(entry) + "\n")
                log.flush()
                writer.write_scalars(done, {k: v for k, v in entry.items() if k != "step"})
                writer.flush()
            if done % save_every == 0 or done == total_steps:
                manager.save(done, args=ocp.args.StandardSave(state))
                manager.wait_until_finished()
            bar.update(1)
            if on_step is not None:
                on_step(done)
    bar.close()
    writer.close()
    manager.close()
    accuracy = test_accuracy(state["params"])
    params = jax.device_get(state["params"])
    summary = {
        "steps": total_steps,
        "test_accuracy": accuracy,
        "test_examples": len(test_data),
        "train_examples": len(train_data),
        "train_token_merging": merging.to_dict(),
        "seconds_this_run": round(time.time() - began, 1),
    }
    export = os.path.join(workdir, MODEL_DIR)
    if not os.path.exists(os.path.join(export, "params")):
        save_checkpoint(export, params, _export_record(config, record, train_source, summary))
    print(f"test accuracy {accuracy:.4f} on {len(test_data)} examples; model in {export}")
    return summary


def _export_record(
    config: ml_collections.ConfigDict,
    record: ModelRecord,
    source: Any,
    summary: dict[str, Any],
) -> ModelRecord:
    eval_merging = ReductionSettings.from_dict(config.get("token_merging"))
    return dataclasses.replace(
        record,
        labels=source.labels,
        class_splits=source.class_splits,
        token_merging=eval_merging.to_dict(),
        trained={"config": json.loads(config.to_json_best_effort()), **summary},
    )


def _lr(config: ml_collections.ConfigDict, total_steps: int, step: int) -> float:
    return float(learning_rate_schedule(config.get("lr_configs", {}) or {}, total_steps)(step))


def _check_same_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """A workdir holds one run: resuming with another config would mix two trainings."""
    path = os.path.join(workdir, "config.json")
    current = json.loads(config.to_json_best_effort())
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != current:
            changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise UserError(
                f"{workdir} holds a run with another config (differs in {', '.join(changed)}); "
                "use a new --workdir"
            )
        return
    write_json(path, current, indent=2)


def _trim_log(path: str, step: int) -> None:
    """Drop log lines past the checkpoint a resumed run restarts from (they are redone)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with atomic_file(path) as f:
        f.writelines(lines)
