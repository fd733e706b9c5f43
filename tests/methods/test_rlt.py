"""Mode ``rlt`` against the authors' Run-Length Tokenization code (rccchoudhury/rlt, 69ec8b4).

The fixtures come from ``scripts/method_fixtures/rlt.py`` running the authors' code: (1) the
keep mask, its scores and the kept order; (2) one block on each clip's kept tokens; (3) the
logits of a tiny VideoMAE-like model run per clip on its kept tokens only.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vtm_jax
from vtm_jax.errors import UserError
from vtm_jax.merging import MergingSettings, Tokens
from vtm_jax.merging.methods import rlt
from vtm_jax.models.encoder import EncoderBlock
from vtm_jax.models.videomae import VideoMAE, sinusoid_positions
from vtm_jax.models.vivit import ViViT

FIXTURES = Path(__file__).parent / "fixtures"
COMMIT = "69ec8b4b8bf8fc44252108801f095936d9845dba"
PATCH = 4  # the fixtures' spatial patch (16x16 frames, 8 frames)


def load(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"rlt_{name}.npz") as data:
        arrays = dict(data)
    assert str(arrays["commit"]) == COMMIT
    return arrays


# ---------------------------------------------------------------------------------------------
# (1) the keep mask, its scores, the kept order


@pytest.mark.parametrize("tubelet", [1, 2, 4])
@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.5])
def test_keep_mask_and_scores_equal_the_authors(tubelet, threshold):
    data = load("keep")
    name = f"t{tubelet}_thr{threshold:g}"
    patch = (tubelet, PATCH, PATCH)
    scores = np.asarray(rlt.tubelet_scores(jnp.asarray(data["clips"]), patch))
    np.testing.assert_allclose(scores, data[f"scores_{name}"], atol=1e-5, rtol=0)
    keep = np.asarray(rlt.keep_mask(jnp.asarray(data["clips"]), threshold, patch))
    np.testing.assert_array_equal(keep, data[f"mask_{name}"])
    assert 0 < keep.sum() < keep.size  # the clips keep some patches and drop others


def test_kept_counts_and_order_equal_the_authors_collate():
    data = load("keep")
    keep = rlt.keep_mask(jnp.asarray(data["clips"]), 0.1, (2, PATCH, PATCH))
    counts = np.asarray(rlt.kept_counts(keep))
    np.testing.assert_array_equal(counts, data["collate_counts"])
    np.testing.assert_array_equal(np.asarray(keep), data["collate_mask"])
    assert len(set(counts.tolist())) == 3  # three different counts
    table = sinusoid_positions(keep.shape[1], data["collate_pos"].shape[1])[0]
    order = np.asarray(rlt.front_order(keep))
    gathered = np.concatenate([table[o[:c]] for o, c in zip(order, counts, strict=True)])
    np.testing.assert_array_equal(gathered, data["collate_pos"])


def test_gather_kept_moves_kept_tokens_first_and_pads_with_size_zero():
    keep = jnp.array([[True, False, True, False, True], [True, True, False, False, False]])
    x = jnp.arange(10, dtype=jnp.float32).reshape(2, 5, 1)
    pos = jnp.arange(30, dtype=jnp.float32).reshape(2, 5, 3)
    index = jnp.broadcast_to(jnp.arange(5), (2, 5))
    dense = jnp.broadcast_to(jnp.eye(5), (2, 5, 5))
    out = rlt.gather_kept(Tokens(x, None, index, pos), keep, 4)
    np.testing.assert_array_equal(out.x[..., 0], [[0, 2, 4, 1], [5, 6, 7, 8]])
    np.testing.assert_array_equal(out.size[..., 0], [[1, 1, 1, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(out.pos[:, :, 0], [[0, 6, 12, 3], [15, 18, 21, 24]])
    # Index-form source: each original's slot, -1 when dropped (or cut off by the length).
    np.testing.assert_array_equal(out.source, [[0, -1, 1, -1, 2], [0, 1, -1, -1, -1]])
    dense_out = rlt.gather_kept(Tokens(x, None, dense), keep, 4).source
    np.testing.assert_array_equal(dense_out[0, 3], np.zeros(5))  # padding holds no original
    np.testing.assert_array_equal(dense_out[0, 1], np.eye(5)[2])
    assert out.size.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Weights of the authors' model as vtm-jax parameters


def block_params(w: dict[str, np.ndarray], prefix: str, heads: int) -> dict:
    width = w[f"{prefix}norm1.weight"].shape[0]
    qkv = w[f"{prefix}attn.qkv.weight"]

    def heads_kernel(rows):  # Linear [H d, D] -> (D, H, d)
        return rows.T.reshape(width, heads, width // heads)

    attention = {
        "query": {
            "kernel": heads_kernel(qkv[:width]),
            "bias": w[f"{prefix}attn.q_bias"].reshape(heads, -1),
        },
        "key": {"kernel": heads_kernel(qkv[width : 2 * width])},
        "value": {
            "kernel": heads_kernel(qkv[2 * width :]),
            "bias": w[f"{prefix}attn.v_bias"].reshape(heads, -1),
        },
        "out": {
            "kernel": w[f"{prefix}attn.proj.weight"].T.reshape(heads, -1, width),
            "bias": w[f"{prefix}attn.proj.bias"],
        },
    }

    def norm(name):
        return {"scale": w[f"{prefix}{name}.weight"], "bias": w[f"{prefix}{name}.bias"]}

    def dense(name):
        return {"kernel": w[f"{prefix}{name}.weight"].T, "bias": w[f"{prefix}{name}.bias"]}

    return {
        "LayerNorm_0": norm("norm1"),
        "MultiHeadDotProductAttention_0": attention,
        "LayerNorm_1": norm("norm2"),
        "MlpBlock_0": {"Dense_0": dense("mlp.fc1"), "Dense_1": dense("mlp.fc2")},
    }


def weights(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k[2:]: v for k, v in data.items() if k.startswith("w/")}


RLT = MergingSettings(mode="rlt", prop_attn=False)


def logits_of(model, params, video) -> np.ndarray:
    """``model``'s logits, compiled: faster than running the ops one by one."""
    return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(video)))


