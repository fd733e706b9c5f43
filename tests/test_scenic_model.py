"""The Scenic model class, and vtm_jax's ViViT against Scenic's own ViViT module.

The parity tests need Scenic importable (``pip install "vtm-jax[scenic]"``) and are skipped
otherwise; the rest runs without Scenic.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tests.scenic_fixtures import TINY_MODEL1, TINY_MODEL2, write_scenic_config
from vtm_jax.config.loading import load_config
from vtm_jax.errors import UserError
from vtm_jax.merging import MergingSettings
from vtm_jax.models.vivit import ViViT
from vtm_jax.scenic import model as scenic_model

SMALL_INPUT = [
    "--config.model.patches.size=(8, 8, 2)",
    "--config.dataset_configs.num_classes=10",
    "--config.dataset_configs.num_frames=4",
    "--config.dataset_configs.crop_size=32",
]
VIDEO_SHAPE = (2, 4, 32, 32, 3)


def _config(tmp_path, model: int, *extra: str):
    tiny = TINY_MODEL1 if model == 1 else TINY_MODEL2
    return load_config(
        [f"--config={write_scenic_config(tmp_path, model)}", *tiny, *SMALL_INPUT, *extra]
    )


def _randomised(params, seed: int = 1):
    """Every parameter moved off its init, so zero heads and class tokens are exercised."""
    leaves, tree = jax.tree.flatten(jax.device_get(params))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(
        tree,
        [
            np.asarray(v + 0.1 * jax.random.normal(k, v.shape))
            for v, k in zip(leaves, keys, strict=True)
        ],
    )


def _shapes(tree) -> dict:
    return {
        "/".join(str(getattr(p, "key", p)) for p in path): tuple(np.shape(leaf))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def test_flax_model_from_scenic_config(tmp_path):
    config = _config(tmp_path, 1, "--config.token_merging.mode=merge", "--config.token_merging.r=4")
    module = scenic_model.flax_model_from_config(config)
    assert isinstance(module, ViViT) and module.merging.r == 4 and module.num_classes == 10
    video = np.zeros(VIDEO_SHAPE, np.float32)
    variables = module.init(jax.random.PRNGKey(0), video, train=False, debug=False)
    logits = module.apply(variables, video, train=False, mutable=False, debug=False)
    assert logits.shape == (2, 10)
    # vtm_jax's ViViT has no dropout: a rate Scenic would apply is an error, not ignored.
    with pytest.raises(UserError, match="no dropout"):
        scenic_model.flax_model_from_config(_config(tmp_path, 1, "--config.model.dropout_rate=0.1"))


@pytest.mark.skipif(scenic_model.SCENIC_AVAILABLE, reason="Scenic is installed here")
def test_model_class_without_scenic_says_how_to_install():
    with pytest.raises(ImportError, match=r"vtm-jax\[scenic\]"):
        scenic_model.ViViTTokenMergingModel(None, {"num_classes": 10})


def _scenic_vivit():
    try:
        from scenic.projects.vivit import model as vivit_model
    except ImportError as error:
        pytest.skip(
            f"Scenic is not importable ({error}); install it with "
            '`pip install "vtm-jax[scenic]"` to compare against its ViViT'
        )
    return vivit_model


@pytest.mark.parametrize(
    "model, extra",
    [
        (1, []),
        (1, ["--config.model.representation_size=12"]),
        (1, ["--config.model.classifier=gap"]),
        (2, ["--config.model.representation_size=12"]),
        (2, ["--config.model.classifier=gap"]),
    ],
)
def test_logits_equal_scenic_vivit(tmp_path, model, extra):
    """r=0: Scenic's ViViTClassificationModel and ours, on the same parameters."""
    vivit_model = _scenic_vivit()
    config = _config(tmp_path, model, *extra)
    meta = {"num_classes": 10, "input_shape": (-1, *VIDEO_SHAPE[1:]), "target_is_onehot": False}
    theirs = vivit_model.ViViTClassificationModel(config, meta).flax_model
    ours = scenic_model.ViViTTokenMergingModel(config, meta).flax_model
    video = np.asarray(jax.random.uniform(jax.random.PRNGKey(2), VIDEO_SHAPE, minval=-1, maxval=1))
    params = theirs.init(jax.random.PRNGKey(0), video, train=False)["params"]
    ours_init = ours.init(jax.random.PRNGKey(0), video, train=False, debug=False)["params"]
    assert _shapes(ours_init) == _shapes(params)  # Scenic's exact tree
    params = _randomised(params)
    want = np.asarray(theirs.apply({"params": params}, video, train=False, mutable=False))
    got = np.asarray(ours.apply({"params": params}, video, train=False, mutable=False, debug=False))
    diff = float(np.max(np.abs(got - want)))
    print(
        f"model {model} {extra}: max |vtm_jax - Scenic| = {diff:.3g} (logit scale {np.max(np.abs(want)):.3g})"
    )
    assert diff < 1e-5


