"""vtm-jax train: optimisers, schedules, resume after an interruption, merging while training."""

from __future__ import annotations

import json
import os
import threading

import jax
import ml_collections
import numpy as np
import pytest

from tests.events import read_scalars
from vtm_jax.cli import main
from vtm_jax.config.blocks import token_merging_config, training_config
from vtm_jax.config.loading import load_config
from vtm_jax.errors import UserError
from vtm_jax.jobs.training.train import batch_indices, learning_rate_schedule, make_optimizer, train


def tiny_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
    """A 2-layer ViViT on 8 frames of 16x16 synthetic video (16 patches + CLS)."""
    config = ml_collections.ConfigDict()
    config.model_name = "vivit_classification"
    config.rng_seed = 3
    config.model = ml_collections.ConfigDict(
        {
            "attention_config": {"type": "spacetime"},
            "hidden_size": 32,
            "num_heads": 2,
            "mlp_dim": 64,
            "num_layers": 2,
            "patches": {"size": (8, 8, 2)},
            "classifier": "token",
            "representation_size": None,
            "temporal_encoding_config": {"method": "3d_conv"},
        }
    )
    config.dataset_name = "synthetic"
    config.dataset_configs = ml_collections.ConfigDict(
        {
            "data_dir": data_dir,
            "builder_options": {"frames": 8, "size": 16, "train_examples": 48, "test_examples": 16},
            "split": "test",
            "num_classes": 8,
            "num_frames": 8,
            "stride": 1,
            "min_resize": 16,
            "crop_size": 16,
            "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5),
        }
    )
    config.optimizer = "momentum"
    config.optimizer_configs = ml_collections.ConfigDict({"momentum": 0.9, "weight_decay": 1e-4})
    config.lr_configs = ml_collections.ConfigDict({"base_learning_rate": 0.05, "warmup_steps": 2})
    config.batch_size = 8
    config.num_training_steps = 12
    config.max_grad_norm = 1.0
    config.log_eval_steps = 6
    config.checkpoint_steps = 4
    config.training = training_config(attention="xla")
    config.token_merging = token_merging_config(mode="merge", r=4)
    config.update(overrides)
    return config


def _params(workdir: str):
    from vtm_jax.checkpoints.store import load_checkpoint

    return load_checkpoint(os.path.join(workdir, "model"))


def test_schedule_warms_up_then_decays_to_the_end_value():
    schedule = learning_rate_schedule(
        {"base_learning_rate": 0.1, "warmup_steps": 10, "end_learning_rate": 0.001}, 100
    )
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), 0.05, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(10)), 0.1, rtol=1e-6)
    assert 0.001 < float(schedule(55)) < 0.1
    np.testing.assert_allclose(float(schedule(100)), 0.001, rtol=1e-5)
    with pytest.raises(UserError, match="warmup_steps"):
        learning_rate_schedule({"warmup_steps": 100}, 100)


def test_optimizers_clip_and_decay():
    params = {"w": jax.numpy.ones(3)}
    grads = {"w": jax.numpy.array([30.0, 40.0, 0.0])}  # norm 50
    config = ml_collections.ConfigDict(
        {
            "optimizer": "momentum",
            "optimizer_configs": {"momentum": 0.0, "weight_decay": 0.0},
            "lr_configs": {"base_learning_rate": 1.0, "warmup_steps": 0},
            "max_grad_norm": 5.0,
        }
    )
    opt = make_optimizer(config, 10)
    updates, _ = opt.update(grads, opt.init(params), params)
    # Clipped to norm 5 before the (lr 1) SGD step.
    np.testing.assert_allclose(updates["w"], [-3.0, -4.0, 0.0], rtol=1e-6)
    config.optimizer = "adamw"
    config.optimizer_configs = {"weight_decay": 0.5}
    opt = make_optimizer(config, 10)
    zero = {"w": jax.numpy.zeros(3)}
    updates, _ = opt.update(zero, opt.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.5] * 3, rtol=1e-6)  # decoupled decay only
    config.optimizer = "lamb"
    with pytest.raises(UserError, match="unknown optimizer 'lamb'"):
        make_optimizer(config, 10)


