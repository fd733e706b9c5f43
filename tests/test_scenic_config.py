"""Scenic ViViT config files and checkpoints as they are: translation, loading, eval, bench."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import serialization

from tests.scenic_fixtures import TINY_MODEL1, TINY_MODEL2, write_scenic_config
from vtm_jax.checkpoints.convert.sources import load_source
from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.checkpoints.store import load_checkpoint, load_record
from vtm_jax.cli import main
from vtm_jax.config.loading import load_config, record_from_config
from vtm_jax.config.scenic_checkpoint import checkpoint_record
from vtm_jax.errors import UserError
from vtm_jax.models.vivit import ViViT
from vtm_jax.models.vivit_fe import FactorisedEncoderViViT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Scenic's training and TFRecord fields, which vtm-jax reports instead of reading.
IGNORED_BOTH = {
    "checkpoint=True (Scenic's save-checkpoints switch)",
    "batch_size",
    "dataset_configs.augmentation_params",
    "dataset_configs.base_dir",
    "dataset_configs.do_multicrop_test",
    "dataset_configs.examples_per_subset",
    "dataset_configs.log_test_epochs",
    "dataset_configs.one_hot_labels",
    "dataset_configs.prefetch_to_device",
    "dataset_configs.tables",
    "datset_configs",
    "debug_eval",
    "debug_train",
    "init_from",
    "l2_decay_factor",
    "label_smoothing",
    "lr_configs",
    "max_grad_norm",
    "model.attention_dropout_rate",
    "model.dropout_rate",
    "model.temporal_encoding_config.kernel_init_method",
    "multicrop_clips_per_device",
    "num_training_epochs",
    "optimizer",
    "optimizer_configs",
    "rng_seed",
    "trainer_name",
    "write_summary",
}
IGNORED_MODEL2 = {"checkpoint_steps", "model.temporal_encoding_config.n_sampled_frames"}


def _ignored(err: str) -> set[str]:
    lines = [line for line in err.splitlines() if "ignored Scenic fields" in line]
    assert len(lines) == 1, err  # reported once
    return set(lines[0].split("ignored Scenic fields: ", 1)[1].split(", "))


def test_k400_model1_config(tmp_path, capsys):
    config = load_config([f"--config={write_scenic_config(tmp_path, 1)}"])
    assert record_from_config(config) == ModelRecord(
        architecture="vivit",
        model={
            "num_classes": 400,
            "hidden_size": 768,
            "patch_size": [2, 16, 16],  # Scenic's (16, 16, 2) is (h, w, t)
            "classifier": "token",
            "representation_size": None,
            "num_heads": 12,
            "mlp_dim": 3072,
            "num_layers": 12,
        },
        num_frames=32,
        image_size=224,
    )
    data = config.dataset_configs
    assert (data.num_frames, data.stride, data.min_resize, data.crop_size) == (32, 2, 256, 224)
    assert tuple(data.mean) == tuple(data.std) == (0.5, 0.5, 0.5)  # zero_centering
    assert (data.num_test_clips, data.do_three_spatial_crops, data.test_batch_size) == (4, True, 8)
    assert config.checkpoint is None and "token_merging" not in config
    assert _ignored(capsys.readouterr().err) == IGNORED_BOTH


def test_k400_model2_config(tmp_path, capsys):
    config = load_config([f"--config={write_scenic_config(tmp_path, 2)}"])
    record = record_from_config(config)
    assert record.architecture == "vivit_factorised_encoder"
    assert record.model == {
        "num_classes": 400,
        "hidden_size": 768,
        "patch_size": [2, 16, 16],
        "classifier": "token",
        "representation_size": None,
        "spatial_num_layers": 12,
        "spatial_num_heads": 12,
        "spatial_mlp_dim": 3072,
        "temporal_num_layers": 4,
        "temporal_num_heads": 12,
        "temporal_mlp_dim": 3072,
    }
    assert _ignored(capsys.readouterr().err) == IGNORED_BOTH | IGNORED_MODEL2


def test_overrides_of_fields_the_file_lacks(tmp_path, capsys):
    path = write_scenic_config(tmp_path, 1)
    config = load_config(
        [
            f"--config={path}",
            "--config.token_merging.mode=merge",
            "--config.token_merging.r=300",
            "--config.token_merging.threshold=0.4",
            "--config.checkpoint=/some/checkpoint",  # a bool in the file
            "--config.model.representation_size=768",  # None in the file
            "--config.dataset_configs.data_dir=/data",
            "--config.dataset_configs.zero_centering=False",
            "--config.eval.limit=3",
        ]
    )
    assert (config.token_merging.mode, config.token_merging.r) == ("merge", 300)
    assert config.token_merging.threshold == 0.4 and config.token_merging.schedule == 0
    assert config.checkpoint == "/some/checkpoint" and config.eval.limit == 3
    assert record_from_config(config).model["representation_size"] == 768
    assert tuple(config.dataset_configs.mean) == (0.0,) * 3
    assert tuple(config.dataset_configs.std) == (1.0,) * 3
    # A typo is still an error.
    with pytest.raises(UserError, match="token_merging has no field 'rr'"):
        load_config([f"--config={path}", "--config.token_merging.rr=3"])


@pytest.mark.parametrize(
    "name", ["vivit_b_k400", "vivit_b_fe_k400", "vivit_tiny", "vivit_synthetic"]
)
def test_own_configs_have_no_ignored_fields(name, capsys):
    load_config([f"--config={REPO}/configs/{name}.py"])
    assert "ignored" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "--config.model.attention_config.type=factorized_transformer_block",
            "is not supported",
        ),
        ("--config.model.classifier=gmp", "model.classifier 'gmp' is not supported"),
        ("--config.model.temporal_encoding_config.method=temporal_sampling", "3d_conv"),
        ("--config.model_dtype_str=bfloat16", "runs float32"),
        ("--config.model.patches.size=(16, 16)", "(h, w, t)"),
    ],
)
def test_unsupported_values_are_errors(tmp_path, override, message):
    path = write_scenic_config(tmp_path, 1)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config([f"--config={path}", override])


def _tiny_params(model: int, representation_size: int | None, image_size: int = 32) -> dict:
    common = dict(
        num_classes=8,
        hidden_size=16,
        patch_size=(2, 16, 16),
        representation_size=representation_size,
    )
    if model == 1:
        module = ViViT(**common, num_heads=2, mlp_dim=32, num_layers=1)
    else:
        module = FactorisedEncoderViViT(
            **common,
            spatial_num_heads=2,
            spatial_mlp_dim=32,
            spatial_num_layers=1,
            temporal_num_heads=2,
            temporal_mlp_dim=32,
            temporal_num_layers=1,
        )
    params = module.init(
        jax.random.PRNGKey(0), np.zeros((1, 4, image_size, image_size, 3), np.float32)
    )
    leaves, tree = jax.tree.flatten(jax.device_get(params["params"]))
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [
        np.asarray(v + 0.05 * jax.random.normal(k, v.shape))
        for v, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(tree, leaves)


def _write_msgpack(path, params: dict, layout: str) -> None:
    """A Scenic checkpoint: flax.optim's ``optimizer.target`` or the optax ``params`` state."""
    if layout == "optimizer.target":
        state = {"optimizer": {"target": params, "state": {"step": 7}}, "global_step": 7}
    else:
        state = {"params": params, "opt_state": {}, "global_step": 7, "model_state": {}}
    path.write_bytes(serialization.msgpack_serialize(state))


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = np.asarray(value)
    return out


