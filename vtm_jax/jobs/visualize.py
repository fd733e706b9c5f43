"""Pictures of which tokens merged: the paper's visualisations (docs/method.md §4), from index sources.

Models run with ``MergingSettings(trace_source="index")`` sow one group id per original token
(``-1`` for a token that was dropped). This module turns those ids into pictures drawn on the
raw RGB frames:

* every group is filled with its mean colour over all the pixels it covers, in every frame it
  spans, so one merged token shows one colour across time (the paper's ``average_colour``);
* a border is drawn on every pixel whose 4-neighbour in the same frame is in another group;
* dropped tokens are dark grey with lighter diagonal hatching, never a group colour.

Global merging (ViViT, VideoMAE) gives ids ``[N0]`` over ``(t h w)`` tokens (after a class
token, if any). Per-frame merging (TimeSformer, ViViT-FE, Motionformer) gives ``[G, P0]``: one
row per merge group, whose ids only mean something within that row. Motionformer's default
``paper`` groups are not frames: member ``c`` of group ``g`` is flat patch ``c * G + g`` of the
frame-major sequence (docs/method.md §3.4), and :func:`frame_group_labels` puts each member back at
its true ``(frame, y, x)``.

Rendering is plain numpy and O(pixels): the index form is never expanded to an ``N x N0``
matrix, so full-size ViViT-B (3137 tokens, 32 frames) fits easily.

Pictures are drawn at the input size, then enlarged by an integer ``scale`` with nearest
neighbour (each pixel becomes a ``scale x scale`` block, no interpolation), so small clips such
as the demo's 32x32 frames are big enough to see and group borders stay crisp. Each picture gets
a legend strip underneath saying what it shows.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.errors import UserError
from vtm_jax.merging import MergingSettings

DROPPED_DARK = (64, 64, 64)
DROPPED_LIGHT = (112, 112, 112)
BORDER = (255, 255, 255)
LAYOUTS = ("frame", "interleaved")
MIN_SIDE = 128  # the automatic scale makes a frame's short side at least this many pixels
MAX_SIDE = 4096  # a bigger scaled frame is refused: it is a typo, not a picture
LEGEND_FONT_SIZE = 13
LEGEND_PAD = 4
LEGEND_INK = (0, 0, 0)
BACKGROUND = 255

Patch = tuple[int, int, int]
Grid = tuple[int, int, int]


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise UserError(
            f"expected uint8 frames [T, H, W, 3], got {frames.dtype} shape {frames.shape}"
        )
    return frames


def render_groups(
    frames: np.ndarray,
    labels: np.ndarray,
    patch: Patch,
    *,
    border: tuple[int, int, int] = BORDER,
) -> np.ndarray:
    """Draw token groups on uint8 frames ``[T, H, W, 3]``; returns a new uint8 ``[T, H, W, 3]``.

    ``labels`` is ``[T', h', w']``, one label per token of the ``(pt, ph, pw)`` patch grid:
    tokens with the same label form one group (across frames too), ``-1`` means dropped.
    """
    frames = _check_frames(frames)
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise UserError(f"expected token labels [T', h', w'], got shape {labels.shape}")
    pt, ph, pw = patch
    t, h, w, _ = frames.shape
    if (labels.shape[0] * pt, labels.shape[1] * ph, labels.shape[2] * pw) != (t, h, w):
        raise UserError(
            f"token grid {labels.shape} with patch {tuple(patch)} does not cover frames "
            f"{frames.shape[:3]}"
        )
    # Compact ids 0..G-1 on the small token grid, then nearest-neighbour up to the pixels.
    flat = labels.reshape(-1)
    kept = flat >= 0
    _, inverse = np.unique(flat[kept], return_inverse=True)
    compact = np.full(flat.shape, -1, np.int64)
    compact[kept] = inverse.reshape(-1)
    pix = compact.reshape(labels.shape).repeat(pt, 0).repeat(ph, 1).repeat(pw, 2)
    inside = pix >= 0
    ids = pix[inside]
    num_groups = int(compact.max()) + 1 if kept.any() else 0
    counts = np.bincount(ids, minlength=num_groups)
    sums = np.stack(
        [
            np.bincount(
                ids, weights=frames[..., c][inside].astype(np.float64), minlength=num_groups
            )
            for c in range(3)
        ],
        axis=-1,
    )
    colours = np.round(sums / np.maximum(counts, 1)[:, None]).astype(np.uint8)
    out = np.empty_like(frames)
    out[inside] = colours[ids]
    # Hatching makes dropped tokens unmistakable even next to a dark grey group.
    yy, xx = np.indices((h, w))
    hatch = np.where(((yy + xx) % 6 < 2)[..., None], DROPPED_LIGHT, DROPPED_DARK).astype(np.uint8)
    dropped = ~inside
    out[dropped] = np.broadcast_to(hatch, out.shape)[dropped]
    # Borders only within a frame (time is not a neighbour) and only on group pixels.
    edge = np.zeros(pix.shape, bool)
    vertical = pix[:, 1:, :] != pix[:, :-1, :]
    edge[:, 1:, :] |= vertical
    edge[:, :-1, :] |= vertical
    horizontal = pix[:, :, 1:] != pix[:, :, :-1]
    edge[:, :, 1:] |= horizontal
    edge[:, :, :-1] |= horizontal
    out[edge & inside] = np.asarray(border, np.uint8)
    return out


def global_group_labels(group_ids: np.ndarray, grid: Grid, *, class_token: bool) -> np.ndarray:
    """Token labels ``[T', h', w']`` from global index-form ids ``[N0]`` in ``(t h w)`` order."""
    ids = np.asarray(group_ids)
    if ids.ndim != 1:
        raise UserError(f"expected global group ids [N0], got shape {ids.shape}")
    if class_token:
        ids = ids[1:]
    if ids.size != int(np.prod(grid)):
        raise UserError(
            f"{ids.size} patch tokens do not fill the token grid {tuple(grid)}"
            + (" (after the class token)" if class_token else "")
        )
    return ids.reshape(grid)


def frame_group_labels(
    group_ids: np.ndarray, grid: Grid, *, class_token: bool = False, layout: str = "frame"
) -> np.ndarray:
    """Token labels ``[T', h', w']`` from per-group index-form ids ``[G, P0]``.

    ``layout`` says where member ``c`` of group ``g`` sits in the frame-major ``(t h w)`` token
    order: ``frame`` at ``g * P + c`` (group ``g`` is frame ``g``: TimeSformer, ViViT-FE,
    Motionformer ``per_frame``), ``interleaved`` at ``c * G + g`` (Motionformer's ``paper``
    groups). Ids of different groups are kept apart, as they index different sequences.
    """
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    ids = np.asarray(group_ids).astype(np.int64)
    if ids.ndim != 2:
        raise UserError(f"expected per-group ids [G, P0], got shape {ids.shape}")
    row_size = ids.shape[1]
    if class_token:
        ids = ids[:, 1:]
    groups, members = ids.shape
    t, h, w = grid
    if groups != t or members != h * w:
        raise UserError(
            f"per-group ids {ids.shape} do not fit the token grid {tuple(grid)} "
            f"({t} groups of {h * w} tokens)"
        )
    labels = np.where(ids >= 0, np.arange(groups)[:, None] * row_size + ids, -1)
    if layout == "interleaved":
        labels = labels.T  # flat index c * G + g
    return labels.reshape(grid)


def render_global_groups(
    frames: np.ndarray,
    group_ids: np.ndarray,
    grid: Grid,
    patch: Patch,
    *,
    class_token: bool,
) -> np.ndarray:
    """Draw global merging (ViViT, VideoMAE): ids ``[N0]`` over ``(t h w)`` tokens."""
    return render_groups(
        frames, global_group_labels(group_ids, grid, class_token=class_token), patch
    )


def render_frame_groups(
    frames: np.ndarray,
    group_ids: np.ndarray,
    grid: Grid,
    patch: Patch,
    *,
    class_token: bool = False,
    layout: str = "frame",
) -> np.ndarray:
    """Draw per-frame / per-group merging: ids ``[G, P0]`` (see :func:`frame_group_labels`)."""
    labels = frame_group_labels(group_ids, grid, class_token=class_token, layout=layout)
    return render_groups(frames, labels, patch)


def auto_scale(height: int, width: int, *, min_side: int = MIN_SIDE) -> int:
    """The smallest integer scale that makes a ``height x width`` frame at least ``min_side``
    pixels on its short side: 4 for the demo's 32x32 frames, 1 for 224x224."""
    return max(1, math.ceil(min_side / max(1, min(height, width))))


def check_scale(scale: int | None) -> int | None:
    """``scale`` if it is a positive integer or None (automatic); otherwise a UserError."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, int | np.integer) or scale < 1:
        raise UserError(f"scale must be a positive integer, not {scale!r}")
    return int(scale)


def upscale(images: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour enlargement of ``[..., H, W, C]``: each pixel becomes a block of
    ``scale x scale`` identical pixels, so colours and borders stay exact."""
    images = np.asarray(images)
    if scale is None:  # automatic is the caller's choice: here a factor is needed
        raise UserError("scale must be a positive integer, not None")
    if check_scale(scale) == 1:
        return images
    return images.repeat(scale, axis=-3).repeat(scale, axis=-2)


def _legend_font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=LEGEND_FONT_SIZE)
    except TypeError:  # Pillow < 10.1 has only the small fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels (a single word
    wider than that stays whole)."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}" if line else word
        if line and font.getlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return (lines + [line]) if line else lines