def test_batches_are_a_function_of_seed_and_step():
    first = [batch_indices(0, s, 8, 50) for s in range(6)]  # 6 batches per epoch
    assert all(len(b) == 8 for b in first)
    assert len(set(np.concatenate(first).tolist())) == 48  # no repeats within an epoch
    np.testing.assert_array_equal(batch_indices(0, 3, 8, 50), first[3])
    assert not np.array_equal(batch_indices(0, 6, 8, 50), first[0])  # a new epoch, a new order
    assert not np.array_equal(batch_indices(1, 0, 8, 50), first[0])


def test_streamed_batches_follow_batch_indices():
    """grain's stream from any step reads exactly ``batch_indices`` of each step, in order,
    across epoch boundaries: a resumed run reads what an uninterrupted one does."""
    from vtm_jax.jobs.training.input import TrainExamples, train_batches

    class Indices(TrainExamples):
        def __call__(self, position):
            return {"index": np.int64(self.index(position))}

    examples = Indices(range(50), {}, seed=0, batch_size=8)  # 6 batches per epoch
    streamed = [b["index"] for b in train_batches(examples, 3, 14, workers=2)]
    assert len(streamed) == 11
    for step, indices in enumerate(streamed, 3):
        np.testing.assert_array_equal(indices, batch_indices(0, step, 8, 50))


def test_training_learns_and_exports_a_checkpoint(tmp_path):
    config = tiny_config(str(tmp_path / "data"), num_training_steps=30, log_eval_steps=12)
    summary = train(config, str(tmp_path / "run"), progress=False)
    log = [json.loads(line) for line in open(tmp_path / "run" / "train_log.jsonl")]
    assert [e["step"] for e in log if "test_accuracy" in e] == [12, 24, 30]
    assert log[-1]["loss"] < log[0]["loss"]
    # The same scalars as TensorBoard events in the workdir (clu.metric_writers, as Scenic).
    scalars = read_scalars(tmp_path / "run")
    assert set(scalars) == {"loss", "accuracy", "lr", "test_accuracy"}
    for tag in scalars:
        logged = [(e["step"], e[tag]) for e in log if tag in e]
        assert [step for step, _ in scalars[tag]] == [step for step, _ in logged]
        assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in logged], rel=1e-6)
    params, record = _params(str(tmp_path / "run"))
    assert record.architecture == "vivit"
    assert record.trained["steps"] == 30
    assert record.trained["test_accuracy"] == summary["test_accuracy"]
    assert record.labels[0] == "left_slow"
    assert record.token_merging["mode"] == "merge"  # the config's eval setting
    assert record.preprocessing["crop_size"] == 16
    # The exported checkpoint evaluates to the accuracy the run recorded.
    from vtm_jax.data.datasets import open_split
    from vtm_jax.jobs.evaluation.evaluate import evaluate
    from vtm_jax.merging import MergingSettings

    source = open_split(
        "synthetic",
        "test",
        data_dir=str(tmp_path / "data"),
        config=config.dataset_configs.builder_options,
    )
    results = evaluate(
        str(tmp_path / "run" / "model"),
        source,
        merging=MergingSettings(),
        batch_size=8,
        attention="xla",
        progress=False,
    )
    assert results["metrics"]["top1"] == pytest.approx(summary["test_accuracy"])


def test_an_interrupted_run_resumes_to_the_same_parameters(tmp_path):
    data = str(tmp_path / "data")
    train(tiny_config(data), str(tmp_path / "straight"), progress=False)

    def interrupt(step: int) -> None:
        if step == 6:  # after the checkpoint at 4: steps 5 and 6 are redone
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data), str(tmp_path / "resumed"), on_step=interrupt, progress=False)
    assert not os.path.exists(tmp_path / "resumed" / "model")
    train(tiny_config(data), str(tmp_path / "resumed"), progress=False)
    straight, _ = _params(str(tmp_path / "straight"))
    resumed, _ = _params(str(tmp_path / "resumed"))
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "resumed" / "train_log.jsonl")]
    assert steps == sorted(set(steps))  # redone steps are logged once


