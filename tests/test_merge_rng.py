"""Random modes' draws: an explicit ``merge_rng=`` first, else Flax's ``'merge'`` RNG stream,
else the seeded default; so a trainer that passes ``rngs`` per step (as Scenic's does) gets a
new draw each step, and evaluation's per-video keys are unchanged."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtm_jax.errors import UserError
from vtm_jax.merging import MergingSettings
from vtm_jax.models.base import MERGE_STREAM, apply_in_steps
from vtm_jax.models.registry import ARCHITECTURES

VIDEO = jax.random.normal(jax.random.PRNGKey(7), (2, 4, 16, 16, 3))

# One or two small layers of each backbone; enough tokens for r=4 per step.
TINY = {
    "vivit": dict(hidden_size=16, num_heads=2, mlp_dim=32, num_layers=2, patch_size=(2, 4, 4)),
    "videomae": dict(hidden_size=16, num_heads=2, mlp_dim=32, num_layers=2, patch_size=(2, 4, 4)),
    "vivit_factorised_encoder": dict(
        hidden_size=16,
        spatial_num_layers=2,
        spatial_num_heads=2,
        spatial_mlp_dim=32,
        temporal_num_layers=1,
        temporal_num_heads=2,
        temporal_mlp_dim=32,
        patch_size=(1, 4, 4),
    ),
    "timesformer": dict(hidden_size=16, num_heads=2, mlp_dim=32, num_layers=2, patch_size=(4, 4)),
    "vivit_factorised_self_attention": dict(
        hidden_size=16, num_heads=2, mlp_dim=32, num_layers=1, patch_size=(2, 4, 4)
    ),
    "vivit_factorised_dot_product": dict(
        hidden_size=16, num_heads=2, mlp_dim=32, num_layers=1, patch_size=(2, 4, 4)
    ),
    "motionformer": dict(
        hidden_size=16,
        num_heads=2,
        mlp_dim=32,
        num_layers=2,
        patch_size=(2, 4, 4),
        representation_size=None,
    ),
}


def _model(architecture: str, **merging):
    settings = MergingSettings(mode="random_merge", r=4, trace_source="index", **merging)
    return ARCHITECTURES[architecture](num_classes=5, **TINY[architecture], merging=settings)


def _params(model):
    params = model.init(jax.random.PRNGKey(0), VIDEO)["params"]
    # Perturbed: the zero-initialised head would give equal logits for any draw.
    return jax.tree.map(
        lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params
    )


def _run(model, params, **kwargs):
    """(logits, sown source) of one apply."""
    logits, state = model.apply({"params": params}, VIDEO, mutable=["intermediates"], **kwargs)
    return np.asarray(logits), np.asarray(state["intermediates"]["source"][0])


def _same(a, b) -> bool:
    return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request):
    assert set(TINY) == set(ARCHITECTURES)  # a new backbone gets a tiny config here
    model = _model(request.param)
    return model, _params(model)


def test_the_merge_stream_decides_the_draws(tiny):
    model, params = tiny
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    one = _run(model, params, rngs={MERGE_STREAM: k1})
    assert _same(one, _run(model, params, rngs={MERGE_STREAM: k1}))  # same key, same draw
    assert not np.array_equal(one[1], _run(model, params, rngs={MERGE_STREAM: k2})[1])
    # Another stream (Scenic's 'dropout') does not stand in for 'merge'.
    default = _run(model, params)
    assert _same(default, _run(model, params, rngs={"dropout": k1}))
    assert not np.array_equal(one[1], default[1])


def test_a_batch_run_in_steps_of_clips(tiny):
    """apply_in_steps: step i of a batch is the model on its clips with fold_in(key, i)."""
    model, params = tiny
    key = jax.random.PRNGKey(5)
    stepped = apply_in_steps(model, params, VIDEO, clips_per_step=1, merge_rng=key)
    for i in range(VIDEO.shape[0]):
        alone = model.apply(
            {"params": params}, VIDEO[i : i + 1], merge_rng=jax.random.fold_in(key, i)
        )
        np.testing.assert_allclose(stepped[i : i + 1], alone, atol=1e-5, rtol=0)
    # A deterministic mode gives the whole batch's logits; a step of the batch is one apply.
    merge = model.clone(merging=dataclasses.replace(model.merging, mode="merge"))
    whole = merge.apply({"params": params}, VIDEO)
    np.testing.assert_allclose(
        apply_in_steps(merge, params, VIDEO, clips_per_step=1), whole, atol=1e-5, rtol=0
    )
    np.testing.assert_array_equal(apply_in_steps(merge, params, VIDEO, clips_per_step=2), whole)
    four = jnp.concatenate([VIDEO, VIDEO])
    for bad in (3, 0):
        with pytest.raises(UserError, match="clips_per_step must divide the batch of 4 clips"):
            apply_in_steps(merge, params, four, clips_per_step=bad)


def test_explicit_key_wins_and_no_stream_keeps_the_seeded_default(tiny):
    model, params = tiny
    explicit = jax.random.PRNGKey(3)
    given = _run(model, params, merge_rng=explicit)
    assert _same(given, _run(model, params, merge_rng=explicit, rngs={MERGE_STREAM: explicit}))
    assert _same(given, _run(model, params, merge_rng=explicit, rngs={MERGE_STREAM: explicit + 1}))
    # No key and no stream: PRNGKey(merging.seed), as before the stream existed.
    seeded = jax.random.PRNGKey(model.merging.seed)
    assert _same(_run(model, params), _run(model, params, merge_rng=seeded))


def test_a_trainer_step_loop_gets_a_new_draw_each_step():
    """Scenic's trainer folds the step into its RNG and passes ``rngs`` to ``apply``; with a
    ``'merge'`` stream beside ``'dropout'`` each step draws anew, reproducibly."""
    model = _model("vivit")
    params = _params(model)

    @jax.jit
    def step(params, rng, step_index):
        rng = jax.random.fold_in(rng, step_index)
        dropout_rng, merge_rng = jax.random.split(rng)

        def loss(p):
            logits, state = model.apply(
                {"params": p},
                VIDEO,
                train=True,
                rngs={"dropout": dropout_rng, MERGE_STREAM: merge_rng},
                mutable=["intermediates"],
            )
            return jnp.mean(logits**2), state["intermediates"]["source"][0]

        (value, source), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, source, grads

    rng = jax.random.PRNGKey(0)
    sources = [np.asarray(step(params, rng, i)[1]) for i in range(3)]
    assert not np.array_equal(sources[0], sources[1])
    assert not np.array_equal(sources[1], sources[2])
    np.testing.assert_array_equal(sources[1], np.asarray(step(params, rng, 1)[1]))
