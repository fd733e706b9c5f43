"""Another frame count than the checkpoint's: the position-embedding choices, every backbone's
temporal tables, and `vtm-jax eval` with dataset_configs.num_frames changed."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from vtm_jax.checkpoints.frame_count import change_frames, resample_linear
from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.checkpoints.store import load_checkpoint
from vtm_jax.cli import main
from vtm_jax.errors import UserError
from vtm_jax.models.registry import build_model, check_params_fit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POS = ("Transformer", "posembed_input", "pos_embedding")


def table(params, path=POS):
    for key in path:
        params = params[key]
    return np.asarray(params)


def test_paper_zeroes_the_vivit_positions(tiny_checkpoint):
    params, record = load_checkpoint(tiny_checkpoint("vivit"))
    before = table(params).copy()
    assert before.shape == (1, 1 + 8 * 16, 32) and np.abs(before).min() > 0
    new, new_record = change_frames(params, record, 8, "paper")
    # 8 frames: 4 tubelet slots x 16 patches, plus the class token's entry, all zeros.
    assert table(new).shape == (1, 1 + 4 * 16, 32)
    assert not table(new).any()
    assert new_record.num_frames == 8 and record.num_frames == 16
    np.testing.assert_array_equal(table(params), before)  # the caller's tree is untouched
    # Everything else is the checkpoint's own.
    flat_old = jax.tree_util.tree_leaves_with_path(params)
    flat_new = dict(jax.tree_util.tree_leaves_with_path(new))
    for path, value in flat_old:
        if "posembed_input" not in jax.tree_util.keystr(path):
            np.testing.assert_array_equal(flat_new[path], value)
    model = build_model(new_record)
    check_params_fit(model, new, new_record.input)
    logits = model.apply({"params": new}, np.zeros((1, 8, 32, 32, 3), np.float32))
    assert logits.shape == (1, 8) and np.isfinite(logits).all()


def test_interpolate_resamples_the_temporal_positions(tiny_checkpoint):
    params, record = load_checkpoint(tiny_checkpoint("vivit"))
    old = table(params)
    half, _ = change_frames(params, record, 8, "interpolate")
    got = table(half)
    assert got.shape == (1, 1 + 4 * 16, 32)
    np.testing.assert_array_equal(got[:, 0], old[:, 0])  # the class token's entry is kept
    slots = old[:, 1:].reshape(1, 8, 16, 32)
    # Halving the slots averages each neighbouring pair, patch by patch.
    want = (slots[:, 0::2] + slots[:, 1::2]) / 2
    np.testing.assert_allclose(got[:, 1:].reshape(1, 4, 16, 32), want, rtol=1e-6, atol=1e-7)
    double, rec = change_frames(params, record, 32, "interpolate")
    assert table(double).shape == (1, 1 + 16 * 16, 32) and rec.num_frames == 32
    same, _ = change_frames(params, record, 16, "interpolate")
    np.testing.assert_array_equal(table(same), old)
    check_params_fit(build_model(rec), double, rec.input)


def test_resample_linear():
    x = np.arange(4.0).reshape(1, 4, 1)
    np.testing.assert_allclose(resample_linear(x, 2, axis=1)[0, :, 0], [0.5, 2.5])
    np.testing.assert_allclose(
        resample_linear(x, 8, axis=1)[0, :, 0], [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3]
    )


@pytest.mark.parametrize(
    ("architecture", "model", "path", "old", "new"),
    [
        ("timesformer", {"patch_size": [16, 16]}, ("time_embedding",), (1, 8, 4), (1, 16, 4)),
        (
            "motionformer",
            {"patch_size": [2, 16, 16]},
            ("temporal_embedding",),
            (1, 4, 4),
            (1, 8, 4),
        ),
        (
            "vivit_factorised_encoder",
            {"patch_size": [2, 16, 16], "classifier": "token"},
            ("TemporalTransformer", "posembed_input", "pos_embedding"),
            (1, 1 + 4, 4),
            (1, 1 + 8, 4),
        ),
    ],
)
def test_other_backbones_temporal_tables(architecture, model, path, old, new):
    record = ModelRecord.from_json(
        {
            "architecture": architecture,
            "model": {**model, "num_classes": 1},  # a record names its classes
            "input": {"num_frames": 8, "image_size": 224},
        }
    )
    params = {"other": np.ones(3)}
    node = params
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = np.random.default_rng(0).normal(size=old).astype(np.float32)
    for positions in ("paper", "interpolate"):
        got, rec = change_frames(params, record, 16, positions)
        assert table(got, path).shape == new and rec.num_frames == 16
        assert (not table(got, path).any()) is (positions == "paper")
        assert got["other"] is params["other"]


def test_videomae_needs_no_table(tiny_checkpoint):
    params, record = load_checkpoint(tiny_checkpoint("videomae", frames=8))
    for positions in ("paper", "interpolate"):
        new, rec = change_frames(params, record, 16, positions)
        assert jax.tree.all(jax.tree.map(lambda a, b: a is b, new, params))
        check_params_fit(build_model(rec), new, rec.input)


def test_bad_frame_counts(tiny_checkpoint):
    params, record = load_checkpoint(tiny_checkpoint("vivit"))
    for frames, message in [(7, "not a positive multiple of its tubelet length 2"), (0, "tubelet")]:
        with pytest.raises(UserError, match=message):
            change_frames(params, record, frames)
    with pytest.raises(UserError, match="valid: paper, interpolate"):
        change_frames(params, record, 8, "nearest")
    with pytest.raises(UserError, match="cannot change its frame count"):
        change_frames(params, dataclasses.replace(record, architecture="resnet"), 8)


def test_eval_at_half_the_frames(tmp_path, tiny_checkpoint, capsys):
    args = [
        "eval",
        f"--config={REPO}/configs/vivit_synthetic.py",
        f"--config.checkpoint={tiny_checkpoint('vivit')}",
        f"--config.dataset_configs.data_dir={tmp_path / 'data'}",
        "--config.dataset_configs.builder_options.test_examples=4",
        "--config.dataset_configs.builder_options.train_examples=4",
        "--config.dataset_configs.test_batch_size=4",
        "--config.dataset_configs.num_frames=8",
    ]
    for positions in ("paper", "interpolate"):
        results = tmp_path / f"{positions}.json"
        extra = [f"--config.eval.position_embeddings={positions}"]
        assert main([*args, *extra, f"--config.results_path={results}"]) == 0
        run = json.loads(results.read_text())
        assert run["complete"] and run["run"]["preprocessing"]["num_frames"] == 8
        assert run["run"]["frames"] == {
            "checkpoint": 16,
            "evaluated": 8,
            "position_embeddings": positions,
        }
        assert "16-frame checkpoint on 8 frames" in capsys.readouterr().err
    assert main([*args, "--config.eval.position_embeddings=nearest"]) == 2
    assert "valid: paper, interpolate" in capsys.readouterr().err
    assert main([*args[:-1], "--config.dataset_configs.num_frames=5"]) == 2
    assert "tubelet length 2" in capsys.readouterr().err
