"""Factorised-encoder ViViT: Scenic's tree, a torch reference for every mode, Scenic checkpoints."""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.reference.tome_oracle import parse_r
from tests.reference.torch_vivit_fe import factorised_vivit_forward
from vtm_jax.cli import main
from vtm_jax.merging import MergingSettings, layer_key
from vtm_jax.models.vivit_fe import FactorisedEncoderViViT, temporal_rng

FRAMES, SIZE = 8, 32  # tubelet (2, 8, 8): 4 frames of 16 patches (+ CLS = 17 tokens each)


def test_param_tree_is_scenic_fe_b():
    model = FactorisedEncoderViViT(num_classes=400)
    video = jax.ShapeDtypeStruct((1, 32, 224, 224, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), video)["params"]
    # scenic_vivit.md §1.5: ViViT-B factorised encoder (12 spatial + 4 temporal layers).
    assert sum(np.prod(p.shape) for p in jax.tree.leaves(params)) == 115_062_928
    assert set(params) == {
        "embedding",
        "SpatialTransformer",
        "TemporalTransformer",
        "cls_SpatialTransformer",
        "cls_TemporalTransformer",
        "output_projection",
    }
    assert params["SpatialTransformer"]["posembed_input"]["pos_embedding"].shape == (1, 197, 768)
    assert params["TemporalTransformer"]["posembed_input"]["pos_embedding"].shape == (1, 17, 768)
    assert len([k for k in params["TemporalTransformer"] if k.startswith("encoderblock")]) == 4


@pytest.fixture(scope="module")
def small():
    model = FactorisedEncoderViViT(
        num_classes=6,
        hidden_size=32,
        spatial_num_layers=3,
        spatial_num_heads=4,
        spatial_mlp_dim=64,
        temporal_num_layers=2,
        temporal_num_heads=2,
        temporal_mlp_dim=48,
        patch_size=(2, 8, 8),
    )
    video = jax.random.normal(jax.random.PRNGKey(0), (2, FRAMES, SIZE, SIZE, 3))
    params = model.init(jax.random.PRNGKey(1), video)["params"]
    # Zero-initialised class tokens and head would hide mistakes; give them values.
    keys = iter(jax.random.split(jax.random.PRNGKey(2), 8))
    for name in ("cls_SpatialTransformer", "cls_TemporalTransformer"):
        params[name] = jax.random.normal(next(keys), params[name].shape)
    head = params["output_projection"]
    head["kernel"] = jax.random.normal(next(keys), head["kernel"].shape)
    return model, jax.tree.map(np.asarray, params), np.asarray(video)


CASES = [
    dict(),
    dict(mode="merge", r=3),
    dict(mode="merge", r=4, schedule=-1.0, temporal_r=1),
    dict(mode="random_merge", r=3),
    dict(mode="drop", r=3, temporal_r=1),
    dict(mode="random_drop", r=3),
    dict(mode="random_merge", r=3, temporal_r=1),
    dict(mode="hybrid", r=3, threshold=0.8),
    dict(mode="merge", r=3, prop_attn=False),
]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "r0"
)
def test_matches_torch_reference(small, case):
    model, params, video = small
    merging = MergingSettings.from_dict(case)
    got = np.asarray(model.clone(merging=merging).apply({"params": params}, jnp.asarray(video)))

    def random_scores(step, shape, rng=None):
        key = jax.random.fold_in(rng, step) if rng is not None else layer_key(merging, step)
        return torch.from_numpy(np.array(jax.random.uniform(key, shape)))

    temporal_key = temporal_rng(merging, None)

    with torch.no_grad():
        expected = factorised_vivit_forward(
            params,
            video,
            # r lists from the oracle's parse_r, not from vtm_jax.
            parse_r(model.spatial_num_layers, (case.get("r", 0), case.get("schedule", 0.0))),
            [case.get("temporal_r", 0)] * model.temporal_num_layers,
            temporal_random_scores=lambda step, shape: random_scores(step, shape, temporal_key),
            mode=merging.mode,
            prop_attn=merging.prop_attn,
            threshold=merging.rule_options.get("threshold", 0.0),
            random_scores=random_scores,
        ).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    if case:
        unreduced = model.apply({"params": params}, jnp.asarray(video))
        assert np.abs(got - np.asarray(unreduced)).max() > 1e-2


def test_token_plan_per_frame():
    model = FactorisedEncoderViViT(num_classes=400, merging=MergingSettings(mode="merge", r=18))
    plan = model.token_plan(32, 224)
    # 197 tokens per frame (196 + CLS), r=18 per frame; then 17 untouched temporal tokens.
    assert [p.tokens_out for p in plan[:3]] == [179, 161, 143]
    assert [p.tokens_out for p in plan[12:]] == [17] * 4
    base = FactorisedEncoderViViT(num_classes=400).analytic_macs(32, 224)["total"]
    assert base / 1e9 == pytest.approx(284.4, rel=0.01)  # ViViT paper: 284.4 GFLOPs (MACs)


def test_scenic_checkpoint_converts(small, tmp_path):
    model, params, video = small
    state = {"optimizer": {"target": params}}
    (tmp_path / "checkpoint").write_bytes(flax.serialization.msgpack_serialize(state))
    ckpt = tmp_path / "ckpt"
    # No --num-frames/--image-size: a factorised encoder's embeddings say its input size.
    assert (
        main(
            [
                "convert",
                "--source",
                "scenic",
                "--input",
                str(tmp_path / "checkpoint"),
                "--output",
                str(ckpt),
            ]
        )
        == 0
    )
    np.save(tmp_path / "clip.npy", video[0])
    out = tmp_path / "logits.npy"
    args = ["predict", "--checkpoint", str(ckpt), "--video", str(tmp_path / "clip.npy")]
    assert main([*args, "--r", "3", "--save-logits", str(out)]) == 0
    merged = model.clone(merging=MergingSettings(mode="merge", r=3))
    np.testing.assert_allclose(
        np.load(out), merged.apply({"params": params}, video[:1])[0], atol=1e-5
    )


def test_mismatched_scenic_tree_is_named(small, tmp_path, capsys):
    _, params, _ = small
    broken = jax.tree.map(lambda a: a, params)
    del broken["TemporalTransformer"]["encoderblock_1"]["MlpBlock_0"]
    (tmp_path / "checkpoint").write_bytes(flax.serialization.msgpack_serialize({"params": broken}))
    args = ["convert", "--source", "scenic", "--input", str(tmp_path / "checkpoint")]
    assert main([*args, "--output", str(tmp_path / "ckpt")]) == 2
    assert "missing TemporalTransformer/encoderblock_1/MlpBlock_0" in capsys.readouterr().err


def test_bench_factorised_config(capsys):
    shrink = [
        "--config.model.hidden_size=32",
        "--config.model.patches.size=(8, 8, 2)",
        "--config.dataset_configs.num_frames=4",
        "--config.dataset_configs.crop_size=32",
        "--config.token_merging.r=4",
        "--config.token_merging.temporal_r=1",
        "--config.bench.iterations=1",
    ]
    for part in ("spatial", "temporal"):
        shrink += [f"--config.model.{part}_transformer.{f}=2" for f in ("num_layers", "num_heads")]
        shrink += [f"--config.model.{part}_transformer.mlp_dim=64"]
    assert main(["bench", "--config=configs/vivit_b_fe_k400.py", *shrink]) == 0
    out = capsys.readouterr().out
    # 17 tokens per frame (16 + CLS) lose 4 then 4; 3 temporal tokens (2 + CLS) lose 1, then
    # the clamp allows no more.
    assert "tokens per layer: [13, 9, 2, 2]" in out
