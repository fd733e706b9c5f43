"""Scenic-style configs of ViViT models 3 and 4: the record they describe, what Scenic refuses,
a bare Scenic checkpoint read through the config, and ``vtm-jax eval`` and ``bench`` on it."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import serialization

from tests.scenic_fixtures import TINY_MODEL3, write_scenic_config
from tests.test_scenic_config import IGNORED_BOTH
from vtm_jax.checkpoints.store import load_checkpoint
from vtm_jax.cli import main
from vtm_jax.config.loading import load_config, record_from_config
from vtm_jax.config.scenic_checkpoint import checkpoint_record
from vtm_jax.errors import UserError
from vtm_jax.jobs.bench import bench_settings
from vtm_jax.merging import MergingSettings
from vtm_jax.models.registry import build_model


def _ignored(err: str) -> set[str]:
    lines = [line for line in err.splitlines() if "ignored Scenic fields" in line]
    assert len(lines) == 1, err
    return set(lines[0].split("ignored Scenic fields: ", 1)[1].split(", "))


@pytest.mark.parametrize(
    "model, order, architecture",
    [
        (3, "time_space", "vivit_factorised_self_attention"),
        (3, "space_time", "vivit_factorised_self_attention"),
        (4, None, "vivit_factorised_dot_product"),
    ],
)
def test_k400_configs_of_models_3_and_4(tmp_path, capsys, model, order, architecture):
    config = load_config(
        [f"--config={write_scenic_config(tmp_path, model, order or 'time_space')}"]
    )
    record = record_from_config(config)
    assert record.architecture == architecture
    want = {
        "num_classes": 400,
        "hidden_size": 768,
        "patch_size": [2, 16, 16],
        "classifier": "gap",
        "representation_size": None,
        "num_heads": 12,
        "mlp_dim": 3072,
        "num_layers": 12,
    }
    if order:
        want["attention_order"] = order
    assert record.model == want
    assert (record.num_frames, record.image_size) == (32, 224)
    # attention_order is read (model 3), not reported; everything else as for model 1.
    assert _ignored(capsys.readouterr().err) == IGNORED_BOTH
    assert build_model(record).attention == ("self_attention" if model == 3 else "dot_product")


@pytest.mark.parametrize(
    "model, override, message",
    [
        (
            3,
            "--config.model.classifier=token",
            "classifier 'token' is not available for .*valid: gap",
        ),
        (4, "--config.model.classifier=token", "classifier 'token' is not available"),
        (3, "--config.model.attention_config.attention_order=spacetime", "attention_order must be"),
        (4, "--config.model.num_heads=3", "num_heads must be even"),
    ],
)
def test_what_scenic_refuses_is_refused(tmp_path, model, override, message):
    with pytest.raises(UserError, match=message):
        config = load_config([f"--config={write_scenic_config(tmp_path, model)}", override])
        build_model(record_from_config(config))


def test_model_3_needs_its_attention_order(tmp_path):
    path = write_scenic_config(tmp_path, 3)
    text = path.read_text().replace(
        "  config.model.attention_config.attention_order = 'time_space'\n", ""
    )
    assert "attention_order" not in text
    path.write_text(text)
    with pytest.raises(UserError, match="attention_order must be one of time_space, space_time"):
        load_config([f"--config={path}"])


def _tiny_config(tmp_path, model: int, *extra: str):
    return load_config(
        [
            f"--config={write_scenic_config(tmp_path, model, 'space_time')}",
            *TINY_MODEL3,
            "--config.model.patches.size=(8, 8, 2)",
            "--config.dataset_configs.num_classes=8",
            "--config.dataset_configs.num_frames=4",
            "--config.dataset_configs.crop_size=32",
            *extra,
        ]
    )


@pytest.mark.parametrize("model", [3, 4])
def test_scenic_checkpoint_loads_through_the_config(tmp_path, model):
    """A bare Scenic msgpack file of model 3 or 4 reads as the model its config describes."""
    record = record_from_config(_tiny_config(tmp_path, model))
    module = build_model(record)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), np.zeros((1, 4, 32, 32, 3)))
    rng = np.random.default_rng(model)
    params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), shapes["params"])
    ckpt = tmp_path / "checkpoint_3"
    state = {"optimizer": {"target": params, "state": {"step": 3}}}
    ckpt.write_bytes(serialization.msgpack_serialize(state))
    config = _tiny_config(tmp_path, model, f"--config.checkpoint={ckpt}")
    loaded, loaded_record = load_checkpoint(
        config.checkpoint, scenic_record=checkpoint_record(config)
    )
    assert loaded_record.architecture == record.architecture
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(got, want)
    # A checkpoint of the other model does not fit: one clear error.
    other = _tiny_config(tmp_path, 7 - model, f"--config.checkpoint={ckpt}")
    with pytest.raises(UserError, match="does not fit the config's model"):
        load_checkpoint(other.checkpoint, scenic_record=checkpoint_record(other))


def test_eval_and_bench_run_a_model_3_config(tmp_path, capsys):
    """`vtm-jax eval` on the Scenic-style file as it is (a Scenic checkpoint, merging on), and
    bench's timing: merging costs fewer MACs than r=0."""
    shrink = [
        *TINY_MODEL3,
        "--config.model.patches.size=(8, 8, 2)",
        "--config.dataset_configs.num_classes=8",
        "--config.dataset_configs.num_frames=4",
        "--config.dataset_configs.crop_size=32",
        "--config.dataset_configs.min_resize=32",
    ]
    path = write_scenic_config(tmp_path, 3)
    record = record_from_config(load_config([f"--config={path}", *shrink]))
    shapes = jax.eval_shape(
        build_model(record).init, jax.random.PRNGKey(0), np.zeros((1, 4, 32, 32, 3))
    )
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), shapes["params"])
    ckpt = tmp_path / "checkpoint"
    ckpt.write_bytes(serialization.msgpack_serialize({"params": params}))
    results = tmp_path / "results.json"
    merge = ["--config.token_merging.mode=merge", "--config.token_merging.r=4"]
    args = [
        "eval",
        f"--config={path}",
        *shrink,
        *merge,
        "--config.dataset_name=synthetic",
        f"--config.dataset_configs.data_dir={tmp_path / 'data'}",
        "--config.dataset_configs.num_test_clips=1",
        "--config.dataset_configs.do_three_spatial_crops=False",
        f"--config.checkpoint={ckpt}",
        f"--config.results_path={results}",
        "--config.eval.limit=2",
    ]
    assert main(args) == 0
    out = json.loads(results.read_text())
    assert out["complete"] and len(out["video_ids"]) == 2
    assert out["run"]["token_merging"]["r"] == 4
    # bench's timing of r=0 and the config's setting (bench_settings: the command's core,
    # without its machine-peak GEMM).
    config = load_config([f"--config={path}", *shrink, *merge], command="bench")
    settings = [MergingSettings(), MergingSettings.from_dict(config.token_merging)]
    rows = {row["mode"]: row for row in bench_settings(record, settings, iterations=1)}
    assert rows["merge"]["tokens_per_layer"] == [12]  # 16 patches a frame, 4 merged
    assert rows["merge"]["gmacs_per_clip"] < rows["none"]["gmacs_per_clip"]
