"""The ``sta`` mode against its authors' code (Mark12Ding/STA at faf10be5), at three levels.

The fixtures are outputs of the authors' ``model_vit.py`` written by
``scripts/method_fixtures/sta.py`` (its docstring says what each holds): (1) ``merge`` at the
three stages on random inputs, (2) one ``Block`` then a stage, (3) the logits of a tiny random
VideoMAE-like ``VisionTransformer``. Kept indices must be equal exactly; values within 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vtm_jax
from vtm_jax.checkpoints.convert.hf_videomae import convert_videomae
from vtm_jax.checkpoints.convert.slowfast_keys import VIDEOMAE_KEYS, split_qkv
from vtm_jax.errors import UserError
from vtm_jax.merging import MergeContext, MergingSettings, Tokens
from vtm_jax.merging.methods import sta
from vtm_jax.models.encoder import EncoderBlock
from vtm_jax.models.registry import check_settings_apply
from vtm_jax.models.videomae import VideoMAE

FIXTURES = Path(__file__).parent / "fixtures"
COMMIT = "faf10be5af889afed737e13517c4904c8572c3d7"
DEPTH = 6  # the fixtures' depth: stages after blocks 0, 2 and 4
STAGE_LAYERS = (0, DEPTH // 3, 2 * DEPTH // 3)
GRID = (8, 4, 4)  # 16 frames, tubelet 2: the authors' 8, 4, 2 groups


def load(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"sta_{name}.npz") as data:
        arrays = dict(data)
    assert str(arrays["commit"]) == COMMIT and str(arrays["repo"]) == "Mark12Ding/STA"
    return arrays


def settings(r: int, **fields) -> MergingSettings:
    return MergingSettings(mode="sta", r=r, prop_attn=False, **fields)


def kept_from_index_source(source: np.ndarray, m: int) -> np.ndarray:
    """The original token at each output slot, from index-form source tracking."""
    kept = np.full((source.shape[0], m), -1)
    for b, row in enumerate(source):
        for original, slot in enumerate(row):
            if slot >= 0:
                kept[b, slot] = original
    return kept


# ---------------------------------------------------------------------------------------------
# Level 1: the reduction on random inputs


@pytest.mark.parametrize("case", ["a", "b"])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_stage_keeps_the_authors_tokens_in_their_order(case, stage):
    ref = load("merge")
    key = f"{case}/stage{stage}"
    x, metric, r = ref[f"{key}/x"], ref[f"{key}/metric"], int(ref[f"{case}/r"])
    assert sta.stage_index(STAGE_LAYERS[stage], DEPTH) == stage
    groups = sta.stage_groups(GRID, stage)
    assert groups == (8, 4, 2)[stage]
    keep = jax.jit(sta.stage_keep, static_argnums=(2, 3, 4))
    kept = np.asarray(keep(jnp.asarray(x), jnp.asarray(metric), groups, r, stage))
    np.testing.assert_array_equal(kept, ref[f"{key}/kept"])
    out = np.take_along_axis(x, kept[..., None], axis=1)
    np.testing.assert_allclose(out, ref[f"{key}/out"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_rule_protects_a_class_token_and_tracks_sources(stage):
    ref = load("merge")
    key = f"a/stage{stage}"
    x, metric, r = ref[f"{key}/x"], ref[f"{key}/metric"], int(ref["a/r"])
    cls_x = np.full((2, 1, x.shape[2]), 100.0, np.float32)  # would be pruned if unprotected
    x_cls = jnp.asarray(np.concatenate([cls_x, x], axis=1))
    m_cls = jnp.asarray(np.concatenate([metric[:, :1], metric], axis=1))
    n = x_cls.shape[1]
    ctx = MergeContext(settings(r), True, None, GRID, STAGE_LAYERS[stage], DEPTH)
    removed = sta.removed(n, r, ctx)
    assert removed == sta.stage_groups(GRID, stage) * r
    source = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (2, n))
    apply = jax.jit(lambda tokens, m: sta.apply_sta(tokens, m, removed, ctx))
    out = apply(Tokens(x_cls, jnp.ones((2, n, 1)), source), m_cls)
    assert out.x.shape[1] == n - removed
    np.testing.assert_array_equal(np.asarray(out.x[:, 0]), cls_x[:, 0])
    np.testing.assert_allclose(np.asarray(out.x[:, 1:]), ref[f"{key}/out"], atol=1e-5, rtol=0)
    kept = kept_from_index_source(np.asarray(out.source), n - removed)
    np.testing.assert_array_equal(kept[:, 1:] - 1, ref[f"{key}/kept"])
    assert kept[0, 0] == 0 and float(out.size.sum()) == 2 * (n - removed)


# ---------------------------------------------------------------------------------------------
# Level 2: one block with the authors' weights, then a stage


def block_params(ref: dict[str, np.ndarray], heads: int) -> dict:
    """The authors' ``Block`` weights (VideoMAE's names) as an EncoderBlock's parameters."""
    w = {k[2:]: v for k, v in ref.items() if k.startswith("w/")}
    width = w["norm1.weight"].shape[0]
    q, k, v = np.split(w["attn.qkv.weight"], 3)

    def qkv(weight):
        return weight.T.reshape(width, heads, width // heads)

    attn = {
        "query": {"kernel": qkv(q), "bias": w["attn.q_bias"].reshape(heads, -1)},
        "key": {"kernel": qkv(k)},
        "value": {"kernel": qkv(v), "bias": w["attn.v_bias"].reshape(heads, -1)},
        "out": {
            "kernel": w["attn.proj.weight"].T.reshape(heads, width // heads, width),
            "bias": w["attn.proj.bias"],
        },
    }
    return {
        "LayerNorm_0": {"scale": w["norm1.weight"], "bias": w["norm1.bias"]},
        "MultiHeadDotProductAttention_0": attn,
        "LayerNorm_1": {"scale": w["norm2.weight"], "bias": w["norm2.bias"]},
        "MlpBlock_0": {
            "Dense_0": {"kernel": w["mlp.fc1.weight"].T, "bias": w["mlp.fc1.bias"]},
            "Dense_1": {"kernel": w["mlp.fc2.weight"].T, "bias": w["mlp.fc2.bias"]},
        },
    }


@pytest.mark.parametrize("stage", [0, 1])
def test_one_block_then_a_stage_matches_the_authors(stage):
    ref = load("block")
    r = int(ref["r"])
    block = EncoderBlock(
        num_heads=2,
        mlp_dim=64,
        class_token=False,
        merging=settings(r, trace_source="index"),
        layer_norm_eps=1e-6,
        gelu_approximate=False,
        key_bias=False,
    )
    x = jnp.asarray(ref[f"stage{stage}/x"])
    n = x.shape[1]
    tokens = Tokens(x, None, jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (2, n)))
    run = jax.jit(
        lambda p, t: block.apply(
            {"params": p}, t, None, r=r, grid=GRID, layer=STAGE_LAYERS[stage], num_layers=DEPTH
        )
    )
    out = run(block_params(ref, heads=2), tokens)
    expected = ref[f"stage{stage}/out"]
    assert out.x.shape == expected.shape
    kept = kept_from_index_source(np.asarray(out.source), expected.shape[1])
    np.testing.assert_array_equal(kept, ref[f"stage{stage}/kept"])
    np.testing.assert_allclose(np.asarray(out.x), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Level 3: the logits of a tiny model


def tiny_model(ref: dict[str, np.ndarray], r: int) -> tuple[VideoMAE, dict]:
    """The authors' tiny VisionTransformer as vtm-jax's VideoMAE (through its converter)."""
    state = {k[2:]: v for k, v in ref.items() if k.startswith("w/") and k != "w/pos_embed"}
    split, rest = split_qkv(state)
    hf_state = {**VIDEOMAE_KEYS.rename(rest, "VideoMAE"), **split}
    hf_config = {
        "image_size": int(ref["image_size"]),
        "patch_size": int(ref["patch_size"]),
        "num_frames": 16,
        "tubelet_size": 2,
        "hidden_size": 16,
        "num_hidden_layers": DEPTH,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-6,
    }
    params, config, _ = convert_videomae(hf_state, hf_config)
    config["fc_norm_eps"] = 1e-6  # the authors' fc_norm, as the original VideoMAE's
    merging = settings(r) if r else MergingSettings(prop_attn=False)
    return VideoMAE(**config, merging=merging), params


@pytest.mark.parametrize("r", [0, 3])
def test_tiny_model_logits_match_the_authors(r):
    ref = load("model")
    assert int(ref["r"]) == 3
    model, params = tiny_model(ref, r)
    video = jnp.asarray(ref["video"].transpose(0, 2, 3, 4, 1))  # [B, C, T, H, W] -> [B, T, H, W, C]
    logits = np.asarray(jax.jit(model.apply)({"params": params}, video))
    expected = ref["logits" if r else "logits_r0"]
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
    if r:  # STA changed the answer: the comparison above is not the r = 0 one again
        assert np.abs(ref["logits"] - ref["logits_r0"]).max() > 1e-3


def test_tiny_model_token_plan_and_macs():
    ref = load("model")
    model, _ = tiny_model(ref, 3)
    plan = model.token_plan(16, int(ref["image_size"]))
    # 8 x 16 tokens; stages after blocks 0, 2, 4 drop 3 per group from 8, 4, 2 groups.
    assert [p.tokens_out for p in plan] == [104, 104, 92, 92, 86, 86]
    assert all(p.place == "block_end" for p in plan)
    full = model.clone(merging=MergingSettings(prop_attn=False))
    assert model.analytic_macs(16, 8)["total"] < full.analytic_macs(16, 8)["total"]
    # The authors' ViT-L at r 64 (their README's example): 1568 -> 1056 -> 800 -> 672 tokens.
    large = VideoMAE(400, 1024, 16, 4096, 24, merging=settings(64))
    plan = large.token_plan(16, 224)
    assert [(i, p.tokens_out) for i, p in enumerate(plan) if p.r] == [
        (0, 1056),
        (8, 800),
        (16, 672),
    ]


# ---------------------------------------------------------------------------------------------
# Counts, refusals and the public API


def test_groups_follow_the_grid_and_bad_grids_are_refused():
    assert [sta.stage_groups((8, 14, 14), s) for s in range(3)] == [8, 4, 2]
    assert [sta.stage_groups((16, 14, 14), s) for s in range(3)] == [16, 8, 4]
    assert [sta.stage_groups((2, 14, 14), s) for s in range(3)] == [2, 1, 1]
    assert [sta.stage_groups((1, 14, 14), s) for s in range(3)] == [1, 1, 1]
    assert sta.group_order(4, 1) == [3, 2, 1, 0] and sta.group_order(4, 2) == [0, 1, 2, 3]
    for t, stage in ((3, 0), (6, 1), (10, 2)):  # refused at every stage alike
        with pytest.raises(UserError, match=r"grid's t must be a multiple of 4, or 1 or 2$"):
            sta.stage_groups((t, 4, 4), stage)
    ctx = MergeContext(settings(3), False, None, None, 0, DEPTH)
    with pytest.raises(UserError, match="needs the \\(t, h, w\\) patch grid"):
        sta.removed(128, 3, ctx)


def test_removed_counts_per_group_only_at_stages():
    ctx = MergeContext(settings(64), False, None, (8, 14, 14), 0, 24)
    assert sta.removed(1568, 64, ctx) == 512  # ViT-L, r 64: 1568 -> 1056 -> 800 -> 672
    assert sta.removed(1056, 64, ctx._replace(layer=8)) == 256
    assert sta.removed(800, 64, ctx._replace(layer=16)) == 128
    assert sta.removed(1056, 64, ctx._replace(layer=5)) == 0
    assert sta.removed(1568, 0, ctx) == 0
    assert sta.removed(1568, 500, ctx) == 8 * 98  # at most half of each group
    assert sta.removed(1 + 1568, 64, ctx._replace(class_token=True)) == 512
    assert [sta.stage_index(i, 2) for i in range(2)] == [0, 2]  # the authors' branch order
    with pytest.raises(UserError, match="cannot cut 1567 tokens into 8 equal temporal groups"):
        sta.removed(1567, 64, ctx)


def clip(frames: int) -> np.ndarray:
    return np.random.default_rng(0).random((frames, 32, 32, 3)).astype(np.float32)


def test_options_bad_clips_and_frame_layouts_are_refused(tiny_checkpoint):
    with pytest.raises(UserError, match=r"^mode 'sta' has no option ratio \(it takes none\)$"):
        MergingSettings(mode="sta", r=2, rule_options={"ratio": 0.5})
    model, params, _ = vtm_jax.load(tiny_checkpoint("videomae"))
    merged = vtm_jax.with_merging(model, mode="sta", r=2)
    # t = 6: 4 slices per group do not fit; refused by the static plan and by the model.
    with pytest.raises(UserError, match="^mode 'sta' cannot group 6 temporal patch slices"):
        merged.token_plan(12, 32)
    with pytest.raises(UserError, match="^mode 'sta' cannot group 6 temporal patch slices"):
        jax.eval_shape(merged.apply, {"params": params}, clip(12)[None])
    for backbone in ("timesformer", "motionformer", "vivit_factorised_encoder"):
        with pytest.raises(UserError, match=f"^mode 'sta' cannot run on {backbone}: it needs a "):
            check_settings_apply(backbone, settings(2))
        with pytest.raises(UserError, match="backbones that run it: vivit, videomae$"):
            check_settings_apply(backbone, settings(2))


@pytest.mark.parametrize("architecture", ["vivit", "videomae"])
def test_runs_through_the_api_with_fewer_macs(tiny_checkpoint, architecture):
    model, params, record = vtm_jax.load(tiny_checkpoint(architecture))
    merged = vtm_jax.with_merging(model, mode="sta", r=2)
    cls = int(architecture == "vivit")
    # Two layers: stages after block 0 (8 groups of 16) and block 1 (2 groups of 56).
    assert vtm_jax.token_counts(merged, record) == [cls + 112, cls + 108]
    logits = vtm_jax.classify(merged, params, clip(16))
    assert logits.shape == (8,) and np.isfinite(logits).all()
    assert merged.analytic_macs(16, 32)["total"] < model.analytic_macs(16, 32)["total"]