def test_model_class_merges(tmp_path):
    """With a token_merging block the Scenic model class is vtm_jax's merged ViViT."""
    _scenic_vivit()
    config = _config(tmp_path, 1, "--config.token_merging.mode=merge", "--config.token_merging.r=6")
    meta = {"num_classes": 10, "input_shape": (-1, *VIDEO_SHAPE[1:]), "target_is_onehot": False}
    model = scenic_model.ViViTTokenMergingModel(config, meta)
    video = np.asarray(jax.random.uniform(jax.random.PRNGKey(2), VIDEO_SHAPE, minval=-1, maxval=1))
    params = _randomised(model.flax_model.init(jax.random.PRNGKey(0), video, train=False)["params"])
    got = model.flax_model.apply({"params": params}, video, train=False, mutable=False, debug=False)
    direct = ViViT(
        num_classes=10,
        hidden_size=16,
        num_heads=2,
        mlp_dim=32,
        num_layers=1,
        patch_size=(2, 8, 8),
        merging=MergingSettings(mode="merge", r=6),
    )
    want = direct.apply({"params": params}, video)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    batch = {"label": np.array([1, 2]), "batch_mask": np.ones(2)}
    assert float(model.loss_function(got, batch)) > 0


@pytest.mark.parametrize("model", [1, 2])
def test_scenic_trainer_steps_draw_anew(tmp_path, model):
    """Scenic's trainer passes only ``rngs={'dropout': ...}``, a new key each step: in training
    that stream keys a random mode's draws (unless ``merge_rng=`` or a ``'merge'`` stream is
    given); evaluation (no rngs) keeps the seeded default."""
    config = _config(
        tmp_path,
        model,
        "--config.token_merging.mode=random_merge",
        "--config.token_merging.r=4",
        "--config.token_merging.trace_source=index",
    )
    module = scenic_model.flax_model_from_config(config)
    video = np.asarray(jax.random.uniform(jax.random.PRNGKey(2), VIDEO_SHAPE, minval=-1, maxval=1))
    params = _randomised(module.init(jax.random.PRNGKey(0), video, train=False)["params"])

    @jax.jit
    def train_step(params, rng, step):
        # As Scenic's classification_trainer: a fresh dropout key per step.
        dropout_rng = jax.random.fold_in(rng, step)
        _, state = module.apply(
            {"params": params},
            video,
            train=True,
            debug=False,
            rngs={"dropout": dropout_rng},
            mutable=["intermediates"],
        )
        return state["intermediates"]["source"][0]

    rng = jax.random.PRNGKey(0)
    sources = [np.asarray(train_step(params, rng, step)) for step in range(3)]
    assert not np.array_equal(sources[0], sources[1])
    assert not np.array_equal(sources[1], sources[2])
    np.testing.assert_array_equal(sources[2], np.asarray(train_step(params, rng, 2)))

    def source(**kwargs):
        _, state = module.apply({"params": params}, video, mutable=["intermediates"], **kwargs)
        return np.asarray(state["intermediates"]["source"][0])

    seeded = source(merge_rng=jax.random.PRNGKey(module.merging.seed))
    np.testing.assert_array_equal(source(train=False), seeded)  # Scenic's eval step
    # Without rngs, or with an explicit key or a 'merge' stream, 'dropout' is not read.
    np.testing.assert_array_equal(source(train=True), seeded)
    key = jax.random.PRNGKey(5)
    explicit = source(train=True, merge_rng=key, rngs={"dropout": rng})
    np.testing.assert_array_equal(explicit, source(merge_rng=key))
    stream = source(train=True, rngs={"dropout": rng, "merge": key})
    np.testing.assert_array_equal(stream, source(rngs={"merge": key}))
