"""The rule contract beyond the paper's modes: what a rule reads, where it acts, its own count.

Toy rules at each place check the plumbing the peer methods (tests/methods/) rely on: the block
hands an ``attention`` rule the probabilities it applies, a ``block_start`` rule's merged
probabilities are applied to the merged values, ``block_end`` reduces the block's output,
an ``input`` rule's size-0 padding is invisible to the rest of the model, the token plan
follows a rule's own count, and a backbone refuses a rule it cannot run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtm_jax.errors import UserError
from vtm_jax.merging import RULES, MergingSettings, Rule, Tokens
from vtm_jax.models.encoder import EncoderBlock
from vtm_jax.models.registry import check_settings_apply
from vtm_jax.models.videomae import VideoMAE
from vtm_jax.models.vivit import ViViT

TINY = dict(num_classes=5, hidden_size=32, num_heads=2, mlp_dim=64, patch_size=(2, 8, 8))
VIDEO = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 16, 16, 3))  # 2 x 2 x 2 = 8 patches
SEEN = {}


def _keep_first(tokens: Tokens, n: int) -> Tokens:
    size = jnp.ones(tokens.x.shape[:2] + (1,)) if tokens.size is None else tokens.size
    return Tokens(tokens.x[:, :n], size[:, :n])


def _attention_reader(tokens, metric, r, ctx):
    SEEN["attention"] = (ctx.attention, ctx.attention_logits, metric)
    return _keep_first(tokens, tokens.x.shape[1] - r)


def _one_step_ahead(tokens, metric, r, ctx):
    n = tokens.x.shape[1] - r
    logits = ctx.attention_logits[:, :, :n, :n]  # sizes are all one in the first block
    return _keep_first(tokens, n), jax.nn.softmax(logits, axis=-1)


def _recompute(tokens, metric, r, ctx):
    return _keep_first(tokens, tokens.x.shape[1] - r)


def _pad_dark_patches(tokens, pixels, r, ctx):
    """Size 0 for patches whose mean pixel is negative (no reorder, nothing removed; a class
    token kept)."""
    t, h, w = ctx.grid
    b = pixels.shape[0]
    patches = pixels.reshape(b, t, pixels.shape[1] // t, h, pixels.shape[2] // h, w, -1)
    keep = patches.mean(axis=(2, 4, 6)).reshape(b, -1) >= 0
    if ctx.class_token:
        keep = jnp.concatenate([jnp.ones((b, 1), bool), keep], axis=1)
    return Tokens(tokens.x, keep[..., None].astype(jnp.float32))


TOY_RULES = {
    "toy_attention": Rule(_attention_reader, reads=("attention", "hidden")),
    "toy_one_step": Rule(_one_step_ahead, reads=("attention",), place="block_start"),
    "toy_recompute": Rule(_recompute, reads=("hidden",), place="block_start"),
    "toy_block_end": Rule(_recompute, place="block_end"),
    "toy_counted": Rule(_recompute, removed=lambda n, r, ctx: 1 if ctx.layer % 2 else 0),
    "toy_input": Rule(_pad_dark_patches, reads=("pixels",), place="input", layouts=("joint",)),
}


@pytest.fixture(autouse=True)
def toy_rules():
    RULES.update(TOY_RULES)
    yield
    for name in TOY_RULES:
        RULES.pop(name)


def _block(mode: str, r: int = 2):
    block = EncoderBlock(
        num_heads=2, mlp_dim=64, class_token=False, merging=MergingSettings(mode=mode, r=r)
    )
    tokens = Tokens(jax.random.normal(jax.random.PRNGKey(1), (2, 6, 32)))
    params = block.init(jax.random.PRNGKey(2), tokens, None, r=r)
    return block, params, tokens


def test_attention_rule_reads_the_probabilities_the_block_applies():
    block, params, tokens = _block("toy_attention")
    out = block.apply(params, tokens, None, r=2)
    probs, logits, metric = SEEN["attention"]
    assert out.x.shape == (2, 4, 32)
    assert probs.shape == logits.shape == (2, 2, 6, 6)
    np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(probs), np.asarray(jax.nn.softmax(logits)), atol=1e-6)
    assert metric.shape == (2, 6, 32)  # reads hidden, not keys: the hidden states


def test_one_step_ahead_probabilities_are_applied_to_the_merged_values():
    # Exact softmax of the kept tokens' logits applied directly equals recomputing attention.
    block, params, tokens = _block("toy_one_step")
    ahead = block.apply(params, tokens, None, r=2)
    block2 = block.clone(merging=MergingSettings(mode="toy_recompute", r=2))
    recomputed = block2.apply(params, tokens, None, r=2)
    assert ahead.x.shape == (2, 4, 32)
    np.testing.assert_allclose(np.asarray(ahead.x), np.asarray(recomputed.x), atol=1e-5)
    # Recomputing equals running the unchanged block on the kept tokens.
    plain = block.clone(merging=MergingSettings()).apply(params, _keep_first(tokens, 4), None, r=0)
    np.testing.assert_allclose(np.asarray(recomputed.x), np.asarray(plain.x), atol=1e-5)


def test_block_end_reduces_the_block_output():
    block, params, tokens = _block("toy_block_end")
    out = block.apply(params, tokens, None, r=2)
    full = block.clone(merging=MergingSettings()).apply(params, tokens, None, r=0)
    np.testing.assert_allclose(np.asarray(out.x), np.asarray(full.x[:, :4]), atol=1e-6)


@pytest.mark.parametrize("mode", ["toy_one_step", "toy_block_end", "toy_counted"])
def test_token_plan_and_macs_follow_the_rule(mode):
    model = VideoMAE(num_layers=4, merging=MergingSettings(mode=mode, r=2), **TINY)
    params = model.init(jax.random.PRNGKey(0), VIDEO)
    counts = []
    rule = RULES[mode]

    def recording(tokens, metric, r, ctx):
        counts.append((ctx.layer, tokens.x.shape[1], r))
        return rule.apply(tokens, metric, r, ctx)

    RULES[mode] = rule._replace(apply=recording)
    model.apply(params, VIDEO)
    plan = model.token_plan(4, 16)
    assert [(p.tokens_in, p.r) for p in plan if p.r] == [(n, r) for _, n, r in counts]
    assert all(p.place == rule.place for p in plan)
    macs = model.analytic_macs(4, 16)["total"]
    base = VideoMAE(num_layers=4, **TINY).analytic_macs(4, 16)["total"]
    assert macs < base
    if mode == "toy_counted":
        assert [layer for layer, _, _ in counts] == [1, 3]


@pytest.mark.parametrize("backbone", [VideoMAE, ViViT])
def test_input_padding_is_invisible(backbone):
    model = backbone(num_layers=2, merging=MergingSettings(mode="toy_input"), **TINY)
    params = model.init(jax.random.PRNGKey(0), VIDEO)
    # A random head: its initialiser gives zeros, under which every logit is 0.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    params = jax.tree.unflatten(
        tree, [0.2 * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves, strict=True)]
    )
    video = VIDEO.at[:, :2, :8, :8].set(-1.0)  # one patch of the first tubelet is dark
    other = video.at[:, :2, :8, :8].set(-5.0)  # still dark, different content
    a, b = model.apply(params, video), model.apply(params, other)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    plain = backbone(num_layers=2, **TINY)
    assert not np.allclose(np.asarray(plain.apply(params, video)), plain.apply(params, other))


def test_backbone_refuses_a_rule_it_cannot_run():
    with pytest.raises(UserError, match=r"toy_one_step.*timesformer.*block_start.*vivit"):
        check_settings_apply("timesformer", MergingSettings(mode="toy_one_step", r=2))
    with pytest.raises(UserError, match=r"joint token layout.*vivit_factorised_encoder"):
        check_settings_apply("vivit_factorised_encoder", MergingSettings(mode="toy_input"))
    check_settings_apply("videomae", MergingSettings(mode="toy_one_step", r=2))


def test_duplicate_needs_a_reduction_after_attention():
    with pytest.raises(
        UserError, match="duplicate repeats a reduction after attention that reads the keys only"
    ):
        MergingSettings(mode="toy_block_end", r=2, duplicate=(1, 2))


def test_no_two_modes_declare_one_option_differently():
    # Options sit side by side at the top of a config's token_merging block (a preset for one
    # mode is left out for another), so one name must mean one thing.
    declared = {}
    for name, rule in RULES.items():
        for option in rule.options if rule is not None else ():
            meaning = option._replace(hint="")  # hints may word it for their own mode
            first = declared.setdefault(option.name, (name, meaning))
            assert first[1] == meaning, f"{option.name}: {first[0]} and {name} differ"
    assert {"threshold", "rlt_threshold", "keep_ratio"} <= set(declared)
