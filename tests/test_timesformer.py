"""Flax TimeSformer: parity with HF at r=0, with the torch reference at r>0, per-frame token plans."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from tests.reference.torch_timesformer import timesformer_forward
from vtm_jax.checkpoints.convert.hf_timesformer import load_hf_timesformer
from vtm_jax.errors import UserError
from vtm_jax.merging import MergingSettings, layer_key
from vtm_jax.models.attention import get_attention
from vtm_jax.models.timesformer import EncoderBlock, TimeSformer

FRAMES, SIZE = 4, 32  # patch 8: 16 patches per frame, 1 + 4 * 16 = 65 tokens


def random_hf_timesformer(labels: int = 10) -> transformers.TimesformerForVideoClassification:
    """A small random TimeSformer in eval mode (eager attention, the only kind HF has).

    The class token, position and time embeddings are redrawn large so that a conversion that drops or misplaces
    them cannot pass. Every dense layer and the patch projection get unit-gain weights (HF's std 0.02 leaves the
    residual updates, and so any reduction's effect on the class token, tiny) and the classifier std 1, so that
    1e-4 separates the merging modes.
    """
    torch.manual_seed(0)
    config = transformers.TimesformerConfig(
        image_size=SIZE,
        patch_size=8,
        num_frames=FRAMES,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=labels,
    )
    model = transformers.TimesformerForVideoClassification(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                fan_in = module.weight[0].numel()
                module.weight.normal_(std=fan_in**-0.5)
                module.bias.normal_(std=0.1)
        embeddings = model.timesformer.embeddings
        embeddings.cls_token.normal_()
        embeddings.position_embeddings.normal_(std=0.5)
        embeddings.time_embeddings.normal_(std=0.5)
        model.classifier.weight.normal_(std=1.0)
    return model


@pytest.fixture(scope="module")
def hf_timesformer(tmp_path_factory):
    hf = random_hf_timesformer()
    path = tmp_path_factory.mktemp("hf_timesformer")
    hf.save_pretrained(path)
    return hf, load_hf_timesformer(path), path


@pytest.fixture(scope="module")
def unreduced(hf_timesformer):
    """Logits at r=0 on the video of the merged cases."""
    return ours_logits(hf_timesformer[1], MergingSettings(), hf_video(seed=1))[0]


def hf_video(seed=0, batch=2):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal((batch, FRAMES, 3, SIZE, SIZE)).astype(np.float32))


def build(converted, merging, attention="xla"):
    """``attention``: a backend name, or ``blockwise:<chunk>`` to make small sequences chunk too."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in converted["model"].items()}
    name, _, chunk = attention.partition(":")
    attention_fn = get_attention(name, chunk_size=int(chunk) if chunk else None)
    return TimeSformer(**kwargs, merging=merging, attention_fn=attention_fn)


def ours_logits(converted, merging, video, attention="xla"):
    model = build(converted, merging, attention)
    nthwc = jnp.asarray(video.numpy().transpose(0, 1, 3, 4, 2))
    return np.asarray(model.apply({"params": converted["params"]}, nthwc)), model


def per_frame_counts(model, params, video):
    """Patches per frame leaving each step, read from traced shapes (no compute)."""

    def run(p, x):
        return model.apply(
            {"params": p},
            x,
            capture_intermediates=lambda mdl, _: isinstance(mdl, EncoderBlock),
            mutable=["intermediates"],
        )[1]

    inter = jax.eval_shape(run, params, video)["intermediates"]["Transformer"]
    frames = video.shape[1]
    # A duplicated block is called several times in a row: its outputs are in step order.
    return [
        (out.x.shape[1] - 1) // frames
        for i in range(model.num_layers)
        for out in inter[f"encoderblock_{i}"]["__call__"]
    ]


def test_param_tree_is_timesformer_b():
    model = TimeSformer(num_classes=400)
    video = jax.ShapeDtypeStruct((1, 8, 224, 224, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), video)["params"]
    # TimesformerForVideoClassification(TimesformerConfig(num_labels=400)) has 121,566,352 parameters.
    assert sum(np.prod(p.shape) for p in jax.tree.leaves(params)) == 121_566_352
    assert set(params) == {
        "embedding",
        "cls",
        "posembed_input",
        "time_embedding",
        "Transformer",
        "output_projection",
    }
    assert params["embedding"]["kernel"].shape == (16, 16, 3, 768)
    assert params["posembed_input"]["pos_embedding"].shape == (1, 197, 768)
    assert params["time_embedding"].shape == (1, 8, 768)
    assert set(params["Transformer"]["encoderblock_11"]) == {
        "LayerNorm_temporal",
        "MultiHeadDotProductAttention_temporal",
        "temporal_fc",
        "LayerNorm_0",
        "MultiHeadDotProductAttention_0",
        "LayerNorm_1",
        "MlpBlock_0",
    }


# Per-frame patch counts after each of the 12 blocks at 8 x 224 (docs/method.md §3.3, §3.5).
FULL_SIZE_TABLES = [
    (98, [98, 49, 25, 13, 7, 4, 2, 1, 1, 1, 1, 1]),  # max
    (49, [147, 98, 49, 25, 13, 7, 4, 2, 1, 1, 1, 1]),  # 25%
    (24, [172, 148, 124, 100, 76, 52, 28, 14, 7, 4, 2, 1]),  # 12.5%
    (12, [184, 172, 160, 148, 136, 124, 112, 100, 88, 76, 64, 52]),  # 6.25%
    (18, [178, 160, 142, 124, 106, 88, 70, 52, 34, 17, 9, 5]),  # roughly optimal
    ((18, -1), [160, 128, 99, 73, 51, 32, 16, 8, 4, 2, 1, 1]),
    ((18, 1), [196, 193, 187, 178, 165, 149, 130, 108, 82, 53, 27, 14]),
]


@pytest.mark.parametrize("r,expected", FULL_SIZE_TABLES, ids=str)
def test_full_size_token_plans(r, expected):
    model = TimeSformer(num_classes=400, merging=MergingSettings(mode="merge", r=r))
    assert [p.tokens_out for p in model.token_plan(8, 224)] == expected


def test_full_size_r18_traces_to_plan():
    """TimeSformer-B, 8 x 224 (1569 tokens) at the paper's r=18: traced shapes are the plan."""
    model = TimeSformer(num_classes=400, merging=MergingSettings(mode="merge", r=18))
    video = jax.ShapeDtypeStruct((1, 8, 224, 224, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), video)["params"]
    assert per_frame_counts(model, params, video) == [
        178,
        160,
        142,
        124,
        106,
        88,
        70,
        52,
        34,
        17,
        9,
        5,
    ]
    macs = TimeSformer(num_classes=400).analytic_macs(8, 224)
    assert macs["total"] / 1e9 == pytest.approx(
        195.8, abs=0.1
    )  # the paper's "0.59 TFLOPs" is 3 views of this
    assert macs["total"] / model.analytic_macs(8, 224)["total"] == pytest.approx(2.165, abs=0.001)


@pytest.mark.parametrize("attention", ["xla", "blockwise:8"])
def test_r0_matches_hf(hf_timesformer, attention):
    hf, converted, _ = hf_timesformer
    video = hf_video()
    with torch.no_grad():
        expected = hf(pixel_values=video).logits.numpy()
    got, _ = ours_logits(converted, MergingSettings(), video, attention)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


CASES = [
    # r=3 takes every frame 16 -> 13 -> 10 -> 7; most cases share those shapes (fewer compiles).
    dict(mode="merge", r=3),
    dict(mode="merge", r=4, schedule=-1.0),  # r 8, 4, 0
    dict(mode="merge", r=4, schedule=1.0),  # r 0, 4, 8
    dict(mode="merge", r=3, prop_attn=False),
    dict(mode="merge", r=3, attention="blockwise:8"),  # the patch-only size bias, chunked
    dict(mode="merge", r=20),  # clamped in every block: 16 -> 8 -> 4 -> 2
    dict(mode="random_merge", r=3),
    dict(mode="drop", r=3),
    dict(mode="random_drop", r=3),
    dict(mode="hybrid", r=3, threshold=0.7),
    dict(mode="merge", r=[0, 3, 3]),
    dict(mode="merge", r=3, duplicate=(0, 4)),  # the whole first block four times
    dict(mode="random_drop", r=3, duplicate=(2, 3)),  # ... or the last block three times
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_merged_matches_torch_reference(hf_timesformer, unreduced, case):
    hf, converted, _ = hf_timesformer
    case = dict(case)
    attention = case.pop("attention", "xla")
    merging = MergingSettings.from_dict(case)
    video = hf_video(seed=1)
    got, model = ours_logits(converted, merging, video, attention)

    def random_scores(step, shape):
        return torch.from_numpy(np.array(jax.random.uniform(layer_key(merging, step), shape)))

    r = case["r"] if isinstance(case["r"], list) else (case["r"], case.get("schedule", 0.0))
    if "duplicate" in case:  # the paper's r list for duplication (docs/method.md §3.6)
        layer, quantity = case["duplicate"]
        r = [0] * layer + [case["r"]] * quantity + [0] * (model.num_layers - 1 - layer)
    with torch.no_grad():
        ref = timesformer_forward(
            hf,
            video,
            r,
            mode=case["mode"],
            prop_attn=case.get("prop_attn", True),
            threshold=case.get("threshold", 0.0),
            random_scores=random_scores,
            duplicate=case.get("duplicate"),
        )
    np.testing.assert_allclose(got, ref["logits"].numpy(), atol=1e-4, rtol=0)
    # Each case is far from the unreduced logits (and hybrid from merge), so 1e-4 separates them.
    assert np.abs(got - unreduced).max() > 1e-2
    if case["mode"] == "hybrid":
        merged, _ = ours_logits(converted, MergingSettings(mode="merge", r=case["r"]), video)
        assert np.abs(got - merged).max() > 1e-2
    assert [p.tokens_out for p in model.token_plan(FRAMES, SIZE)] == ref["token_counts"]


@pytest.mark.parametrize(
    "merging",
    [
        MergingSettings(mode="merge", r=5, schedule=-1.0),
        MergingSettings(mode="drop", r=3, duplicate=(1, 3)),
    ],
    ids=["decreasing", "duplicate"],
)
def test_traced_shapes_follow_plan(hf_timesformer, merging):
    model = build(hf_timesformer[1], merging)
    video = jax.ShapeDtypeStruct((1, FRAMES, SIZE, SIZE, 3), jnp.float32)
    plan = [p.tokens_out for p in model.token_plan(FRAMES, SIZE)]
    assert per_frame_counts(model, hf_timesformer[1]["params"], video) == plan
    assert len(plan) == len(merging.layer_steps(model.num_layers))


def test_trace_source_per_frame(hf_timesformer):
    hf, converted, _ = hf_timesformer
    video = hf_video(seed=2)
    nthwc = jnp.asarray(video.numpy().transpose(0, 1, 3, 4, 2))
    sources = {}
    for form in ("dense", "index"):
        model = build(converted, MergingSettings(mode="merge", r=4, trace_source=form))
        _, state = model.apply({"params": converted["params"]}, nthwc, mutable=["intermediates"])
        sources[form] = np.asarray(state["intermediates"]["source"][0])
    dense, index = sources["dense"], sources["index"]
    assert dense.shape == (2 * FRAMES, 4, 16) and index.shape == (2 * FRAMES, 16)
    np.testing.assert_array_equal(dense, index[:, None, :] == np.arange(4)[None, :, None])
    with torch.no_grad():
        ref = timesformer_forward(hf, video, 4, trace_source=True)
    np.testing.assert_array_equal(dense, ref["source"].numpy())


def test_bad_inputs(hf_timesformer):
    _, converted, _ = hf_timesformer
    params = {"params": converted["params"]}
    model = build(converted, MergingSettings(mode="merge", r=2, head_aggregation="concat"))
    with pytest.raises(UserError, match="head_aggregation"):
        model.apply(params, jnp.zeros((1, FRAMES, SIZE, SIZE, 3)))
    model = build(converted, MergingSettings())
    with pytest.raises(UserError, match="8 frames"):
        model.apply(params, jnp.zeros((1, 8, SIZE, SIZE, 3)))
    with pytest.raises(UserError, match="position embedding"):
        model.apply(params, jnp.zeros((1, FRAMES, 64, 64, 3)))
    with pytest.raises(UserError, match="multiple of the patch"):
        model.apply(params, jnp.zeros((1, FRAMES, 30, 30, 3)))


def test_conversion_errors_name_keys(hf_timesformer, tmp_path):
    _, converted, path = hf_timesformer
    assert converted["labels"] == [f"LABEL_{i}" for i in range(10)]
    assert converted["class_splits"] is None
    assert converted["preprocessing"]["mean"] == [0.45] * 3
    state = load_file(path / "model.safetensors")
    config = (path / "config.json").read_text()
    qkv = "timesformer.encoder.layer.1.temporal_attention.attention.qkv.weight"

    def convert(tensors):
        directory = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        directory.mkdir()
        (directory / "config.json").write_text(config)
        save_file(tensors, directory / "model.safetensors")
        return load_hf_timesformer(directory)

    with pytest.raises(UserError, match=r"missing .*temporal_attention\.attention\.qkv\.weight"):
        convert({k: v for k, v in state.items() if k != qkv})
    with pytest.raises(UserError, match=r"unknown timesformer\.extra\.weight"):
        convert({**state, "timesformer.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(UserError, match=r"mis-shaped .*time_embeddings \(1, 3, 64\)"):
        convert(
            {**state, "timesformer.embeddings.time_embeddings": np.zeros((1, 3, 64), np.float32)}
        )
    bad_config = json.loads(config) | {"attention_type": "joint_space_time"}
    (path.parent / "joint").mkdir(exist_ok=True)
    (path.parent / "joint" / "config.json").write_text(json.dumps(bad_config))
    save_file(state, path.parent / "joint" / "model.safetensors")
    with pytest.raises(UserError, match="divided_space_time"):
        load_hf_timesformer(path.parent / "joint")


def test_live_state_dict_converts_like_the_saved_one(hf_timesformer):
    """transformers 5 names TimeSformer weights the same in memory and on disk."""
    from vtm_jax.checkpoints.convert.common import flatten
    from vtm_jax.checkpoints.convert.hf_timesformer import convert_timesformer

    hf, converted, path = hf_timesformer
    assert set(hf.state_dict()) == set(load_file(path / "model.safetensors"))
    params, model, inputs = convert_timesformer(hf.state_dict(), hf.config.to_dict())
    assert (model, inputs) == (converted["model"], converted["input"])
    ours, saved = flatten(params), flatten(converted["params"])
    assert list(ours) == list(saved)
    for key in ours:
        np.testing.assert_array_equal(ours[key], saved[key])


def test_preprocessing_from_processor_config(tmp_path):
    from vtm_jax.checkpoints.convert.hf_timesformer import read_preprocessing

    inputs = {"num_frames": 8, "image_size": 224}
    paper = read_preprocessing(tmp_path, inputs, num_classes=400)
    assert paper == {
        "num_frames": 8,
        "stride": 32,
        "min_resize": 256,
        "crop_size": 224,
        "mean": [0.45] * 3,
        "std": [0.225] * 3,
    }
    assert read_preprocessing(tmp_path, inputs, num_classes=174)["stride"] == 8
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_mean": [0.485, 0.456, 0.406],
                "image_std": [0.229, 0.224, 0.225],
                "rescale_factor": 1 / 255,
                "size": {"shortest_edge": 224},
                "crop_size": {"height": 224, "width": 224},
            }
        )
    )
    hf = read_preprocessing(tmp_path, inputs, num_classes=400)
    assert hf["min_resize"] == 224 and hf["mean"] == [0.485, 0.456, 0.406]
    assert hf["std"] == [0.229, 0.224, 0.225] and hf["stride"] == 32


def test_convert_and_predict_through_the_cli(hf_timesformer, tmp_path):
    """`vtm-jax convert --source hf` finds TimeSformer from config.json; predict merges per frame."""
    import json

    from vtm_jax.cli import main

    _, converted, path = hf_timesformer
    ckpt = tmp_path / "ckpt"
    assert main(["convert", "--source", "hf", "--input", str(path), "--output", str(ckpt)]) == 0
    assert json.loads((ckpt / "model.json").read_text())["architecture"] == "timesformer"
    video = hf_video(seed=3, batch=1)
    np.save(tmp_path / "clip.npy", video.numpy()[0].transpose(0, 2, 3, 1))
    args = [
        "predict",
        "--checkpoint",
        str(ckpt),
        "--video",
        str(tmp_path / "clip.npy"),
        "--attention",
        "xla",
    ]
    assert (
        main([*args, "--mode", "drop", "--r", "3", "--save-logits", str(tmp_path / "l.npy")]) == 0
    )
    expected, _ = ours_logits(converted, MergingSettings(mode="drop", r=3), video)
    np.testing.assert_allclose(np.load(tmp_path / "l.npy"), expected[0], atol=1e-4)
