"""Motionformer: conversion of original checkpoints, parity with the torch reference at r=0 and
at r>0 in both merge groupings, token counts per group (docs/method.md §3.3, §3.4, §3.5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml

from tests.reference.torch_motionformer import (
    TorchMotionformer,
    randomise,
    tome_motionformer_forward,
)
from vtm_jax.checkpoints.convert.motionformer import convert_motionformer, load_motionformer
from vtm_jax.errors import UserError
from vtm_jax.merging import MergingSettings, layer_key
from vtm_jax.models.attention import get_attention
from vtm_jax.models.motionformer import (
    Motionformer,
    TrajectoryBlock,
    eval_probabilities,
    to_groups,
)

# Tubelet (2, 8, 8) on 8 x 32 x 32: F = 4 slots of P = 16 patches, plus the class token.
FRAMES, SIZE, PATCH, SLOTS, LAYERS = 8, 32, 8, 4, 3


def small_torch_model(num_classes=10, seed=0):
    model = TorchMotionformer(
        num_classes=num_classes,
        dim=64,
        depth=LAYERS,
        heads=4,
        img_size=SIZE,
        patch=PATCH,
        slots=SLOTS,
    )
    return randomise(model, seed)


def save_original_checkpoint(model, path, *, prefix="module.", cfg=True):
    """As the original training code saves it: epoch, model_state, optimizer_state, cfg (YAML)."""
    checkpoint = {
        "epoch": 3,
        "model_state": {prefix + k: v for k, v in model.state_dict().items()},
        "optimizer_state": torch.optim.AdamW(model.parameters()).state_dict(),
    }
    if cfg:
        checkpoint["cfg"] = yaml.safe_dump(
            {
                "DATA": {
                    "NUM_FRAMES": FRAMES,
                    "SAMPLING_RATE": 4,
                    "TRAIN_JITTER_SCALES": [256, 320],
                    "TRAIN_CROP_SIZE": SIZE,
                    "TEST_CROP_SIZE": SIZE,
                    "MEAN": [0.5, 0.5, 0.5],
                    "STD": [0.5, 0.5, 0.5],
                },
                "VIT": {"NUM_HEADS": 4, "USE_MLP": True, "ATTN_LAYER": "trajectory"},
            }
        )
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def mf(tmp_path_factory):
    model = small_torch_model()
    path = save_original_checkpoint(model, tmp_path_factory.mktemp("mf") / "mf.pyth")
    return model, load_motionformer(path)


def clip(seed=0, batch=2):
    video = np.random.default_rng(seed).standard_normal((batch, 3, FRAMES, SIZE, SIZE))
    return torch.from_numpy(video.astype(np.float32))


def ours(converted, merging, video, attention=None):
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in converted["model"].items()}
    model = Motionformer(**kwargs, merging=merging, attention_fn=attention or get_attention("xla"))
    nthwc = jnp.asarray(video.numpy().transpose(0, 2, 3, 4, 1))
    # Eager, not jitted: the small model's ops compile once and are shared by every case.
    return np.asarray(model.apply({"params": converted["params"]}, nthwc)), model


def traced_group_counts(model, params, video):
    """Tokens per merge group leaving each step, from the traced shapes (no compute)."""

    def run(p, x):
        return model.apply(
            {"params": p},
            x,
            capture_intermediates=lambda mdl, _: isinstance(mdl, TrajectoryBlock),
            mutable=["intermediates"],
        )[1]

    inter = jax.eval_shape(run, params, video)["intermediates"]
    slots = video.shape[1] // model.patch_size[0]
    steps = model.merging.layer_steps(model.num_layers)
    calls = {i: list(inter[f"encoderblock_{i}"]["__call__"]) for i in range(model.num_layers)}
    return [(calls[layer].pop(0).x.shape[1] - 1) // slots for layer, _ in steps]


def test_conversion_record(mf):
    _, converted = mf
    assert converted["model"] == {
        "num_classes": 10,
        "hidden_size": 64,
        "num_heads": 4,
        "mlp_dim": 256,
        "num_layers": LAYERS,
        "patch_size": [2, PATCH, PATCH],
        "representation_size": 64,
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
        "original_temporal_values": True,
    }
    assert converted["input"] == {"num_frames": FRAMES, "image_size": SIZE}
    assert converted["preprocessing"] == {
        "num_frames": FRAMES,
        "stride": 4,
        "min_resize": 256,
        "crop_size": SIZE,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
    }
    assert converted["labels"] is None and converted["class_splits"] is None
    attn = converted["params"]["encoderblock_0"]["TrajectoryAttention_0"]
    assert attn["proj_kv"]["kernel"].shape == (64, 2, 4, 16)
    assert converted["params"]["pos_embedding"].shape == (1, 17, 64)
    assert converted["params"]["temporal_embedding"].shape == (1, SLOTS, 64)


@pytest.mark.parametrize("attention", ["xla", "blockwise"])
def test_r0_matches_torch(mf, attention):
    model, converted = mf
    video = clip()
    with torch.no_grad():
        expected = model.logits(video).numpy()
    backend = get_attention(attention, chunk_size=16)  # blockwise: several query chunks
    got, _ = ours(converted, MergingSettings(), video, backend)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_corrected_temporal_values_match_torch():
    """USE_ORIGINAL_TRAJ_ATTN_CODE=False: the temporal step weighs the projected values."""
    model = small_torch_model(seed=2)
    for block in model.blocks:
        block.attn.original_temporal_values = False
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    cfg = {"VIT": {"NUM_HEADS": 4, "USE_ORIGINAL_TRAJ_ATTN_CODE": False}}
    params, config, _, _ = convert_motionformer(state, cfg)
    assert config["original_temporal_values"] is False
    video = clip(seed=5)
    got, _ = ours({"params": params, "model": config}, MergingSettings(), video)
    with torch.no_grad():
        np.testing.assert_allclose(got, model.logits(video).numpy(), atol=1e-4, rtol=0)


def test_epic_kitchens_heads_and_eval_softmax(tmp_path):
    """Two heads become one output_projection; eval_probabilities is the original's eval output."""
    model = small_torch_model(num_classes=[3, 5], seed=1)
    path = save_original_checkpoint(model, tmp_path / "ek.pyth", prefix="")  # no DDP prefix
    converted = load_motionformer(path)
    assert converted["class_splits"] == [3, 5]
    assert converted["params"]["output_projection"]["kernel"].shape == (64, 8)
    video = clip(seed=3)
    got, _ = ours(converted, MergingSettings(), video)
    with torch.no_grad():
        np.testing.assert_allclose(got, model.logits(video).numpy(), atol=1e-4, rtol=0)
        verb, noun = model(video)  # eval mode: one softmax per head
    probs = np.asarray(eval_probabilities(jnp.asarray(got), converted["class_splits"]))
    np.testing.assert_allclose(probs, torch.cat([verb, noun], -1).numpy(), atol=1e-5, rtol=0)


