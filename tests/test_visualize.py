"""Merge pictures: exact colours, borders and dropped tokens on hand-built groups; the token
layouts against the models' own reshapes; tiny checkpoints end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageSequence

from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.checkpoints.store import save_checkpoint
from vtm_jax.cli import main
from vtm_jax.errors import UserError
from vtm_jax.jobs import visualize as vis
from vtm_jax.jobs.pictures import (
    BORDER,
    DROPPED_DARK,
    DROPPED_LIGHT,
    auto_scale,
    frame_grid,
    frame_group_labels,
    legend_strip,
    render_frame_groups,
    render_global_groups,
    render_groups,
    upscale,
    with_legend,
)
from vtm_jax.jobs.visualize import (
    gif_legend,
    input_legend,
    layer_legend,
    layer_settings,
    trace_groups,
    visualize,
)
from vtm_jax.merging import MergingSettings
from vtm_jax.models import motionformer, timesformer
from vtm_jax.models.motionformer import Motionformer
from vtm_jax.models.registry import build_model
from vtm_jax.models.timesformer import TimeSformer
from vtm_jax.models.vivit import ViViT
from vtm_jax.models.vivit_fe import FactorisedEncoderViViT

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


def test_auto_scale():
    assert auto_scale(32, 32) == 4  # the demo's frames: 128 px
    assert auto_scale(224, 224) == 1
    assert auto_scale(16, 16) == 8
    assert auto_scale(32, 48) == 4 and auto_scale(48, 32) == 4  # the short side counts
    assert auto_scale(100, 200) == 2
    assert auto_scale(500, 300) == 1


def test_upscale_is_exact_nearest_neighbour():
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (2, 3, 5, 3), dtype=np.uint8)
    big = upscale(frames, 3)
    assert big.shape == (2, 9, 15, 3) and big.dtype == np.uint8
    for t, y, x in np.ndindex(2, 3, 5):  # each pixel is a 3 x 3 block of itself
        block = big[t, 3 * y : 3 * y + 3, 3 * x : 3 * x + 3]
        np.testing.assert_array_equal(block, np.broadcast_to(frames[t, y, x], (3, 3, 3)))
    np.testing.assert_array_equal(big, np.repeat(np.repeat(frames, 3, axis=1), 3, axis=2))
    np.testing.assert_array_equal(upscale(frames[0], 2), frames[0].repeat(2, 0).repeat(2, 1))
    np.testing.assert_array_equal(upscale(frames, 1), frames)
    for bad in (0, -2, True, 2.0, None):
        with pytest.raises(UserError, match="scale must be a positive integer"):
            upscale(frames, bad)


def test_scaled_rendering_keeps_groups_exact():
    """Colours, borders and hatching drawn at the input size, then enlarged: the same
    picture, pixel for pixel, in blocks."""
    frames, ids = _hand_built()
    out = render_global_groups(frames, ids, (2, 2, 2), PATCH, class_token=False)
    big = upscale(out, 4)
    np.testing.assert_array_equal(big, np.repeat(np.repeat(out, 4, axis=1), 4, axis=2))
    assert {tuple(c) for c in big.reshape(-1, 3)} == {tuple(c) for c in out.reshape(-1, 3)}
    grid = frame_grid(big, 2)
    assert grid.shape == (32, 2 * 32 + 2, 3)  # the gap between frames is not scaled
    np.testing.assert_array_equal(grid[:, 34:], big[1])


def test_legend_strip():
    image = np.zeros((10, 200, 3), np.uint8)
    out = with_legend(image, ["layer 4 of 12", "each colour: one merged group"])
    assert out.shape[1] == 200 and out.shape[0] > 10
    np.testing.assert_array_equal(out[:10], image)
    strip = out[10:]
    assert (strip == 255).any() and (strip != 255).any()  # white background, black text
    np.testing.assert_array_equal(with_legend(image, []), image)
    # Text too long for the width wraps onto more lines instead of being cut off.
    words = ["word"] * 40
    assert legend_strip([" ".join(words)], 100).shape[0] > legend_strip(["word"], 100).shape[0]
    assert legend_strip(["a"], 100).shape == (legend_strip(["b"], 100).shape[0], 100, 3)


def test_layer_settings_truncate():
    s = MergingSettings(mode="merge", r=(4, -1.0))
    assert layer_settings(s, 4, 2).layer_r(4) == s.layer_r(4)[:2] + [0, 0]
    assert layer_settings(s, 4, 2).trace_source == "index"
    dup = MergingSettings(mode="merge", r=3, duplicate=(1, 2))
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
    # 32x32 frames are drawn at 4x (the automatic scale), each pixel a 4 x 4 block.
    scale = 4
    big = upscale(pixels, scale)
    # The input grid shows the raw pixels (not normalised values): 4 frames in one row, with
    # its legend underneath.
    grid = np.asarray(Image.open(out / "clip_input.png").convert("RGB"))
    np.testing.assert_array_equal(grid, with_legend(frame_grid(big, 4), input_legend(pixels, 4)))
    np.testing.assert_array_equal(grid[:128], frame_grid(big, 4))
    assert grid.shape[0] > 128 and (grid[128:] != 255).any()  # the legend has ink

    (trace,) = traces
    np.testing.assert_array_equal(trace.frames, pixels)
    assert trace.num_layers == 3 and trace.merging == MergingSettings(mode="merge", r=5)
    plan = build_model(record, MergingSettings(mode="merge", r=5)).token_plan(4, 32)
    for layer in (1, 3):
        labels = trace.labels[layer]
        assert labels.shape == (2, 4, 4)
        # Every token left after the layer except the class token is one drawn group.
        assert len(np.unique(labels)) == plan[layer - 1].tokens_out - 1
        assert (labels >= 0).all()
        png = np.asarray(Image.open(out / f"clip_layer{layer}.png").convert("RGB"))
        # Was (2 * 32 + 8, 4 * 32 + 3 * 2) before the 4x scale and the legend.
        height = 2 * 128 + 8
        picture, legend = png[:height], png[height:]
        assert picture.shape == (height, 4 * 128 + 3 * 2, 3)
        np.testing.assert_array_equal(png[:128], grid[:128])
        merged = picture[-128:]
        drawn = render_groups(trace.frames, labels, trace.patch)
        np.testing.assert_array_equal(merged, frame_grid(upscale(drawn, scale), 4))
        for t in range(4):  # each frame is exactly np.repeat of the unscaled rendering
            cell = merged[:, t * 130 : t * 130 + 128]
            np.testing.assert_array_equal(cell, drawn[t].repeat(4, 0).repeat(4, 1))
        np.testing.assert_array_equal(legend, legend_strip(layer_legend(trace, layer, 4), 518))
        assert (legend != 255).any()
        text = " ".join(layer_legend(trace, layer, 4))
        assert f"after layer {layer} of 3 (merge, r=5)" in text
        assert f"32 patch tokens -> {plan[layer - 1].tokens_out - 1} groups" in text
        assert "drawn at 4x" in text and "dropped" not in text
        # The merged panel holds at most one colour per group, plus the border colour.
        colours = {tuple(c) for c in merged.reshape(-1, 3)} - {BORDER}
        assert 1 < len(colours) <= len(np.unique(labels))
        gif = Image.open(out / f"clip_layer{layer}.gif")
        shots = [np.asarray(s.convert("RGB")) for s in ImageSequence.Iterator(gif)]
        assert len(shots) == 4
        strip = legend_strip(["frame 1 of 4", *gif_legend(trace, layer)], 2 * 128 + 2)
        assert all(s.shape == (128 + strip.shape[0], 2 * 128 + 2, 3) for s in shots)
        for s in shots:  # GIF colours are approximate, but the 4 x 4 blocks stay exact
            half = s[:128, 130:]
            np.testing.assert_array_equal(half, half[::4, ::4].repeat(4, 0).repeat(4, 1))
            assert (s[128:] < 128).any()  # each frame pair has its legend
    assert len(np.unique(trace.labels[1])) != len(np.unique(trace.labels[3]))


def test_visualize_scale_from_the_cli(vivit_ckpt, tmp_path, capsys):
    ckpt, _, clip, pixels = vivit_ckpt
    args = ["visualize", "--checkpoint", ckpt, "--video", clip, "--layers", "1", "--r", "5"]
    assert main([*args, "--scale", "2", "--workdir", str(tmp_path / "two")]) == 0
    assert main([*args, "--scale", "1", "--workdir", str(tmp_path / "one")]) == 0
    for name in ("clip_input.png", "clip_layer1.png"):
        with Image.open(tmp_path / "two" / name) as two, Image.open(tmp_path / "one" / name) as one:
            assert two.size[0] == 4 * 64 + 3 * 2 and one.size[0] == 4 * 32 + 3 * 2
    two = np.asarray(Image.open(tmp_path / "two" / "clip_input.png").convert("RGB"))
    np.testing.assert_array_equal(two[:64], frame_grid(upscale(pixels, 2), 4))
    layer = np.asarray(Image.open(tmp_path / "one" / "clip_layer1.png").convert("RGB"))
    np.testing.assert_array_equal(layer[:32], frame_grid(pixels, 4))  # scale 1: as before
    with Image.open(tmp_path / "two" / "clip_layer1.gif") as gif:
        assert gif.size[0] == 2 * 64 + 2
    capsys.readouterr()
    for bad in ("0", "-3"):
        assert main([*args, "--scale", bad, "--workdir", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"vtm-jax: error: --scale must be a positive integer, not {bad}", err
    assert not (tmp_path / "bad").exists()  # refused before anything was made


def test_visualize_bad_scale(vivit_ckpt, tmp_path):
    ckpt, _, clip, _ = vivit_ckpt
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UserError, match="scale must be a positive integer"):
            visualize(ckpt, clip, layers=[1], out_dir=str(tmp_path / "bad"), scale=bad)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(UserError, match="larger than 4096 px"):
        visualize(ckpt, clip, layers=[1], out_dir=str(tmp_path / "huge"), scale=200)


def test_drop_mode_draws_dropped(vivit_ckpt):
    ckpt, record, clip, _ = vivit_ckpt
    drop = MergingSettings(mode="drop", r=5)
    trace = trace_groups(ckpt, clip, layers=2, merging=drop)
    labels = trace.labels[2]
    left = build_model(record, drop).token_plan(4, 32)[1].tokens_out - 1
    assert (labels < 0).sum() == 32 - left
    assert len(np.unique(labels[labels >= 0])) == left  # kept tokens hold only themselves
    out = render_groups(trace.frames, labels, trace.patch)
    pix = labels.repeat(2, 0).repeat(8, 1).repeat(8, 2) < 0
    assert _is_dropped(out[pix])
    assert not _is_dropped(out[~pix][:1])
    text = " ".join(layer_legend(trace, 2, 4))
    assert f"{32 - left} dropped" in text and "hatched grey: dropped" in text
    assert "(drop, r=5)" in text


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
    per_group = build_model(record, MergingSettings(mode="merge", r=3)).token_plan(4, 32)
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
    plan = build_model(record, MergingSettings(mode="merge", r=3)).token_plan(4, 32)
    assert len(np.unique(labels)) == rows * (plan[1].tokens_out - cls)
    # Per-frame merging: no group reaches into another frame.
    for t in range(rows):
        others = np.delete(labels, t, axis=0)
        assert not np.isin(labels[t], others).any()
