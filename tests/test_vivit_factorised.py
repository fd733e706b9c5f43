"""ViViT models 3 and 4: Scenic's recorded tree, the grid merging options' token counts,
values and sources, analytic MACs against the matmuls the model runs, and what is refused.

Parity with Scenic's own module (which needs Scenic importable) is in
``tests/test_vivit_factorised_scenic.py``; the Scenic config, checkpoint and CLI paths are in
``tests/test_vivit_factorised_config.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vtm_jax.config.scenic import vivit_record
from vtm_jax.errors import UserError
from vtm_jax.merging import MergingSettings
from vtm_jax.models.grid_merging import Grid, reduce_grid
from vtm_jax.models.macs import GridStep
from vtm_jax.models.registry import architecture_param_shapes, build_model
from vtm_jax.models.vivit_factorised import FactorisedDotProductViViT, FactorisedSelfAttentionViViT

SHAPES = Path(__file__).with_name("scenic_factorised_shapes.json")
REPO = Path(__file__).resolve().parent.parent
TINY = dict(
    num_classes=5, hidden_size=16, num_heads=2, mlp_dim=32, num_layers=3, patch_size=(2, 8, 8)
)
FRAMES, SIZE = 8, 32  # 4 frames of 4 x 4 = 16 patches
MODELS = {
    "model3_time_space": lambda **kw: FactorisedSelfAttentionViViT(**TINY, **kw),
    "model3_space_time": lambda **kw: FactorisedSelfAttentionViViT(
        **TINY, attention_order="space_time", **kw
    ),
    "model4": lambda **kw: FactorisedDotProductViViT(**TINY, **kw),
}


def _cases() -> list[dict]:
    return json.loads(SHAPES.read_text())["cases"]


@pytest.mark.parametrize("case", _cases(), ids=lambda case: case["name"])
def test_param_tree_is_the_one_scenic_declares(case):
    """Names and shapes as Scenic's module declared them (scripts/record_scenic_factorised_shapes.py),
    the model built the way a Scenic config builds it."""
    config = ml_collections.ConfigDict(
        {
            "model_name": "vivit_classification",
            "model": case["model"],
            "dataset_configs": {
                "num_classes": case["num_classes"],
                "num_frames": case["num_frames"],
                "crop_size": case["image_size"],
            },
        }
    )
    record = vivit_record(config)
    got = architecture_param_shapes(record.architecture, record.model, record.input)
    want = {path: tuple(shape) for path, shape in case["params"].items()}
    assert got == want


def test_recorded_shapes_name_the_pinned_scenic_commit():
    commit = json.loads(SHAPES.read_text())["scenic_commit"]
    assert commit in (REPO / "pyproject.toml").read_text()
    assert commit in (REPO / "scripts" / "record_scenic_factorised_shapes.py").read_text()


@pytest.fixture(scope="module")
def tiny():
    """Each model's random parameters (from its shapes: nothing compiled) and a video."""
    rng = np.random.default_rng(0)
    video = rng.normal(size=(2, FRAMES, SIZE, SIZE, 3)).astype(np.float32)
    out = {}
    for name, make in MODELS.items():
        shapes = jax.eval_shape(make().init, jax.random.PRNGKey(0), video)["params"]
        out[name] = jax.tree.map(
            lambda a: (0.3 * rng.normal(size=a.shape)).astype(np.float32), shapes
        )
    return out, video


OPTIONS = {
    "aligned": dict(mode="merge", r=4),
    "per_frame": dict(mode="merge", r=4, factorised_groups="per_frame"),
    "temporal": dict(mode="merge", r=0, temporal_r=1),
    "aligned+temporal": dict(mode="merge", r=3, temporal_r=1),
    "drop": dict(mode="drop", r=5),
    "hybrid": dict(mode="hybrid", r=4, threshold=0.2),
    "duplicate": dict(mode="merge", r=3, duplicate=(1, 2)),
}
CASES = [
    ("model3_time_space", "aligned"),
    ("model3_time_space", "temporal"),
    ("model3_time_space", "duplicate"),
    ("model3_space_time", "per_frame"),
    ("model3_space_time", "drop"),
    ("model4", "aligned+temporal"),
    ("model4", "per_frame"),
    ("model4", "hybrid"),
    ("model4", "duplicate"),
]