# ---------------------------------------------------------------------------------------------
# (2) one block


def test_block_on_padded_tokens_equals_the_authors_block_on_kept_tokens():
    data = load("block")
    params = block_params(weights(data), "", heads=4)
    x, keep = jnp.asarray(data["x"]), jnp.asarray(data["mask"])
    tokens = rlt.gather_kept(Tokens(x), keep, x.shape[1])
    block = EncoderBlock(
        num_heads=4,
        mlp_dim=4 * x.shape[-1],
        class_token=False,
        merging=RLT,
        layer_norm_eps=1e-5,
        gelu_approximate=False,
        key_bias=False,
    )
    out = jax.jit(lambda p, t: block.apply({"params": p}, t, None, r=0))(params, tokens)
    counts = np.asarray(rlt.kept_counts(keep))
    kept = np.concatenate([np.asarray(out.x[b, :c]) for b, c in enumerate(counts)])
    np.testing.assert_allclose(kept, data["kept_out"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out.size, tokens.size)  # the block leaves sizes alone


# ---------------------------------------------------------------------------------------------
# (3) the logits of a tiny model


def videomae_params(w: dict[str, np.ndarray], depth: int, heads: int) -> dict:
    params = {
        "embedding": {
            "kernel": w["patch_embed.proj.weight"].transpose(2, 3, 4, 1, 0),
            "bias": w["patch_embed.proj.bias"],
        },
        "Transformer": {
            f"encoderblock_{i}": block_params(w, f"blocks.{i}.", heads) for i in range(depth)
        },
        "fc_norm": {"scale": w["fc_norm.weight"], "bias": w["fc_norm.bias"]},
        "output_projection": {"kernel": w["head.weight"].T, "bias": w["head.bias"]},
    }
    return jax.tree.map(jnp.asarray, params)


def tiny_videomae(merging: MergingSettings, w: dict[str, np.ndarray]) -> VideoMAE:
    width = w["fc_norm.weight"].shape[0]
    return VideoMAE(
        num_classes=w["head.bias"].shape[0],
        hidden_size=width,
        num_heads=4,
        mlp_dim=w["blocks.0.mlp.fc1.weight"].shape[0],
        num_layers=2,
        patch_size=(2, PATCH, PATCH),
        layer_norm_eps=1e-5,
        fc_norm_eps=1e-5,
        merging=merging,
    )


def test_padded_model_logits_equal_the_authors_per_clip_forward():
    data = load("model")
    w = weights(data)
    params = videomae_params(w, depth=2, heads=4)
    clips = jnp.asarray(data["clips"])
    logits = logits_of(tiny_videomae(RLT, w), params, clips)
    np.testing.assert_allclose(logits, data["logits"], atol=1e-5, rtol=0)
    # Without RLT the same model differs: the fixtures do drop tokens.
    plain = logits_of(tiny_videomae(MergingSettings(prop_attn=False), w), params, clips)
    assert np.abs(np.asarray(plain) - data["logits"])[:2].max() > 1e-3


def test_a_bucket_length_gives_the_same_logits_and_fewer_macs():
    data = load("model")
    w = weights(data)
    params = videomae_params(w, depth=2, heads=4)
    clips = jnp.asarray(data["clips"][:2])  # 28 and 22 patches kept of 64
    bucketed = rlt.batch_settings(
        MergingSettings(mode="rlt", prop_attn=False, rule_options={"bucket": 16}),
        clips,
        (2, PATCH, PATCH),
    )
    assert bucketed.rule_options["length"] == 32
    short = tiny_videomae(bucketed, w)
    logits = logits_of(short, params, clips)
    np.testing.assert_allclose(logits, data["logits"][:2], atol=1e-5, rtol=0)
    full = tiny_videomae(RLT, w)
    frames, size = clips.shape[1], clips.shape[2]
    assert short.analytic_macs(frames, size)["total"] < full.analytic_macs(frames, size)["total"]
    none = tiny_videomae(MergingSettings(prop_attn=False), w)
    assert full.analytic_macs(frames, size)["total"] == none.analytic_macs(frames, size)["total"]
    assert [p.tokens_out for p in short.token_plan(frames, size)] == [32, 32]


# ---------------------------------------------------------------------------------------------
# Host-side buckets, options, backbones


def test_bucket_length_is_the_smallest_multiple_that_holds_the_batch():
    assert rlt.bucket_length(28, 16, 64) == 32
    assert rlt.bucket_length(32, 16, 64) == 32
    assert rlt.bucket_length(33, 16, 64) == 48
    assert rlt.bucket_length(60, 48, 64) == 64  # never beyond every patch
    other = MergingSettings(mode="merge", r=2)
    assert rlt.batch_settings(other, None, (2, 4, 4)) is other  # other modes untouched
    fixed = MergingSettings(mode="rlt", rule_options={"bucket": 16, "length": 48})
    assert rlt.batch_settings(fixed, None, (2, 4, 4)) is fixed  # a given length stays


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rlt_threshold": -0.1}, r"rlt_threshold must be .*0"),
        ({"length": 0}, r"length must be .*1"),
        ({"bucket": 0}, r"bucket must be .*1"),
        ({"rlt_threshold": "high"}, "rlt_threshold must be a finite number"),
    ],
)
def test_bad_options_are_refused_when_settings_are_made(options, message):
    with pytest.raises(UserError, match=message) as info:
        MergingSettings(mode="rlt", rule_options=options)
    assert "\n" not in str(info.value)


