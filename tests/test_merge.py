"""The merge core against docs/method.md's worked example and an independent torch oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.reference import tome_oracle as oracle
from vtm_jax.merging import MergingSettings, Tokens, initial_source, merge_tokens
from vtm_jax.merging import matching as mg

MODES = ("merge", "random_merge", "drop", "random_drop", "hybrid")


def worked_example_metric() -> np.ndarray:
    """Method.md §1.1: B tokens 1,3,5,7 are basis vectors; A tokens point at their partner.

    Similarities 6->7 (0.9) > 8->1 (0.8) > 0->5 (0.7) > 4->3 (0.6) > 2->1 (0.5).
    """
    basis = np.eye(9, dtype=np.float32)
    metric = np.zeros((9, 9), np.float32)
    for pos, b in zip((1, 3, 5, 7), range(4), strict=True):
        metric[pos] = basis[b]
    for extra, (pos, target, c) in enumerate(
        [(6, 7, 0.9), (8, 1, 0.8), (0, 5, 0.7), (4, 3, 0.6), (2, 1, 0.5)]
    ):
        metric[pos] = c * metric[target] + np.sqrt(1 - c * c) * basis[4 + extra]
    return metric[None]


@pytest.mark.parametrize(
    "class_token, expected",
    [
        (True, [0, 2, 4.5, 3.5, 5, 6.5]),  # [CLS, 2, mean(1,8), mean(3,4), 5, mean(7,6)]
        (False, [4, 2, 4.5, 3, 2.5, 6.5]),  # [4, 2, mean(1,8), 3, mean(5,0), mean(7,6)]
    ],
)
def test_worked_example(class_token, expected):
    metric = jnp.asarray(worked_example_metric())
    x = jnp.arange(9, dtype=jnp.float32)[None, :, None]
    r = mg.clamp_r(9, 3, class_token=class_token)
    match = mg.bipartite_soft_matching(mg.cosine_scores(metric), r, class_token=class_token)
    out, size = mg.merge_wavg(x, None, match)
    np.testing.assert_allclose(out[0, :, 0], expected, rtol=1e-6)
    assert float(size.sum()) == 9.0


def test_clamp():
    assert mg.clamp_r(3137, 2000, class_token=True) == 1568
    assert mg.clamp_r(1568, 2000, class_token=False) == 784
    assert mg.clamp_r(2, 5, class_token=True) == 0
    assert mg.clamp_r(1, 5, class_token=False) == 0


def _random_case(seed, b, n, c):
    rng = np.random.default_rng(seed)
    metric = rng.standard_normal((b, n, 8)).astype(np.float32)
    x = rng.standard_normal((b, n, c)).astype(np.float32)
    return metric, x


def _oracle_step(mode, metric, x, size, source, r, class_token, threshold, scores):
    t = torch.from_numpy
    metric, x = t(metric), t(x)
    size = None if size is None else t(size)
    source = t(np.array(source))
    if mode in ("drop", "random_drop"):
        fn = oracle.bipartite_soft_matching_drop(
            metric, r, class_token=class_token, mode=mode, random_scores=scores
        )
        return fn(x).numpy(), None, fn(source).numpy()
    if mode == "hybrid":
        m, _ = oracle.bipartite_soft_matching_hybrid(
            metric, r, class_token=class_token, threshold=threshold
        )
    else:
        m, _ = oracle.bipartite_soft_matching(
            metric, r, class_token=class_token, mode=mode, random_scores=scores
        )
    x, size = oracle.merge_wavg(m, x, size)
    return x.numpy(), size.numpy(), oracle.merge_source(m, x, source).numpy()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("class_token", [True, False])
def test_merge_tokens_matches_oracle(mode, class_token):
    """Three chained steps (the order of one step feeds the next) at r, r and the clamp."""
    b, n, c = 2, 37, 5
    metric, x = _random_case(MODES.index(mode) + 10 * class_token, b, n, c)
    # At 0.6 some destinations in each step get a source below the threshold (hybrid discards).
    settings = MergingSettings(
        mode=mode, r=1, rule_options={"threshold": 0.6}, trace_source="dense"
    )
    ours = Tokens(jnp.asarray(x), None, initial_source(b, n, "dense"))
    ours_index = initial_source(b, n, "index")
    ref_x, ref_size, ref_source = x, None, np.broadcast_to(np.eye(n, dtype=np.float32), (b, n, n))
    rng = np.random.default_rng(0)
    for step, r in enumerate([5, 7, 100]):
        cur_n = ours.x.shape[1]
        r = mg.clamp_r(cur_n, r, class_token=class_token)
        key = jax.random.PRNGKey(step)
        scores = None
        if mode.startswith("random"):
            scores = torch.from_numpy(np.array(mg.random_scores(key, jnp.asarray(metric))))
        ours_dense = merge_tokens(
            ours, jnp.asarray(metric), r, settings=settings, class_token=class_token, key=key
        )
        ours_idx = merge_tokens(
            Tokens(ours.x, ours.size, ours_index),
            jnp.asarray(metric),
            r,
            settings=settings,
            class_token=class_token,
            key=key,
        )
        ref_x, ref_size, ref_source = _oracle_step(
            mode, metric, ref_x, ref_size, ref_source, r, class_token, 0.6, scores
        )
        np.testing.assert_allclose(ours_dense.x, ref_x, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(ours_dense.source, ref_source)
        # Index form says the same as the dense matrix.
        np.testing.assert_array_equal(
            mg.groups_to_source(ours_idx.source, ref_x.shape[1]), ref_source
        )
        if ref_size is not None:
            np.testing.assert_allclose(ours_dense.size, ref_size, rtol=1e-6)
        else:  # drop: sizes reset to one
            np.testing.assert_array_equal(ours_dense.size, np.ones(ref_x.shape[:2] + (1,)))
        ours, ours_index = ours_dense, ours_idx.source
        metric = rng.standard_normal((b, ref_x.shape[1], 8)).astype(np.float32)
        if class_token:
            assert ours.source[0, 0, 0] == 1  # the class token stays first
    if mode == "hybrid":  # the discard path ran: some original tokens are gone
        assert (ref_source.sum(axis=1) == 0).any()


@pytest.mark.parametrize("class_token", [True, False])
@pytest.mark.parametrize("reduce", ["mean", "sum", "max"])
def test_merge_reduce_and_unmerge_match_oracle(class_token, reduce):
    metric, x = _random_case(7, 3, 20, 4)
    r = 6
    match = mg.bipartite_soft_matching(
        mg.cosine_scores(jnp.asarray(metric)), r, class_token=class_token
    )
    m, u = oracle.bipartite_soft_matching(torch.from_numpy(metric), r, class_token=class_token)
    merged = mg.merge(jnp.asarray(x), match, reduce=reduce)
    expected = m(torch.from_numpy(x), mode=reduce).numpy()
    np.testing.assert_allclose(merged, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        mg.unmerge(merged, match), u(torch.from_numpy(expected)).numpy(), rtol=1e-6, atol=1e-6
    )


def test_hybrid_threshold_minus_one_is_merge():
    metric, x = _random_case(3, 2, 31, 6)
    tokens = Tokens(jnp.asarray(x))
    merged = merge_tokens(
        tokens, jnp.asarray(metric), 9, settings=MergingSettings(mode="merge"), class_token=True
    )
    hybrid = merge_tokens(
        tokens,
        jnp.asarray(metric),
        9,
        settings=MergingSettings(mode="hybrid", rule_options={"threshold": -1.0}),
        class_token=True,
    )
    np.testing.assert_array_equal(merged.x, hybrid.x)
    np.testing.assert_array_equal(merged.size, hybrid.size)


@pytest.mark.parametrize("mode", ["merge", "random_merge"])
def test_merge_conserves_size_and_source_partitions(mode):
    metric, x = _random_case(11, 2, 64, 3)
    settings = MergingSettings(mode=mode, r=1, trace_source="index")
    tokens = Tokens(jnp.asarray(x), None, initial_source(2, 64, "index"))
    for step in range(4):
        n = tokens.x.shape[1]
        metric = np.random.default_rng(step).standard_normal((2, n, 8)).astype(np.float32)
        tokens = merge_tokens(
            tokens,
            jnp.asarray(metric),
            mg.clamp_r(n, 9, class_token=True),
            settings=settings,
            class_token=True,
            key=jax.random.PRNGKey(step),
        )
        assert float(tokens.size.sum()) == 2 * 64
        source = mg.groups_to_source(tokens.source, tokens.x.shape[1])
        # Every original belongs to exactly one current token, and sizes count them.
        np.testing.assert_array_equal(source.sum(axis=1), 1)
        np.testing.assert_array_equal(source.sum(axis=2), tokens.size[..., 0])
        assert int(tokens.source[0, 0]) == 0  # class token first


def test_drop_removes_originals():
    metric, x = _random_case(5, 1, 21, 2)
    settings = MergingSettings(mode="drop", r=4, trace_source="index")
    tokens = Tokens(jnp.asarray(x), None, initial_source(1, 21, "index"))
    tokens = merge_tokens(tokens, jnp.asarray(metric), 4, settings=settings, class_token=True)
    assert tokens.x.shape[1] == 17
    assert int((tokens.source < 0).sum()) == 4


def test_values_differentiable_indices_constant():
    metric, x = _random_case(1, 1, 16, 3)

    def loss(x, metric):
        match = mg.bipartite_soft_matching(mg.cosine_scores(metric), 4, class_token=True)
        out, _ = mg.merge_wavg(x, None, match)
        return (out**2).sum()

    gx, gm = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(metric))
    assert float(jnp.abs(gx).sum()) > 0
    assert float(jnp.abs(gm).sum()) == 0  # matching runs under stop_gradient


def test_layer_keys_differ_by_layer_and_seed():
    from vtm_jax.merging import layer_key

    a, b = (
        MergingSettings(mode="random_drop", seed=0),
        MergingSettings(mode="random_drop", seed=1),
    )
    keys = [layer_key(s, layer) for s in (a, b) for layer in range(3)]
    draws = {float(jax.random.uniform(k)) for k in keys}
    assert len(draws) == 6
    np.testing.assert_array_equal(layer_key(a, 2), layer_key(a, 2))