def legend_strip(lines: Sequence[str], width: int) -> np.ndarray:
    """A white strip ``[h, width, 3]`` with ``lines`` of black text, wrapped to fit, in
    Pillow's default font (built in: no font file, no network)."""
    from PIL import Image, ImageDraw

    font = _legend_font()
    wrapped = [part for text in lines for part in _wrap(text, font, width - 2 * LEGEND_PAD)]
    line_height = font.getbbox("Ag")[3] + 3
    image = Image.new(
        "RGB", (width, 2 * LEGEND_PAD + len(wrapped) * line_height), (BACKGROUND,) * 3
    )
    draw = ImageDraw.Draw(image)
    for i, text in enumerate(wrapped):
        draw.text((LEGEND_PAD, LEGEND_PAD + i * line_height), text, fill=LEGEND_INK, font=font)
    return np.asarray(image)


def with_legend(image: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """``image [H, W, 3]`` with a :func:`legend_strip` of ``lines`` underneath (none: as is)."""
    image = np.asarray(image, np.uint8)
    if not lines:
        return image
    return np.concatenate([image, legend_strip(lines, image.shape[1])], axis=0)


def frame_grid(frames: np.ndarray, ncols: int, *, gap: int = 2, fill: int = 255) -> np.ndarray:
    """Frames ``[n, h, w, 3]`` pasted row by row into one image, ``gap`` pixels apart."""
    frames = _check_frames(frames)
    if ncols < 1:
        raise UserError(f"ncols must be at least 1, not {ncols}")
    n, h, w, _ = frames.shape
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    image = np.full(
        (nrows * h + (nrows - 1) * gap, ncols * w + (ncols - 1) * gap, 3), fill, np.uint8
    )
    for i, frame in enumerate(frames):
        top, left = (i // ncols) * (h + gap), (i % ncols) * (w + gap)
        image[top : top + h, left : left + w] = frame
    return image


def write_png(path: str, image: np.ndarray) -> str:
    """Save one uint8 image ``[H, W, 3]`` as PNG; returns ``path``."""
    from PIL import Image

    from vtm_jax.paths import open_file

    with open_file(path, "wb") as f:  # local or remote (gs://)
        Image.fromarray(np.asarray(image, np.uint8)).save(f, format="PNG")
    return path


def write_comparison_png(
    path: str,
    frames: np.ndarray,
    merged: np.ndarray,
    *,
    ncols: int,
    gap: int = 2,
    legend: Sequence[str] = (),
) -> str:
    """The input frames as a grid above the merged view as the same grid, in one PNG, with
    ``legend`` lines underneath (see :func:`with_legend`)."""
    top, bottom = frame_grid(frames, ncols, gap=gap), frame_grid(merged, ncols, gap=gap)
    spacer = np.full((gap * 4, top.shape[1], 3), 255, np.uint8)
    return write_png(path, with_legend(np.concatenate([top, spacer, bottom], axis=0), legend))


def write_gif(
    path: str,
    frames: np.ndarray,
    merged: np.ndarray,
    *,
    fps: float = 4.0,
    gap: int = 2,
    legend: Sequence[str] = (),
) -> str:
    """An animated GIF, input frame beside merged frame, looping.

    With ``legend``, every frame pair gets a strip underneath: ``frame i of T`` then the
    ``legend`` lines. GIF has a 256-colour palette per frame, so colours are approximate (the
    PNG is exact); Pillow also folds identical consecutive frames into one longer frame.
    """
    from PIL import Image

    from vtm_jax.paths import open_file

    frames, merged = _check_frames(frames), _check_frames(merged)
    if frames.shape != merged.shape:
        raise UserError(f"frames {frames.shape} and merged view {merged.shape} differ in shape")
    spacer = np.full(frames.shape[:2] + (gap, 3), 255, np.uint8)
    pairs = np.concatenate([frames, spacer, merged], axis=2)
    if legend:
        pairs = _legend_per_frame(pairs, legend)
    images = [Image.fromarray(p) for p in pairs]
    with open_file(path, "wb") as f:  # local or remote (gs://)
        images[0].save(
            f,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=max(1, round(1000 / fps)),
            loop=0,
        )
    return path


def _legend_per_frame(pairs: np.ndarray, legend: Sequence[str]) -> list[np.ndarray]:
    """Each frame pair with its own legend strip, all strips padded to one height (a GIF's
    frames share one size; "frame 10" may wrap where "frame 9" did not)."""
    n, _, width, _ = pairs.shape
    strips = [legend_strip([f"frame {i + 1} of {n}", *legend], width) for i in range(n)]
    height = max(strip.shape[0] for strip in strips)
    pad = [np.full((height - s.shape[0], width, 3), BACKGROUND, np.uint8) for s in strips]
    return [np.concatenate(parts, axis=0) for parts in zip(pairs, strips, pad, strict=True)]


# ---------------------------------------------------------------------------------------------
# Running a checkpoint


def default_layers(num_layers: int) -> list[int]:
    """A third, two thirds and all of the way through the merging layers, as the paper's
    figure (its intro shows layers 4, 8 and 12 of 12)."""
    return sorted({max(1, num_layers // 3), max(1, 2 * num_layers // 3), num_layers})


def layer_settings(settings: MergingSettings, num_layers: int, layer: int) -> MergingSettings:
    """``settings`` reduced to the first ``layer`` layers (1-based), tracing index sources.

    Every later layer gets r = 0, so the sown groups are those after layer ``layer``; earlier
    layers keep their r and their step keys, so they make the same decisions as the full run.
    """
    if isinstance(layer, bool) or not isinstance(layer, int | np.integer):
        raise UserError(f"layers must be integers, not {layer!r}")
    if not 1 <= layer <= num_layers:
        raise UserError(f"layer {layer} is out of range: the model has layers 1 to {num_layers}")
    if settings.duplicate is not None:
        # All reduction happens at the duplicated layer: either it has run or nothing has.
        if settings.duplicate[0] < layer:
            return dataclasses.replace(settings, trace_source="index")
        return dataclasses.replace(
            settings, duplicate=None, r=0, schedule=0.0, trace_source="index"
        )
    per_layer = settings.layer_r(num_layers)
    r = list(per_layer[:layer]) + [0] * (num_layers - layer)
    return dataclasses.replace(settings, r=r, schedule=0.0, trace_source="index")


def raw_frames(clip: np.ndarray, record: ModelRecord) -> np.ndarray:
    """Undo the record's normalisation of a model-ready clip: uint8 RGB ``[T, H, W, 3]``.

    This gives the sampled, resized and cropped pixels the model saw, so pictures line up with
    the tokens. Without a stored mean and std the clip is stretched to the full range.
    """
    clip = np.asarray(clip, np.float32)
    prep = record.preprocessing or {}
    if "mean" in prep and "std" in prep:
        pixels = clip * np.asarray(prep["std"], np.float32) + np.asarray(prep["mean"], np.float32)
    else:
        lo, hi = float(clip.min()), float(clip.max())
        pixels = (clip - lo) / (hi - lo if hi > lo else 1.0)
    return np.clip(np.round(pixels * 255.0), 0, 255).astype(np.uint8)


class GroupTrace(NamedTuple):
    """What :func:`trace_groups` found: raw frames, pixels per token, labels per layer, and
    (for the legends) how many layers merge and with which settings."""

    frames: np.ndarray  # uint8 [T, H, W, 3]
    patch: Patch
    labels: dict[int, np.ndarray]  # layer -> [T', h', w'] token labels, -1 dropped
    num_layers: int = 0  # 0: unknown
    merging: MergingSettings | None = None


def _check_layers(layers: int | Sequence[int] | None, num_layers: int) -> list[int]:
    if layers is None:
        return default_layers(num_layers)
    layers = [layers] if isinstance(layers, int) else list(layers)
    if not layers:
        raise UserError("give at least one layer to visualise")
    return list(dict.fromkeys(layers))  # in the order given, each once


def trace_groups(
    checkpoint_dir: str,
    video_path: str,
    *,
    layers: int | Sequence[int] | None,
    merging: MergingSettings | None = None,
    attention: str = "auto",
    verify: bool = True,
) -> GroupTrace:
    """Run a checkpoint on one clip once per layer and return the token groups after each.

    ``layers`` are 1-based; None: :func:`default_layers`. ``merging=None`` uses the reduction
    settings stored in the checkpoint record; ``verify`` checks the checkpoint's digests.
    """
    import flax.errors
    import jax
    import jax.numpy as jnp

    from vtm_jax.jobs.predict import check_logits, load_clip, load_model
    from vtm_jax.models.attention import get_attention
    from vtm_jax.models.registry import build_model

    model, params, record = load_model(checkpoint_dir, merging, attention, verify=verify)
    merging = model.merging
    attention_fn = get_attention(attention)
    base = build_model(record, dataclasses.replace(merging, trace_source="index"), attention_fn)
    # Each backbone says how its sources map to the patch grid and how many layers merge.
    geometry = base.source_layout()
    num_layers = base.merging_layers()
    layers = _check_layers(layers, num_layers)
    per_layer = {layer: layer_settings(merging, num_layers, layer) for layer in layers}
    clip = load_clip(video_path, record)
    frames = raw_frames(clip, record)
    pt, ph, pw = geometry.patch
    grid = (frames.shape[0] // pt, frames.shape[1] // ph, frames.shape[2] // pw)
    labels = {}
    for layer, settings in per_layer.items():
        model = build_model(record, settings, attention_fn)

        def run(variables, video, model=model):
            return model.apply(variables, video, mutable=["intermediates"])

        try:
            logits, state = jax.jit(run)({"params": params}, jnp.asarray(clip)[None])
        except flax.errors.FlaxError as e:
            raise UserError(
                f"{checkpoint_dir}: parameters do not fit model.json: {e}".splitlines()[0]
            ) from None
        # Groups drawn from a forward pass that overflowed would be a picture of noise.
        check_logits(logits, what=video_path)
        source = np.asarray(state["intermediates"]["source"][0])
        if geometry.per_group:
            labels[layer] = frame_group_labels(
                source, grid, class_token=geometry.class_token, layout=geometry.layout
            )
        else:
            labels[layer] = global_group_labels(source[0], grid, class_token=geometry.class_token)
    return GroupTrace(frames, geometry.patch, labels, num_layers, merging)


def describe_merging(settings: MergingSettings) -> str:
    """``merge, r=64`` (``hybrid, r=8, threshold 0.3``; ``no merging`` at r=0)."""
    if settings.mode == "none":
        return "no merging"
    r = settings.to_dict()["r"]
    r = ",".join(str(v) for v in r) if isinstance(r, list | tuple) else str(r)
    options = "".join(f", {k} {v:g}" for k, v in settings.rule_options.items())
    return f"{settings.mode}, r={r}{options}"


def input_legend(frames: np.ndarray, scale: int) -> list[str]:
    """The legend of ``<stem>_input.png``."""
    t, h, w, _ = frames.shape
    return [
        f"input: {t} frames of {w}x{h} px, as the model saw them (sampled, resized, cropped)",
        f"drawn at {scale}x (nearest neighbour: each pixel is a {scale}x{scale} block)",
    ]


def layer_legend(trace: GroupTrace, layer: int, scale: int) -> list[str]:
    """The legend of one layer's pictures: what is on top and below, after which layer and
    settings, how many patch tokens became how many groups, and the colour key."""
    labels = trace.labels[layer]
    groups = len(np.unique(labels[labels >= 0]))
    dropped = int((labels < 0).sum())
    of = f" of {trace.num_layers}" if trace.num_layers else ""
    how = f" ({describe_merging(trace.merging)})" if trace.merging is not None else ""
    counts = f"{labels.size} patch tokens -> {groups} groups" + (
        f", {dropped} dropped" if dropped else ""
    )
    key = "each colour: one group, its mean colour over every pixel it covers in every frame"
    key += "; white lines: group boundaries" + ("; hatched grey: dropped" if dropped else "")
    return [
        f"top: input frames; below: token groups after layer {layer}{of}{how}",
        f"{counts}; drawn at {scale}x (nearest neighbour)",
        key,
    ]


def gif_legend(trace: GroupTrace, layer: int) -> list[str]:
    """The shorter legend under each frame pair of a layer's GIF (the frame line is added by
    :func:`write_gif`)."""
    labels = trace.labels[layer]
    groups = len(np.unique(labels[labels >= 0]))
    of = f" of {trace.num_layers}" if trace.num_layers else ""
    how = f", {describe_merging(trace.merging)}" if trace.merging is not None else ""
    return [
        f"left: input; right: groups after layer {layer}{of}{how}",
        f"{labels.size} patch tokens -> {groups} groups; white lines: group boundaries",
    ]


def visualize(
    checkpoint_dir: str,
    video_path: str,
    *,
    layers: int | Sequence[int],
    out_dir: str,
    merging: MergingSettings | None = None,
    attention: str = "auto",
    ncols: int | None = None,
    fps: float = 4.0,
    verify: bool = True,
    scale: int | None = None,
) -> list[str]:
    """Write the merge pictures of one clip after each layer; returns the paths written.

    Files in ``out_dir``: ``<stem>_input.png`` (the input frames as a grid), and per layer
    ``<stem>_layer<L>.png`` (input grid above the merged view) and ``<stem>_layer<L>.gif``
    (input beside merged, animated), each with a legend underneath. ``ncols`` defaults to
    ``min(8, frames)``, as the paper's grids; ``layers`` are 1-based (the paper's intro figure:
    4, 8, 12; None: :func:`default_layers`). ``scale`` enlarges every frame by nearest
    neighbour before the grids are laid out; None: :func:`auto_scale` (4x for 32x32 frames).
    """
    from vtm_jax.outputs import check_output_dir
    from vtm_jax.paths import join, makedirs

    scale = check_scale(scale)  # before the model runs
    check_output_dir(out_dir, what="output directory")
    trace = trace_groups(
        checkpoint_dir,
        video_path,
        layers=layers,
        merging=merging,
        attention=attention,
        verify=verify,
    )
    frames = trace.frames
    scale = scale or auto_scale(*frames.shape[1:3])
    if scale > 1 and max(frames.shape[1:3]) * scale > MAX_SIDE:
        raise UserError(
            f"scale {scale} makes {frames.shape[2]}x{frames.shape[1]} px frames larger than "
            f"{MAX_SIDE} px; give a smaller scale"
        )
    ncols = ncols or min(8, frames.shape[0])
    makedirs(out_dir)
    stem = os.path.splitext(os.path.basename(video_path))[0]
    big = upscale(frames, scale)  # before the grid, so the gaps stay thin
    grid = with_legend(frame_grid(big, ncols), input_legend(frames, scale))
    paths = [write_png(join(out_dir, f"{stem}_input.png"), grid)]
    for layer, labels in trace.labels.items():
        # Borders are drawn at the input size, then enlarged: exact blocks, no blur.
        merged = upscale(render_groups(frames, labels, trace.patch), scale)
        base = join(out_dir, f"{stem}_layer{layer}")
        legend = layer_legend(trace, layer, scale)
        paths.append(write_comparison_png(base + ".png", big, merged, ncols=ncols, legend=legend))
        gif = gif_legend(trace, layer)
        paths.append(write_gif(base + ".gif", big, merged, fps=fps, legend=gif))
    return paths