def test_a_length_outside_the_patch_grid_is_refused_with_the_range():
    model = ViViT(
        num_classes=3,
        hidden_size=16,
        num_heads=2,
        mlp_dim=32,
        num_layers=1,
        patch_size=(2, 8, 8),
        merging=MergingSettings(mode="rlt", rule_options={"length": 99}),
    )
    video = jnp.zeros((1, 4, 16, 16, 3))
    with pytest.raises(UserError, match=r"rlt length must be between 4 .* and 8 .*, not 99"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), video)  # refused when traced


def _static_video(frames: int, size: int) -> np.ndarray:
    """Clips whose background stands still while one corner changes every frame."""
    rng = np.random.default_rng(3)
    video = np.repeat(rng.normal(size=(2, 1, size, size, 3)), frames, axis=1)
    video[:, :, :8, :8] = rng.normal(size=(2, frames, 8, 8, 3))
    return video.astype(np.float32)


@pytest.mark.parametrize("architecture", ["vivit", "videomae"])
def test_runs_through_the_api_and_buckets_cost_fewer_macs(tiny_checkpoint, architecture):
    model, params, _ = vtm_jax.load(tiny_checkpoint(architecture))
    video = jnp.asarray(_static_video(16, 32))  # 128 patches: 16 + 7 x 1 kept
    static = vtm_jax.with_merging(model, mode="rlt")
    bucketed = vtm_jax.with_merging(static, rule_options={"bucket": 16})
    bucketed = rlt.batch_settings(bucketed.merging, video, model.patch_size)
    assert bucketed.rule_options["length"] == 32
    short = vtm_jax.with_merging(static, bucketed)
    logits = logits_of(static, params, video)
    np.testing.assert_allclose(logits_of(short, params, video), logits, atol=1e-5)
    # A clip of noise changes every patch: RLT keeps them all and equals the plain model.
    noise = video + np.random.default_rng(0).normal(size=video.shape).astype(np.float32)
    np.testing.assert_allclose(
        logits_of(static, params, noise), logits_of(model, params, noise), atol=1e-5
    )
    macs = [m.analytic_macs(16, 32)["total"] for m in (model, static, short)]
    assert macs[2] < macs[1] == macs[0]