def _block_outputs(state) -> list[tuple[int, tuple[int, ...]]]:
    """``(layer, [B, T, S, D])`` of each grid a block call returned."""
    transformer = state["intermediates"]["Transformer"]
    return [
        (layer, grid.x.shape)
        for layer in range(TINY["num_layers"])
        for grid in transformer[f"encoderblock_{layer}"]["__call__"]
    ]


@pytest.mark.parametrize(("name", "option"), CASES)
def test_token_counts_follow_the_static_plan(tiny, name, option):
    """The shapes each block returns (traced, not run) are those grid_plan and token_plan say."""
    params, video = tiny
    merging = MergingSettings.from_dict({**OPTIONS[option], "trace_source": "index"})
    model = MODELS[name](merging=merging)
    logits, state = jax.eval_shape(
        lambda p, v: model.apply(
            {"params": p}, v, capture_intermediates=True, mutable=["intermediates"]
        ),
        params[name],
        video,
    )
    assert logits.shape == (2, 5)
    plan = model.grid_plan(FRAMES, SIZE)
    steps = merging.layer_steps(TINY["num_layers"])
    want = [
        (layer, (2, p.frames_out, p.space_out, 16))
        for (layer, _), p in zip(steps, plan, strict=True)
    ]
    assert sorted(_block_outputs(state)) == sorted(want)
    assert [p.tokens_out for p in model.token_plan(FRAMES, SIZE)] == [p.space_out for p in plan]
    assert state["intermediates"]["source"][0].shape == (2, 4 * 16)
    assert plan[-1].frames_out * plan[-1].space_out < 4 * 16


def test_plans_of_the_options():
    merging = MergingSettings(mode="merge", r=4, temporal_r=1)
    plan = FactorisedSelfAttentionViViT(**TINY, merging=merging).grid_plan(FRAMES, SIZE)
    # 16 patches per frame lose 4, 4 then the clamp's half of 8; 4 frames lose 1 a layer.
    assert plan == [GridStep(4, 16, 3, 12), GridStep(3, 12, 2, 8), GridStep(2, 8, 1, 4)]
    plan = FactorisedDotProductViViT(
        **TINY, merging=MergingSettings(mode="merge", r=10, duplicate=(2, 2))
    ).grid_plan(FRAMES, SIZE)
    assert plan == [
        GridStep(4, 16, 4, 16),
        GridStep(4, 16, 4, 16),
        GridStep(4, 16, 4, 8, reduce_only=True),
        GridStep(4, 8, 4, 4),
    ]
    none = FactorisedDotProductViViT(**TINY, merging=MergingSettings(temporal_r=2))
    assert all(p.frames_out == 4 and p.space_out == 16 for p in none.grid_plan(FRAMES, SIZE))


def _chain(x, metric, mode: str, steps) -> Grid:
    """``reduce_grid`` over ``steps`` (``(factorised_groups, GridStep)``), sources tracked."""
    b = x.shape[0]
    grid = Grid(x, source=jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), (b, 64)))
    for i, (groups, step) in enumerate(steps):
        merging = MergingSettings(mode=mode, factorised_groups=groups)
        t, s = grid.x.shape[1:3]
        key = jax.random.PRNGKey(i)
        grid = reduce_grid(grid, metric[:, :t, :s], step, merging=merging, key=key)
    return grid


def _group_means(x: np.ndarray, source: np.ndarray, tokens: int) -> np.ndarray:
    """Each final token's mean of the original patches its source id names."""
    flat_x = x.reshape(x.shape[0], -1, x.shape[-1])
    out = np.zeros((x.shape[0], tokens, x.shape[-1]))
    for b in range(x.shape[0]):
        for token in range(tokens):
            out[b, token] = flat_x[b, source[b] == token].mean(axis=0)
    return out


