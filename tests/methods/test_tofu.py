"""Mode ``tofu`` against the ToFu reimplementation in hchautran/PiToMe (550b5de).

The fixtures come from ``scripts/method_fixtures/tofu.py`` running that code: (1)
``bipartite_soft_matching`` and its ``prune``, ``mean`` and ``tofu`` merges on random keys;
(2) single blocks of a tiny timm ViT under the DeiT and MAE patches; (3) that model's logits.
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
from vtm_jax.merging.methods import tofu
from vtm_jax.models.encoder import EncoderBlock
from vtm_jax.models.registry import ARCHITECTURES
from vtm_jax.models.vivit import ViViT

from . import timm_vit
from .timm_vit import random_params

FIXTURES = Path(__file__).parent / "fixtures"
COMMIT = "550b5deed94aadfeac28bfbe381d87e672044a40"
# The port's per-layer strategy after the middle layer: DeiT's MLERP, MAE's mean.
PATCH_MERGE = {"deit": "mlerp_port", "mae": "mean"}


@functools.cache
def load(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"tofu_{name}.npz") as data:
        arrays = dict(data)
    assert str(arrays["meta/commit"]) == COMMIT
    return arrays


def case(name: str) -> tuple[jax.Array, jax.Array, bool, float]:
    data = load("merge")
    _, _, cls, _, _, ratio = data[f"meta/case/{name}"]
    return jnp.asarray(data[f"{name}/metric"]), jnp.asarray(data[f"{name}/x"]), bool(cls), ratio


def _settings(**options) -> MergingSettings:
    return MergingSettings(mode="tofu", rule_options=options)


# Jitted, as the blocks run them (eager dispatch is slow on a loaded CPU).
match = jax.jit(tofu.match, static_argnums=1, static_argnames="class_token")
reduce = jax.jit(tofu.reduce, static_argnums=2)
tofu_merge = jax.jit(tofu.tofu_merge, static_argnums=(2, 3))


# ---------------------------------------------------------------------------------------------
# (1) the reduction functions


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_match_and_reductions_equal_the_port(name):
    data = load("merge")
    metric, x, cls, ratio = case(name)
    n = x.shape[1]
    r = tofu.removed(n, 0, MergeContext(_settings(keep_ratio=ratio), cls))
    assert r == data[f"{name}/src_idx"].shape[1]  # the port's floor(N - N ratio)
    m = match(metric, r, class_token=cls)
    for idx in ("unm_idx", "src_idx", "dst_idx"):
        np.testing.assert_array_equal(getattr(m, idx), data[f"{name}/{idx}"])
    for ours, theirs in (("prune", "prune"), ("mean", "mean"), ("mlerp_port", "tofu")):
        out = reduce(x, m, ours)
        np.testing.assert_allclose(out, data[f"{name}/{theirs}"], atol=1e-5, rtol=0)
    eye = jnp.broadcast_to(jnp.eye(n), (2, n, n))
    source = tofu.track_source(eye, m, n, pruned=False)
    np.testing.assert_array_equal(source, data[f"{name}/source_amax"])
    groups = tofu.track_source(jnp.broadcast_to(jnp.arange(n), (2, n)), m, n, pruned=False)
    dense = np.asarray(groups)[:, None, :] == np.arange(n - r)[None, :, None]
    np.testing.assert_array_equal(dense, data[f"{name}/source_amax"] > 0)


@pytest.mark.parametrize("name", ["a", "b"])
def test_paper_mlerp_keeps_the_mean_direction_and_the_largest_norm(name):
    metric, x, cls, ratio = case(name)
    n = x.shape[1]
    r = tofu.removed(n, 0, MergeContext(_settings(keep_ratio=ratio), cls))
    m = match(metric, r, class_token=cls)
    paper = np.asarray(reduce(x, m, "mlerp"))
    port = np.asarray(reduce(x, m, "mlerp_port"))
    mean = np.asarray(reduce(x, m, "mean"))
    a, b = np.asarray(x[:, ::2]), np.asarray(x[:, 1::2])
    n_unm = m.unm_idx.shape[1]
    for row in range(x.shape[0]):
        for slot in range(b.shape[1]):
            members = [b[row, slot]] + [
                a[row, s] for s, d in zip(m.src_idx[row], m.dst_idx[row], strict=True) if d == slot
            ]
            got, avg = paper[row, n_unm + slot], mean[row, n_unm + slot]
            norm = max(np.linalg.norm(v) for v in members)
            np.testing.assert_allclose(np.linalg.norm(got), norm, rtol=1e-5)
            np.testing.assert_allclose(got / norm, avg / np.linalg.norm(avg), atol=1e-5)
    # The port's divisor (the destination's norm before merging) differs where srcs merged.
    assert np.abs(paper - port).max() > 1e-3
    np.testing.assert_array_equal(paper[:, :n_unm], port[:, :n_unm])


def test_prune_early_merge_late_as_the_port():
    # The port's patches: strategy 'prune' for i <= L // 2, the late merge after.
    assert [tofu.strategy("mlerp", i, 12) for i in range(12)] == ["prune"] * 7 + ["mlerp"] * 5
    assert [tofu.strategy("mean", i, 4) for i in range(4)] == ["prune"] * 3 + ["mean"]


def test_removed_follows_r_or_the_keep_ratio_and_never_takes_the_class_token():
    ctx = MergeContext(_settings(), True)
    assert [tofu.removed(65, r, ctx) for r in (0, 5, 40)] == [0, 5, 32]
    ctx = MergeContext(_settings(keep_ratio=0.8), True)
    counts, n = [], 65
    for _ in range(4):  # floor(N - N ratio), the class token counted in N
        counts.append(tofu.removed(n, 0, ctx))
        n -= counts[-1]
    assert counts == [13, 10, 8, 6]
    # At 0.5 the port would take all of A, the class token included, from an even count.
    assert tofu.removed(10, 0, MergeContext(_settings(keep_ratio=0.5), True)) == 4
    assert tofu.removed(10, 0, MergeContext(_settings(keep_ratio=0.5), False)) == 5


def test_the_rule_prunes_early_and_merges_late_without_tracking_sizes():
    metric, x, cls, _ = case("a")
    late = MergeContext(_settings(late_merge="mlerp"), cls, layer=3, num_layers=4)
    early = late._replace(layer=2)
    m = match(metric, 5, class_token=cls)
    out = tofu_merge(Tokens(x), metric, 5, late)
    np.testing.assert_array_equal(out.x, reduce(x, m, "mlerp"))
    assert out.size is None
    default = tofu_merge(Tokens(x), metric, 5, late._replace(settings=_settings()))
    np.testing.assert_array_equal(default.x, reduce(x, m, "mlerp_port"))  # the port's, quirk kept
    np.testing.assert_array_equal(tofu_merge(Tokens(x), metric, 5, early).x, reduce(x, m, "prune"))
    # Index-form source: pruned tokens are gone (-1), as in vtm-jax's drop mode.
    groups = jnp.broadcast_to(jnp.arange(x.shape[1]), (2, x.shape[1]))
    pruned = tofu_merge(Tokens(x, None, groups), metric, 5, early).source
    assert (np.asarray(pruned) == -1).sum(axis=1).tolist() == [5, 5]


# ---------------------------------------------------------------------------------------------
# Bad options


@pytest.mark.parametrize(
    "options, message",
    [
        ({"keep_ratio": 0.3}, r"keep_ratio must be in \[0.5, 1\], not 0.3"),
        ({"keep_ratio": 2}, r"keep_ratio must be in \[0.5, 1\], not 2"),
        ({"late_merge": "max"}, "late_merge must be one of mlerp_port, mlerp, mean, not 'max'"),
        ({"late_merge": 1}, "late_merge must be a string, not 1"),
        ({"margin": 0.5}, None),  # PiToMe's option: checked, then left out (a preset)
    ],
)
def test_bad_options_are_refused_with_the_valid_range(options, message):
    if message is None:
        assert "margin" not in _settings(**options).rule_options
        return
    with pytest.raises(UserError, match=message) as error:
        _settings(**options)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# (2) one block, (3) the model's logits: the port's tiny timm ViT under its DeiT and MAE
# patches, as a one-frame ViViT


def _model_settings(patch: str | None) -> MergingSettings:
    if patch is None:
        return MergingSettings()
    ratio = float(load("model")["meta/keep_ratio"])
    return _settings(keep_ratio=ratio, late_merge=PATCH_MERGE[patch])


def _dims() -> dict:
    meta = load("model")
    width = int(meta["meta/model/embed_dim"])
    return dict(
        num_heads=int(meta["meta/model/num_heads"]),
        mlp_dim=int(width * meta["meta/model/mlp_ratio"]),
        gelu_approximate=False,  # timm's nn.GELU
    )


@pytest.mark.parametrize("patch", ["deit", "mae"])
def test_blocks_equal_the_port(patch):
    weights, data = load("model"), load("block")
    num_layers = int(weights["meta/model/depth"])
    for layer in data["meta/blocks"]:
        block = EncoderBlock(class_token=True, merging=_model_settings(patch), **_dims())
        x = jnp.asarray(data[f"{patch}/{layer}/x_in"])
        params = timm_vit.block_params(weights, block, int(layer), x)
        apply = jax.jit(
            lambda p, t, layer=int(layer), block=block: block.apply(
                {"params": p}, t, None, r=0, layer=layer, num_layers=num_layers
            )
        )
        out = apply(params, Tokens(x))
        np.testing.assert_allclose(out.x, data[f"{patch}/{layer}/x_out"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("patch", [None, "deit", "mae"])
def test_logits_equal_the_port(patch):
    data = load("model")
    size = int(data["meta/model/patch_size"])
    model = ViViT(
        num_classes=int(data["meta/num_classes"]),
        hidden_size=int(data["meta/model/embed_dim"]),
        num_layers=int(data["meta/model/depth"]),
        patch_size=(1, size, size),
        merging=_model_settings(patch),
        **_dims(),
    )
    video = timm_vit.video(data["images"])
    params = timm_vit.vivit_params(data, model, video)
    logits = jax.jit(model.apply)({"params": params}, video)
    np.testing.assert_allclose(logits, data[f"logits/{patch or 'none'}"], atol=1e-5, rtol=0)
    if patch is not None:  # the reduction changed the logits: the comparison is not vacuous
        assert np.abs(data[f"logits/{patch}"] - data["logits/none"]).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Through the public API, on the backbones


def clip(frames: int = 16) -> np.ndarray:
    return np.random.default_rng(0).random((frames, 32, 32, 3)).astype(np.float32)


@pytest.mark.parametrize("architecture", ["vivit", "videomae"])
def test_runs_through_the_api_with_fewer_macs(tiny_checkpoint, architecture):
    model, params, record = vtm_jax.load(tiny_checkpoint(architecture))
    cls = int(architecture == "vivit")
    merged = vtm_jax.with_merging(model, mode="tofu", r=16)
    # 128 tubelets: the common budget r per layer, or the port's keep ratio (N with the class
    # token: floor(129 - 129 * 0.9) = 12 on ViViT, floor(128 - 115.2) = 12 on VideoMAE).
    assert vtm_jax.token_counts(merged, record) == [cls + 112, cls + 96]
    by_ratio = vtm_jax.with_merging(model, mode="tofu", keep_ratio=0.9)
    assert vtm_jax.token_counts(by_ratio, record) == [cls + 116, cls + 105]
    logits = vtm_jax.classify(merged, params, clip())
    assert logits.shape == (8,) and np.isfinite(logits).all()
    assert not np.allclose(logits, vtm_jax.classify(model, params, clip()), atol=1e-4)
    assert merged.analytic_macs(16, 32)["total"] < model.analytic_macs(16, 32)["total"]


@pytest.mark.parametrize("architecture", ["timesformer", "motionformer"])
def test_runs_per_frame_on_timesformer_and_motionformer(architecture):
    # Frame layouts: each frame's (or trajectory group's) tokens are reduced on their own.
    tiny = dict(num_classes=5, hidden_size=32, num_heads=2, mlp_dim=64, num_layers=3)
    if architecture == "motionformer":
        tiny |= dict(patch_size=(2, 8, 8), representation_size=None)
    else:
        tiny |= dict(patch_size=(8, 8))
    base = ARCHITECTURES[architecture](**tiny)
    merged = base.clone(merging=vtm_jax.settings(mode="tofu", r=3, late_merge="mlerp"))
    video = jnp.asarray(clip(4)[None])
    # 16 patches per frame (TimeSformer) or per trajectory group (Motionformer): layers 0 and
    # 1 prune, layer 2 merges.
    assert [p.tokens_out for p in merged.token_plan(4, 32)] == [13, 10, 7]
    logits = jax.jit(merged.apply)({"params": random_params(base, video)}, video)
    assert logits.shape == (1, 5) and np.isfinite(logits).all()
    assert merged.analytic_macs(4, 32)["total"] < base.analytic_macs(4, 32)["total"]
