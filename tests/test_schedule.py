"""r schedules and token counts against docs/method.md's tables (§2.1, §3.1-3.3), FLOPs (landscape §4)."""

import pytest

from vtm_jax.errors import UserError
from vtm_jax.merging.schedule import block_macs, parse_r, plan_tokens


@pytest.mark.parametrize(
    "r, expected",
    [
        ((300, -1), [600, 545, 490, 436, 381, 327, 272, 218, 163, 109, 54, 0]),
        ((300, 1), [0, 54, 109, 163, 218, 272, 327, 381, 436, 490, 545, 600]),
        ((18, -1), [36, 32, 29, 26, 22, 19, 16, 13, 9, 6, 3, 0]),
        ((18, 1), [0, 3, 6, 9, 13, 16, 19, 22, 26, 29, 32, 36]),
        (7, [7] * 12),
        ((7, 0), [7] * 12),
        ([1, 2], [1, 2] + [0] * 10),
        (list(range(14)), list(range(14))),  # longer lists are not truncated
    ],
)
def test_parse_r(r, expected):
    assert parse_r(12, r) == expected


def test_parse_r_rejects_nonsense():
    with pytest.raises(UserError):
        parse_r(12, "300")
    with pytest.raises(UserError):
        parse_r(1, (300, -1))


def counts(tokens, r, class_token):
    return [p.tokens_out for p in plan_tokens(tokens, parse_r(12, r), class_token=class_token)]


# ViViT: 3137 tokens, global, class token (docs/method.md §3.1).
def test_vivit_tables():
    assert counts(3137, 1568, True) == [1569, 785, 393, 197, 99, 50, 26, 14, 8, 5, 3, 2]
    r300 = counts(3137, 300, True)
    assert r300[:4] == [2837, 2537, 2237, 1937] and r300[-5:] == [737, 437, 219, 110, 56]
    assert [p.r for p in plan_tokens(3137, [300] * 12, class_token=True)][-4:] == [
        300,
        218,
        109,
        54,
    ]
    assert counts(3137, (300, -1), True) == [
        2537, 1992, 1502, 1066, 685, 358, 180, 91, 46, 24, 13, 13
    ]  # fmt: skip
    assert counts(3137, (300, 1), True) == [
        3137, 3083, 2974, 2811, 2593, 2321, 1994, 1613, 1177, 687, 344, 173
    ]  # fmt: skip


# VideoMAE: 1568 tokens, global, no class token (§3.2).
def test_videomae_tables():
    assert counts(1568, 784, False) == [784, 392, 196, 98, 49, 25, 13, 7, 4, 2, 1, 1]
    r150 = counts(1568, 150, False)
    assert r150[0] == 1418 and r150[-5:] == [368, 218, 109, 55, 28]
    assert counts(1568, (150, -1), False) == [1268, 996, 751, 533, 343, 180, 90, 45, 23, 12, 6, 6]
    assert counts(1568, (150, 1), False) == [
        1568, 1541, 1487, 1406, 1297, 1161, 998, 808, 590, 345, 173, 87
    ]  # fmt: skip


# TimeSformer / Motionformer: 196 tokens per frame group, no class token (§3.3, §3.4).
def test_per_frame_tables():
    assert counts(196, 98, False) == [98, 49, 25, 13, 7, 4, 2, 1, 1, 1, 1, 1]
    r18 = counts(196, 18, False)
    assert r18[:2] == [178, 160] and r18[-5:] == [52, 34, 17, 9, 5]
    assert counts(196, (18, -1), False) == [160, 128, 99, 73, 51, 32, 16, 8, 4, 2, 1, 1]
    assert counts(196, (18, 1), False) == [196, 193, 187, 178, 165, 149, 130, 108, 82, 53, 27, 14]


def vivit_b_gmacs(r):
    from vtm_jax.merging import MergingSettings
    from vtm_jax.models.vivit import ViViT

    model = ViViT(num_classes=400, merging=MergingSettings(mode="merge", r=r))
    return model.analytic_macs(32, 224)["total"] / 1e9


def test_vivit_b_flops():
    # landscape.md §4: 451.5 GMACs at r=0; the FLOP limit of r=300 is about 2.52x.
    assert vivit_b_gmacs(0) == pytest.approx(451.5, abs=0.1)
    assert vivit_b_gmacs(0) / vivit_b_gmacs(300) == pytest.approx(2.52, abs=0.02)
    assert block_macs(10, 10, hidden=4, mlp_dim=16) == 4 * 10 * 16 + 2 * 100 * 4 + 2 * 10 * 4 * 16


def test_settings_r_forms():
    import dataclasses

    from vtm_jax.merging import MergingSettings

    paper = MergingSettings(mode="merge", r=(300, -1))  # the paper's (r, inflection)
    assert (paper.r, paper.schedule) == (300, -1.0)
    assert paper.layer_r(12) == parse_r(12, (300, -1))
    per_layer = MergingSettings(mode="merge", r=[300, 1, 0, 0])
    assert per_layer.layer_r(4) == [300, 1, 0, 0]
    # Copies keep a per-layer list per-layer, and the dict form round-trips.
    assert dataclasses.replace(per_layer, mode="drop").layer_r(4) == [300, 1, 0, 0]
    assert MergingSettings.from_dict(per_layer.to_dict()) == per_layer
    assert hash(per_layer) == hash(MergingSettings(mode="merge", r=[300, 1, 0, 0]))
    # A list of another length is refused, not padded or cut as the paper's parse_r does.
    for wrong in ([300, 1], [300, 1, 0, 0, 5]):
        with pytest.raises(UserError, match=f"lists {len(wrong)} values, the model has 4"):
            MergingSettings(mode="merge", r=wrong).layer_r(4)
    for bad in (dict(r=(1, 2, 3)), dict(r=-1), dict(seed=-1)):
        with pytest.raises(UserError):
            MergingSettings(mode="merge", **bad)
    with pytest.raises(UserError, match="threshold must be a finite number"):
        MergingSettings(mode="hybrid", rule_options={"threshold": float("nan")})
    # ... and given at the top level, as a config block's --config.token_merging.threshold=nan.
    with pytest.raises(UserError, match="threshold must be a finite number"):
        MergingSettings.from_dict({"mode": "hybrid", "threshold": float("nan")})
    with pytest.raises(UserError, match="threshold is given twice: 0.4 and rule_options 0.5"):
        MergingSettings.from_dict(
            {"mode": "hybrid", "threshold": 0.4, "rule_options": {"threshold": 0.5}}
        )