@pytest.mark.parametrize("layout", ["optimizer.target", "params"])
@pytest.mark.parametrize("model", [1, 2])
def test_scenic_checkpoint_layouts(tmp_path, model, layout):
    params = _tiny_params(model, representation_size=8)
    ckpt = tmp_path / "checkpoint_7"
    _write_msgpack(ckpt, params, layout)
    # `vtm-jax convert --source scenic` reads it, pre-logits included ...
    _, converted = load_source("scenic", str(ckpt), num_frames=4, image_size=32)
    assert converted.model["representation_size"] == 8
    assert converted.input == {"num_frames": 4, "image_size": 32}
    # ... and so does `vtm-jax eval` with the Scenic config as the model's description (a
    # workdir of checkpoint_<step> files or the file itself).
    tiny = TINY_MODEL1 if model == 1 else TINY_MODEL2
    if model == 2:
        tiny = [a for a in tiny if "temporal_transformer.num_layers" not in a]
        tiny.append("--config.model.temporal_transformer.num_layers=1")
    for where in (tmp_path, ckpt):
        config = load_config(
            [
                f"--config={write_scenic_config(tmp_path, model)}",
                *tiny,
                "--config.model.representation_size=8",
                "--config.dataset_configs.num_classes=8",
                "--config.dataset_configs.num_frames=4",
                "--config.dataset_configs.crop_size=32",
                f"--config.checkpoint={where}",
            ]
        )
        described = checkpoint_record(config)
        assert load_record(config.checkpoint, scenic_record=described).model
        loaded, record = load_checkpoint(config.checkpoint, scenic_record=described)
        assert record.architecture == ("vivit" if model == 1 else "vivit_factorised_encoder")
        assert record.preprocessing["mean"] == [0.5] * 3
        got, want = _flat(loaded), _flat(params)
        assert got.keys() == want.keys() and "pre_logits/kernel" in got
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    # A config whose model does not fit the checkpoint is one clear error.
    config = load_config(
        [
            f"--config={write_scenic_config(tmp_path, model)}",
            *tiny,
            "--config.dataset_configs.num_classes=8",
            "--config.dataset_configs.num_frames=4",
            "--config.dataset_configs.crop_size=32",
            f"--config.checkpoint={ckpt}",
        ]
    )
    with pytest.raises(UserError, match="does not fit the config's model.*pre_logits"):
        load_checkpoint(config.checkpoint, scenic_record=checkpoint_record(config))