CHAIN = (
    ("aligned", GridStep(4, 16, 3, 11)),  # 5 slots merged in every frame, 1 frame merged
    ("aligned", GridStep(3, 11, 2, 7)),
    ("per_frame", GridStep(2, 7, 2, 4)),
)


def test_grid_reductions_are_exact_size_weighted_means():
    """Spatial (aligned, then per frame) and temporal merges in a chain: every final token is
    the plain mean of the patches it holds, so the separable sizes weighted each step exactly."""
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 16, 6))
    metric = jax.random.normal(jax.random.PRNGKey(4), (2, 4, 16, 5))
    grid = jax.jit(lambda x, m: _chain(x, m, "merge", CHAIN))(x, metric)
    assert grid.x.shape == (2, 2, 4, 6)
    source = np.asarray(grid.source)
    want = _group_means(np.asarray(x), source, 8)
    np.testing.assert_allclose(np.asarray(grid.x).reshape(2, 8, 6), want, atol=1e-5)
    counts = [[np.sum(source[b] == i) for i in range(8)] for b in range(2)]
    np.testing.assert_array_equal(np.asarray(grid.sizes()).reshape(2, 8), counts)


def test_what_each_option_keeps_aligned():
    """Aligned: every frame groups its slots alike and no patch leaves its frame; per frame:
    frames group on their own; temporal: frames move whole, slots stay put."""
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 4, 16, 6))
    metric = jax.random.normal(jax.random.PRNGKey(7), (2, 4, 16, 5))

    def slots(steps, space):
        grid = jax.jit(lambda x, m: _chain(x, m, "merge", steps))(x, metric)
        source = np.asarray(grid.source).reshape(2, 4, 16)
        return source // space, source % space

    frame, slot = slots((("aligned", GridStep(4, 16, 4, 10)),), 10)
    assert np.all(frame == np.arange(4)[None, :, None]) and np.all(slot == slot[:, :1])
    assert all(len(np.unique(slot[b, 0])) == 10 for b in range(2))
    frame, slot = slots((("per_frame", GridStep(4, 16, 4, 10)),), 10)
    assert np.all(frame == np.arange(4)[None, :, None])
    assert not np.all(slot == slot[:, :1])  # frames of random keys pick their own groups
    frame, slot = slots((("aligned", GridStep(4, 16, 2, 16)),), 16)
    assert np.all(slot == np.arange(16)) and np.all(frame == frame[:, :, :1])
    assert all(len(np.unique(frame[b])) == 2 for b in range(2))


def test_model_sows_a_source_over_its_final_grid(tiny):
    """A whole model (model 4, aligned spatial and temporal merging): the source it sows names
    every final token, and each frame's patches share slots."""
    params, video = tiny
    merging = MergingSettings(mode="merge", r=4, temporal_r=1, trace_source="index")
    model = MODELS["model4"](merging=merging)
    run = jax.jit(lambda p, v: model.apply({"params": p}, v, mutable=["intermediates"]))
    logits, state = run(params["model4"], video)
    assert np.all(np.isfinite(np.asarray(logits)))
    final = model.grid_plan(FRAMES, SIZE)[-1]
    assert (final.frames_out, final.space_out) == (1, 4)
    source = np.asarray(state["intermediates"]["source"][0]).reshape(2, 4, 16)
    assert all(len(np.unique(source[b])) == 4 for b in range(2))
    assert np.all(source == source[:, :1])  # one frame left, its slots shared by all frames


