"""Quick self-checks of the independent PyTorch reference (tests/reference), run before trusting it as an oracle."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import VivitConfig, VivitForVideoClassification

from tests.reference import tome_oracle as tm
from tests.reference.torch_tome_vivit import tome_vivit_forward


def _worked_example_metric() -> torch.Tensor:
    """N=9 metric for docs/method.md §1.1's worked example.

    B tokens (positions 1,3,5,7) are the basis vectors e0..e3. Each A token (positions 0,2,4,6,8) is
    c*e_target + sqrt(1-c^2)*e_own, with a private extra axis, so its cosine to its target is exactly c and 0 to the
    other B tokens. Scores: 6->7 (0.9) > 8->1 (0.8) > 0->5 (0.7) > 4->3 (0.6) > 2->1 (0.5).
    """
    metric = torch.zeros(9, 9, dtype=torch.float64)
    for j, pos in enumerate((1, 3, 5, 7)):
        metric[pos, j] = 1.0
    targets = {6: (7, 0.9), 8: (1, 0.8), 0: (5, 0.7), 4: (3, 0.6), 2: (1, 0.5)}
    for extra, (pos, (dst_pos, c)) in enumerate(targets.items(), start=4):
        metric[pos, (dst_pos - 1) // 2] = c
        metric[pos, extra] = math.sqrt(1 - c * c)
    return metric[None]


def test_worked_example_with_class_token() -> None:
    metric = _worked_example_metric()
    x = torch.arange(9, dtype=torch.float64)[None, :, None]
    merge, unmerge = tm.bipartite_soft_matching(metric, 3, class_token=True)
    expected = [0, 2, (1 + 8) / 2, (3 + 4) / 2, 5, (7 + 6) / 2]
    assert merge(x)[0, :, 0].tolist() == expected
    merged, size = tm.merge_wavg(merge, x)
    assert merged[0, :, 0].tolist() == expected
    assert size[0, :, 0].tolist() == [1, 1, 2, 2, 1, 2]
    # unmerge: every original position gets its (merged) token's value back.
    assert unmerge(merge(x))[0, :, 0].tolist() == [
        0,
        4.5,
        2,
        3.5,
        3.5,
        5,
        6.5,
        6.5,
        4.5,
    ]
    # r is clamped to (N - 1) // 2 = 4 with a class token.
    assert tm.bipartite_soft_matching(metric, 100, class_token=True)[0](x).shape[1] == 5


def test_worked_example_without_class_token() -> None:
    metric = _worked_example_metric()
    x = torch.arange(9, dtype=torch.float64)[None, :, None]
    merge, _ = tm.bipartite_soft_matching(metric, 3, class_token=False)
    # Unmerged A tokens stay in descending-score order (4 before 2).
    assert merge(x)[0, :, 0].tolist() == [
        4,
        2,
        (1 + 8) / 2,
        3,
        (5 + 0) / 2,
        (7 + 6) / 2,
    ]
    drop = tm.bipartite_soft_matching_drop(metric, 3, class_token=False)
    assert drop(x)[0, :, 0].tolist() == [4, 2, 1, 3, 5, 7]
    assert (
        tm.bipartite_soft_matching(metric, 5, class_token=False)[0](x).shape[1] == 5
    )  # clamp 9 // 2 = 4
    assert tm.bipartite_soft_matching(metric, 0) == (tm.do_nothing, tm.do_nothing)


def test_hybrid_and_source_on_worked_example() -> None:
    metric = _worked_example_metric()
    x = torch.arange(9, dtype=torch.float64)[None, :, None]
    # threshold 0.85: only 6->7 (0.9) passes, so dsts 1 (from 8, 0.8) and 3 (from 4, 0.6) are discarded.
    merge, _ = tm.bipartite_soft_matching_hybrid(metric, 3, class_token=True, threshold=0.85)
    merged, size = tm.merge_wavg(merge, x)
    assert merged[0, :, 0].tolist() == [0, 2, 8, 4, 5, 6.5]
    assert size[0, :, 0].tolist() == [1, 1, 1, 1, 1, 2]
    source = tm.merge_source(merge, x)
    assert source[0].sum(-1).tolist() == [1, 1, 1, 1, 1, 2]
    assert (
        source[0, :, 1].sum() == 0 and source[0, :, 3].sum() == 0
    )  # discarded dsts vanish from the source
    merge, _ = tm.bipartite_soft_matching(metric, 3, class_token=True)
    assert tm.merge_source(merge, x)[0].sum(-1).tolist() == [1, 1, 2, 2, 1, 2]


def test_random_scores_are_used() -> None:
    metric = torch.randn(2, 9, 4)
    x = torch.randn(2, 9, 3)
    scores = torch.rand(2, 5, 4)
    m1, _ = tm.bipartite_soft_matching(
        metric, 3, class_token=True, mode="random_merge", random_scores=scores
    )
    m2, _ = tm.bipartite_soft_matching(
        metric * -1, 3, class_token=True, mode="random_merge", random_scores=scores
    )
    assert torch.equal(m1(x), m2(x))  # the metric's values are ignored
    assert scores.isfinite().all()  # the caller's tensor is not modified by the CLS protection


def test_parse_r() -> None:
    assert tm.parse_r(12, (300, -1)) == [
        600,
        545,
        490,
        436,
        381,
        327,
        272,
        218,
        163,
        109,
        54,
        0,
    ]
    assert tm.parse_r(12, (300, 1)) == [
        0,
        54,
        109,
        163,
        218,
        272,
        327,
        381,
        436,
        490,
        545,
        600,
    ]
    assert tm.parse_r(12, (18, -1)) == [36, 32, 29, 26, 22, 19, 16, 13, 9, 6, 3, 0]
    assert tm.parse_r(12, (18, 1)) == [0, 3, 6, 9, 13, 16, 19, 22, 26, 29, 32, 36]
    assert tm.parse_r(12, 7) == [7] * 12
    assert tm.parse_r(12, (7, 0)) == [7] * 12
    assert tm.parse_r(4, [1, 2]) == [1, 2, 0, 0]
    assert tm.parse_r(2, [1, 2, 3]) == [1, 2, 3]  # not truncated
    assert tm.parse_r(14, [0] * 11 + [300] * 12) == [0] * 11 + [300] * 12


@pytest.fixture(scope="module")
def tiny_vivit() -> VivitForVideoClassification:
    torch.manual_seed(0)
    config = VivitConfig(
        image_size=32,
        num_frames=4,
        tubelet_size=[2, 8, 8],
        num_channels=3,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
        attn_implementation="eager",
    )
    assert config.hidden_act == "gelu_fast"
    model = VivitForVideoClassification(config).eval()
    with torch.no_grad():  # HF initialises these to zero; make them matter
        model.vivit.embeddings.cls_token.normal_(std=0.5)
        model.vivit.embeddings.position_embeddings.normal_(std=0.5)
    return model


@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    return torch.randn(
        2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1)
    )  # 2*4*4 = 32 patches + CLS


@torch.no_grad()
def test_r0_matches_hf(tiny_vivit: VivitForVideoClassification, video: torch.Tensor) -> None:
    expected = tiny_vivit(pixel_values=video).logits
    for r in (0, [0], (0, -1)):
        out = tome_vivit_forward(tiny_vivit, video, r)
        assert out["token_counts"] == [33, 33, 33]
        torch.testing.assert_close(out["logits"], expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_merged_forward_invariants(
    tiny_vivit: VivitForVideoClassification, video: torch.Tensor
) -> None:
    assert tome_vivit_forward(tiny_vivit, video, 4)["token_counts"] == [29, 25, 21]
    assert tome_vivit_forward(tiny_vivit, video, 100)["token_counts"] == [
        17,
        9,
        5,
    ]  # clamp (N-1)//2
    assert tome_vivit_forward(tiny_vivit, video, (8, -1))["token_counts"] == [
        17,
        9,
        9,
    ]  # r = [16, 8, 0]

    merged = tome_vivit_forward(tiny_vivit, video, 6, trace_source=True)
    assert torch.equal(merged["size"].sum(dim=(1, 2)), torch.full((2,), 33.0))
    source = merged["source"]
    assert source.shape == (2, 15, 33)
    assert torch.equal(
        source.sum(dim=1), torch.ones(2, 33)
    )  # every original patch in exactly one token
    assert torch.equal(source.sum(dim=2, keepdim=True), merged["size"])
    assert torch.equal(source[:, 0, 0], torch.ones(2))  # CLS stays first and alone

    hybrid = tome_vivit_forward(
        tiny_vivit, video, 6, mode="hybrid", threshold=-1.0, trace_source=True
    )
    for key in ("logits", "size", "source"):
        assert torch.equal(hybrid[key], merged[key])
    hybrid = tome_vivit_forward(tiny_vivit, video, 6, mode="hybrid", threshold=2.0)
    assert hybrid["size"].sum() < 2 * 33  # every dst discarded: size not conserved

    concat = tome_vivit_forward(tiny_vivit, video, 6, head_aggregation="concat")
    assert concat["token_counts"] == [27, 21, 15]
    no_prop = tome_vivit_forward(tiny_vivit, video, 6, prop_attn=False)
    assert not torch.allclose(no_prop["logits"], merged["logits"])


@torch.no_grad()
def test_drop_random_and_duplicate(
    tiny_vivit: VivitForVideoClassification, video: torch.Tensor
) -> None:
    dropped = tome_vivit_forward(tiny_vivit, video, 6, mode="drop", trace_source=True)
    assert dropped["token_counts"] == [27, 21, 15]
    assert torch.equal(dropped["size"], torch.ones(2, 15, 1))
    assert torch.equal(
        dropped["source"].sum(dim=(1, 2)), torch.full((2,), 15.0)
    )  # rows deleted, never OR-ed

    calls: list[tuple[int, tuple[int, int, int]]] = []

    def scores(step: int, shape: tuple[int, int, int]) -> torch.Tensor:
        calls.append((step, shape))
        return torch.rand(shape, generator=torch.Generator().manual_seed(step))

    for mode in ("random_merge", "random_drop"):
        calls.clear()
        a = tome_vivit_forward(tiny_vivit, video, 6, mode=mode, random_scores=scores)
        assert calls == [(0, (2, 17, 16)), (1, (2, 14, 13)), (2, (2, 11, 10))]
        b = tome_vivit_forward(tiny_vivit, video, 6, mode=mode, random_scores=scores)
        assert torch.equal(a["logits"], b["logits"])

    # Duplication (docs/method.md §3.6): 2 extra metric-only steps at layer 1, r list over 3 + 2 = 5 steps.
    dup = tome_vivit_forward(tiny_vivit, video, [0, 4, 4, 4, 0], duplicate=(1, 3))
    assert dup["token_counts"] == [33, 29, 25, 21, 21]


@pytest.mark.parametrize(
    ("r", "expected"),
    [
        (1568, [1569, 785, 393, 197, 99, 50, 26, 14, 8, 5, 3, 2]),
        ((300, -1), [2537, 1992, 1502, 1066, 685, 358, 180, 91, 46, 24, 13, 13]),
        (
            (300, 1),
            [3137, 3083, 2974, 2811, 2593, 2321, 1994, 1613, 1177, 687, 344, 173],
        ),
    ],
)
def test_vivit_b_token_trajectories(r: int | tuple[int, int], expected: list[int]) -> None:
    """docs/method.md §3.1 token counts for 3137 tokens and 12 layers (parse_r + clamp), on a random metric."""
    x = torch.randn(1, 3137, 4, generator=torch.Generator().manual_seed(0))
    counts = []
    for r_i in tm.parse_r(12, r):
        if r_i > 0:
            merge, _ = tm.bipartite_soft_matching(x, r_i, class_token=True)
            x = merge(x)
        counts.append(x.shape[1])
    assert counts == expected