CASES = [
    dict(mode="merge", r=3),
    dict(mode="merge", r=3, schedule=-1.0),  # r values chosen so that most token counts recur:
    dict(mode="merge", r=3, schedule=1.0),  # eager ops compile once per shape
    dict(mode="merge", r=3, prop_attn=False),
    # The paper's Motionformer ignores head_aggregation; concat must be asked for by name.
    dict(mode="merge", r=3, head_aggregation="concat", motionformer_concat_keys=True),
    dict(mode="random_merge", r=3),
    dict(mode="drop", r=3),
    dict(mode="random_drop", r=3),
    dict(mode="hybrid", r=3, threshold=0.5),
    dict(mode="merge", r=[6, 0, 20]),  # the last step clamped to 10 // 2
    dict(mode="merge", r=3, duplicate=(0, 3)),  # the whole first block three times
    dict(mode="random_drop", r=3, duplicate=(2, 2)),
]
GROUPS = ["paper", "per_frame"]
# Every case in the paper's grouping; every mode, a schedule and duplication in the other.
PER_FRAME = [c for i, c in enumerate(CASES) if c["mode"] != "merge" or i in (0, 1, 10)]
GROUPED_CASES = [(c, "paper") for c in CASES] + [(c, "per_frame") for c in PER_FRAME]


@pytest.fixture(scope="module")
def baselines(mf):
    """Unreduced and plain-merge logits of the parity clip, computed once."""
    _, converted = mf
    video = clip(seed=1)
    return {
        "none": ours(converted, MergingSettings(), video)[0],
        "merge": ours(converted, MergingSettings(mode="merge", r=3), video)[0],
    }


