"""The ``vid_tldr`` mode against its authors' code (mlvlab/vid-TLDR at a25051d4), at three levels.

The fixtures are outputs of the authors' ``vid_TLDR.py`` and UMT encoder written by
``scripts/method_fixtures/vid_tldr.py`` (its docstring says what each holds): (1) the saliency,
the matching and ``merge_wavg`` on random inputs, two steps in a row, (2) one UMT ``Block``,
(3) the logits of a tiny random UMT encoder with VideoMAE's head. Indices must be equal
exactly; values within 1e-5.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vtm_jax
from vtm_jax.checkpoints.convert.common import CONV, LINEAR, OUT_KERNEL, QKV_KERNEL, to_flax
from vtm_jax.errors import UserError
from vtm_jax.merging import MergeContext, MergingSettings, Tokens
from vtm_jax.merging import matching as mg
from vtm_jax.merging.methods import vid_tldr
from vtm_jax.models.encoder import EncoderBlock
from vtm_jax.models.registry import check_settings_apply
from vtm_jax.models.videomae import VideoMAE
from vtm_jax.models.vivit_fe import FactorisedEncoderViViT

FIXTURES = Path(__file__).parent / "fixtures"
COMMIT = "a25051d4a4808ce2b480bd1a80a96f68c21aa5cb"
WIDTH, HEADS, MLP = 32, 4, 64
# Blocks and models: the authors' float32 torch output is itself up to 1.5e-5 off a float64 run
# of the same block (vtm-jax's float32 is within 4.2e-6 of it), so values there get a relative
# term on top of 1e-5; indices and level 1 stay at 1e-5 absolute.
CLOSE = dict(atol=1e-5, rtol=1e-5)
SALIENCY = jax.jit(vid_tldr.saliency, static_argnames="class_token")


def load(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"vid_tldr_{name}.npz") as data:
        arrays = dict(data)
    assert str(arrays["commit"]) == COMMIT and str(arrays["repo"]) == "mlvlab/vid-TLDR"
    return arrays


def settings(r, **fields) -> MergingSettings:
    # UMT adds log(size) to the logits once sizes exist: proportional attention on.
    return MergingSettings(mode="vid_tldr", r=r, prop_attn=True, **fields)


# ---------------------------------------------------------------------------------------------
# Level 1: saliency, matching and merge on random inputs


def step(x, size, logits, r: int):
    """One vid-TLDR step piece by piece: saliency, matching, the weighted merge."""
    weights = vid_tldr.saliency(logits, class_token=False)
    match = vid_tldr.match_hidden(x, r, class_token=False)
    merged = vid_tldr.merge_wavg(x, size, match, vid_tldr.src_weights(weights, match))
    return weights, match, merged


def test_two_steps_match_the_authors_indices_and_values():
    ref = load("functions")
    x, size = jnp.asarray(ref["x1"]), None
    for i in (1, 2):
        r, logits = int(ref[f"r{i}"]), jnp.asarray(ref[f"logits{i}"])
        weights, match, (x, size) = jax.jit(step, static_argnums=3)(x, size, logits, r)
        np.testing.assert_allclose(weights, ref[f"score{i}"], atol=1e-5, rtol=0)
        assert int((np.asarray(weights) == 0).sum()) == int((ref[f"score{i}"] == 0).sum())
        np.testing.assert_array_equal(match.unm_idx, ref[f"unm{i}"])
        np.testing.assert_array_equal(match.src_idx, ref[f"src{i}"])
        np.testing.assert_array_equal(match.dst_idx, ref[f"dst{i}"])
        # Chained on vtm-jax's own outputs, so sizes carry over as they would in a model.
        np.testing.assert_allclose(x, ref[f"x{i + 1}"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(size, ref[f"size{i + 1}"], atol=1e-5, rtol=0)


@functools.partial(jax.jit, static_argnums=(2, 3))
def rule(tokens: Tokens, logits, r: int, class_token: bool) -> Tokens:
    """The registered rule as a block calls it: metric = hidden states, the block's logits."""
    ctx = MergeContext(settings(r), class_token, attention_logits=logits)
    return vid_tldr.RULE.apply(tokens, tokens.x, r, ctx)


