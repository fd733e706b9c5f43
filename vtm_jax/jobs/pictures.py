"""Drawing merge pictures, plain numpy and Pillow with no model: token group labels from index
sources (global ids ``[N0]`` or per-group ids ``[G, P0]``) put back on the patch grid, each group
filled with its mean colour over every pixel it covers in every frame, white borders between
groups within a frame, dropped tokens hatched grey; integer nearest-neighbour enlargement, legend
strips of wrapped text in Pillow's built-in font, frame grids, and the PNG, comparison PNG and
GIF files that :mod:`vtm_jax.jobs.visualize` writes for the ``vtm-jax visualize`` job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from vtm_jax.errors import UserError

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
# Written into every picture's metadata (a PNG's "Software" text, a GIF's comment): a rerun
# recognises the pictures as its own and rewrites them, and refuses any other file there.
PICTURE_MARKER = "vtm-jax merge pictures"

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
    """Save one uint8 image ``[H, W, 3]`` as PNG (with :data:`PICTURE_MARKER`); returns
    ``path``."""
    from PIL import Image, PngImagePlugin

    from vtm_jax.outputs import atomic_file

    info = PngImagePlugin.PngInfo()
    info.add_text("Software", PICTURE_MARKER)
    with atomic_file(path, "wb") as f:  # local or remote (gs://); never half a picture
        Image.fromarray(np.asarray(image, np.uint8)).save(f, format="PNG", pnginfo=info)
    return path


def picture_owner(path: str) -> str | None:
    """Whether ``path`` is a picture :func:`write_png` or :func:`write_gif` wrote (None), or
    what it is instead (``vtm_jax.outputs.claim_outputs``)."""
    from PIL import Image, UnidentifiedImageError

    from vtm_jax.paths import open_file

    try:
        with open_file(path, "rb") as f, Image.open(f) as image:
            marker = image.info.get("Software") or image.info.get("comment")
    except (OSError, UnidentifiedImageError, ValueError):  # a directory, not a picture ...
        marker = None
    if isinstance(marker, bytes):
        marker = marker.decode("utf-8", "replace")
    return None if marker == PICTURE_MARKER else "exists and is not a picture vtm-jax drew"


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

    from vtm_jax.outputs import atomic_file

    frames, merged = _check_frames(frames), _check_frames(merged)
    if frames.shape != merged.shape:
        raise UserError(f"frames {frames.shape} and merged view {merged.shape} differ in shape")
    spacer = np.full(frames.shape[:2] + (gap, 3), 255, np.uint8)
    pairs = np.concatenate([frames, spacer, merged], axis=2)
    if legend:
        pairs = _legend_per_frame(pairs, legend)
    images = [Image.fromarray(p) for p in pairs]
    with atomic_file(path, "wb") as f:  # local or remote (gs://); never half a picture
        images[0].save(
            f,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=max(1, round(1000 / fps)),
            loop=0,
            comment=PICTURE_MARKER.encode(),
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