@pytest.mark.parametrize(
    "case,groups",
    GROUPED_CASES,
    ids=lambda c: c if isinstance(c, str) else "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_merged_matches_torch_reference(mf, baselines, case, groups):
    model, converted = mf
    merging = MergingSettings.from_dict({**case, "motionformer_groups": groups})
    video = clip(seed=1)
    got, flax_model = ours(converted, merging, video)

    def random_scores(step, shape):
        return torch.from_numpy(np.array(jax.random.uniform(layer_key(merging, step), shape)))

    r = case["r"] if isinstance(case["r"], list) else (case["r"], case.get("schedule", 0.0))
    if "duplicate" in case:  # the paper's r list for duplication (docs/method.md §3.6)
        layer, quantity = case["duplicate"]
        r = [0] * layer + [case["r"]] * quantity + [0] * (LAYERS - 1 - layer)
    with torch.no_grad():
        ref = tome_motionformer_forward(
            model,
            video,
            r,
            mode=case["mode"],
            prop_attn=case.get("prop_attn", True),
            head_aggregation=case.get("head_aggregation", "mean"),
            threshold=case.get("threshold", 0.0),
            random_scores=random_scores,
            duplicate=case.get("duplicate"),
            groups=groups,
        )
    np.testing.assert_allclose(got, ref["logits"].numpy(), atol=1e-4, rtol=0)
    # Each case is far from the unreduced logits (hybrid also from merge): 1e-4 separates them.
    assert np.abs(got - baselines["none"]).max() > 1e-2
    if (case["mode"] == "hybrid" or "motionformer_concat_keys" in case) and groups == "paper":
        assert np.abs(got - baselines["merge"]).max() > 1e-2  # not plain mean-key merging
    assert [p.tokens_out for p in flax_model.token_plan(FRAMES, SIZE)] == ref["token_counts"]


def test_concat_refused_unless_named(mf, tmp_path, capsys):
    """The paper's Motionformer averages keys over heads whatever is asked: concat would
    silently differ from it, so it is an error unless motionformer_concat_keys asks for it."""
    from vtm_jax.cli import main
    from vtm_jax.models.registry import check_settings_apply

    _, converted = mf
    with pytest.raises(UserError, match="motionformer_concat_keys=True"):
        ours(converted, MergingSettings(mode="merge", r=3, head_aggregation="concat"), clip())
    with pytest.raises(UserError, match="needs head_aggregation 'concat'"):
        MergingSettings(mode="merge", r=3, motionformer_concat_keys=True)
    named = MergingSettings(
        mode="merge", r=3, head_aggregation="concat", motionformer_concat_keys=True
    )
    with pytest.raises(UserError, match="motionformer_concat_keys applies only to motionformer"):
        check_settings_apply("videomae", named)
    # Through the CLI: one line, and the option makes the same request work.
    path = save_original_checkpoint(small_torch_model(), tmp_path / "mf.pyth")
    ckpt = tmp_path / "ckpt"
    assert (
        main(["convert", "--source", "motionformer", "--input", str(path), "--output", str(ckpt)])
        == 0
    )
    np.save(tmp_path / "clip.npy", clip(batch=1).numpy()[0].transpose(1, 2, 3, 0))
    args = ["predict", "--checkpoint", str(ckpt), "--video", str(tmp_path / "clip.npy")]
    args += ["--attention", "xla", "--r", "3", "--head-aggregation", "concat"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vtm-jax: error: Motionformer takes head_aggregation 'mean' only")
    assert "\n" not in err
    assert main([*args, "--motionformer-concat-keys"]) == 0


def test_groupings_differ_and_paper_groups_mix_frames(mf):
    _, converted = mf
    video = clip(seed=2)
    paper, _ = ours(converted, MergingSettings(mode="merge", r=3), video)
    per_frame, _ = ours(
        converted, MergingSettings(mode="merge", r=3, motionformer_groups="per_frame"), video
    )
    assert np.abs(paper - per_frame).max() > 1e-2
    # Full size, 8 slots of 196: a paper group holds 24 or 25 tokens of every slot (docs/method.md §3.4).
    slot_of = (jnp.arange(8 * 196) // 196)[None, :, None]
    for grouping, allowed in (("paper", {24, 25}), ("per_frame", {0, 196})):
        groups = np.asarray(to_groups(slot_of, 8, grouping))[..., 0]  # [8, 196] slot ids
        counts = {int((g == slot).sum()) for g in groups for slot in range(8)}
        assert counts == allowed, grouping


@pytest.mark.parametrize("groups", GROUPS)
def test_trace_source_dense_and_index_agree(mf, groups):
    _, converted = mf
    video = jnp.asarray(clip(seed=4).numpy().transpose(0, 2, 3, 4, 1))
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in converted["model"].items()}
    sources = {}
    for form in ("dense", "index"):
        merging = MergingSettings(mode="merge", r=3, trace_source=form, motionformer_groups=groups)
        model = Motionformer(**kwargs, merging=merging)
        _, state = model.apply({"params": converted["params"]}, video, mutable=["intermediates"])
        sources[form] = np.asarray(state["intermediates"]["source"][0])
    dense, index = sources["dense"], sources["index"]
    assert dense.shape == (2 * SLOTS, 7, 16) and index.shape == (2 * SLOTS, 16)  # per group
    np.testing.assert_array_equal(dense, index[:, None, :] == np.arange(7)[None, :, None])


# Tokens per group of 196 after each layer (docs/method.md §3.3 / §3.4 / §3.5).
TABLES = {
    98: [98, 49, 25, 13, 7, 4, 2, 1, 1, 1, 1, 1],
    49: [147, 98, 49, 25, 13, 7, 4, 2, 1, 1, 1, 1],
    24: [172, 148, 124, 100, 76, 52, 28, 14, 7, 4, 2, 1],
    12: [184, 172, 160, 148, 136, 124, 112, 100, 88, 76, 64, 52],
    18: [178, 160, 142, 124, 106, 88, 70, 52, 34, 17, 9, 5],
    (18, -1.0): [160, 128, 99, 73, 51, 32, 16, 8, 4, 2, 1, 1],
    (18, 1.0): [196, 193, 187, 178, 165, 149, 130, 108, 82, 53, 27, 14],
}


@pytest.mark.parametrize("r", list(TABLES), ids=str)
def test_token_plan_tables(r):
    model = Motionformer(num_classes=400, merging=MergingSettings(mode="merge", r=r))
    assert [p.tokens_out for p in model.token_plan(16, 224)] == TABLES[r]


@pytest.mark.parametrize("groups", GROUPS)
def test_full_size_r18_traced_shapes(groups):
    """ViT-B, 16 frames at 224: 1 + 8 * 196 = 1569 tokens; r=18 per group traces to the table."""
    model = Motionformer(
        num_classes=400, merging=MergingSettings(mode="merge", r=18, motionformer_groups=groups)
    )
    video = jax.ShapeDtypeStruct((1, 16, 224, 224, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), video)["params"]
    assert traced_group_counts(model, params, video) == TABLES[18]
    with torch.device("meta"):  # parameter count of the original layout, no memory
        original = TorchMotionformer(num_classes=400)
    unused = sum(p.numel() for p in original.patch_embed.parameters())  # the unused 2-D embed
    total = sum(p.numel() for p in original.parameters()) - unused
    assert sum(np.prod(p.shape) for p in jax.tree.leaves(params)) == total
    assert params["pos_embedding"].shape == (1, 197, 768)
    assert params["temporal_embedding"].shape == (1, 8, 768)


def test_duplicate_plan_and_macs():
    merging = MergingSettings(mode="merge", r=18, duplicate=(11, 3))
    model = Motionformer(num_classes=400, merging=merging)
    assert [p.tokens_out for p in model.token_plan(16, 224)] == [196] * 11 + [178, 160, 142]
    macs = model.analytic_macs(16, 224)
    assert len(macs["layers"]) == 14
    assert macs["total"] == macs["embedding"] + sum(macs["layers"]) + macs["head"]
    full = Motionformer(num_classes=400).analytic_macs(16, 224)
    assert macs["layers"][0] == full["layers"][0] and macs["layers"][-1] < full["layers"][-1]
    # Largest terms at r=0 (S = 1568, N = 1569, D = 768): 2 S^2 D + 8 S D^2 (proj_kv keys).
    assert full["layers"][0] > 2 * 1568**2 * 768 + 8 * 1568 * 768**2


def test_one_compile_per_schedule_and_video_checks(mf):
    _, converted = mf
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in converted["model"].items()}
    model = Motionformer(**kwargs, merging=MergingSettings(mode="merge", r=(3, -1.0)))
    traces = []

    @jax.jit
    def forward(p, x):
        traces.append(1)
        return model.apply({"params": p}, x)

    for seed in range(3):
        forward(converted["params"], jax.random.normal(jax.random.PRNGKey(seed), (1, 8, 32, 32, 3)))
    assert len(traces) == 1
    with pytest.raises(UserError, match="made for 8 frames"):
        model.apply({"params": converted["params"]}, jnp.zeros((1, 6, 32, 32, 3)))
    with pytest.raises(UserError, match="made for 32x32 pixels"):
        model.apply({"params": converted["params"]}, jnp.zeros((1, 8, 48, 48, 3)))
    with pytest.raises(UserError, match="multiple of the tubelet"):
        model.apply({"params": converted["params"]}, jnp.zeros((1, 7, 32, 32, 3)))


# ---------------------------------------------------------------------------------------------
# Conversion errors


def _edit_and_load(tmp_path, edit):
    model = small_torch_model()
    state = dict(model.state_dict())
    edit(state)
    path = tmp_path / "edited.pyth"
    torch.save({"model_state": state}, path)
    return load_motionformer(path)


def test_missing_key_named(tmp_path):
    with pytest.raises(UserError, match=r"missing blocks\.1\.attn\.proj_q\.weight"):
        _edit_and_load(tmp_path, lambda s: s.pop("blocks.1.attn.proj_q.weight"))


def test_unknown_key_named(tmp_path):
    with pytest.raises(UserError, match=r"unknown blocks\.0\.attn\.extra"):
        _edit_and_load(tmp_path, lambda s: s.update({"blocks.0.attn.extra": torch.zeros(3)}))


def test_mis_shaped_key_named(tmp_path):
    def edit(state):
        state["blocks.2.attn.proj_kv.weight"] = torch.zeros(64, 64)

    with pytest.raises(UserError, match=r"blocks\.2\.attn\.proj_kv\.weight \(64, 64\)"):
        _edit_and_load(tmp_path, edit)


def test_joint_checkpoint_refused(tmp_path):
    with pytest.raises(UserError, match="joint/divided"):
        _edit_and_load(tmp_path, lambda s: s.update({"st_embed": torch.zeros(1, 65, 64)}))


class _Pickled:  # any class: weights_only loading refuses it
    pass


def test_pickled_objects_refused(tmp_path):
    path = tmp_path / "unsafe.pyth"
    torch.save({"model_state": {}, "cfg": _Pickled()}, path)  # refused by weights_only=True
    with pytest.raises(UserError, match=r"pickles tests\.test_motionformer\._Pickled, an object"):
        load_motionformer(path)


def test_convert_and_predict_through_the_cli(tmp_path):
    """`vtm-jax convert --source motionformer` on an original-format checkpoint, then predict."""
    import json

    from vtm_jax.cli import main

    path = save_original_checkpoint(small_torch_model(), tmp_path / "mf.pyth")
    ckpt = tmp_path / "ckpt"
    assert (
        main(["convert", "--source", "motionformer", "--input", str(path), "--output", str(ckpt)])
        == 0
    )
    assert json.loads((ckpt / "model.json").read_text())["architecture"] == "motionformer"
    video = clip(seed=4, batch=1)
    np.save(tmp_path / "clip.npy", video.numpy()[0].transpose(1, 2, 3, 0))
    args = [
        "predict",
        "--checkpoint",
        str(ckpt),
        "--video",
        str(tmp_path / "clip.npy"),
        "--attention",
        "xla",
        "--r",
        "4",
    ]
    assert main([*args, "--save-logits", str(tmp_path / "l.npy")]) == 0
    expected, _ = ours(load_motionformer(path), MergingSettings(mode="merge", r=4), video)
    np.testing.assert_allclose(np.load(tmp_path / "l.npy"), expected[0], atol=1e-4)