def test_refused_on_per_frame_backbones():
    from vtm_jax.models.registry import check_settings_apply

    with pytest.raises(UserError, match="mode 'rlt' cannot run on timesformer: .*joint"):
        check_settings_apply("timesformer", MergingSettings(mode="rlt"))


def test_bench_picks_the_length_of_each_batch_on_the_host(tiny_checkpoint):
    from vtm_jax.jobs.bench import bench_settings

    _, _, record = vtm_jax.load(tiny_checkpoint("videomae"))
    settings = [MergingSettings(), MergingSettings(mode="rlt", rule_options={"bucket": 48})]
    results = bench_settings(record, settings, warmup=0, iterations=1, progress=lambda _: None)
    # bench's clips are uniform noise, which changes every patch: the bucket holds all 128.
    assert results[1]["settings"]["rule_options"] == {"bucket": 48, "length": 128}
    assert results[1]["gmacs_per_clip"] == results[0]["gmacs_per_clip"]


class StaticSource:
    """Videos whose frames repeat but for a square that moves: RLT keeps few patches."""

    name, split, num_classes = "static", "test", 8

    def __len__(self):
        return 4

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        frame = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        video = np.repeat(frame[None], 16, axis=0)
        for t in range(16):  # an 8-pixel square moving right, 1 pixel a frame
            video[t, 8:16, t : t + 8] = 255
        return {"video": video, "video_id": f"v{i}".encode(), "label": np.int64(i % 8)}


def test_evaluation_picks_buckets_per_batch_with_the_same_results(tiny_checkpoint, tmp_path):
    from vtm_jax.jobs.evaluation.evaluate import _BucketedStep, evaluate

    checkpoint = tiny_checkpoint("videomae")
    run = dict(batch_size=2, progress=False, predictions=True)
    static = evaluate(
        checkpoint,
        StaticSource(),
        merging=MergingSettings(mode="rlt"),
        **run,
        results_path=str(tmp_path / "static.json"),
    )
    lengths = []
    original = _BucketedStep.__call__

    def spy(self, params, batch):
        out = original(self, params, batch)
        lengths.append(sorted(s.rule_options["length"] for s in self.steps))
        return out

    _BucketedStep.__call__ = spy
    try:
        bucketed = evaluate(
            checkpoint,
            StaticSource(),
            merging=MergingSettings(mode="rlt", rule_options={"bucket": 16}),
            **run,
            results_path=str(tmp_path / "bucketed.json"),
        )
    finally:
        _BucketedStep.__call__ = original
    assert lengths and max(lengths[-1]) < 128  # a bucket shorter than every patch was used
    assert bucketed["sums"] == static["sums"]
    assert bucketed["predictions"] == static["predictions"]  # every video's top 5, in order
