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
a legend strip underneath saying what it shows. The drawing itself is in
:mod:`vtm_jax.jobs.pictures`; this module runs the checkpoint and writes the files.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.errors import UserError
from vtm_jax.jobs.pictures import (
    MAX_SIDE,
    Patch,
    auto_scale,
    check_scale,
    frame_grid,
    frame_group_labels,
    global_group_labels,
    picture_owner,
    render_groups,
    upscale,
    with_legend,
    write_comparison_png,
    write_gif,
    write_png,
)
from vtm_jax.merging import MergingSettings


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


def picture_paths(
    checkpoint_dir: str,
    video_path: str,
    layers: int | Sequence[int] | None,
    out_dir: str,
) -> list[str]:
    """The files :func:`visualize` writes for these arguments, known before the model runs
    (``layers`` None: :func:`default_layers` of the checkpoint's model)."""
    from vtm_jax.paths import join

    if layers is None:
        from vtm_jax.checkpoints.store import load_record
        from vtm_jax.models.registry import build_model

        layers = default_layers(build_model(load_record(checkpoint_dir), None).merging_layers())
    stem = os.path.splitext(os.path.basename(video_path))[0]
    files = [join(out_dir, f"{stem}_input.png")]
    for layer in _check_layers(layers, 0):
        files += [join(out_dir, f"{stem}_layer{layer}{suffix}") for suffix in (".png", ".gif")]
    return files


def check_picture_outputs(
    checkpoint_dir: str,
    video_path: str,
    layers: int | Sequence[int] | None,
    out_dir: str,
    *,
    what: str = "output directory",
    overwrite: bool = False,
) -> None:
    """Before the model runs: every picture goes where nothing is, or where an earlier run's
    picture is (``vtm_jax.outputs.claim_outputs``); ``overwrite`` replaces other files."""
    from vtm_jax.checkpoints.store import checkpoint_inputs
    from vtm_jax.outputs import claim_outputs

    targets = {p: picture_owner for p in picture_paths(checkpoint_dir, video_path, layers, out_dir)}
    inputs = {"--video": video_path, **checkpoint_inputs(checkpoint_dir)}
    claim_outputs(targets, what=what, overwrite=overwrite, inputs=inputs)


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
    overwrite: bool = False,
) -> list[str]:
    """Write the merge pictures of one clip after each layer; returns the paths written.

    Files in ``out_dir``: ``<stem>_input.png`` (the input frames as a grid), and per layer
    ``<stem>_layer<L>.png`` (input grid above the merged view) and ``<stem>_layer<L>.gif``
    (input beside merged, animated), each with a legend underneath. ``ncols`` defaults to
    ``min(8, frames)``, as the paper's grids; ``layers`` are 1-based (the paper's intro figure:
    4, 8, 12; None: :func:`default_layers`). ``scale`` enlarges every frame by nearest
    neighbour before the grids are laid out; None: :func:`auto_scale` (4x for 32x32 frames).
    A file of one of those names that is not a picture vtm-jax drew is refused before the
    model runs, unless ``overwrite`` (:func:`check_picture_outputs`).
    """
    from vtm_jax.outputs import check_output_dir
    from vtm_jax.paths import join, makedirs

    scale = check_scale(scale)  # before the model runs
    check_output_dir(out_dir, what="output directory")
    check_picture_outputs(checkpoint_dir, video_path, layers, out_dir, overwrite=overwrite)
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
