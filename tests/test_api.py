"""The Python API: a light top-level import, load, classify with one compile, bad input."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest

import vtm_jax
from vtm_jax import api
from vtm_jax.jobs.predict import _apply, predict

FRAMES, SIZE = 16, 32


def test_the_top_level_import_is_light_and_lists_the_api():
    code = (
        "import sys, vtm_jax\n"
        "heavy = [m for m in ('jax', 'flax', 'tensorflow_datasets', 'vtm_jax.api') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert 'load' in dir(vtm_jax) and 'classify' in vtm_jax.__all__\n"
        "vtm_jax.MergingSettings\n"
        "assert 'vtm_jax.api' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert set(vtm_jax._API) == set(api.__all__)  # the lazy names are the API's
    for name in api.__all__:
        assert getattr(vtm_jax, name) is getattr(api, name)
    with pytest.raises(AttributeError, match="no attribute 'lod'"):
        vtm_jax.lod  # noqa: B018


def test_load_and_classify_arrays_paths_and_batches(tiny_checkpoint, tmp_path):
    model, params, record = vtm_jax.load(tiny_checkpoint("vivit"))
    assert model.merging == vtm_jax.MergingSettings()  # the record's stored settings
    clip = np.random.default_rng(0).random((FRAMES, SIZE, SIZE, 3)).astype(np.float32)
    expected = np.asarray(model.apply({"params": params}, clip[None]))[0]
    logits = vtm_jax.classify(model, params, clip)
    assert logits.shape == (8,)
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
    batch = vtm_jax.classify(model, params, np.stack([clip, clip[::-1]]))
    assert batch.shape == (2, 8)
    np.testing.assert_allclose(batch[0], expected, atol=1e-5, rtol=0)

    # Raw pixels and files go through the record's preprocessing, as `vtm-jax predict`.
    pixels = np.random.default_rng(1).integers(0, 256, (20, 40, 50, 3), dtype=np.uint8)
    np.save(tmp_path / "pixels.npy", pixels)
    from_array = vtm_jax.classify(model, params, pixels, record=record)
    from_path = vtm_jax.classify(model, params, tmp_path / "pixels.npy", record=record)
    cli_logits, _ = predict(tiny_checkpoint("vivit"), pixels)
    np.testing.assert_array_equal(from_array, from_path)
    np.testing.assert_allclose(from_array, cli_logits, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="classify needs record="):
        vtm_jax.classify(model, params, pixels)
    with pytest.raises(vtm_jax.UserError, match="classify needs record="):
        vtm_jax.classify(model, params, str(tmp_path / "pixels.npy"))
    with pytest.raises(ValueError, match=r"expected an array \(T, H, W, 3\)"):
        vtm_jax.classify(model, params, clip[..., :2])
    other = {k: v for k, v in params.items() if k != "embedding"}  # another model's
    with pytest.raises(ValueError, match="^the parameters do not fit ViViT: "):
        vtm_jax.classify(model, other, clip)
    bad = clip.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        vtm_jax.classify(model, params, bad)


def test_classify_compiles_once_per_model_and_shape(tiny_checkpoint):
    checkpoint = tiny_checkpoint("vivit")
    model, params, _ = vtm_jax.load(checkpoint)
    clip = np.zeros((FRAMES, SIZE, SIZE, 3), np.float32)
    vtm_jax.classify(model, params, clip)
    compiled = _apply._cache_size()
    vtm_jax.classify(model, params, clip + 0.5)
    again, params_again, _ = vtm_jax.load(checkpoint)  # an equal model, rebuilt
    vtm_jax.classify(again, params_again, clip)
    predict(checkpoint, clip)  # the command line's path shares the cache too
    assert _apply._cache_size() == compiled
    merged = vtm_jax.classify(model, params, clip, merging={"mode": "merge", "r": 16})
    assert _apply._cache_size() == compiled + 1  # new settings: one new program
    vtm_jax.classify(model, params, clip, merging=vtm_jax.settings(mode="merge", r=16))
    assert _apply._cache_size() == compiled + 1
    assert merged.shape == (8,) and np.isfinite(merged).all()


def test_names_of_vtm_jax_0_1_still_answer_with_a_warning():
    with pytest.warns(DeprecationWarning, match="ReductionSettings is now vtm_jax.MergingSettings"):
        assert vtm_jax.ReductionSettings is vtm_jax.MergingSettings
    with pytest.warns(DeprecationWarning, match="reduce_tokens is now vtm_jax.merge_tokens"):
        assert vtm_jax.reduce_tokens is vtm_jax.merge_tokens
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from vtm_jax.reduction import ReduceContext, ReductionSettings, register_rule\n"
        "from vtm_jax import merging, tokens\n"
        "assert ReductionSettings is merging.MergingSettings, ReductionSettings\n"
        "assert ReduceContext is tokens.MergeContext and register_rule is merging.register_rule\n"
        "assert [w.category for w in caught] == [DeprecationWarning], caught\n"
        "assert 'vtm_jax.reduction is now vtm_jax.merging' in str(caught[0].message)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_settings_token_counts_and_merge_functions(tiny_checkpoint):
    model, _, record = vtm_jax.load(tiny_checkpoint("vivit"), merging={"mode": "merge", "r": 32})
    assert model.merging.mode == "merge" and model.merging.r == 32
    # 128 tubelets + CLS: each layer takes up to half of the unprotected tokens.
    assert vtm_jax.token_counts(model, record) == [97, 65]
    assert vtm_jax.token_counts(model, record, {"mode": "none"}) == [129, 129]
    assert vtm_jax.token_counts(vtm_jax.with_merging(model, r=64), record) == [65, 33]
    with pytest.raises(ValueError, match="temporal_r applies only to"):
        vtm_jax.with_merging(model, temporal_r=2)
    with pytest.raises(ValueError, match="unknown mode"):
        vtm_jax.settings(mode="tome")
    # A rule's option by name, as in a config block, lands in the settings' rule_options.
    hybrid = vtm_jax.settings(mode="hybrid", r=8, threshold=0.5)
    assert hybrid == vtm_jax.MergingSettings(mode="hybrid", r=8, rule_options={"threshold": 0.5})
    with pytest.raises(ValueError, match="num_frames apply to a converted source"):
        vtm_jax.load(tiny_checkpoint("vivit"), num_frames=8)

    # The merge functions, on their own: 6 tokens, the 2 most similar pairs averaged.
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 4))
    match = vtm_jax.bipartite_soft_matching(vtm_jax.cosine_scores(x), 2, class_token=False)
    merged, size = vtm_jax.merge_wavg(x, None, match)
    assert merged.shape == (1, 4, 4) and float(size.sum()) == 6.0
