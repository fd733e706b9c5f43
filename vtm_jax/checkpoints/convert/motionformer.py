"""Motionformer checkpoints (``.pyth`` / ``.pth`` of facebookresearch/Motionformer) to Flax.

The original training code saves ``torch.save({'epoch', 'model_state', 'optimizer_state',
'cfg'[, 'scaler']})``: ``model_state`` is the state dict (keys may carry a ``module.`` prefix)
and ``cfg`` the yacs config dumped as YAML text. A bare state dict is accepted too. The file is
read with ``torch.load(weights_only=True)``; a file that pickles other objects is refused.

Expected keys and shapes (ViT-B: ``D = 768``, ``H = 12`` heads of ``d = 64``, tubelet ``(t, h,
w) = (2, 16, 16)``, ``P = 196`` patches per slot at 224 px, ``F = 8`` slots for 16 frames,
``M = 3072``; torch Linear weights are ``[out, in]``), and where they go:

* ``cls_token`` ``[1, 1, D]`` -> ``cls``
* ``pos_embed`` ``[1, 1 + P, D]`` (entry 0: the class token's) -> ``pos_embedding``
* ``temp_embed`` ``[1, F, D]`` -> ``temporal_embedding``
* ``patch_embed_3d.proj.weight`` ``[D, 3, t, h, w]``, ``.bias`` ``[D]`` -> ``embedding``
  (kernel ``(t, h, w, 3, D)``)
* ``patch_embed.proj.weight`` ``[D, 3, h, w]``, ``.bias`` ``[D]``: optional and dropped unread;
  the original always builds this 2-D embedding but never uses it with a tubelet
* ``blocks.{i}.norm1.weight`` / ``.bias`` ``[D]`` -> ``encoderblock_{i}/LayerNorm_0``
* ``blocks.{i}.attn.qkv.weight`` ``[3D, D]``, ``.bias`` ``[3D]`` -> ``.../TrajectoryAttention_0/``
  ``query``, ``key``, ``value`` (kernels ``(D, H, d)``, biases ``(H, d)``)
* ``blocks.{i}.attn.proj_q.weight`` ``[D, D]``, ``.bias`` ``[D]`` -> ``.../proj_q`` ``(D, H, d)``
* ``blocks.{i}.attn.proj_kv.weight`` ``[2D, D]``, ``.bias`` ``[2D]`` -> ``.../proj_kv``
  ``(D, 2, H, d)`` (keys first, values second)
* ``blocks.{i}.attn.proj.weight`` ``[D, D]``, ``.bias`` ``[D]`` -> ``.../out`` ``(H, d, D)``
* ``blocks.{i}.norm2.weight`` / ``.bias`` ``[D]`` -> ``encoderblock_{i}/LayerNorm_1``
* ``blocks.{i}.mlp.fc1.weight`` ``[M, D]`` / ``.bias`` ``[M]`` -> ``.../MlpBlock_0/Dense_0``
* ``blocks.{i}.mlp.fc2.weight`` ``[D, M]`` / ``.bias`` ``[D]`` -> ``.../MlpBlock_0/Dense_1``
* ``norm.weight`` / ``.bias`` ``[D]`` -> ``encoder_norm``
* ``pre_logits.fc.weight`` ``[D, D]`` / ``.bias`` ``[D]`` (``USE_MLP``) -> ``pre_logits``
* ``head.weight`` ``[C, D]`` / ``.bias`` ``[C]`` -> ``output_projection``; EPIC-KITCHENS
  ``head0.*`` ``[97, D]`` and ``head1.*`` ``[300, D]`` are concatenated into it, with
  ``class_splits = [97, 300]``

The qkv, proj_q and proj_kv biases are absent when the model was built with ``QKV_BIAS=False``.
The head count is not visible in the shapes: it is ``NUM_HEADS`` from ``cfg``, else ``D / 64``.
From ``cfg`` (when present) come the input pipeline (frames, sampling rate, mean/std, crops)
and checks that the checkpoint is the trajectory-attention Motionformer this model implements
(``ATTN_LAYER: trajectory``, ``POS_EMBED: separate``, ``APPROX_ATTN_TYPE: none``, ``HEAD_ACT:
tanh``); ``USE_ORIGINAL_TRAJ_ATTN_CODE`` (default True, and absent from the released
checkpoints' configs) sets ``original_temporal_values``. With a crop other than 224 the original
interpolates ``pos_embed`` bicubically on every forward pass; that is done once here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from etils.epath import Path

from vtm_jax.checkpoints.convert.checkpoint_files import (
    import_torch,
    parse_cfg_yaml,
    read_torch_checkpoint,
)
from vtm_jax.checkpoints.convert.common import (
    CONV,
    IDENTITY,
    LINEAR,
    OUT_KERNEL,
    QKV_BIAS,
    QKV_KERNEL,
    Params,
    Target,
    as_float32,
    check_keys,
    concat_heads,
    format_keys,
    map_tensors,
    model_shapes,
)
from vtm_jax.errors import UserError

# The paper's Motionformer test pipeline (docs/method.md §3.8): 16 frames at stride 4, pixels
# zero-centred to [-1, 1], short side 256 (TRAIN_JITTER_SCALES[0]: slowfast's single-crop
# test), centre crop 224.
DEFAULT_PREPROCESSING = {
    "num_frames": 16,
    "stride": 4,
    "min_resize": 256,
    "crop_size": 224,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
}

_ATTN = "TrajectoryAttention_0"
_BLOCK = re.compile(r"blocks\.(\d+)\.")
_HEAD = re.compile(r"head(\d*)\.(weight|bias)")
_UNUSED = ("patch_embed.proj.weight", "patch_embed.proj.bias")  # the original's 2-D embedding
_QKV = ("query", "key", "value")


# ---------------------------------------------------------------------------------------------
# Reading


def _model_cfg(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The model section: ``MOTIONFORMER`` in the paper's repo, ``VIT`` in the original."""
    section = cfg.get("MOTIONFORMER") or cfg.get("VIT") or {}
    return section if isinstance(section, dict) else {}