def test_the_rule_is_the_authors_step():
    ref = load("functions")
    out = rule(Tokens(jnp.asarray(ref["x1"])), jnp.asarray(ref["logits1"]), 5, False)
    np.testing.assert_allclose(out.x, ref["x2"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.size, ref["size2"], atol=1e-5, rtol=0)


def test_zero_probabilities_give_finite_saliency():
    # Masked logits give exact zeros after the softmax: torch's A log A is NaN there.
    logits = jax.random.normal(jax.random.PRNGKey(0), (1, 2, 6, 6)).at[..., :3].set(-jnp.inf)
    weights = SALIENCY(logits, class_token=False)
    assert np.isfinite(np.asarray(weights)).all()
    assert 0.0 <= float(weights.min()) and float(weights.max()) == pytest.approx(1.0)


@jax.jit
def protected(logits, tokens):
    """Saliency, its patch-token statistics, matching and the rule with a class token."""
    weights = vid_tldr.saliency(logits, class_token=True)
    patches = vid_tldr.foreground_weights(vid_tldr.attention_sharpness(logits)[:, 1:])
    match = vid_tldr.match_hidden(tokens.x, 6, class_token=True)
    ctx = MergeContext(settings(6), True, attention_logits=logits)
    return weights, patches, match, vid_tldr.RULE.apply(tokens, tokens.x, 6, ctx)


def test_class_token_is_protected_and_left_out_of_the_statistics():
    ref = load("functions")
    x = jnp.asarray(ref["x1"])
    cls = jnp.full((2, 1, x.shape[2]), 5.0)  # very similar to nothing; would merge if allowed
    with_cls = jnp.concatenate([cls, x], axis=1)
    n = with_cls.shape[1]
    logits = jax.random.normal(jax.random.PRNGKey(1), (2, 3, n, n))
    source = jnp.broadcast_to(jnp.arange(n), (2, n))
    weights, patches, match, out = protected(logits, Tokens(with_cls, None, source))
    assert float(jnp.abs(weights[:, 0]).max()) == 0.0
    np.testing.assert_array_equal(weights[:, 1:], patches)
    assert out.x.shape == (2, n - 6, x.shape[2])
    np.testing.assert_allclose(out.x[:, 0], cls[:, 0], atol=1e-6, rtol=0)
    assert (np.asarray(out.source)[:, 0] == 0).all()  # the class token stays in slot 0
    assert int(match.unm_idx[:, 0].max()) == 0 and not (np.asarray(match.src_idx) == 0).any()


def test_source_tracking_index_and_dense_agree():
    ref = load("functions")
    x, logits = jnp.asarray(ref["x1"]), jnp.asarray(ref["logits1"])
    n = x.shape[1]
    index = rule(Tokens(x, None, jnp.broadcast_to(jnp.arange(n), (2, n))), logits, 5, False)
    dense = rule(Tokens(x, None, jnp.broadcast_to(jnp.eye(n), (2, n, n))), logits, 5, False)
    members = np.asarray(mg.groups_to_source(index.source, n - 5)) > 0
    np.testing.assert_array_equal(members, np.asarray(dense.source) > 0)
    # Background tokens (weight 0) are gone from the index form: dropped in effect.
    weights = np.asarray(SALIENCY(logits, class_token=False))[..., 0]
    assert ((np.asarray(index.source) == -1) <= (weights == 0)).all()
    assert (np.asarray(index.source) == -1).any()


def test_options_and_backbones_it_cannot_run_on_are_refused():
    with pytest.raises(UserError, match="mode 'vid_tldr' has no option keep") as caught:
        settings(8, rule_options={"keep": 0.5})
    assert "\n" not in str(caught.value)
    for arch in ("timesformer", "motionformer"):  # their blocks supply only keys
        with pytest.raises(UserError, match=f"cannot run on {arch}: it reads attention") as caught:
            check_settings_apply(arch, settings(8))
        assert "vivit" in str(caught.value) and "videomae" in str(caught.value)
    for arch in ("vivit", "videomae", "vivit_factorised_encoder"):
        check_settings_apply(arch, settings(8))


# ---------------------------------------------------------------------------------------------
# Level 2 and 3: the authors' UMT block and encoder, weights loaded into vtm-jax


def block_params(w: dict[str, np.ndarray], prefix: str) -> dict:
    """One UMT block (fused qkv without key bias, q/v biases) as vtm-jax's EncoderBlock."""
    qkv = w[f"{prefix}attn.qkv.weight"]
    head = (WIDTH, HEADS, WIDTH // HEADS)
    attn = {
        name: {"kernel": to_flax(QKV_KERNEL, part, head)}
        for name, part in zip(("query", "key", "value"), np.split(qkv, 3), strict=True)
    }
    attn["query"]["bias"] = w[f"{prefix}attn.q_bias"].reshape(head[1:])
    attn["value"]["bias"] = w[f"{prefix}attn.v_bias"].reshape(head[1:])
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

    return {
        "LayerNorm_0": norm("norm1"),
        "MultiHeadDotProductAttention_0": attn,
        "LayerNorm_1": norm("norm2"),
        "MlpBlock_0": {
            "Dense_0": dense("mlp.fc1", (WIDTH, MLP)),
            "Dense_1": dense("mlp.fc2", (MLP, WIDTH)),
        },
    }


def weights_of(ref: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k[2:]: v for k, v in ref.items() if k.startswith("w/")}


def umt_block(r: int) -> EncoderBlock:
    return EncoderBlock(
        num_heads=HEADS,
        mlp_dim=MLP,
        class_token=False,
        merging=settings(r),
        gelu_approximate=False,
        key_bias=False,
    )


@pytest.mark.parametrize("sized", [False, True])
def test_one_block_matches_the_authors_block(sized):
    ref = load("block")
    r, name = int(ref["r"]), "sized" if sized else "none"
    size = jnp.asarray(ref["sized_size"]) if sized else None
    params = block_params(weights_of(ref), "")
    block = umt_block(r)
    apply = jax.jit(lambda p, t: block.apply(p, t, None, r=r, layer=0, num_layers=1))
    out = apply({"params": params}, Tokens(jnp.asarray(ref["x"]), size))
    np.testing.assert_allclose(out.x, ref[f"{name}_out"], **CLOSE)
    np.testing.assert_allclose(out.size, ref[f"{name}_size_out"], **CLOSE)


def videomae_params(w: dict[str, np.ndarray]) -> dict:
    patch = w["encoder.patch_embed.proj.weight"]
    blocks = {f"encoderblock_{i}": block_params(w, f"encoder.blocks.{i}.") for i in range(3)}
    return {
        "embedding": {
            "kernel": to_flax(CONV, patch, patch.shape[2:] + patch.shape[1::-1]),
            "bias": w["encoder.patch_embed.proj.bias"],
        },
        "Transformer": blocks,
        "fc_norm": {"scale": w["pool_norm.weight"], "bias": w["pool_norm.bias"]},
        "output_projection": {
            "kernel": to_flax(LINEAR, w["head.weight"], (WIDTH, 5)),
            "bias": w["head.bias"],
        },
    }


def test_tiny_model_logits_match_the_authors_model():
    ref = load("model")
    params = videomae_params(weights_of(ref))
    video = jnp.asarray(ref["video"].transpose(0, 2, 3, 4, 1))  # [B, C, T, H, W] -> [B, T, H, W, C]
    r = [int(v) for v in ref["r"]]
    model = VideoMAE(
        num_classes=5,
        hidden_size=WIDTH,
        num_heads=HEADS,
        mlp_dim=MLP,
        num_layers=3,
        patch_size=(2, 8, 8),
        merging=settings(r),
    )
    np.testing.assert_allclose(
        jax.jit(model.apply)({"params": params}, video), ref["logits"], **CLOSE
    )
    assert [p.tokens_out for p in model.token_plan(4, 32)] == [26, 22, 19]


# ---------------------------------------------------------------------------------------------
# The public API on the tiny backbones


@pytest.mark.parametrize("architecture", ["vivit", "videomae"])
def test_runs_through_the_api_with_fewer_macs(tiny_checkpoint, architecture):
    model, params, record = vtm_jax.load(tiny_checkpoint(architecture))
    merged = vtm_jax.with_merging(model, mode="vid_tldr", r=16)
    clip = np.random.default_rng(0).random((16, 32, 32, 3)).astype(np.float32)
    logits = vtm_jax.classify(merged, params, clip)
    assert logits.shape == (8,) and np.isfinite(logits).all()
    counts = vtm_jax.token_counts(merged, record)
    cls = int(architecture == "vivit")
    assert counts == [128 + cls - 16, 128 + cls - 32]
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
    # Per frame: 16 patches and the class token, 4 tokens fewer in each spatial layer.
    assert [p.tokens_out for p in model.token_plan(4, 32)][:2] == [13, 9]
    plain = model.clone(merging=MergingSettings())
    assert model.analytic_macs(4, 32)["total"] < plain.analytic_macs(4, 32)["total"]
