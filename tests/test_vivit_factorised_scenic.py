"""ViViT models 3 and 4 against Scenic's own ViViT module, on the same random parameters.

These need Scenic importable (``pip install "vtm-jax[scenic]"``) and are skipped otherwise, as
the model-1 and model-2 parity tests are; the tree's names and shapes are also checked without
Scenic, against shapes recorded from its module (``tests/test_vivit_factorised.py``).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tests.scenic_fixtures import TINY_MODEL3, write_scenic_config
from vtm_jax.config.loading import load_config
from vtm_jax.scenic import model as scenic_model

SMALL_INPUT = [
    "--config.model.patches.size=(8, 8, 2)",
    "--config.model.num_layers=2",
    "--config.dataset_configs.num_classes=10",
    "--config.dataset_configs.num_frames=8",
    "--config.dataset_configs.crop_size=32",
]
VIDEO_SHAPE = (2, 8, 32, 32, 3)  # 4 frames of 16 patches
META = {"num_classes": 10, "input_shape": (-1, *VIDEO_SHAPE[1:]), "target_is_onehot": False}


def _scenic_vivit():
    try:
        from scenic.projects.vivit import model as vivit_model
    except ImportError as error:
        pytest.skip(
            f"Scenic is not importable ({error}); install it with "
            '`pip install "vtm-jax[scenic]"` to compare against its ViViT'
        )
    return vivit_model


def _config(tmp_path, model: int, order: str, *extra: str):
    path = write_scenic_config(tmp_path, model, order)
    return load_config([f"--config={path}", *TINY_MODEL3, *SMALL_INPUT, *extra])


def _randomised(params, seed: int = 1):
    """Every parameter moved off its init (the zero head above all)."""
    leaves, tree = jax.tree.flatten(jax.device_get(params))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    moved = [
        np.asarray(v + 0.1 * jax.random.normal(k, v.shape))
        for v, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(tree, moved)


def _shapes(tree) -> dict:
    return {
        "/".join(str(getattr(p, "key", p)) for p in path): tuple(np.shape(leaf))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


@pytest.mark.parametrize(
    "model, order, extra",
    [
        (3, "time_space", []),
        (3, "space_time", ["--config.model.representation_size=12"]),
        (4, "time_space", []),
        (4, "time_space", ["--config.model.representation_size=12", "--config.model.num_heads=4"]),
    ],
)
def test_logits_equal_scenic_vivit(tmp_path, model, order, extra):
    """r=0: Scenic's ViViTClassificationModel and ours, on the same parameters."""
    vivit_model = _scenic_vivit()
    config = _config(tmp_path, model, order, *extra)
    theirs = vivit_model.ViViTClassificationModel(config, META).flax_model
    ours = scenic_model.ViViTTokenMergingModel(config, META).flax_model
    video = np.asarray(jax.random.uniform(jax.random.PRNGKey(2), VIDEO_SHAPE, minval=-1, maxval=1))
    params = jax.jit(lambda v: theirs.init(jax.random.PRNGKey(0), v, train=False))(video)
    ours_shapes = jax.eval_shape(
        lambda v: ours.init(jax.random.PRNGKey(0), v, train=False, debug=False), video
    )
    assert _shapes(ours_shapes["params"]) == _shapes(params["params"])  # Scenic's exact tree
    params = _randomised(params["params"])
    want = jax.jit(lambda p, v: theirs.apply({"params": p}, v, train=False))(params, video)
    got = jax.jit(lambda p, v: ours.apply({"params": p}, v, train=False, debug=False))(
        params, video
    )
    want, got = np.asarray(want), np.asarray(got)
    diff = float(np.max(np.abs(got - want)))
    print(
        f"model {model} {order} {extra}: max |vtm_jax - Scenic| = {diff:.3g} "
        f"(logit scale {np.max(np.abs(want)):.3g})"
    )
    assert np.max(np.abs(want)) > 0.05  # a real comparison, not of zeros
    assert diff < 1e-5


def test_model_class_merges_models_3_and_4(tmp_path):
    """With a token_merging block, the Scenic model class is vtm_jax's merged model 3 or 4;
    merging changes the logits (it is not ignored) and keeps them finite."""
    _scenic_vivit()
    merge = ["--config.token_merging.mode=merge", "--config.token_merging.r=4"]
    video = np.asarray(jax.random.uniform(jax.random.PRNGKey(3), VIDEO_SHAPE, minval=-1, maxval=1))
    for model, order in ((3, "space_time"), (4, "time_space")):
        plain = scenic_model.ViViTTokenMergingModel(_config(tmp_path, model, order), META)
        merged = scenic_model.ViViTTokenMergingModel(_config(tmp_path, model, order, *merge), META)
        assert merged.flax_model.merging.r == 4 and plain.flax_model.merging.mode == "none"
        params = jax.jit(
            lambda v, m=plain.flax_model: m.init(jax.random.PRNGKey(0), v, train=False)
        )(video)
        params = _randomised(params["params"])
        outputs = [
            np.asarray(
                jax.jit(lambda p, v, m=m.flax_model: m.apply({"params": p}, v, train=False))(
                    params, video
                )
            )
            for m in (plain, merged)
        ]
        assert np.all(np.isfinite(outputs[1])) and not np.allclose(outputs[0], outputs[1])
