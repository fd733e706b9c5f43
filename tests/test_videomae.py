"""Flax VideoMAE: parity with HF at r=0, with the torch reference at r>0, token plans, conversion."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.reference.torch_videomae import tome_videomae_forward
from vtm_jax.checkpoints.convert.common import flatten
from vtm_jax.checkpoints.convert.hf_videomae import convert_videomae, load_hf_videomae
from vtm_jax.errors import UserError
from vtm_jax.merging import MergingSettings, layer_key
from vtm_jax.models.attention import get_attention
from vtm_jax.models.videomae import VideoMAE, sinusoid_positions
from vtm_jax.models.vivit import EncoderBlock

FRAMES, SIZE = 8, 32  # tubelet (2, 8, 8): 4 x 4 x 4 = 64 tokens, no class token


def random_hf_videomae(
    *, frames: int = FRAMES, size: int = SIZE, hidden: int = 64, layers: int = 3, labels: int = 10
) -> transformers.VideoMAEForVideoClassification:
    """A random tubelet-(2, 8, 8) VideoMAE classifier in eval mode, eager attention, 4 heads.

    HF initialises biases and norms to zeros / ones; they are redrawn so that a conversion that
    drops or swaps one cannot pass, and the classifier gets O(1) logits so 1e-4 separates cases.
    """
    torch.manual_seed(0)
    config = transformers.VideoMAEConfig(
        image_size=size,
        patch_size=8,
        num_frames=frames,
        tubelet_size=2,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        layer_norm_eps=1e-6,
        num_labels=labels,
        attn_implementation="eager",
    )
    model = transformers.VideoMAEForVideoClassification(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm_before.weight", "norm_after.weight", "fc_norm.weight")):
                param.normal_(1.0, 0.1)
            elif param.ndim == 1:
                param.normal_(std=0.1)
        model.classifier.weight.normal_(std=1.0)
    return model


@pytest.fixture(scope="module")
def hf_videomae(tmp_path_factory):
    """A small random HF VideoMAE saved like a real checkpoint, and its conversion."""
    hf = random_hf_videomae()
    path = tmp_path_factory.mktemp("hf_videomae")
    hf.save_pretrained(path)
    return hf, load_hf_videomae(path), path


def hf_video(seed=0, batch=2):
    return torch.from_numpy(
        np.random.default_rng(seed)
        .standard_normal((batch, FRAMES, 3, SIZE, SIZE))
        .astype(np.float32)
    )


def build(converted, merging, attention="xla"):
    return VideoMAE(**converted["model"], merging=merging, attention_fn=get_attention(attention))


def ours_logits(converted, merging, video, attention="xla"):
    model = build(converted, merging, attention)
    nthwc = jnp.asarray(video.numpy().transpose(0, 1, 3, 4, 2))
    return np.asarray(model.apply({"params": converted["params"]}, nthwc)), model


def block_token_counts(model, params, video):
    """Tokens leaving each step, read from the traced shapes (no compute)."""

    def run(p, x):
        return model.apply(
            {"params": p},
            x,
            capture_intermediates=lambda mdl, _: isinstance(mdl, EncoderBlock),
            mutable=["intermediates"],
        )[1]

    inter = jax.eval_shape(run, params, video)["intermediates"]["Transformer"]
    return [
        out.x.shape[1]
        for i in range(model.num_layers)
        for out in inter[f"encoderblock_{i}"]["__call__"]
    ]


# ---------------------------------------------------------------------------------------------
# Full size: parameter tree and the token counts of docs/method.md §3.2 / §3.5 / §3.6

FULL_VIDEO = jax.ShapeDtypeStruct((1, 16, 224, 224, 3), jnp.float32)


def videomae_param_shapes(model_config):
    """Every parameter path of a VideoMAE classifier and its shape, written out independently
    of the model (the converter takes its shapes from the model itself)."""
    d_model = model_config["hidden_size"]
    heads = model_config["num_heads"]
    head_dim = d_model // heads
    mlp = model_config["mlp_dim"]
    t, h, w = model_config["patch_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "embedding/kernel": (t, h, w, 3, d_model),
        "embedding/bias": (d_model,),
    }
    for i in range(model_config["num_layers"]):
        block = f"Transformer/encoderblock_{i}"
        attn = f"{block}/MultiHeadDotProductAttention_0"
        for norm in ("LayerNorm_0", "LayerNorm_1"):
            shapes[f"{block}/{norm}/scale"] = (d_model,)
            shapes[f"{block}/{norm}/bias"] = (d_model,)
        for proj in ("query", "key", "value"):
            shapes[f"{attn}/{proj}/kernel"] = (d_model, heads, head_dim)
        shapes[f"{attn}/query/bias"] = (heads, head_dim)
        shapes[f"{attn}/value/bias"] = (heads, head_dim)
        shapes[f"{attn}/out/kernel"] = (heads, head_dim, d_model)
        shapes[f"{attn}/out/bias"] = (d_model,)
        shapes[f"{block}/MlpBlock_0/Dense_0/kernel"] = (d_model, mlp)
        shapes[f"{block}/MlpBlock_0/Dense_0/bias"] = (mlp,)
        shapes[f"{block}/MlpBlock_0/Dense_1/kernel"] = (mlp, d_model)
        shapes[f"{block}/MlpBlock_0/Dense_1/bias"] = (d_model,)
    shapes["fc_norm/scale"] = (d_model,)
    shapes["fc_norm/bias"] = (d_model,)
    shapes["output_projection/kernel"] = (d_model, model_config["num_classes"])
    shapes["output_projection/bias"] = (model_config["num_classes"],)
    return shapes


def test_param_tree_is_videomae_b():
    model = VideoMAE(num_classes=400)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), FULL_VIDEO)["params"]
    flat = {k: tuple(v.shape) for k, v in flatten(params).items()}
    config = dict(hidden_size=768, num_heads=12, mlp_dim=3072, num_layers=12)
    assert flat == videomae_param_shapes({**config, "patch_size": (2, 16, 16), "num_classes": 400})
    # ViT-B/16 without a class token or position parameters, key projections without bias.
    assert sum(np.prod(s) for s in flat.values()) == 86_534_800
    assert set(params) == {"embedding", "Transformer", "fc_norm", "output_projection"}
    attn = params["Transformer"]["encoderblock_11"]["MultiHeadDotProductAttention_0"]
    assert set(attn["key"]) == {"kernel"}
    assert set(attn["query"]) == set(attn["value"]) == {"kernel", "bias"}


def test_full_size_r150_traces_to_plan():
    """VideoMAE-B at 16x224x224 (1568 tokens) with the paper's r=150."""
    model = VideoMAE(num_classes=400, merging=MergingSettings(mode="merge", r=150))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), FULL_VIDEO)["params"]
    expected = [1418, 1268, 1118, 968, 818, 668, 518, 368, 218, 109, 55, 28]
    assert block_token_counts(model, params, FULL_VIDEO) == expected
    assert [p.tokens_out for p in model.token_plan(16, 224)] == expected


