"""Merge pictures: exact colours, borders and dropped tokens on hand-built groups; the token
layouts against the models' own reshapes; tiny checkpoints end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageSequence

from vtm_jax import visualize as vis
from vtm_jax.checkpoint import save_checkpoint
from vtm_jax.errors import UserError
from vtm_jax.models import motionformer, timesformer
from vtm_jax.models.motionformer import Motionformer
from vtm_jax.models.registry import build_model
from vtm_jax.models.timesformer import TimeSformer
from vtm_jax.models.vivit import ViViT
from vtm_jax.models.vivit_fe import FactorisedEncoderViViT
from vtm_jax.record import ModelRecord
from vtm_jax.reduction import ReductionSettings
from vtm_jax.visualize import (
    BORDER,
    DROPPED_DARK,
    DROPPED_LIGHT,
    frame_grid,
    frame_group_labels,
    layer_settings,
    render_frame_groups,
    render_global_groups,
    render_groups,
    trace_groups,
    visualize,
)

PATCH = (1, 4, 4)


def _is_dropped(pixels):
    pixels = pixels.reshape(-1, 3)
    return np.all((pixels == DROPPED_DARK).all(-1) | (pixels == DROPPED_LIGHT).all(-1))


def _hand_built():
    """Two frames of 2 x 2 tokens (4 x 4 pixels each).

    Frame 0: A B / B B; frame 1: A C / dropped D. A spans both frames; B's pixels are noise.
    """
    rng = np.random.default_rng(0)
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    frames[0, :4, :4] = (10, 20, 245)
    frames[1, :4, :4] = (30, 60, 225)
    frames[0, :4, 4:] = rng.integers(0, 256, (4, 4, 3))
    frames[0, 4:, :] = rng.integers(0, 256, (4, 8, 3))
    frames[1, :4, 4:] = (200, 100, 50)
    frames[1, 4:, :4] = (1, 2, 3)
    frames[1, 4:, 4:] = (90, 180, 0)
    # (t h w) order; ids are arbitrary current-token indices, -1 dropped.
    ids = np.array([5, 2, 2, 2, 5, 7, -1, 0])
    return frames, ids


@pytest.mark.parametrize("class_token", [False, True])
def test_global_groups_mean_colour_borders_and_dropped(class_token):
    frames, ids = _hand_built()
    if class_token:
        ids = np.concatenate([[0], np.where(ids >= 0, ids + 1, -1)])  # class token: slot 0
    out = render_global_groups(frames, ids, (2, 2, 2), PATCH, class_token=class_token)
    assert out.shape == frames.shape and out.dtype == np.uint8
    # A: one colour over both frames, the mean of all its pixels.
    a = (20, 40, 235)
    np.testing.assert_array_equal(out[0, :3, :3], np.broadcast_to(a, (3, 3, 3)))
    np.testing.assert_array_equal(out[1, :3, :3], np.broadcast_to(a, (3, 3, 3)))
    # B: three tokens of noise, one mean colour (border pixels count in the mean too).
    b_mask = np.zeros((8, 8), bool)
    b_mask[:4, 4:] = b_mask[4:, :] = True
    b = np.round(frames[0][b_mask].astype(np.float64).mean(0)).astype(np.uint8)
    np.testing.assert_array_equal(out[0, 5:, 5:], np.broadcast_to(b, (3, 3, 3)))
    np.testing.assert_array_equal(out[0, :3, 5:], np.broadcast_to(b, (3, 3, 3)))
    # Borders where A meets B, on both sides; none inside B across token edges, none at the
    # image edge.
    for y, x in [(0, 3), (0, 4), (3, 0), (4, 0), (3, 3), (4, 3), (3, 4)]:
        np.testing.assert_array_equal(out[0, y, x], BORDER, err_msg=f"{(y, x)}")
    np.testing.assert_array_equal(out[0, 4, 5], b)  # B above and below: no border
    np.testing.assert_array_equal(out[0, 3, 5], b)
    np.testing.assert_array_equal(out[0, 5, 4], b)
    np.testing.assert_array_equal(out[0, 7, 7], b)
    # Frame 1: C and D single tokens keep their colour; the dropped token is hatched grey.
    np.testing.assert_array_equal(out[1, 1, 6], (200, 100, 50))
    np.testing.assert_array_equal(out[1, 6, 6], (90, 180, 0))
    drop = out[1, 4:, :4]
    assert _is_dropped(drop)
    assert (drop == DROPPED_DARK).all(-1).any() and (drop == DROPPED_LIGHT).all(-1).any()
    # D borders the dropped token (on D's side only) and C.
    np.testing.assert_array_equal(out[1, 5, 4], BORDER)
    np.testing.assert_array_equal(out[1, 4, 6], BORDER)
    np.testing.assert_array_equal(out[1, 3, 6], BORDER)
    assert not (out[1, 4:, :4] == BORDER).all(-1).any()
    # Exactly these colours, nothing else.
    colours = {tuple(c) for c in out.reshape(-1, 3)}
    expected = {a, tuple(b), (200, 100, 50), (90, 180, 0), BORDER, DROPPED_DARK, DROPPED_LIGHT}
    assert colours == expected


def test_interleaved_groups_span_frames():
    """Motionformer's paper groups: member c of group g is flat token c * G + g."""
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    for slot in range(2):
        for i in range(4):
            y, x = divmod(i, 2)
            frames[slot, 4 * y : 4 * y + 4, 4 * x : 4 * x + 4] = 10 * (4 * slot + i) + 20
    # Group 0 holds flat tokens 0, 2, 4, 6 (slot 0 patches 0, 2; slot 1 patches 0, 2); its
    # members 0 and 2 (slot 0 patch 0, slot 1 patch 0) merged. Group 1 is all singletons.
    ids = np.array([[0, 1, 0, 2], [0, 1, 2, 3]])
    out = render_frame_groups(frames, ids, (2, 2, 2), PATCH, layout="interleaved")
    merged = (20 + 60) // 2
    np.testing.assert_array_equal(out[0, 0, 0], (merged,) * 3)
    np.testing.assert_array_equal(out[1, 0, 0], (merged,) * 3)
    # Slot 0 patch 1 is group 1 member 0: its own colour, not group 0's id 0 colour.
    np.testing.assert_array_equal(out[0, 1, 6], (30,) * 3)
    np.testing.assert_array_equal(out[1, 6, 1], (80,) * 3)  # slot 1 patch 2: group 0 member 3
    # The same ids as per-frame groups: slot 0 patches 0 and 2 merge instead.
    out = render_frame_groups(frames, ids, (2, 2, 2), PATCH, layout="frame")
    np.testing.assert_array_equal(out[0, 0, 0], ((20 + 40) // 2,) * 3)
    np.testing.assert_array_equal(out[0, 6, 1], ((20 + 40) // 2,) * 3)
    np.testing.assert_array_equal(out[1, 0, 0], (60,) * 3)


def test_frame_group_dropped_and_class_token():
    frames = np.full((2, 8, 8, 3), 100, np.uint8)
    ids = np.array([[0, 1, 1, 2, -1], [0, 1, 2, 3, 4]])  # column 0: a per-frame class token
    out = render_frame_groups(frames, ids, (2, 2, 2), PATCH, class_token=True)
    assert _is_dropped(out[0, 4:, 4:])
    assert not _is_dropped(out[1, 4:, 4:])
    assert not _is_dropped(out[0, :4, :4])


@pytest.mark.parametrize("grouping", ["paper", "per_frame"])
def test_motionformer_layout_matches_model(grouping):
    """Each source column sits where the model's own to_groups took it from."""
    f, p = 3, 4
    flat = jnp.arange(f * p)[None, :, None]  # frame-major (f n) token index
    origin = np.asarray(motionformer.to_groups(flat, f, grouping))[..., 0]  # [G, P]
    ids = np.broadcast_to(np.arange(p), (f, p))  # every token its own group
    layout = "interleaved" if grouping == "paper" else "frame"
    labels = frame_group_labels(ids, (f, 2, 2), layout=layout).reshape(-1)
    for g in range(f):
        for c in range(p):
            assert labels[origin[g, c]] == g * p + c


def test_timesformer_layout_matches_model():
    """TimeSformer's source row t is frame t, although its tokens are in (p t) order."""
    t, p = 3, 4
    pt_index = jnp.arange(p * t)[None, :, None]  # (p t): spatial major, frame minor
    origin = np.asarray(timesformer.to_frames(pt_index, t))[..., 0]  # [T, p]
    labels = frame_group_labels(np.broadcast_to(np.arange(p), (t, p)), (t, 2, 2)).reshape(-1)
    for row in range(t):
        for c in range(p):
            frame, spatial = origin[row, c] % t, origin[row, c] // t
            assert labels[frame * p + spatial] == row * p + c


def test_frame_grid():
    frames = np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones((5, 3, 4, 3), np.uint8)
    grid = frame_grid(frames, 2, gap=1, fill=255)
    assert grid.shape == (3 * 3 + 2, 2 * 4 + 1, 3)
    np.testing.assert_array_equal(grid[4:7, 5:9], frames[3])
    np.testing.assert_array_equal(grid[8:11, 0:4], frames[4])
    assert (grid[8:11, 4:] == 255).all()  # the empty cell and the gap
    assert (grid[3] == 255).all()


def test_layer_settings_truncate():
    s = ReductionSettings(mode="merge", r=(4, -1.0))
    assert layer_settings(s, 4, 2).layer_r(4) == s.layer_r(4)[:2] + [0, 0]
    assert layer_settings(s, 4, 2).trace_source == "index"
    dup = ReductionSettings(mode="merge", r=3, duplicate=(1, 2))
    assert layer_settings(dup, 3, 1).layer_steps(3) == [(0, 0), (1, 0), (2, 0)]
    assert layer_settings(dup, 3, 2).layer_steps(3) == dup.layer_steps(3)
    for bad in (0, 5, True):
        with pytest.raises(UserError):
            layer_settings(s, 4, bad)


# ---------------------------------------------------------------------------------------------
# End to end on tiny checkpoints

PREP = {
    "num_frames": 4,
    "stride": 1,
    "min_resize": 32,
    "crop_size": 32,
    "mean": [0.45, 0.5, 0.55],
    "std": [0.25, 0.5, 0.2],
}


def _save(path, module_cls, arch, kwargs, merging):
    video = np.zeros((1, 4, 32, 32, 3), np.float32)
    params = module_cls(**kwargs).init(jax.random.PRNGKey(0), video)["params"]
    params = jax.tree.map(
        lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params
    )
    record = ModelRecord.from_json(
        {
            "architecture": arch,
            "model": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
            "input": {"num_frames": 4, "image_size": 32},
            "preprocessing": PREP,
            "token_merging": merging,
        }
    )
    save_checkpoint(str(path), jax.device_get(params), record)
    return str(path), record


TINY = dict(num_classes=5, hidden_size=32, num_heads=4, mlp_dim=64, num_layers=3)


@pytest.fixture(scope="module")
def vivit_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("vis")
    ckpt, record = _save(
        root / "vivit",
        ViViT,
        "vivit",
        {**TINY, "patch_size": (2, 8, 8)},
        {"mode": "merge", "r": 5},
    )
    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    clip = root / "clip.npy"
    np.save(clip, pixels)
    return ckpt, record, str(clip), pixels


def test_visualize_vivit_end_to_end(vivit_ckpt, tmp_path, monkeypatch):
    ckpt, record, clip, pixels = vivit_ckpt
    out = tmp_path / "out"
    traces = []  # what visualize drew, without running the model twice

    def recording(*args, **kwargs):
        traces.append(trace_groups(*args, **kwargs))
        return traces[-1]

    monkeypatch.setattr(vis, "trace_groups", recording)
    paths = visualize(ckpt, clip, layers=[1, 3], out_dir=str(out))
    names = sorted(p.split("/")[-1] for p in paths)
    assert names == sorted(
        [
            "clip_input.png",
            "clip_layer1.png",
            "clip_layer1.gif",
            "clip_layer3.png",
            "clip_layer3.gif",
        ]
    )
    # The input grid shows the raw pixels (not normalised values): 4 frames in one row.
    grid = np.asarray(Image.open(out / "clip_input.png").convert("RGB"))
    np.testing.assert_array_equal(grid, frame_grid(pixels, 4))

    (trace,) = traces
    np.testing.assert_array_equal(trace.frames, pixels)
    plan = build_model(record, ReductionSettings(mode="merge", r=5)).token_plan(4, 32)
    for layer in (1, 3):
        labels = trace.labels[layer]
        assert labels.shape == (2, 4, 4)
        # Every token left after the layer except the class token is one drawn group.
        assert len(np.unique(labels)) == plan[layer - 1].tokens_out - 1
        assert (labels >= 0).all()
        png = np.asarray(Image.open(out / f"clip_layer{layer}.png").convert("RGB"))
        assert png.shape == (2 * 32 + 8, 4 * 32 + 3 * 2, 3)
        np.testing.assert_array_equal(png[:32], grid)
        merged = png[-32:]
        drawn = render_groups(trace.frames, labels, trace.patch)
        np.testing.assert_array_equal(merged, frame_grid(drawn, 4))
        # The merged panel holds at most one colour per group, plus the border colour.
        colours = {tuple(c) for c in merged.reshape(-1, 3)} - {BORDER}
        assert 1 < len(colours) <= len(np.unique(labels))
        gif = Image.open(out / f"clip_layer{layer}.gif")
        shots = [np.asarray(s.convert("RGB")) for s in ImageSequence.Iterator(gif)]
        assert len(shots) == 4
        assert all(s.shape == (32, 2 * 32 + 2, 3) for s in shots)
    assert len(np.unique(trace.labels[1])) != len(np.unique(trace.labels[3]))


def test_drop_mode_draws_dropped(vivit_ckpt):
    ckpt, record, clip, _ = vivit_ckpt
    drop = ReductionSettings(mode="drop", r=5)
    trace = trace_groups(ckpt, clip, layers=2, merging=drop)
    labels = trace.labels[2]
    left = build_model(record, drop).token_plan(4, 32)[1].tokens_out - 1
    assert (labels < 0).sum() == 32 - left
    assert len(np.unique(labels[labels >= 0])) == left  # kept tokens hold only themselves
    out = render_groups(trace.frames, labels, trace.patch)
    pix = labels.repeat(2, 0).repeat(8, 1).repeat(8, 2) < 0
    assert _is_dropped(out[pix])
    assert not _is_dropped(out[~pix][:1])


def test_bad_input(vivit_ckpt, tmp_path):
    ckpt, _, clip, _ = vivit_ckpt
    for layers in ([0], [4], []):
        with pytest.raises(UserError):
            visualize(ckpt, clip, layers=layers, out_dir=str(tmp_path))
    record = json.loads(open(f"{ckpt}/model.json").read())
    record["architecture"] = "resnet"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_text(json.dumps(record))
    (bad / "params").symlink_to(f"{ckpt}/params")
    with pytest.raises(UserError, match="architecture"):
        visualize(str(bad), clip, layers=[1], out_dir=str(tmp_path))


def test_motionformer_paper_groups_end_to_end(tmp_path):
    kwargs = {**TINY, "num_layers": 2, "patch_size": (2, 8, 8), "representation_size": None}
    ckpt, record = _save(
        tmp_path / "mf", Motionformer, "motionformer", kwargs, {"mode": "merge", "r": 3}
    )
    clip = tmp_path / "clip.npy"
    np.save(clip, np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    trace = trace_groups(str(ckpt), str(clip), layers=[2])
    labels = trace.labels[2]
    assert trace.patch == (2, 8, 8) and labels.shape == (2, 4, 4)
    per_group = build_model(record, ReductionSettings(mode="merge", r=3)).token_plan(4, 32)
    assert len(np.unique(labels)) == 2 * per_group[1].tokens_out
    # The paper's groups mix frames: each group's labels appear in both temporal slots.
    row_size = 16
    for g in range(2):
        in_group = labels // row_size == g
        assert in_group[0].any() and in_group[1].any()


@pytest.mark.parametrize("arch", ["timesformer", "vivit_factorised_encoder"])
def test_per_frame_models_end_to_end(arch, tmp_path):
    if arch == "timesformer":
        kwargs = {**TINY, "num_layers": 2, "patch_size": (8, 8)}
        module, rows, patch, cls = TimeSformer, 4, (1, 8, 8), 0
    else:
        kwargs = dict(
            num_classes=5,
            hidden_size=32,
            spatial_num_layers=2,
            spatial_num_heads=4,
            spatial_mlp_dim=64,
            temporal_num_layers=1,
            temporal_num_heads=4,
            temporal_mlp_dim=64,
            patch_size=(2, 8, 8),
        )
        module, rows, patch, cls = FactorisedEncoderViViT, 2, (2, 8, 8), 1
    ckpt, record = _save(tmp_path / "m", module, arch, kwargs, {"mode": "merge", "r": 3})
    clip = tmp_path / "clip.npy"
    np.save(clip, np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    trace = trace_groups(ckpt, str(clip), layers=[2])
    labels = trace.labels[2]
    assert trace.patch == patch and labels.shape == (rows, 4, 4)
    plan = build_model(record, ReductionSettings(mode="merge", r=3)).token_plan(4, 32)
    assert len(np.unique(labels)) == rows * (plan[1].tokens_out - cls)
    # Per-frame merging: no group reaches into another frame.
    for t in range(rows):
        others = np.delete(labels, t, axis=0)
        assert not np.isin(labels[t], others).any()
