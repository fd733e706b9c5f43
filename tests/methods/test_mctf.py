"""The ``mctf`` mode against its authors' code (mlvlab/MCTF at 2004da0c), at three levels.

The fixtures are outputs of the authors' ``utils/mctf.py``, ``Block_DEIT`` and DeiT
``VisionTransformer`` written by ``scripts/method_fixtures/mctf.py`` (its docstring says what
each holds): (1) the multi-criteria bidirectional matching and ``merge_wavg`` for every pooling
type on random inputs, (2) one block with one-step-ahead attention (and with recomputed
attention), (3) the logits of a tiny random DeiT loaded into vtm-jax's ViViT with single-frame
tubelets. Indices must be equal exactly; values within 1e-5.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vtm_jax
from vtm_jax.checkpoints.convert.common import CONV2D, LINEAR, OUT_KERNEL, QKV_KERNEL, to_flax
from vtm_jax.errors import UserError
from vtm_jax.merging import MergeContext, MergingSettings, Tokens
from vtm_jax.merging import matching as mg
from vtm_jax.merging.methods import mctf
from vtm_jax.models.encoder import EncoderBlock
from vtm_jax.models.registry import check_settings_apply
from vtm_jax.models.vivit import ViViT
from vtm_jax.models.vivit_fe import FactorisedEncoderViViT

FIXTURES = Path(__file__).parent / "fixtures"
COMMIT = "2004da0cad3231fa74cbd60b6042b0bd133aacde"
WIDTH, HEADS, MLP = 32, 4, 64
# (name, tokens, class token, r, sized, bidirection, taus): as the fixture script's CASES
CASES = (
    ("cls", 17, True, 6, True, 1, (1.0, 20.0, 40.0)),
    ("nocls", 16, False, 5, False, 1, (0.5, 5.0, 10.0)),
    ("uni", 17, True, 4, True, 0, (1.0, 20.0, 40.0)),
)
# Blocks and models: small float32 differences pass through LayerNorms and the MLP (the
# authors' torch float32 is itself ~1e-5 off float64 there), so a relative term is added.
CLOSE = dict(atol=1e-5, rtol=1e-5)


def load(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"mctf_{name}.npz") as data:
        arrays = dict(data)
    assert str(arrays["commit"]) == COMMIT and str(arrays["repo"]) == "mlvlab/MCTF"
    return arrays


def settings(r, **options) -> MergingSettings:
    return MergingSettings(mode="mctf", r=r, prop_attn=True, rule_options=options)


def case_inputs(ref, name, sized):
    x, attn = jnp.asarray(ref[f"{name}_x"]), jnp.asarray(ref[f"{name}_attn"])
    return x, attn, jnp.asarray(ref[f"{name}_size"]) if sized else None


# ---------------------------------------------------------------------------------------------
# Level 1: matching and pooling on random inputs


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matching_and_every_pooling_type_match_the_authors(case):
    ref = load("functions")
    name, _, cls, r, sized, bidirection, taus = case
    x, attn, size = case_inputs(ref, name, sized)

    @jax.jit
    def run(x, attn, size):
        scores = mctf.criteria_scores(x, attn, size, taus, class_token=cls)
        match = mctf.bidirectional_match(scores, r, bidirection=bool(bidirection), class_token=cls)
        pooled = [
            mctf.pool(x, size, attn, match, pooling_type=p, merge_attention=True) for p in range(4)
        ]
        return match, pooled

    match, pooled = run(x, attn, size)
    fields = ("unm_idx", "src_idx", "dst_idx") + (
        ("unm_idx2", "src_idx2", "dst_idx2") if bidirection else ()
    )
    for field in fields:
        np.testing.assert_array_equal(
            getattr(match, field), ref[f"{name}_{field.replace('_idx', '')}"]
        )
    for p, (out_x, out_size, out_attn) in enumerate(pooled):
        np.testing.assert_allclose(out_x, ref[f"{name}_p{p}_x"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(out_size, ref[f"{name}_p{p}_size"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(out_attn, ref[f"{name}_p{p}_attn"], atol=1e-5, rtol=0)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def rule(tokens: Tokens, attn, r: int, class_token: bool, options: tuple = ()):
    """The registered rule as a block calls it: metric = the block input, its attention."""
    ctx = MergeContext(settings(r, **dict(options)), class_token, attention=attn)
    return mctf.RULE.apply(tokens, tokens.x, r, ctx)


def test_the_rule_returns_the_authors_tokens_and_merged_attention():
    ref = load("functions")
    x, attn, size = case_inputs(ref, "cls", True)
    out, merged = rule(Tokens(x, size), attn, 6, True)
    np.testing.assert_allclose(out.x, ref["cls_p1_x"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.size, ref["cls_p1_size"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(merged, ref["cls_p1_attn"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.x[:, 0], x[:, 0], atol=1e-6, rtol=0)  # class token kept
    only = rule(Tokens(x, size), attn, 6, True, (("one_step_ahead", 2),))
    assert isinstance(only, Tokens)
    np.testing.assert_allclose(only.x, out.x, atol=0, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_source_tracking_index_and_dense_agree(case):
    ref = load("functions")
    name, n, cls, r, sized, bidirection, _ = case
    x, attn, size = case_inputs(ref, name, sized)
    options = (("bidirection", bidirection),)
    index = jnp.broadcast_to(jnp.arange(n), (2, n))
    dense = jnp.broadcast_to(jnp.eye(n), (2, n, n))
    by_index = rule(Tokens(x, size, index), attn, r, cls, options)[0].source
    by_dense = rule(Tokens(x, size, dense), attn, r, cls, options)[0].source
    np.testing.assert_array_equal(mg.groups_to_source(by_index, n - r), by_dense)
    # Every token lands somewhere: MCTF merges, it never drops.
    assert (np.asarray(by_index) >= 0).all()


def test_removed_keeps_the_authors_ten_tokens_and_cap():
    ctx = MergeContext(settings(8), True)
    assert [mctf.removed(n, 8, ctx) for n in (37, 29, 21, 13, 11)] == [8, 8, 8, 3, 1]
    assert mctf.removed(37, 0, ctx) == 0 and mctf.removed(9, 8, ctx) == 0
    assert mctf.removed(37, 30, ctx) == 18  # half the unprotected tokens
    free = MergeContext(settings(8, min_tokens=0), True)
    assert mctf.removed(13, 8, free) == 6


@pytest.mark.parametrize(
    "options, message",
    [
        ({"tau_sim": 0}, r"tau_sim must be in \(0, inf\)"),
        ({"tau_info": -2.0}, r"tau_info must be in \(0, inf\)"),
        ({"tau_size": 0.0}, r"tau_size must be in \(0, inf\)"),
        ({"pooling_type": 4}, "pooling_type must be one of 0, 1, 2, 3"),
        ({"one_step_ahead": 0}, "one_step_ahead must be one of 1, 2"),
        ({"bidirection": 2}, "bidirection must be one of 0, 1"),
        ({"min_tokens": -1}, r"min_tokens must be in \[0, inf\]"),
        ({"tau": 1.0}, "has no option tau"),
    ],
)
def test_bad_options_are_refused_with_the_valid_range(options, message):
    with pytest.raises(UserError, match=message) as caught:
        settings(8, **options)
    assert "\n" not in str(caught.value)


def test_refused_on_backbones_whose_blocks_supply_only_keys():
    for arch in ("timesformer", "motionformer"):
        with pytest.raises(UserError, match=f"cannot run on {arch}.*vivit") as caught:
            check_settings_apply(arch, settings(8))
        assert "videomae" in str(caught.value)
    for arch in ("vivit", "videomae", "vivit_factorised_encoder"):
        check_settings_apply(arch, settings(8))


# ---------------------------------------------------------------------------------------------
# Level 2 and 3: the authors' DeiT block and model, weights loaded into vtm-jax


def block_params(w: dict[str, np.ndarray], prefix: str) -> dict:
    """One DeiT block (fused qkv with bias) as vtm-jax's EncoderBlock."""
    head = (WIDTH, HEADS, WIDTH // HEADS)
    kernels = np.split(w[f"{prefix}attn.qkv.weight"], 3)
    biases = np.split(w[f"{prefix}attn.qkv.bias"], 3)
    attn = {
        name: {"kernel": to_flax(QKV_KERNEL, k, head), "bias": b.reshape(head[1:])}
        for name, k, b in zip(("query", "key", "value"), kernels, biases, strict=True)
    }
    attn["out"] = {
        "kernel": to_flax(OUT_KERNEL, w[f"{prefix}attn.proj.weight"], head[1:] + (WIDTH,)),
        "bias": w[f"{prefix}attn.proj.bias"],
    }

    def norm(name):
        return {"scale": w[f"{prefix}{name}.weight"], "bias": w[f"{prefix}{name}.bias"]}

    def dense(name, shape):
        return {
            "kernel": to_flax(LINEAR, w[f"{prefix}{name}.weight"], shape),
            "bias": w[f"{prefix}{name}.bias"],
        }

    mlp = {"Dense_0": dense("mlp.fc1", (WIDTH, MLP)), "Dense_1": dense("mlp.fc2", (MLP, WIDTH))}
    return {
        "LayerNorm_0": norm("norm1"),
        "MultiHeadDotProductAttention_0": attn,
        "LayerNorm_1": norm("norm2"),
        "MlpBlock_0": mlp,
    }


def weights_of(ref: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k[2:]: v for k, v in ref.items() if k.startswith("w/")}


@pytest.mark.parametrize("osa", [1, 2])
@pytest.mark.parametrize("sized", [False, True])
def test_one_block_matches_the_authors_block(osa, sized):
    ref = load("block")
    r, name = int(ref["r"]), f"osa{osa}_{'sized' if sized else 'none'}"
    size = jnp.asarray(ref["sized_size"]) if sized else None
    block = EncoderBlock(
        num_heads=HEADS,
        mlp_dim=MLP,
        class_token=True,
        merging=settings(r, one_step_ahead=osa),
        gelu_approximate=False,
    )
    apply = jax.jit(lambda p, t: block.apply(p, t, None, r=r, layer=0, num_layers=1))
    out = apply({"params": block_params(weights_of(ref), "")}, Tokens(jnp.asarray(ref["x"]), size))
    np.testing.assert_allclose(out.x, ref[f"{name}_out"], **CLOSE)
    np.testing.assert_allclose(out.size, ref[f"{name}_size_out"], **CLOSE)


def vivit_params(w: dict[str, np.ndarray], depth: int) -> dict:
    patch = w["patch_embed.proj.weight"]  # (out, in, h, w)
    blocks = {f"encoderblock_{i}": block_params(w, f"blocks.{i}.") for i in range(depth)}
    blocks["posembed_input"] = {"pos_embedding": w["pos_embed"]}
    blocks["encoder_norm"] = {"scale": w["norm.weight"], "bias": w["norm.bias"]}
    return {
        "embedding": {
            "kernel": to_flax(CONV2D, patch, patch.shape[2:] + patch.shape[1::-1])[None],
            "bias": w["patch_embed.proj.bias"],
        },
        "cls": w["cls_token"],
        "Transformer": blocks,
        "output_projection": {
            "kernel": to_flax(LINEAR, w["head.weight"], (WIDTH, 5)),
            "bias": w["head.bias"],
        },
    }


def test_tiny_model_logits_match_the_authors_model():
    ref = load("model")
    params = vivit_params(weights_of(ref), 5)
    video = jnp.asarray(ref["image"].transpose(0, 2, 3, 1))[:, None]  # one frame, NTHWC
    r = [0] + [int(ref["r"])] * 4  # the authors' activate_layer [1, 2, 3, 4]
    model = ViViT(
        num_classes=5,
        hidden_size=WIDTH,
        num_heads=HEADS,
        mlp_dim=MLP,
        num_layers=5,
        patch_size=(1, 8, 8),
        gelu_approximate=False,
        merging=settings(r),
    )
    np.testing.assert_allclose(
        jax.jit(model.apply)({"params": params}, video), ref["logits"], **CLOSE
    )
    again = model.clone(merging=settings(r, one_step_ahead=2))
    np.testing.assert_allclose(
        jax.jit(again.apply)({"params": params}, video), ref["logits_osa2"], **CLOSE
    )
    # The static plan follows the same count: the last layer keeps 10 tokens, as theirs.
    assert [p.tokens_out for p in model.token_plan(1, 48)] == [37, 29, 21, 13, 10]


# ---------------------------------------------------------------------------------------------
# The public API on the tiny backbones


@pytest.mark.parametrize("architecture", ["vivit", "videomae"])
def test_runs_through_the_api_with_fewer_macs(tiny_checkpoint, architecture):
    model, params, record = vtm_jax.load(tiny_checkpoint(architecture))
    merged = vtm_jax.with_merging(model, mode="mctf", r=16)
    clip = np.random.default_rng(0).random((16, 32, 32, 3)).astype(np.float32)
    logits = vtm_jax.classify(merged, params, clip)
    assert logits.shape == (8,) and np.isfinite(logits).all()
    cls = int(architecture == "vivit")
    assert vtm_jax.token_counts(merged, record) == [128 + cls - 16, 128 + cls - 32]
    macs = merged.analytic_macs(16, 32)["total"]
    assert macs < vtm_jax.with_merging(model, mode="none", r=0).analytic_macs(16, 32)["total"]


def test_runs_per_frame_on_the_factorised_encoder():
    model = FactorisedEncoderViViT(
        num_classes=3,
        hidden_size=16,
        spatial_num_layers=2,
        spatial_num_heads=2,
        spatial_mlp_dim=32,
        temporal_num_layers=1,
        temporal_num_heads=2,
        temporal_mlp_dim=32,
        patch_size=(2, 8, 8),
        merging=settings(4),
    )
    video = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 32, 32, 3))
    # Random parameters of the right shapes without compiling init (only apply is compiled).
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(1), video)
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda s: 0.2 * rng.standard_normal(s.shape, np.float32), shapes)
    assert np.isfinite(np.asarray(jax.jit(model.apply)(variables, video))).all()
    # Per frame: 16 patches and the class token, 4 fewer, then 3: at least 10 stay.
    assert [p.tokens_out for p in model.token_plan(4, 32)][:2] == [13, 10]
    plain = model.clone(merging=MergingSettings())
    assert model.analytic_macs(4, 32)["total"] < plain.analytic_macs(4, 32)["total"]
