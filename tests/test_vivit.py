"""Flax ViViT: Scenic's parameter tree, parity with HF at r=0 and with the torch reference at r>0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.hf_models import random_hf_vivit
from tests.reference.torch_tome_vivit import tome_vivit_forward
from vtm_jax.checkpoints.convert.hf_vivit import load_hf_vivit
from vtm_jax.checkpoints.convert.sources import record_from_converted
from vtm_jax.merging import MergingSettings, layer_key
from vtm_jax.models.registry import build_model
from vtm_jax.models.vivit import EncoderBlock, ViViT

FRAMES, SIZE = 8, 32  # tubelet (2, 8, 8): 4 x 4 x 4 = 64 patches + CLS = 65 tokens


def block_token_counts(model, params, video):
    """Tokens leaving each block, read from the traced shapes (no compute)."""

    def run(p, x):
        return model.apply(
            {"params": p},
            x,
            capture_intermediates=lambda mdl, _: isinstance(mdl, EncoderBlock),
            mutable=["intermediates"],
        )[1]

    inter = jax.eval_shape(run, params, video)["intermediates"]["Transformer"]
    # A duplicated layer is called several times in a row: its outputs are in step order.
    return [
        out.x.shape[1]
        for i in range(model.num_layers)
        for out in inter[f"encoderblock_{i}"]["__call__"]
    ]


def test_param_tree_is_scenic_vivit_b():
    model = ViViT(num_classes=400)
    video = jax.ShapeDtypeStruct((1, 32, 224, 224, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), video)["params"]
    assert sum(np.prod(p.shape) for p in jax.tree.leaves(params)) == 88_954_000
    block = params["Transformer"]["encoderblock_11"]
    assert params["embedding"]["kernel"].shape == (2, 16, 16, 3, 768)
    assert params["cls"].shape == (1, 1, 768)
    assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 3137, 768)
    attn = block["MultiHeadDotProductAttention_0"]
    assert attn["query"]["kernel"].shape == (768, 12, 64)
    assert attn["query"]["bias"].shape == (12, 64)
    assert attn["out"]["kernel"].shape == (12, 64, 768)
    assert block["MlpBlock_0"]["Dense_0"]["kernel"].shape == (768, 3072)
    assert set(block) == {
        "LayerNorm_0",
        "MultiHeadDotProductAttention_0",
        "LayerNorm_1",
        "MlpBlock_0",
    }
    assert set(params) == {"cls", "embedding", "Transformer", "output_projection"}
    assert set(params["Transformer"]) == {"posembed_input", "encoder_norm"} | {
        f"encoderblock_{i}" for i in range(12)
    }


def test_full_size_r300_token_counts():
    """ViViT-B/16x2 at 32x224x224 with r=300 traces to docs/method.md §3.1's counts."""
    model = ViViT(num_classes=400, merging=MergingSettings(mode="merge", r=300))
    video = jax.ShapeDtypeStruct((1, 32, 224, 224, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), video)["params"]
    expected = [2837, 2537, 2237, 1937, 1637, 1337, 1037, 737, 437, 219, 110, 56]
    assert block_token_counts(model, params, video) == expected
    assert [p.tokens_out for p in model.token_plan(32, 224)] == expected


@pytest.fixture(scope="module")
def hf_vivit(tmp_path_factory):
    """A small random HF ViViT saved like a real checkpoint, and its conversion."""
    hf = random_hf_vivit(frames=FRAMES, size=SIZE)
    path = tmp_path_factory.mktemp("hf_vivit")
    hf.save_pretrained(path)
    return hf, load_hf_vivit(path), path


def hf_video(seed=0, batch=2):
    return torch.from_numpy(
        np.random.default_rng(seed)
        .standard_normal((batch, FRAMES, 3, SIZE, SIZE))
        .astype(np.float32)
    )


def ours_logits(converted, merging, video, attention="xla"):
    from vtm_jax.models.attention import get_attention

    record = record_from_converted({"architecture": "vivit", **converted})
    model = build_model(record, merging, get_attention(attention))
    nthwc = jnp.asarray(video.numpy().transpose(0, 1, 3, 4, 2))
    return np.asarray(model.apply({"params": converted["params"]}, nthwc)), model


