"""The extension API (rules and schedules by name or by "module:attr" path) and tube merging."""

import dataclasses
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtm_jax.config.loading import load_config
from vtm_jax.errors import UserError
from vtm_jax.merging import (
    RULES,
    MergingSettings,
    Tokens,
    get_rule,
    initial_positions,
    initial_source,
    merge_tokens,
    register_rule,
    schedule,
)
from vtm_jax.merging import matching as mg
from vtm_jax.merging.tokens import RuleOption
from vtm_jax.models.timesformer import TimeSformer
from vtm_jax.models.videomae import VideoMAE
from vtm_jax.models.vivit import EncoderBlock, ViViT
from vtm_jax.models.vivit_fe import FactorisedEncoderViViT

GRID = (4, 4, 4)  # 8 frames of 32x32, tubelet (2, 8, 8): 64 patches
VIDEO = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 32, 32, 3))
TINY = dict(num_classes=5, hidden_size=32, num_heads=2, mlp_dim=64, patch_size=(2, 8, 8))

# A user's package: one rule (keep the first N - r tokens) and one schedule (r, r*s, r*s^2 ...).
USER_MODULE = textwrap.dedent(
    """
    import jax.numpy as jnp

    from vtm_jax.merging import Tokens

    def keep_first(tokens, metric, r, ctx):
        n = tokens.x.shape[1] - r
        source = tokens.source
        if source is not None:
            source = jnp.where(source >= n, -1, source)
        size = None if tokens.size is None else tokens.size[:, :n]
        return Tokens(tokens.x[:, :n], size, source)

    def keep_window(tokens, metric, r, ctx):
        start, n = ctx.settings.rule_options["start"], tokens.x.shape[1] - r
        source = tokens.source
        if source is not None:
            kept = (source >= start) & (source < start + n)
            source = jnp.where(kept, source - start, -1)
        size = None if tokens.size is None else tokens.size[:, start : start + n]
        return Tokens(tokens.x[:, start : start + n], size, source)

    def geometric(num_layers, r, schedule):
        return [int(r * schedule**i) for i in range(num_layers)]
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_vtm_rules.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_vtm_rules

    yield my_vtm_rules
    for registry in (RULES, schedule.SCHEDULES):
        for name in [k for k in registry if k.startswith("test_")]:
            del registry[name]


def run(model, merging=None, video=VIDEO):
    """The last block's output, the final index source and the token count leaving each block.

    One jitted init pass (random weights) computes all three: a single compile per case.
    """
    if merging is not None:
        model = model.clone(merging=merging)

    def forward(key, v):
        _, state = model.init_with_output(
            key,
            v,
            capture_intermediates=lambda mdl, _: isinstance(mdl, EncoderBlock),
            mutable=["params", "intermediates"],
        )
        return state["intermediates"]

    inter = jax.jit(forward)(jax.random.PRNGKey(1), video)
    blocks = inter["Transformer"]
    outputs = [
        out for i in range(model.num_layers) for out in blocks[f"encoderblock_{i}"]["__call__"]
    ]
    source = inter["source"][0] if "source" in inter else None
    return (
        np.asarray(outputs[-1].x),
        None if source is None else np.asarray(source),
        [out.x.shape[1] for out in outputs],
    )


def test_custom_rule_by_name_and_by_path(user_module):
    register_rule("test_keep_first", user_module.keep_first)
    model = ViViT(**TINY, num_layers=2)
    for mode in ("test_keep_first", "my_vtm_rules:keep_first"):
        merging = MergingSettings(mode=mode, r=10, trace_source="index")
        _, source, counts = run(model, merging)
        assert counts == [55, 45]
        # Exactly the first 45 originals survive, each alone and in place.
        np.testing.assert_array_equal(source[:, :45], np.broadcast_to(np.arange(45), (2, 45)))
        assert (source[:, 45:] == -1).all()


def test_custom_rule_with_an_option(user_module):
    register_rule(
        "test_keep_window",
        user_module.keep_window,
        options=(RuleOption("start", int, required=True, hint="a token index"),),
    )
    model = ViViT(**TINY, num_layers=2)
    merging = MergingSettings(mode="test_keep_window", r=10, rule_options={"start": 5})
    _, source, counts = run(model, dataclasses.replace(merging, trace_source="index"))
    assert counts == [55, 45]
    # Each layer keeps the window from token 5: originals 10..54 survive, renumbered from 0.
    np.testing.assert_array_equal(source[:, 10:55], np.broadcast_to(np.arange(45), (2, 45)))
    assert (source[:, :10] == -1).all() and (source[:, 55:] == -1).all()
    # Settings round-trip through their dict (a record's token_merging) and stay hashable.
    assert MergingSettings.from_dict(merging.to_dict()) == merging
    assert merging.to_dict()["rule_options"] == {"start": 5}
    assert hash(merging) == hash(MergingSettings.from_dict(merging.to_dict()))
    # Flat in a config block, as hybrid's threshold is: read into rule_options.
    flat = MergingSettings.from_dict({"mode": "test_keep_window", "r": 10, "start": 5})
    assert flat == merging
    for bad, message in (
        ({}, "mode 'test_keep_window' needs a start \\(a token index\\)"),
        ({"start": 2.5}, "start must be an integer, not 2.5"),
        ({"start": 5, "stride": 2}, "has no option stride \\(it takes start\\)"),
    ):
        with pytest.raises(UserError, match=message):
            MergingSettings(mode="test_keep_window", r=10, rule_options=bad)
    # Another mode leaves the window's start out: a preset for its own mode, not an error.
    other = MergingSettings(mode="merge", r=10, rule_options={"start": 5})
    assert other.rule_options == {}
    with pytest.raises(UserError, match="mode 'merge' has no option window"):
        MergingSettings(mode="merge", r=10, rule_options={"window": 5})


def test_custom_schedule_by_name_by_path_and_from_the_command_line(user_module):
    schedule.register_schedule("test_geometric", user_module.geometric)
    for name in ("test_geometric", "my_vtm_rules:geometric"):
        merging = MergingSettings(mode="merge", r=16, r_schedule=name, schedule=0.5)
        assert merging.layer_r(3) == [16, 8, 4]
        assert ViViT(**TINY, num_layers=3, merging=merging).token_plan(8, 32)[-1].tokens_out == 37
    _, _, counts = run(ViViT(**TINY, num_layers=3), merging)
    assert counts == [49, 41, 37]
    # Both fields from --config overrides, as the bench/eval commands read them.
    config = load_config(
        [
            "--config=configs/vivit_b_k400.py",
            "--config.token_merging.mode=my_vtm_rules:keep_first",
            "--config.token_merging.r=12",
            "--config.token_merging.r_schedule=my_vtm_rules:geometric",
            "--config.token_merging.schedule=0.5",
        ]
    )
    merging = MergingSettings.from_dict(config.token_merging)
    assert (merging.mode, merging.r_schedule) == (
        "my_vtm_rules:keep_first",
        "my_vtm_rules:geometric",
    )
    assert merging.layer_r(4) == [12, 6, 3, 1]
    assert hash(merging) == hash(MergingSettings.from_dict(merging.to_dict()))


def test_default_schedule_is_the_papers():
    paper = MergingSettings(mode="merge", r=300, schedule=-1)
    assert paper.r_schedule == "paper"
    assert paper.layer_r(12) == schedule.parse_r(12, (300, -1))
    assert MergingSettings(mode="merge", r=5, schedule=1).layer_r(1) == [5]


def test_unknown_names_are_one_line_user_errors():
    cases = [
        (dict(mode="tome"), "unknown mode 'tome'; valid: none, merge"),
        (dict(r_schedule="linear"), "unknown r_schedule 'linear'; valid: paper"),
        (dict(mode="no_such_module_xyz:rule"), "cannot import 'no_such_module_xyz'"),
        (dict(mode="vtm_jax.merging.tube:nope"), "has no attribute 'nope'"),
        (dict(mode="vtm_jax.merging:tube"), "names a module, not a rule"),
        (dict(r_schedule="vtm_jax.merging.schedule:RSpec.x"), "has no attribute"),
    ]
    for values, message in cases:
        with pytest.raises(UserError, match=message) as info:
            MergingSettings(**values)
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="tube_merge"):  # shipped modes are listed
        MergingSettings(mode="tome")


def test_registration_and_schedule_results_are_checked(user_module):
    register_rule("test_keep_first", user_module.keep_first)
    register_rule("test_keep_first", user_module.keep_first)  # same: a no-op
    with pytest.raises(ValueError, match="already registered"):
        register_rule("test_keep_first", user_module.geometric)
    with pytest.raises(ValueError, match="without ':'"):
        schedule.register_schedule("a:b", user_module.geometric)
    schedule.register_schedule("test_short", lambda num_layers, r, s: [r])
    with pytest.raises(UserError, match="must give 3 non-negative ints"):
        MergingSettings(mode="merge", r=4, r_schedule="test_short").layer_r(3)
    with pytest.raises(UserError, match="needs a single int r"):
        MergingSettings(mode="merge", r=[4, 2], r_schedule="my_vtm_rules:geometric")


# --- tube merging -------------------------------------------------------------------------


def unravel(original: np.ndarray, class_token: bool) -> np.ndarray:
    """(t, y, x) of original patch indices in (t h w) order."""
    return np.stack(np.unravel_index(original - int(class_token), GRID), axis=-1)


def assert_tubes(source: np.ndarray, class_token: bool) -> None:
    """Every group is one location over consecutive frames; the class token stays alone first."""
    lead = int(class_token)
    for row in source:
        if class_token:
            assert row[0] == 0 and (row == 0).sum() == 1
        assert (row >= 0).all()  # nothing dropped
        for group in np.unique(row[lead:]):
            members = unravel(np.flatnonzero(row == group), class_token)
            assert (members[:, 1:] == members[0, 1:]).all(), members
            frames = np.sort(members[:, 0])
            np.testing.assert_array_equal(frames, np.arange(frames[0], frames[0] + len(frames)))


@pytest.mark.parametrize("architecture", [ViViT, VideoMAE])
def test_tube_merge_in_models_follows_plan_and_keeps_tubes(architecture):
    class_token = architecture is ViViT
    model = architecture(**TINY, num_layers=2)
    merging = MergingSettings(mode="tube_merge", r=[24, 20], trace_source="index")
    if architecture is VideoMAE:  # by path: the same rule object
        merging = dataclasses.replace(merging, mode="vtm_jax.merging.tube:tube_merge")
        assert get_rule(merging.mode) is get_rule("tube_merge")
    out, source, counts = run(model, merging)
    assert counts == [p.tokens_out for p in model.clone(merging=merging).token_plan(8, 32)]
    assert counts == [64 + class_token - 24, 64 + class_token - 44]
    assert np.isfinite(out).all()
    assert_tubes(source, class_token)


def test_plain_merge_breaks_tubes():
    """The tube check above can fail: ordinary merging mixes locations."""
    merging = MergingSettings(mode="merge", r=[24, 20], trace_source="index")
    _, source, _ = run(ViViT(**TINY, num_layers=2), merging)
    with pytest.raises(AssertionError):
        assert_tubes(source, True)


def test_tube_merge_falls_back_to_merge_and_keeps_the_plan():
    # 64 patches over 16 locations: 48 tube pairs, used up in the third layer (4 of its 10).
    model = ViViT(**TINY, num_layers=3)
    merging = MergingSettings(mode="tube_merge", r=[24, 20, 10], trace_source="index")
    out, source, counts = run(model, merging)
    assert counts == [41, 21, 11]
    assert counts == [p.tokens_out for p in model.clone(merging=merging).token_plan(8, 32)]
    assert np.isfinite(out).all()
    assert source[:, 0].tolist() == [0, 0] and (source >= 0).all()
    # Proportional attention sees the tube sizes.
    no_prop = dataclasses.replace(merging, prop_attn=False)
    assert not np.allclose(run(model, no_prop)[0], out, atol=1e-5)


def _tokens(seed: int, batch: int = 2, class_token: bool = True):
    n = 64 + int(class_token)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, n, 6)), jnp.float32)
    pos = initial_positions(batch, GRID, class_token=class_token)
    return Tokens(x, None, initial_source(batch, n, "index"), pos)


def test_tube_step_conserves_size_and_tracks_centroids():
    settings = MergingSettings(mode="tube_merge", r=1)
    tokens = _tokens(0)
    coords = np.concatenate([np.full((1, 3), -1.0), unravel(np.arange(1, 65), True)])
    for step, r in enumerate([20, 16, 10, 8, 4]):  # the fourth exhausts the tubes
        n = tokens.x.shape[1]
        metric = jnp.asarray(np.random.default_rng(step).standard_normal((2, n, 5)), jnp.float32)
        tokens = jax.jit(
            lambda t, m, r=r: merge_tokens(t, m, r, settings=settings, class_token=True, grid=GRID)
        )(tokens, metric)
        assert tokens.x.shape[1] == tokens.size.shape[1] == tokens.pos.shape[1] == n - r
        np.testing.assert_allclose(tokens.size.sum(axis=(1, 2)), 65)
        source = np.asarray(mg.groups_to_source(tokens.source, n - r))
        np.testing.assert_array_equal(source.sum(axis=2), tokens.size[..., 0])
        # Each position is the mean (t, y, x) of the originals the token holds.
        centroids = source @ coords / source.sum(axis=2, keepdims=True)
        np.testing.assert_allclose(tokens.pos, centroids, atol=1e-5)
        assert float(tokens.size[0, 0, 0]) == 1 and (tokens.pos[:, 0] == -1).all()
        if step < 3:
            assert_tubes(np.asarray(tokens.source), True)


def test_tube_step_joins_the_most_similar_adjacent_pair():
    tokens = _tokens(1, batch=1, class_token=False)
    metric = np.random.default_rng(3).standard_normal((1, 64, 5)).astype(np.float32)
    unit = metric[0] / np.linalg.norm(metric[0], axis=-1, keepdims=True)
    # Candidates: (t, y, x) with (t + 1, y, x): 16 patches apart in (t h w) order.
    sims = {(i, i + 16): float(unit[i] @ unit[i + 16]) for i in range(48)}
    best = max(sims, key=sims.get)
    out = merge_tokens(
        tokens,
        jnp.asarray(metric),
        1,
        settings=MergingSettings(mode="tube_merge", r=1),
        class_token=False,
        grid=GRID,
    )
    groups = np.asarray(out.source[0])
    assert groups[best[0]] == groups[best[1]]
    assert len(np.unique(groups)) == 63


def test_tube_merge_refuses_backbones_without_a_grid():
    merging = MergingSettings(mode="tube_merge", r=4)
    tiny = dict(num_classes=5, hidden_size=32, num_heads=2, mlp_dim=64, num_layers=1)
    video = VIDEO[:, :4]
    for model in (
        TimeSformer(**tiny, patch_size=(8, 8), merging=merging),
        FactorisedEncoderViViT(
            num_classes=5,
            hidden_size=32,
            spatial_num_layers=1,
            spatial_num_heads=2,
            spatial_mlp_dim=64,
            temporal_num_layers=1,
            temporal_num_heads=2,
            temporal_mlp_dim=64,
            patch_size=(2, 8, 8),
            merging=merging,
        ),
    ):
        with pytest.raises(UserError, match="needs token positions"):
            jax.eval_shape(model.init, jax.random.PRNGKey(0), video)
    with pytest.raises(UserError, match="needs token positions"):
        merge_tokens(Tokens(VIDEO[:, 0, 0]), VIDEO[:, 0, 0], 2, settings=merging, class_token=False)


def test_random_rules_are_marked_so_evaluation_records_their_batching():
    from vtm_jax.merging import RULES, MergingSettings, is_random, register_rule

    assert is_random(MergingSettings(mode="random_merge", r=2))
    assert is_random(MergingSettings(mode="random_drop", r=2))
    assert not is_random(MergingSettings(mode="merge", r=2))
    assert not is_random(MergingSettings())

    def noisy(tokens, metric, r, ctx):  # never run: only its flag matters here
        return tokens

    try:
        register_rule("noisy_test_rule", noisy, random=True)
        assert is_random(MergingSettings(mode="noisy_test_rule", r=2))
    finally:
        RULES.pop("noisy_test_rule", None)
