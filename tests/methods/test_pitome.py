"""Mode ``pitome`` against PiToMe's authors' code (hchautran/PiToMe, 550b5de).

The fixtures come from ``scripts/method_fixtures/pitome.py`` running the authors' code: (1)
``pitome_vision`` and ``merge_wavg`` on random keys (energies, sort order, the merge's index
tensors, merged tokens, sizes and source); (2) single blocks of a tiny timm ViT under the
DeiT and MAE patches; (3) that model's logits.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vtm_jax
from vtm_jax.errors import UserError
from vtm_jax.merging import MergeContext, MergingSettings, Tokens
from vtm_jax.merging.methods import pitome
from vtm_jax.models.encoder import EncoderBlock
from vtm_jax.models.registry import ARCHITECTURES
from vtm_jax.models.vivit import ViViT

from . import timm_vit
from .timm_vit import random_params

FIXTURES = Path(__file__).parent / "fixtures"
COMMIT = "550b5deed94aadfeac28bfbe381d87e672044a40"


@functools.cache
def load(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"pitome_{name}.npz") as data:
        arrays = dict(data)
    assert str(arrays["meta/commit"]) == COMMIT
    return arrays


def case(data: dict, name: str) -> dict:
    b, t, cls, _, _, ratio, margin, alpha, sized = data[f"meta/case/{name}"]
    return dict(
        class_token=bool(cls), t=int(t), ratio=float(ratio), margin=float(margin),
        alpha=float(alpha), size=jnp.asarray(data[f"{name}/size"]) if sized else None,
        metric=jnp.asarray(data[f"{name}/metric"]), x=jnp.asarray(data[f"{name}/x"]),
    )  # fmt: skip


def _settings(**options) -> MergingSettings:
    return MergingSettings(mode="pitome", prop_attn=False, rule_options=options)


# ---------------------------------------------------------------------------------------------
# (1) the reduction functions


@functools.partial(jax.jit, static_argnames=("class_token", "margin", "alpha", "r", "bsm"))
def energy_and_split(metric, *, class_token, margin, alpha, r, bsm):
    """The authors' steps in turn: similarity, energy, its order, the variant's split."""
    sim = pitome.similarity(metric[:, int(class_token) :])
    energy = pitome.energy(sim, margin, alpha)
    order = pitome.energy_order(energy)
    return energy, order, (pitome.pitome_bsm_split if bsm else pitome.pitome_split)(sim, order, r)


# The rule jitted (r and the context static), as the blocks run it.
pitome_merge = jax.jit(pitome.pitome_merge, static_argnums=(2, 3))


@pytest.mark.parametrize("variant", ["pitome", "pitome_bsm"])
@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_energy_order_and_split_equal_the_authors(name, variant):
    data, c = load("merge"), case(load("merge"), name)
    ref = {k.split("/")[-1]: v for k, v in data.items() if k.startswith(f"{name}/{variant}/")}
    r = pitome.keep_ratio_removed(c["t"], c["ratio"])
    assert r == (ref["a_idx"] if variant == "pitome" else ref["src_idx"]).shape[1]
    energy, order, split = energy_and_split(
        c["metric"], class_token=c["class_token"], margin=c["margin"], alpha=c["alpha"], r=r,
        bsm=variant == "pitome_bsm",
    )  # fmt: skip
    np.testing.assert_allclose(energy, ref["energy"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(order, ref["indices"])
    if variant == "pitome":
        np.testing.assert_array_equal(split.kept, ref["protected_idx"])
        np.testing.assert_array_equal(split.src, ref["a_idx"])
    else:
        kept, src = (np.take_along_axis(ref["a_idx"], ref[k], 1) for k in ("unm_idx", "src_idx"))
        np.testing.assert_array_equal(split.kept, kept)
        np.testing.assert_array_equal(split.src, src)
    np.testing.assert_array_equal(split.dst, ref["b_idx"])
    np.testing.assert_array_equal(split.dst_slot, ref["dst_idx"])


@pytest.mark.parametrize("variant", ["pitome", "pitome_bsm"])
@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_the_rule_merges_as_the_authors(name, variant):
    data, c = load("merge"), case(load("merge"), name)
    ref = {k.split("/")[-1]: v for k, v in data.items() if k.startswith(f"{name}/{variant}/")}
    n = c["x"].shape[1]
    settings = _settings(
        keep_ratio=c["ratio"], margin=c["margin"], alpha=c["alpha"],
        bsm_layers="all" if variant == "pitome_bsm" else "none",
    )  # fmt: skip
    # Layer 0 of any depth: the margin is the option itself.
    ctx = MergeContext(settings, c["class_token"], layer=0, num_layers=4)
    r = pitome.removed(n, 0, ctx)
    eye = jnp.broadcast_to(jnp.eye(n), (2, n, n))
    out = pitome_merge(Tokens(c["x"], c["size"], eye), c["metric"], r, ctx)
    np.testing.assert_allclose(out.x, ref["x_out"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.size, ref["size_out"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out.source, ref["source_out"])
    # Index-form tracking agrees with the dense form.
    index = jnp.broadcast_to(jnp.arange(n), (2, n))
    groups = pitome_merge(Tokens(c["x"], c["size"], index), c["metric"], r, ctx).source
    dense = np.asarray(groups)[:, None, :] == np.arange(n - r)[None, :, None]
    np.testing.assert_array_equal(dense, ref["source_out"] > 0)


def test_margin_and_variant_schedules_are_the_authors_patches():
    # The DeiT and MAE patches: margins .75 - .75 i / L; pitome_bsm in the first ceil(L/2)
    # layers (DeiT) or the rest (MAE).
    assert [pitome.layer_margin(0.75, i, 12) for i in (0, 6, 11)] == [
        0.75,
        0.375,
        0.75 - 0.75 * 11 / 12,
    ]
    deit = [pitome.uses_bsm("first_half", i, 5) for i in range(5)]
    mae = [pitome.uses_bsm("second_half", i, 5) for i in range(5)]
    assert deit == [True, True, True, False, False]
    assert mae == [False, False, False, True, True]
    assert [pitome.uses_bsm(pitome.DEFAULT_BSM_LAYERS, i, 5) for i in range(5)] == deit


def test_removed_follows_r_or_the_keep_ratio():
    ctx = MergeContext(_settings(), True, layer=0, num_layers=4)
    assert [pitome.removed(65, r, ctx) for r in (0, 5, 40)] == [0, 5, 32]
    ctx = MergeContext(_settings(keep_ratio=0.8), True, layer=0, num_layers=4)
    counts, n = [], 65
    for _ in range(4):  # the authors' floor(T - T ratio) of the tokens after the class token
        counts.append(pitome.removed(n, 0, ctx))
        n -= counts[-1]
    assert counts == [12, 10, 8, 6]
    assert pitome.removed(65, 3, MergeContext(_settings(keep_ratio=1.0), True)) == 0


# ---------------------------------------------------------------------------------------------
# Bad options


@pytest.mark.parametrize(
    "options, message",
    [
        ({"keep_ratio": 0.4}, r"keep_ratio must be in \[0.5, 1\], not 0.4"),
        ({"keep_ratio": 1.5}, r"keep_ratio must be in \[0.5, 1\], not 1.5"),
        ({"margin": 1.2}, r"margin must be in \[0, 1\], not 1.2"),
        ({"alpha": -1.0}, r"alpha must be in \[0, inf\], not -1.0"),
        ({"bsm_layers": "middle"}, "bsm_layers must be one of first_half, second_half, none, all"),
        ({"ratio": 0.9}, "mode 'pitome' has no option ratio"),
    ],
)
def test_bad_options_are_refused_with_the_valid_range(options, message):
    with pytest.raises(UserError, match=message) as error:
        _settings(**options)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# (2) one block, (3) the model's logits: the authors' tiny timm ViT under their DeiT and MAE
# patches, as a one-frame ViViT

PATCH_LAYERS = {"deit": "first_half", "mae": "second_half"}


def _model_settings(patch: str | None) -> MergingSettings:
    if patch is None:
        return MergingSettings()
    # The authors' block calls attention without sizes: no proportional attention.
    return _settings(
        keep_ratio=float(load("model")["meta/keep_ratio"]), bsm_layers=PATCH_LAYERS[patch]
    )


def _vivit(merging: MergingSettings) -> ViViT:
    model = load("model")
    return ViViT(
        num_classes=int(model["meta/num_classes"]),
        hidden_size=int(model["meta/model/embed_dim"]),
        num_heads=int(model["meta/model/num_heads"]),
        mlp_dim=int(model["meta/model/embed_dim"] * model["meta/model/mlp_ratio"]),
        num_layers=int(model["meta/model/depth"]),
        patch_size=(1, int(model["meta/model/patch_size"]), int(model["meta/model/patch_size"])),
        gelu_approximate=False,  # timm's nn.GELU
        merging=merging,
    )


@pytest.mark.parametrize("patch", ["deit", "mae"])
def test_blocks_equal_the_authors(patch):
    weights, data = load("model"), load("block")
    num_layers = int(weights["meta/model/depth"])
    for layer in data["meta/blocks"]:
        block = EncoderBlock(
            num_heads=int(weights["meta/model/num_heads"]),
            mlp_dim=int(weights["meta/model/embed_dim"] * weights["meta/model/mlp_ratio"]),
            class_token=True,
            merging=_model_settings(patch),
            gelu_approximate=False,
        )
        x = jnp.asarray(data[f"{patch}/{layer}/x_in"])
        size = data.get(f"{patch}/{layer}/size_in")
        params = timm_vit.block_params(weights, block, int(layer), x)
        apply = jax.jit(
            lambda p, t, layer=int(layer), block=block: block.apply(
                {"params": p}, t, None, r=0, layer=layer, num_layers=num_layers
            )
        )
        out = apply(params, Tokens(x, None if size is None else jnp.asarray(size)))
        np.testing.assert_allclose(out.x, data[f"{patch}/{layer}/x_out"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(out.size, data[f"{patch}/{layer}/size_out"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("patch", [None, "deit", "mae"])
def test_logits_equal_the_authors(patch):
    data = load("model")
    model = _vivit(_model_settings(patch))
    video = timm_vit.video(data["images"])
    params = timm_vit.vivit_params(data, model, video)
    logits = jax.jit(model.apply)({"params": params}, video)
    np.testing.assert_allclose(logits, data[f"logits/{patch or 'none'}"], atol=1e-5, rtol=0)
    if patch is not None:  # the merging changed the logits: the comparison is not vacuous
        assert np.abs(data[f"logits/{patch}"] - data["logits/none"]).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Through the public API, on the backbones


def clip(frames: int = 16) -> np.ndarray:
    return np.random.default_rng(0).random((frames, 32, 32, 3)).astype(np.float32)


@pytest.mark.parametrize("architecture", ["vivit", "videomae"])
def test_runs_through_the_api_with_fewer_macs(tiny_checkpoint, architecture):
    model, params, record = vtm_jax.load(tiny_checkpoint(architecture))
    cls = int(architecture == "vivit")
    merged = vtm_jax.with_merging(model, mode="pitome", r=16)
    # 128 tubelets: the common budget r per layer, or the authors' keep ratio.
    assert vtm_jax.token_counts(merged, record) == [cls + 112, cls + 96]
    by_ratio = vtm_jax.with_merging(model, mode="pitome", keep_ratio=0.9)
    assert vtm_jax.token_counts(by_ratio, record) == [cls + 116, cls + 105]
    logits = vtm_jax.classify(merged, params, clip())
    assert logits.shape == (8,) and np.isfinite(logits).all()
    assert not np.allclose(logits, vtm_jax.classify(model, params, clip()), atol=1e-4)
    assert merged.analytic_macs(16, 32)["total"] < model.analytic_macs(16, 32)["total"]


@pytest.mark.parametrize("architecture", ["timesformer", "motionformer"])
def test_runs_per_frame_on_timesformer_and_motionformer(architecture):
    # Frame layouts: each frame's (or trajectory group's) tokens are merged on their own.
    tiny = dict(num_classes=5, hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2)
    if architecture == "motionformer":
        tiny |= dict(patch_size=(2, 8, 8), representation_size=None)
    else:
        tiny |= dict(patch_size=(8, 8))
    base = ARCHITECTURES[architecture](**tiny)
    merged = base.clone(merging=vtm_jax.settings(mode="pitome", r=4))
    video = jnp.asarray(clip(4)[None])
    # 16 patches per frame (TimeSformer) or per trajectory group (Motionformer), r 4 a layer.
    assert [p.tokens_out for p in merged.token_plan(4, 32)] == [12, 8]
    logits = jax.jit(merged.apply)({"params": random_params(base, video)}, video)
    assert logits.shape == (1, 5) and np.isfinite(logits).all()
    assert merged.analytic_macs(4, 32)["total"] < base.analytic_macs(4, 32)["total"]