@pytest.mark.parametrize("attention", ["xla", "blockwise"])
def test_r0_matches_hf(hf_vivit, attention):
    hf, converted, _ = hf_vivit
    video = hf_video()
    with torch.no_grad():
        expected = hf(pixel_values=video).logits.numpy()
    got, _ = ours_logits(converted, MergingSettings(), video, attention)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


CASES = [
    dict(mode="merge", r=6),
    dict(mode="merge", r=9, schedule=-1.0),
    dict(mode="merge", r=9, schedule=1.0),
    dict(mode="merge", r=6, head_aggregation="concat"),
    dict(mode="merge", r=6, prop_attn=False),
    dict(mode="merge", r=40),  # clamped in every layer
    dict(mode="random_merge", r=6),
    dict(mode="drop", r=6),
    dict(mode="random_drop", r=6),
    dict(mode="hybrid", r=6, threshold=0.8),
    dict(mode="merge", r=[0, 12, 5]),
    dict(mode="merge", r=5, duplicate=(0, 4)),  # all reduction at the first layer
    dict(mode="random_drop", r=5, duplicate=(2, 3)),  # ... or at the last
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_merged_matches_torch_reference(hf_vivit, case):
    hf, converted, _ = hf_vivit
    merging = MergingSettings.from_dict(case)
    video = hf_video(seed=1)
    got, model = ours_logits(converted, merging, video)

    def random_scores(layer, shape):
        return torch.from_numpy(np.array(jax.random.uniform(layer_key(merging, layer), shape)))

    r = case["r"] if isinstance(case["r"], list) else (case["r"], case.get("schedule", 0.0))
    if "duplicate" in case:  # the paper's r list for duplication (docs/method.md §3.6)
        layer, quantity = case["duplicate"]
        r = [0] * layer + [case["r"]] * quantity + [0] * (model.num_layers - 1 - layer)
    with torch.no_grad():
        ref = tome_vivit_forward(
            hf,
            video,
            r,
            mode=case["mode"],
            prop_attn=case.get("prop_attn", True),
            head_aggregation=case.get("head_aggregation", "mean"),
            threshold=case.get("threshold", 0.0),
            random_scores=random_scores,
            duplicate=case.get("duplicate"),
        )
    np.testing.assert_allclose(got, ref["logits"].numpy(), atol=1e-4, rtol=0)
    # Each case is far from the unreduced logits (and hybrid from merge), so 1e-4 separates them.
    unreduced, _ = ours_logits(converted, MergingSettings(), video)
    assert np.abs(got - unreduced).max() > 1e-2
    if case["mode"] == "hybrid":
        merged, _ = ours_logits(converted, MergingSettings(mode="merge", r=case["r"]), video)
        assert np.abs(got - merged).max() > 1e-2
    assert [p.tokens_out for p in model.token_plan(FRAMES, SIZE)] == ref["token_counts"]


def test_shapes_follow_plan_and_one_compile_per_schedule(hf_vivit):
    _, converted, _ = hf_vivit
    record = record_from_converted({"architecture": "vivit", **converted})
    model = build_model(record, MergingSettings(mode="merge", r=10, schedule=-1.0))
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


def test_trace_source_dense_and_index_agree(hf_vivit):
    _, converted, _ = hf_vivit
    record = record_from_converted({"architecture": "vivit", **converted})
    video = jnp.asarray(hf_video(seed=2).numpy().transpose(0, 1, 3, 4, 2))
    sources = {}
    for form in ("dense", "index"):
        model = build_model(record, MergingSettings(mode="merge", r=8, trace_source=form))
        _, state = model.apply({"params": converted["params"]}, video, mutable=["intermediates"])
        sources[form] = state["intermediates"]["source"][0]
    dense, index = sources["dense"], sources["index"]
    n = dense.shape[1]
    assert dense.shape[2] == index.shape[1] == 65
    np.testing.assert_array_equal(dense, (index[:, None, :] == np.arange(n)[None, :, None]))
