"""Scenic ViViT checkpoints (legacy Flax msgpack) and the spatio-temporal ViViT parameter tree.

The tree is exactly Scenic's (``scenic/projects/vivit/model.py``, attention type ``spacetime``),
so a Scenic checkpoint's params load into vtm_jax's ViViT without renaming: reading one is
finding the model config its shapes imply and checking the tree against that model's own
(``registry.check_params_fit``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils.epath import Path

from vtm_jax.checkpoints.convert.common import Params, flatten, format_keys
from vtm_jax.errors import UserError
from vtm_jax.models.registry import check_params_fit
from vtm_jax.models.vivit import ViViT

# Scenic's ViViT uses Flax's LayerNorm default epsilon and nn.gelu (tanh approximation).
SCENIC_LAYER_NORM_EPS = 1e-6
SCENIC_GELU_APPROXIMATE = True


def vivit_preprocessing(num_frames: int, image_size: int) -> dict[str, Any]:
    """Scenic's ViViT input: frames 2 apart, the short side resized to 256/224 of the crop,
    pixels zero-centred (mean and std 0.5 on [0, 1])."""
    return {
        "num_frames": num_frames,
        "stride": 2,
        "min_resize": round(image_size * 256 / 224),
        "crop_size": image_size,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
    }


_TOP_REQUIRED = ("embedding", "Transformer", "output_projection")
_TOP_OPTIONAL = ("cls", "pre_logits")
_CHECKPOINT_STEP = re.compile(r"checkpoint_(\d+)")


def num_tokens(
    *, num_frames: int, image_size: int, patch_size: tuple[int, int, int], classifier: str
) -> int:
    """Sequence length of a spatio-temporal ViViT, class token included when there is one."""
    t, h, w = patch_size
    bad = [
        f"{name}={size} is not a multiple of the tubelet's {step}"
        for name, size, step in (
            ("num_frames", num_frames, t),
            ("image_size", image_size, h),
            ("image_size", image_size, w),
        )
        if size <= 0 or size % step
    ]
    if bad:
        raise UserError(f"input size does not fit tubelet {tuple(patch_size)}: {'; '.join(bad)}")
    return (num_frames // t) * (image_size // h) * (image_size // w) + int(classifier == "token")


def _latest_checkpoint(directory: Path) -> Path:
    steps = {}
    for entry in directory.iterdir():
        match = _CHECKPOINT_STEP.fullmatch(entry.name)
        if match:
            steps[int(match.group(1))] = entry
    if steps:
        return steps[max(steps)]
    if (directory / "checkpoint").is_file():
        return directory / "checkpoint"
    raise UserError(f"no checkpoint_<step> file in {directory}")


def _select_params(state: Any, path: Path) -> Any:
    if isinstance(state, Mapping):
        optimizer = state.get("optimizer")
        if isinstance(optimizer, Mapping) and isinstance(optimizer.get("target"), Mapping):
            target = optimizer["target"]
            # A Linen model under flax.optim stores its variables dict as the target.
            if isinstance(target.get("params"), Mapping):
                return target["params"]
            return target
        if isinstance(state.get("params"), Mapping):
            return state["params"]
    found = format_keys(list(state)) if isinstance(state, Mapping) else type(state).__name__
    raise UserError(
        f"{path}: expected state['optimizer']['target'] (flax.optim) or state['params'] "
        f"(optax); found top-level keys: {found or 'none'}"
    )


def _to_numpy(tree: Mapping[str, Any]) -> Params:
    out: Params = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out[key] = _to_numpy(value)
        else:
            array = np.asarray(value)
            # bfloat16 (ml_dtypes) is not of kind "f", hence the name check.
            if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
                array = array.astype(np.float32)
            out[key] = array
    return out


def read_scenic_checkpoint(path: str | Path) -> Params:
    """Read a Scenic / Flax legacy msgpack checkpoint and return its params (numpy leaves).

    ``path`` is a checkpoint file (``checkpoint``, ``checkpoint_1000``) or a directory of
    ``checkpoint_<step>`` files, in which case the highest step is read.
    """
    from flax import serialization

    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_dir():
        path = _latest_checkpoint(path)
        if path.is_dir():
            raise UserError(f"{path} is a directory (Orbax?), not a legacy Flax msgpack file")
    try:
        state = serialization.msgpack_restore(path.read_bytes())
    except Exception as error:  # msgpack raises several unrelated types on bad input
        raise UserError(
            f"{path} is not a Flax msgpack checkpoint ({type(error).__name__}: {error})"
        ) from error
    return _to_numpy(_select_params(state, path))


def _fitting_inputs(patches: int, patch_size: tuple[int, int, int]) -> list[tuple[int, int]]:
    """(num_frames, image_size) pairs whose tubelet grid has exactly ``patches`` cells."""
    t, h, w = patch_size
    step = math.lcm(h, w)
    fits = []
    for frames_cells in range(1, patches + 1):
        if patches % frames_cells:
            continue
        spatial = patches // frames_cells
        size = step
        while (size // h) * (size // w) < spatial:
            size += step
        if (size // h) * (size // w) == spatial:
            fits.append((frames_cells * t, size))
    return fits


def _pos_embedding_error(
    n_tokens: int, expected: int | str, *, num_frames: int, image_size: int, model_config: dict
) -> UserError:
    cls = int(model_config["classifier"] == "token")
    patches = n_tokens - cls
    patch_size = model_config["patch_size"]
    fits = _fitting_inputs(patches, patch_size) if patches > 0 else []
    # Show first the fits that keep one of the two given sizes.
    fits.sort(key=lambda fit: (fit[0] != num_frames and fit[1] != image_size, fit[0]))
    implied = ", ".join(f"--num-frames={f} --image-size={s}" for f, s in fits[:3])
    return UserError(
        f"Transformer/posembed_input/pos_embedding has {n_tokens} tokens ({cls} class + "
        f"{patches} patch tokens), but num_frames={num_frames}, image_size={image_size} with "
        f"tubelet {tuple(patch_size)} give {expected}; "
        + (f"the checkpoint fits e.g. {implied}; " if implied else "")
        + "pass --num-frames/--image-size to match the checkpoint"
    )


def vivit_config_from_params(
    params: Mapping[str, Any], *, num_frames: int, image_size: int
) -> tuple[dict[str, Any], dict[str, int]]:
    """Infer the model config of a Scenic spatio-temporal ViViT from its parameter shapes.

    Returns ``(model_config, input_config)``; raises a UserError if the tree is not exactly a
    spatio-temporal ViViT or if its position embedding does not fit the given input size.
    """
    unexpected = [k for k in params if k not in _TOP_REQUIRED + _TOP_OPTIONAL]
    missing = [k for k in _TOP_REQUIRED if k not in params]
    if unexpected or missing:
        parts = [f"unexpected {format_keys(unexpected)}"] if unexpected else []
        parts += [f"missing {format_keys(missing)}"] if missing else []
        raise UserError(
            f"params are not a spatio-temporal ViViT (Scenic 'spacetime'): top-level "
            f"{'; '.join(parts)}"
        )
    flat = flatten(params)
    block0 = "Transformer/encoderblock_0"
    needed = {
        "embedding/kernel": 5,
        "Transformer/posembed_input/pos_embedding": 3,
        f"{block0}/MultiHeadDotProductAttention_0/query/kernel": 3,
        f"{block0}/MlpBlock_0/Dense_0/kernel": 2,
        "output_projection/kernel": 2,
    }
    if "pre_logits" in params:
        needed["pre_logits/kernel"] = 2
    absent = [k for k in needed if k not in flat]
    if absent:
        raise UserError(f"params are not a spatio-temporal ViViT: missing {format_keys(absent)}")
    wrong_rank = [
        f"{k} {tuple(np.shape(flat[k]))} (expected {rank} dimensions)"
        for k, rank in needed.items()
        if np.ndim(flat[k]) != rank
    ]
    if wrong_rank:
        raise UserError(f"params are not a spatio-temporal ViViT: {format_keys(wrong_rank)}")

    t, h, w, _, hidden = np.shape(flat["embedding/kernel"])
    _, heads, _ = np.shape(flat[f"{block0}/MultiHeadDotProductAttention_0/query/kernel"])
    layers = sum(1 for k in params["Transformer"] if re.fullmatch(r"encoderblock_\d+", k))
    model_config: dict[str, Any] = {
        "num_classes": int(np.shape(flat["output_projection/kernel"])[1]),
        "hidden_size": int(hidden),
        "num_heads": int(heads),
        "mlp_dim": int(np.shape(flat[f"{block0}/MlpBlock_0/Dense_0/kernel"])[1]),
        "num_layers": layers,
        "patch_size": (int(t), int(h), int(w)),
        "classifier": "token" if "cls" in params else "gap",
        "representation_size": (
            int(np.shape(flat["pre_logits/kernel"])[1]) if "pre_logits" in params else None
        ),
        "layer_norm_eps": SCENIC_LAYER_NORM_EPS,
        "gelu_approximate": SCENIC_GELU_APPROXIMATE,
    }
    n_tokens = int(np.shape(flat["Transformer/posembed_input/pos_embedding"])[1])
    try:
        expected: int | str = num_tokens(
            num_frames=num_frames,
            image_size=image_size,
            patch_size=model_config["patch_size"],
            classifier=model_config["classifier"],
        )
    except UserError:
        expected = "no whole number of tubelets"
    if n_tokens != expected:
        raise _pos_embedding_error(
            n_tokens,
            expected,
            num_frames=num_frames,
            image_size=image_size,
            model_config=model_config,
        )
    input_config = {"num_frames": int(num_frames), "image_size": int(image_size)}
    # Everything else about the tree, against the model's own shapes for this input.
    check_params_fit(ViViT(**model_config), params, input_config, where="params")
    return model_config, input_config


def factorised_config_from_params(
    params: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, int]]:
    """Infer a factorised-encoder ViViT (Scenic ``SpaceTimeViViT``) config from its parameters.

    The input size needs no flags here: the spatial position embedding has one entry per patch
    of a frame and the temporal one per tubelet slot (each plus a class token).
    """
    flat = flatten(params)
    required = ["embedding/kernel", "output_projection/kernel"] + [
        f"{enc}/{path}"
        for enc in ("SpatialTransformer", "TemporalTransformer")
        for path in (
            "posembed_input/pos_embedding",
            "encoderblock_0/MultiHeadDotProductAttention_0/query/kernel",
            "encoderblock_0/MlpBlock_0/Dense_0/kernel",
        )
    ]
    missing = [k for k in required if k not in flat]
    if missing:
        raise UserError(
            f"params are not a factorised-encoder ViViT: missing {format_keys(missing)}"
        )
    t, h, w, _, hidden = np.shape(flat["embedding/kernel"])
    token = "cls_SpatialTransformer" in params
    model_config: dict[str, Any] = {
        "num_classes": int(np.shape(flat["output_projection/kernel"])[1]),
        "hidden_size": int(hidden),
        "patch_size": (int(t), int(h), int(w)),
        "classifier": "token" if token else "gap",
        "representation_size": (
            int(np.shape(flat["pre_logits/kernel"])[1]) if "pre_logits/kernel" in flat else None
        ),
        "layer_norm_eps": SCENIC_LAYER_NORM_EPS,
        "gelu_approximate": SCENIC_GELU_APPROXIMATE,
    }
    for enc, prefix in (("SpatialTransformer", "spatial"), ("TemporalTransformer", "temporal")):
        block = f"{enc}/encoderblock_0"
        model_config[f"{prefix}_num_layers"] = sum(
            1 for k in params[enc] if re.fullmatch(r"encoderblock_\d+", k)
        )
        model_config[f"{prefix}_num_heads"] = int(
            np.shape(flat[f"{block}/MultiHeadDotProductAttention_0/query/kernel"])[1]
        )
        model_config[f"{prefix}_mlp_dim"] = int(
            np.shape(flat[f"{block}/MlpBlock_0/Dense_0/kernel"])[1]
        )
    spatial = np.shape(flat["SpatialTransformer/posembed_input/pos_embedding"])[1] - int(token)
    slots = np.shape(flat["TemporalTransformer/posembed_input/pos_embedding"])[1] - int(token)
    side = math.isqrt(spatial)
    if side * side != spatial or h != w:
        raise UserError(f"spatial position embedding of {spatial} patches is not a square grid")
    return model_config, {"num_frames": int(slots * t), "image_size": int(side * h)}