def _matmul_macs(fn, *args) -> int:
    """Multiply-adds of every matmul and convolution ``fn`` runs (from its jaxpr)."""

    def walk(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
            elif eqn.primitive.name == "conv_general_dilated":
                kernel = eqn.invars[1].aval.shape
                out = eqn.outvars[0].aval.shape
                total += math.prod(out) * math.prod(kernel) // out[-1]
            for value in eqn.params.values():  # the bodies of jit, cond, scan ...
                for item in value if isinstance(value, tuple | list) else (value,):
                    inner = getattr(item, "jaxpr", item)
                    if hasattr(inner, "eqns"):
                        total += walk(inner)
        return total

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize(
    "merging",
    [
        {},
        {"mode": "random_merge", "r": 3, "temporal_r": 1},
        {"mode": "random_drop", "r": 5, "factorised_groups": "per_frame", "duplicate": (1, 2)},
    ],
    ids=["r0", "aligned+temporal", "per_frame+duplicate"],
)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_analytic_macs_are_the_matmuls_the_model_runs(tiny, name, merging):
    """Random modes score without a matmul, so the jaxpr's matmuls are exactly the model's."""
    params, video = tiny
    model = MODELS[name](merging=MergingSettings(**merging))
    clip = video[:1]
    counted = _matmul_macs(lambda p, v: model.apply({"params": p}, v), params[name], clip)
    assert model.analytic_macs(FRAMES, SIZE)["total"] == counted


def test_merging_options_cost_fewer_macs_than_r0():
    base = FactorisedSelfAttentionViViT(num_classes=400).analytic_macs(32, 224)["total"]
    # ViViT-B model 3 at 32 x 224^2: 16 frames of 196 patches.
    d, m, t, s, layers = 768, 3072, 16, 196, 12
    n = t * s
    block = 8 * n * d**2 + 2 * s * t**2 * d + 2 * t * s**2 * d + 2 * n * d * m
    assert base == layers * block + n * 2 * 16 * 16 * 3 * d + d * 400
    for options in (
        {"r": 16},
        {"r": 16, "factorised_groups": "per_frame"},
        {"r": 0, "temporal_r": 1},
    ):
        merging = MergingSettings(mode="merge", **options)
        for cls in (FactorisedSelfAttentionViViT, FactorisedDotProductViViT):
            cut = cls(num_classes=400, merging=merging).analytic_macs(32, 224)["total"]
            assert cut < cls(num_classes=400).analytic_macs(32, 224)["total"]


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: FactorisedSelfAttentionViViT(**TINY, classifier="token"),
            "not available for ViViT model 3",
        ),
        (
            lambda: FactorisedSelfAttentionViViT(**TINY, attention_order="spacetime"),
            "attention_order",
        ),
        (lambda: FactorisedDotProductViViT(**{**TINY, "num_heads": 3, "hidden_size": 18}), "even"),
        (
            lambda: FactorisedDotProductViViT(
                **TINY, merging=MergingSettings(mode="tube_merge", r=2)
            ),
            "positions",
        ),
        (
            lambda: FactorisedDotProductViViT(
                **TINY,
                merging=MergingSettings(mode="merge", temporal_r=1, factorised_groups="per_frame"),
            ),
            "needs factorised_groups 'aligned'",
        ),
    ],
)
def test_refused_with_one_line(make, message):
    with pytest.raises(UserError, match=message):
        make().init(jax.random.PRNGKey(0), np.zeros((1, FRAMES, SIZE, SIZE, 3), np.float32))


def test_factorised_groups_is_refused_where_nothing_reads_it():
    from vtm_jax.checkpoints.record import ModelRecord

    record = ModelRecord.from_json(
        {
            "architecture": "vivit",
            "model": {"num_classes": 3, "num_layers": 1},
            "input": {"num_frames": 4, "image_size": 32},
        }
    )
    with pytest.raises(
        UserError, match="factorised_groups applies only to .*vivit_factorised_dot_product"
    ):
        build_model(record, MergingSettings(factorised_groups="per_frame"))
    with pytest.raises(
        UserError, match="unknown factorised_groups 'tube'; valid: aligned, per_frame"
    ):
        MergingSettings(factorised_groups="tube")