def _check_cfg(model_cfg: Mapping[str, Any]) -> None:
    expected = {
        "ATTN_LAYER": "trajectory",
        "POS_EMBED": "separate",
        "APPROX_ATTN_TYPE": "none",
        "HEAD_ACT": "tanh",
        "VIDEO_INPUT": True,
    }
    wrong = [
        f"{k}={model_cfg[k]!r} (supported: {v!r})"
        for k, v in expected.items()
        if k in model_cfg and model_cfg[k] != v
    ]
    if wrong:
        raise UserError(f"unsupported Motionformer variant: {', '.join(wrong)}")


# ---------------------------------------------------------------------------------------------
# Converting


class _Sizes(NamedTuple):
    """What the tensors say about the model (the head count comes from the cfg)."""

    dim: int
    tubelet: tuple[int, int, int]
    slots: int
    grid: int  # patches per side of the stored position table
    layers: int
    mlp: int
    qkv_bias: bool
    pre_logits: bool


def _check_trajectory(state: Mapping[str, np.ndarray]) -> None:
    """A clear error for a checkpoint that is not the trajectory-attention Motionformer."""
    if "st_embed" in state or any(".timeattn." in k for k in state):
        raise UserError(
            "this is a joint/divided-attention checkpoint (st_embed or timeattn keys); only "
            "trajectory attention (the Motionformer proper) is supported"
        )
    for needed in ("patch_embed_3d.proj.weight", "temp_embed", "pos_embed"):
        if needed not in state:
            raise UserError(f"not a Motionformer checkpoint: missing {needed}")