PLANS = {
    "max": (dict(r=784), [784, 392, 196, 98, 49, 25, 13, 7, 4, 2, 1, 1]),
    "25%": (dict(r=392), [1176, 784, 392, 196, 98, 49, 25, 13, 7, 4, 2, 1]),
    "12.5%": (dict(r=196), [1372, 1176, 980, 784, 588, 392, 196, 98, 49, 25, 13, 7]),
    "6.25%": (dict(r=98), [1470 - 98 * i for i in range(12)]),
    "optimal": (dict(r=150), [1418, 1268, 1118, 968, 818, 668, 518, 368, 218, 109, 55, 28]),
    "decreasing": (
        dict(r=150, schedule=-1.0),
        [1268, 996, 751, 533, 343, 180, 90, 45, 23, 12, 6, 6],
    ),
    "increasing": (
        dict(r=150, schedule=1.0),
        [1568, 1541, 1487, 1406, 1297, 1161, 998, 808, 590, 345, 173, 87],
    ),
    # Duplication (docs/method.md §3.6): 12 merge steps at layer 0, then 11 plain layers.
    "duplicate-first": (
        dict(r=150, duplicate=(0, 12)),
        [1418, 1268, 1118, 968, 818, 668, 518, 368, 218, 109, 55, 28] + [28] * 11,
    ),
}


@pytest.mark.parametrize("name", PLANS)
def test_token_plan_tables(name):
    settings, expected = PLANS[name]
    model = VideoMAE(num_classes=400, merging=MergingSettings(mode="merge", **settings))
    plan = model.token_plan(16, 224)
    assert [p.tokens_out for p in plan] == expected
    assert plan[0].tokens_in == 1568
    macs = model.analytic_macs(16, 224)
    assert len(macs["layers"]) == len(expected)
    assert macs["total"] == macs["embedding"] + sum(macs["layers"]) + macs["head"]


def test_analytic_macs_r0():
    macs = VideoMAE(num_classes=400).analytic_macs(16, 224)
    n, d = 1568, 768
    assert macs["layers"] == [4 * n * d * d + 2 * n * n * d + 2 * n * d * 3072] * 12
    assert macs["embedding"] == n * 2 * 16 * 16 * 3 * d
    assert macs["head"] == d * 400


def test_sinusoid_positions_match_hf():
    expected = transformers.models.videomae.modeling_videomae.get_sinusoid_encoding_table(50, 64)
    np.testing.assert_array_equal(sinusoid_positions(50, 64), expected.numpy())