def test_training_with_merging_changes_the_gradients(tmp_path):
    data = str(tmp_path / "data")
    plain = tiny_config(data, num_training_steps=4)
    merged = tiny_config(data, num_training_steps=4)
    merged.training.token_merging = token_merging_config(mode="merge", r=4)
    train(plain, str(tmp_path / "plain"), progress=False)
    summary = train(merged, str(tmp_path / "merged"), progress=False)
    assert summary["train_token_merging"]["mode"] == "merge"
    a, _ = _params(str(tmp_path / "plain"))
    b, _ = _params(str(tmp_path / "merged"))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(b))
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    differ = [not np.allclose(x, y) for x, y in pairs]
    assert any(differ)


def test_cli_train_errors_are_one_line(tmp_path, capsys):
    config = tmp_path / "config.py"
    config.write_text(
        "import ml_collections\n"
        "def get_config():\n"
        "    c = ml_collections.ConfigDict({'dataset_name': 'synthetic'})\n"
        "    c.model = ml_collections.ConfigDict({'hidden_size': 32, 'num_heads': 2,\n"
        "        'mlp_dim': 64, 'num_layers': 1, 'patches': {'size': (8, 8, 2)}})\n"
        "    c.dataset_configs = ml_collections.ConfigDict(\n"
        "        {'num_classes': 8, 'num_frames': 8, 'crop_size': 16})\n"
        "    return c\n"
    )
    assert main(["train", f"--config={config}", "--workdir", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().err.strip() == "vtm-jax: error: train needs config.batch_size"


def test_a_workdir_holds_one_run(tmp_path):
    data = str(tmp_path / "data")
    train(tiny_config(data, num_training_steps=4), str(tmp_path / "run"), progress=False)
    with pytest.raises(UserError, match="another config .*num_training_steps"):
        train(tiny_config(data, num_training_steps=8), str(tmp_path / "run"), progress=False)


class CountingSplit:
    """A split that records, at every read, how far reading is ahead of the trained steps."""

    def __init__(self, source, batch_size):
        self.source, self.batch_size = source, batch_size
        self.lock = threading.Lock()
        self.reads, self.consumed, self.ahead = 0, 0, []

    def __getattr__(self, name):  # num_classes, labels, class_splits ...
        return getattr(self.source, name)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        with self.lock:
            self.reads += 1
            self.ahead.append(self.reads - self.consumed)
        return self.source[i]

    def trained(self, step):
        self.consumed = step * self.batch_size


def test_the_training_block_takes_command_line_overrides():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    flags = ["--config.training.workers=3", "--config.training.token_merging.r=8"]
    config = load_config([f"--config={repo}/configs/vivit_demo.py", *flags], command="train")
    assert config.training.workers == 3 and config.training.token_merging.r == 8
    assert config.training.attention == "xla"


def test_training_streams_its_examples(tmp_path):
    """Training reads each step's batch a few steps ahead, never the whole split up front."""
    from vtm_jax.data.datasets import open_split
    from vtm_jax.jobs.training.input import PREFETCH_BATCHES

    data, batch = str(tmp_path / "data"), 4
    config = tiny_config(data, batch_size=batch, num_training_steps=12, log_eval_steps=0)
    config.training.workers = 2
    split = open_split(
        "synthetic", "train", data_dir=data, config=config.dataset_configs.builder_options
    )
    counting = CountingSplit(split, batch)
    summary = train(
        config, str(tmp_path / "run"), train_source=counting, on_step=counting.trained,
        progress=False,
    )  # fmt: skip
    assert summary["steps"] == 12 and counting.reads == 12 * batch
    # In memory at once: the prefetched batches, the batch being trained on, one per worker.
    window = (PREFETCH_BATCHES + 1) * batch + config.training.workers
    assert max(counting.ahead) <= window < len(split)