def _sizes(state: Mapping[str, np.ndarray], model_cfg: Mapping[str, Any]) -> _Sizes:
    """The model's sizes, read from the embeddings and the blocks' keys."""
    conv = state["patch_embed_3d.proj.weight"]
    if conv.ndim != 5 or conv.shape[1] != 3:
        raise UserError(
            f"patch_embed_3d.proj.weight has shape {conv.shape}; expected [D, 3, t, h, w]"
        )
    dim, tubelet = int(conv.shape[0]), tuple(int(s) for s in conv.shape[2:])
    if tubelet[1] != tubelet[2]:
        raise UserError(f"patch_embed_3d.proj.weight has non-square patches {tubelet[1:]}")
    pos_patches = int(np.shape(state["pos_embed"])[1]) - 1
    grid = round(math.sqrt(pos_patches))
    if grid * grid != pos_patches:
        raise UserError(f"pos_embed has {pos_patches} patches, not a square grid")
    layers = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    if layers == 0:
        raise UserError("no transformer blocks (blocks.N.*) in the checkpoint")
    pre_logits = "pre_logits.fc.weight" in state or "pre_logits.fc.bias" in state
    if "USE_MLP" in model_cfg and bool(model_cfg["USE_MLP"]) != pre_logits:
        raise UserError(
            f"cfg says USE_MLP={model_cfg['USE_MLP']} but pre_logits.fc is "
            f"{'present' if pre_logits else 'absent'}"
        )
    fc1 = state.get("blocks.0.mlp.fc1.weight")  # absent: the key check names it
    return _Sizes(
        dim=dim,
        tubelet=tubelet,
        slots=int(np.shape(state["temp_embed"])[1]),
        grid=grid,
        layers=layers,
        mlp=int(np.shape(fc1)[0]) if fc1 is not None else 4 * dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        pre_logits=pre_logits,
    )


def _one_head(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[int]]:
    """``head`` as it is, or EPIC-KITCHENS' ``head0``, ``head1``, ... as one ``head``."""
    found = sorted({m.group(1) for k in state if (m := _HEAD.fullmatch(k))})
    if found == [""]:
        head = state.get("head.bias", state.get("head.weight", np.zeros(0)))
        return dict(state), [int(np.shape(head)[0])]
    if found and "" not in found:
        return concat_heads(state, [f"head{i}" for i in range(len(found))], "head")
    raise UserError(
        "expected one classifier 'head' or heads 'head0', 'head1', ...; found "
        f"{format_keys(['head' + h for h in found]) or 'none'}"
    )


def _name_table(sizes: _Sizes) -> dict[str, Target]:
    """Every key of the checkpoint and the Flax leaf (or leaves, for ``qkv``) it fills."""
    table: dict[str, Target] = {
        "cls_token": ("cls", IDENTITY),
        "pos_embed": ("pos_embedding", IDENTITY),
        "temp_embed": ("temporal_embedding", IDENTITY),
        "patch_embed_3d.proj.weight": ("embedding/kernel", CONV),
        "patch_embed_3d.proj.bias": ("embedding/bias", IDENTITY),
        "norm.weight": ("encoder_norm/scale", IDENTITY),
        "norm.bias": ("encoder_norm/bias", IDENTITY),
        "head.weight": ("output_projection/kernel", LINEAR),
        "head.bias": ("output_projection/bias", IDENTITY),
    }
    if sizes.pre_logits:
        table["pre_logits.fc.weight"] = ("pre_logits/kernel", LINEAR)
        table["pre_logits.fc.bias"] = ("pre_logits/bias", IDENTITY)
    for i in range(sizes.layers):
        src, dst = f"blocks.{i}.", f"encoderblock_{i}/"
        attn = f"{dst}{_ATTN}/"
        for norm, name in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")):
            table[f"{src}{norm}.weight"] = (f"{dst}{name}/scale", IDENTITY)
            table[f"{src}{norm}.bias"] = (f"{dst}{name}/bias", IDENTITY)
        table[f"{src}attn.qkv.weight"] = (tuple(f"{attn}{p}/kernel" for p in _QKV), QKV_KERNEL)
        table[f"{src}attn.proj_q.weight"] = (f"{attn}proj_q/kernel", QKV_KERNEL)
        table[f"{src}attn.proj_kv.weight"] = (f"{attn}proj_kv/kernel", QKV_KERNEL)  # (D, 2, H, d)
        if sizes.qkv_bias:
            table[f"{src}attn.qkv.bias"] = (tuple(f"{attn}{p}/bias" for p in _QKV), QKV_BIAS)
            table[f"{src}attn.proj_q.bias"] = (f"{attn}proj_q/bias", QKV_BIAS)
            table[f"{src}attn.proj_kv.bias"] = (f"{attn}proj_kv/bias", QKV_BIAS)
        table[f"{src}attn.proj.weight"] = (f"{attn}out/kernel", OUT_KERNEL)
        table[f"{src}attn.proj.bias"] = (f"{attn}out/bias", IDENTITY)
        for fc, name in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            table[f"{src}mlp.{fc}.weight"] = (f"{dst}MlpBlock_0/{name}/kernel", LINEAR)
            table[f"{src}mlp.{fc}.bias"] = (f"{dst}MlpBlock_0/{name}/bias", IDENTITY)
    return table