def test_eval_and_bench_run_scenic_config_unchanged(tmp_path, capsys):
    """The K400 model-1 file as it is, on the synthetic data with a tiny Scenic checkpoint."""
    config_path = write_scenic_config(tmp_path, 1)
    params = _tiny_params(1, representation_size=None, image_size=224)
    ckpt = tmp_path / "checkpoint"
    _write_msgpack(ckpt, params, "optimizer.target")
    results = tmp_path / "results.json"
    shared = [
        f"--config={config_path}",
        *TINY_MODEL1,
        "--config.dataset_configs.num_classes=8",  # the synthetic set's classes
        "--config.dataset_configs.num_frames=4",  # the synthetic videos have 16 frames
    ]
    args = [
        "eval",
        *shared,
        "--config.dataset_name=synthetic",
        f"--config.dataset_configs.data_dir={tmp_path / 'data'}",
        f"--config.checkpoint={ckpt}",
        f"--config.results_path={results}",
        "--config.eval.limit=3",
        "--config.token_merging.mode=merge",
        "--config.token_merging.r=50",
    ]
    assert main(args) == 0
    out = json.loads(results.read_text())
    assert out["complete"] and len(out["video_ids"]) == 3
    run = out["run"]
    assert (run["num_clips"], run["three_crops"]) == (4, True)  # Scenic's 4 x 3 views
    assert run["preprocessing"] == {
        "num_frames": 4,
        "stride": 2,
        "min_resize": 256,
        "crop_size": 224,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "sampling": "stride",
        # Scenic config files are read with Scenic's own input pipeline, 4x3 on "test".
        "protocol": "scenic",
        "is_test_split": True,
    }
    assert run["token_merging"]["r"] == 50
    err = capsys.readouterr().err
    assert err.count("ignored Scenic fields") == 1
    # Scenic's own dataset name is a clear error.
    assert main([a for a in args if "dataset_name" not in a]) == 2
    assert "Scenic's TFRecord loader" in capsys.readouterr().err
    # bench reads the same file (tiny here; full size by hand, see the report).
    assert main(["bench", *shared, "--config.dataset_configs.crop_size=32"]) == 0
    assert "tokens per layer" in capsys.readouterr().out