# ---------------------------------------------------------------------------------------------
# Parity: HF at r=0, the torch reference of the paper's merged forward at r>0


@pytest.mark.parametrize("attention", ["xla", "blockwise"])
def test_r0_matches_hf(hf_videomae, attention):
    hf, converted, _ = hf_videomae
    video = hf_video()
    with torch.no_grad():
        expected = hf(pixel_values=video).logits.numpy()
    got, _ = ours_logits(converted, MergingSettings(), video, attention)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


# The paper runs VideoMAE with prop_attn False; one case checks prop attention on as well.
CASES = [
    dict(mode="merge", r=6, prop_attn=False),
    dict(mode="merge", r=9, schedule=-1.0, prop_attn=False),
    dict(mode="merge", r=9, schedule=1.0, prop_attn=False),
    dict(mode="merge", r=6, head_aggregation="concat", prop_attn=False),
    dict(mode="merge", r=6, prop_attn=True),
    dict(mode="merge", r=40, prop_attn=False),  # clamped in every layer
    dict(mode="merge", r=6, prop_attn=False, size_weighted_pool=True),
    dict(mode="random_merge", r=6, prop_attn=False),
    dict(mode="drop", r=6, prop_attn=False),
    dict(mode="random_drop", r=6, prop_attn=False),
    dict(mode="hybrid", r=6, threshold=0.8, prop_attn=False),
    dict(mode="merge", r=[0, 12, 5], prop_attn=False),
    dict(mode="merge", r=5, duplicate=(0, 4), prop_attn=False),  # all reduction first
    dict(mode="random_drop", r=5, duplicate=(2, 3), prop_attn=False),  # ... or last
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_merged_matches_torch_reference(hf_videomae, case):
    hf, converted, _ = hf_videomae
    merging = MergingSettings.from_dict(case)
    video = hf_video(seed=1)
    got, model = ours_logits(converted, merging, video)

    def random_scores(step, shape):
        return torch.from_numpy(np.array(jax.random.uniform(layer_key(merging, step), shape)))

    r = case["r"] if isinstance(case["r"], list) else (case["r"], case.get("schedule", 0.0))
    if "duplicate" in case:  # the paper's r list for duplication (docs/method.md §3.6)
        layer, quantity = case["duplicate"]
        r = [0] * layer + [case["r"]] * quantity + [0] * (model.num_layers - 1 - layer)
    with torch.no_grad():
        ref = tome_videomae_forward(
            hf,
            video,
            r,
            mode=case["mode"],
            prop_attn=case["prop_attn"],
            head_aggregation=case.get("head_aggregation", "mean"),
            threshold=case.get("threshold", 0.0),
            random_scores=random_scores,
            duplicate=case.get("duplicate"),
            size_weighted_pool=case.get("size_weighted_pool", False),
        )
    np.testing.assert_allclose(got, ref["logits"].numpy(), atol=1e-4, rtol=0)
    # Each case is far from the unreduced logits (and from its nearest neighbour case).
    unreduced, _ = ours_logits(converted, MergingSettings(), video)
    assert np.abs(got - unreduced).max() > 1e-2
    neighbour = None
    if case["mode"] == "hybrid":
        neighbour = dict(mode="merge", r=case["r"], prop_attn=False)
    elif case.get("size_weighted_pool") or case["prop_attn"]:
        neighbour = dict(mode="merge", r=case["r"], prop_attn=False)
    if neighbour is not None:
        other, _ = ours_logits(converted, MergingSettings.from_dict(neighbour), video)
        assert np.abs(got - other).max() > 1e-2
    assert [p.tokens_out for p in model.token_plan(FRAMES, SIZE)] == ref["token_counts"]


def test_shapes_follow_plan_and_one_compile_per_schedule(hf_videomae):
    _, converted, _ = hf_videomae
    model = build(converted, MergingSettings(mode="merge", r=10, schedule=-1.0))
    params = converted["params"]
    video = jnp.zeros((1, FRAMES, SIZE, SIZE, 3))
    assert block_token_counts(model, params, video) == [
        p.tokens_out for p in model.token_plan(FRAMES, SIZE)
    ]
    traces = []

    @jax.jit
    def forward(p, x):
        traces.append(1)
        return model.apply({"params": p}, x)

    for seed in range(3):
        forward(params, jax.random.normal(jax.random.PRNGKey(seed), video.shape))
    assert len(traces) == 1


def test_trace_source_dense_and_index_agree(hf_videomae):
    _, converted, _ = hf_videomae
    video = jnp.asarray(hf_video(seed=2).numpy().transpose(0, 1, 3, 4, 2))
    sources = {}
    for form in ("dense", "index"):
        model = build(converted, MergingSettings(mode="merge", r=8, trace_source=form))
        _, state = model.apply({"params": converted["params"]}, video, mutable=["intermediates"])
        sources[form] = state["intermediates"]["source"][0]
    dense, index = sources["dense"], sources["index"]
    assert dense.shape[1:] == (64 - 3 * 8, 64) and index.shape[1] == 64
    np.testing.assert_array_equal(dense, (index[:, None, :] == np.arange(dense.shape[1])[:, None]))
    np.testing.assert_array_equal(dense.sum(axis=1), 1)  # merging keeps every original once


def test_bad_video_shape_is_user_error(hf_videomae):
    _, converted, _ = hf_videomae
    with pytest.raises(UserError, match="not a multiple of the tubelet"):
        build(converted, MergingSettings()).apply(
            {"params": converted["params"]}, jnp.zeros((1, 7, SIZE, SIZE, 3))
        )


# ---------------------------------------------------------------------------------------------
# Conversion


def test_record_fields(hf_videomae):
    hf, converted, _ = hf_videomae
    assert converted["model"]["layer_norm_eps"] == 1e-6  # from the config
    assert converted["model"]["fc_norm_eps"] == 1e-5  # HF's fc_norm ignores the config
    assert converted["input"] == {"num_frames": FRAMES, "image_size": SIZE}
    assert converted["labels"] == [f"LABEL_{i}" for i in range(10)]
    assert converted["class_splits"] is None
    assert converted["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert converted["preprocessing"]["stride"] == 1
    # The paper runs VideoMAE without proportional attention.
    assert MergingSettings.from_dict(converted["token_merging"]).prop_attn is False
    json.dumps({k: v for k, v in converted.items() if k != "params"})


def test_in_memory_and_on_disk_names_agree(hf_videomae):
    hf, converted, path = hf_videomae
    disk_keys = set(load_file(path / "model.safetensors"))
    memory_keys = set(hf.state_dict())
    assert "videomae.encoder.layer.0.attention.attention.q_bias" in disk_keys
    assert "videomae.encoder.layer.0.attention.attention.query.bias" in memory_keys
    config = json.loads((path / "config.json").read_text())
    params, _, _ = convert_videomae(hf.state_dict(), config)
    jax.tree.map(np.testing.assert_array_equal, params, converted["params"])


def _edited(path, tmp_path, edit):
    state = load_file(path / "model.safetensors")
    edit(state)
    out = tmp_path / "edited"
    out.mkdir()
    save_file(state, out / "model.safetensors")
    (out / "config.json").write_text((path / "config.json").read_text())
    return out


LAYER0 = "videomae.encoder.layer.0."


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop(LAYER0 + "attention.attention.v_bias"), "missing .*v_bias"),
        (
            lambda s: s.__setitem__(LAYER0 + "attention.attention.key.bias", torch.zeros(64)),
            "unknown .*key.bias",
        ),
        (
            lambda s: s.__setitem__("fc_norm.weight", torch.zeros(63)),
            r"mis-shaped .*fc_norm.weight \(63,\) \(expected \(64,\)\)",
        ),
        (
            lambda s: s.__setitem__(
                LAYER0 + "attention.attention.query.bias",
                s.pop(LAYER0 + "attention.attention.q_bias"),
            ),
            "mixed key namings",
        ),
    ],
    ids=["missing", "unknown", "mis-shaped", "mixed"],
)
def test_conversion_errors_name_the_key(hf_videomae, tmp_path, edit, message):
    _, _, path = hf_videomae
    with pytest.raises(UserError, match=message):
        load_hf_videomae(_edited(path, tmp_path, edit))


def test_convert_and_predict_through_the_cli(hf_videomae, tmp_path, capsys):
    """`vtm-jax convert` finds VideoMAE from config.json; predict uses the stored prop_attn=False."""
    import json

    from vtm_jax.cli import main

    hf, converted, path = hf_videomae
    ckpt = tmp_path / "ckpt"
    assert main(["convert", "--source", "hf", "--input", str(path), "--output", str(ckpt)]) == 0
    record = json.loads((ckpt / "model.json").read_text())
    assert record["architecture"] == "videomae" and record["token_merging"]["prop_attn"] is False
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
    assert main([*args, "--r", "8", "--save-logits", str(tmp_path / "l.npy")]) == 0
    expected, _ = ours_logits(converted, MergingSettings(mode="merge", r=8, prop_attn=False), video)
    np.testing.assert_allclose(np.load(tmp_path / "l.npy"), np.asarray(expected)[0], atol=1e-5)
    assert main([*args, "--r", "8", "--prop-attn", "--save-logits", str(tmp_path / "p.npy")]) == 0
    assert np.abs(np.load(tmp_path / "p.npy") - np.load(tmp_path / "l.npy")).max() > 1e-3