def _interpolate_pos(pos: np.ndarray, grid: int) -> np.ndarray:
    """The original's forward-time resize: bicubic, ``scale_factor = new / old`` side."""
    torch = import_torch("resizing pos_embed")
    old = round(math.sqrt(pos.shape[1] - 1))
    table = torch.from_numpy(pos[0, 1:]).reshape(1, old, old, -1).permute(0, 3, 1, 2)
    table = torch.nn.functional.interpolate(
        table, scale_factor=math.sqrt(grid * grid / (old * old)), mode="bicubic"
    )
    if table.shape[-1] != grid:
        raise UserError(f"cannot resize the {old}x{old} pos_embed grid to {grid}x{grid}")
    table = table.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).numpy()
    return np.concatenate([pos[:, :1], table], axis=1)


def _input_size(
    state: dict[str, np.ndarray], cfg: Mapping[str, Any], sizes: _Sizes
) -> dict[str, int]:
    """The input the model is made for; a crop other than the table's resizes ``pos_embed``
    in ``state``, once, as the original does on every forward pass."""
    patch = sizes.tubelet[1]
    image_size = sizes.grid * patch
    crop = int((cfg.get("DATA") or {}).get("TRAIN_CROP_SIZE", image_size))
    if crop != image_size:
        if crop % patch:
            raise UserError(f"crop size {crop} is not a multiple of the patch size {patch}")
        state["pos_embed"] = _interpolate_pos(as_float32(state["pos_embed"]), crop // patch)
    return {"num_frames": sizes.slots * sizes.tubelet[0], "image_size": crop}


def convert_motionformer(
    state: Mapping[str, np.ndarray], cfg: Mapping[str, Any] | None = None
) -> tuple[Params, dict[str, Any], dict[str, int], list[int] | None]:
    """Map a Motionformer state dict to the Flax tree of :class:`~vtm_jax.models.motionformer.
    Motionformer`. Returns ``(params, model_config, input_config, class_splits)``.

    Every unknown, missing or mis-shaped key is a UserError that names it.
    """
    cfg = dict(cfg or {})
    model_cfg = _model_cfg(cfg)
    _check_cfg(model_cfg)
    _check_trajectory(state)
    sizes = _sizes(state, model_cfg)
    # Heads cannot be read from the shapes: the cfg says, else ViT's 64-wide heads.
    heads = int(model_cfg.get("NUM_HEADS", max(1, sizes.dim // 64)))
    if sizes.dim % heads:
        raise UserError(f"width {sizes.dim} is not a multiple of {heads} heads")
    state, splits = _one_head(state)
    table = _name_table(sizes)
    check_keys(state, table, "Motionformer", optional=_UNUSED)
    state = {k: v for k, v in state.items() if k not in _UNUSED}
    input_config = _input_size(state, cfg, sizes)
    model_config = {
        "num_classes": sum(splits),
        "hidden_size": sizes.dim,
        "num_heads": heads,
        "mlp_dim": sizes.mlp,
        "num_layers": sizes.layers,
        "patch_size": list(sizes.tubelet),
        "representation_size": sizes.dim if sizes.pre_logits else None,
        "layer_norm_eps": 1e-6,
        "qkv_bias": sizes.qkv_bias,
        "original_temporal_values": bool(model_cfg.get("USE_ORIGINAL_TRAJ_ATTN_CODE", True)),
    }
    shapes = model_shapes("motionformer", model_config, input_config)
    params = map_tensors(state, table, shapes, "Motionformer")
    return params, model_config, input_config, splits if len(splits) > 1 else None


def _preprocessing(cfg: Mapping[str, Any], input_config: Mapping[str, int]) -> dict[str, Any]:
    data = cfg.get("DATA") or {}
    prep = dict(DEFAULT_PREPROCESSING)
    prep["num_frames"] = int(input_config["num_frames"])
    prep["crop_size"] = int(input_config["image_size"])
    prep["min_resize"] = round(prep["crop_size"] * 256 / 224)
    if "SAMPLING_RATE" in data:
        prep["stride"] = int(data["SAMPLING_RATE"])
    scales = data.get("TRAIN_JITTER_SCALES")
    if isinstance(scales, (list, tuple)) and scales:
        prep["min_resize"] = int(scales[0])  # slowfast's single-crop test resize
    for name, key in (("mean", "MEAN"), ("std", "STD")):
        value = data.get(key)
        if isinstance(value, (list, tuple)) and len(value) == 3:
            prep[name] = [float(v) for v in value]
    frames = data.get("NUM_FRAMES")
    if frames is not None and int(frames) != prep["num_frames"]:
        raise UserError(
            f"{frames} frames asked (cfg DATA.NUM_FRAMES or --num-frames) but temp_embed fits "
            f"{prep['num_frames']} frames"
        )
    return prep


def with_overrides(
    cfg: Mapping[str, Any],
    *,
    num_frames: int | None = None,
    image_size: int | None = None,
    num_heads: int | None = None,
) -> dict[str, Any]:
    """``cfg`` with the command line's input size and head count written into it."""
    cfg = dict(cfg)
    data = dict(cfg.get("DATA") or {})
    if num_frames is not None:
        data["NUM_FRAMES"] = num_frames
    if image_size is not None:
        data["TRAIN_CROP_SIZE"] = image_size  # the original resizes pos_embed to this crop
    cfg["DATA"] = data
    if num_heads is not None:
        section = "VIT" if "VIT" in cfg and "MOTIONFORMER" not in cfg else "MOTIONFORMER"
        cfg[section] = {**_model_cfg(cfg), "NUM_HEADS": num_heads}
    return cfg


def motionformer_from_state(
    state: Mapping[str, np.ndarray], cfg: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A Motionformer state dict and its parsed ``cfg`` as :func:`load_motionformer` returns."""
    cfg = dict(cfg or {})
    params, model_config, input_config, class_splits = convert_motionformer(state, cfg)
    return {
        "params": params,
        "model": model_config,
        "input": input_config,
        "labels": None,
        "preprocessing": _preprocessing(cfg, input_config),
        "class_splits": class_splits,
    }


def load_motionformer(
    path: str | Path,
    *,
    num_frames: int | None = None,
    image_size: int | None = None,
    num_heads: int | None = None,
) -> dict[str, Any]:
    """Load a Motionformer ``.pyth`` / ``.pth`` checkpoint.

    Returns ``{'params', 'model', 'input', 'labels', 'preprocessing', 'class_splits'}``: the Flax
    tree, the constructor arguments of :class:`~vtm_jax.models.motionformer.Motionformer`,
    ``{'num_frames', 'image_size'}``, ``None`` (the checkpoints carry no class names), the input
    pipeline (from the checkpoint's cfg, else the paper's) and ``[97, 300]``-style head sizes for
    multi-head (EPIC-KITCHENS) checkpoints, else ``None``. ``num_frames`` / ``image_size`` /
    ``num_heads`` override the cfg's ``DATA.NUM_FRAMES``, ``DATA.TRAIN_CROP_SIZE`` and
    ``NUM_HEADS``.
    """
    checkpoint = read_torch_checkpoint(path)
    cfg = with_overrides(
        parse_cfg_yaml(checkpoint.cfg_text),
        num_frames=num_frames,
        image_size=image_size,
        num_heads=num_heads,
    )
    return motionformer_from_state(checkpoint.state, cfg)
