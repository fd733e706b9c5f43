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
* ``patch_embed.proj.weight`` ``[D, 3, h, w]``, ``.bias`` ``[D]``: optional and dropped; the
  original always builds this 2-D embedding but never uses it with a tubelet
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
from pathlib import Path
from typing import Any

import numpy as np

from vtm_jax.convert.common import import_torch, parse_cfg_yaml, read_torch_checkpoint
from vtm_jax.convert.scenic import Params, format_keys, unflatten_params
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


def _expected_shapes(
    dim: int, mlp: int, layers: int, slots: int, patches: int, tubelet: tuple[int, int, int]
) -> dict[str, tuple[int, ...]]:
    t, h, w = tubelet
    shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + patches, dim),
        "temp_embed": (1, slots, dim),
        "patch_embed_3d.proj.weight": (dim, 3, t, h, w),
        "patch_embed_3d.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    for i in range(layers):
        block = {
            "norm1.weight": (dim,),
            "norm1.bias": (dim,),
            "attn.qkv.weight": (3 * dim, dim),
            "attn.qkv.bias": (3 * dim,),
            "attn.proj_q.weight": (dim, dim),
            "attn.proj_q.bias": (dim,),
            "attn.proj_kv.weight": (2 * dim, dim),
            "attn.proj_kv.bias": (2 * dim,),
            "attn.proj.weight": (dim, dim),
            "attn.proj.bias": (dim,),
            "norm2.weight": (dim,),
            "norm2.bias": (dim,),
            "mlp.fc1.weight": (mlp, dim),
            "mlp.fc1.bias": (mlp,),
            "mlp.fc2.weight": (dim, mlp),
            "mlp.fc2.bias": (dim,),
        }
        shapes.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return shapes


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
    keys = list(state)
    if "st_embed" in state or any(".timeattn." in k for k in keys):
        raise UserError(
            "this is a joint/divided-attention checkpoint (st_embed or timeattn keys); only "
            "trajectory attention (the Motionformer proper) is supported"
        )
    for needed in ("patch_embed_3d.proj.weight", "temp_embed", "pos_embed"):
        if needed not in state:
            raise UserError(f"not a Motionformer checkpoint: missing {needed}")
    conv = state["patch_embed_3d.proj.weight"]
    if conv.ndim != 5 or conv.shape[1] != 3:
        raise UserError(
            f"patch_embed_3d.proj.weight has shape {conv.shape}; expected [D, 3, t, h, w]"
        )
    dim, tubelet = conv.shape[0], tuple(int(s) for s in conv.shape[2:])
    if tubelet[1] != tubelet[2]:
        raise UserError(f"patch_embed_3d.proj.weight has non-square patches {tubelet[1:]}")
    slots = int(np.shape(state["temp_embed"])[1])
    pos_patches = int(np.shape(state["pos_embed"])[1]) - 1
    grid = round(math.sqrt(pos_patches))
    if grid * grid != pos_patches:
        raise UserError(f"pos_embed has {pos_patches} patches, not a square grid")

    layers = 1 + max((int(m.group(1)) for k in keys if (m := _BLOCK.match(k))), default=-1)
    if layers == 0:
        raise UserError("no transformer blocks (blocks.N.*) in the checkpoint")
    # Heads cannot be read from the shapes: the cfg says, else ViT's 64-wide heads.
    heads = int(model_cfg.get("NUM_HEADS", max(1, dim // 64)))
    if dim % heads:
        raise UserError(f"width {dim} is not a multiple of {heads} heads")
    mlp = int(np.shape(state.get("blocks.0.mlp.fc1.weight", np.zeros((4 * dim, dim))))[0])
    qkv_bias = "blocks.0.attn.qkv.bias" in state
    expected = _expected_shapes(dim, mlp, layers, slots, pos_patches, tubelet)
    if not qkv_bias:
        for suffix in ("qkv", "proj_q", "proj_kv"):
            for i in range(layers):
                expected.pop(f"blocks.{i}.attn.{suffix}.bias")
    has_pre_logits = "pre_logits.fc.weight" in state or "pre_logits.fc.bias" in state
    if has_pre_logits:
        expected["pre_logits.fc.weight"] = (dim, dim)
        expected["pre_logits.fc.bias"] = (dim,)
    if "USE_MLP" in model_cfg and bool(model_cfg["USE_MLP"]) != has_pre_logits:
        raise UserError(
            f"cfg says USE_MLP={model_cfg['USE_MLP']} but pre_logits.fc is "
            f"{'present' if has_pre_logits else 'absent'}"
        )
    heads_found = sorted({m.group(1) for k in keys if (m := _HEAD.fullmatch(k))})
    if heads_found == [""]:
        head_names = ["head"]
    elif heads_found and "" not in heads_found:
        head_names = [f"head{i}" for i in range(len(heads_found))]
    else:
        raise UserError(
            "expected one classifier 'head' or heads 'head0', 'head1', ...; found "
            f"{format_keys(['head' + h for h in heads_found]) or 'none'}"
        )
    for name in head_names:
        classes = int(np.shape(state.get(f"{name}.weight", state.get(f"{name}.bias", [0])))[0])
        expected[f"{name}.weight"] = (classes, dim)
        expected[f"{name}.bias"] = (classes,)
    optional = {"patch_embed.proj.weight": (dim, 3) + tubelet[1:], "patch_embed.proj.bias": (dim,)}

    unknown = [k for k in keys if k not in expected and k not in optional]
    missing = [k for k in expected if k not in state]
    if unknown or missing:
        parts = [f"unknown {format_keys(unknown)}"] if unknown else []
        parts += [f"missing {format_keys(missing)}"] if missing else []
        raise UserError(f"Motionformer checkpoint keys do not match: {'; '.join(parts)}")
    shapes = {**expected, **{k: v for k, v in optional.items() if k in state}}
    mis_shaped = [
        f"{k} {tuple(np.shape(state[k]))} (expected {v})"
        for k, v in shapes.items()
        if tuple(np.shape(state[k])) != v
    ]
    if mis_shaped:
        raise UserError(
            f"Motionformer checkpoint has mis-shaped tensors: {format_keys(mis_shaped)}"
        )

    def get(key: str) -> np.ndarray:
        return np.asarray(state[key], dtype=np.float32)

    h, d = heads, dim // heads
    image_size = grid * tubelet[1]
    crop = int((cfg.get("DATA") or {}).get("TRAIN_CROP_SIZE", image_size))
    pos = get("pos_embed")
    if crop != image_size:  # the original resizes pos_embed for other crops
        if crop % tubelet[1]:
            raise UserError(f"crop size {crop} is not a multiple of the patch size {tubelet[1]}")
        pos = _interpolate_pos(pos, crop // tubelet[1])
        image_size = crop

    flat: dict[str, np.ndarray] = {
        "embedding/kernel": get("patch_embed_3d.proj.weight").transpose(2, 3, 4, 1, 0),
        "embedding/bias": get("patch_embed_3d.proj.bias"),
        "cls": get("cls_token"),
        "pos_embedding": pos,
        "temporal_embedding": get("temp_embed"),
    }
    for i in range(layers):
        src, dst = f"blocks.{i}.", f"encoderblock_{i}/"
        attn = f"{dst}{_ATTN}/"
        for ln, name in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")):
            flat[f"{dst}{name}/scale"] = get(f"{src}{ln}.weight")
            flat[f"{dst}{name}/bias"] = get(f"{src}{ln}.bias")
        qkv = get(f"{src}attn.qkv.weight").reshape(3, h, d, dim)
        for j, name in enumerate(("query", "key", "value")):
            flat[f"{attn}{name}/kernel"] = qkv[j].transpose(2, 0, 1)
        flat[f"{attn}proj_q/kernel"] = (
            get(f"{src}attn.proj_q.weight").reshape(h, d, dim).transpose(2, 0, 1)
        )
        flat[f"{attn}proj_kv/kernel"] = (
            get(f"{src}attn.proj_kv.weight").reshape(2, h, d, dim).transpose(3, 0, 1, 2)
        )
        if qkv_bias:
            qkv_b = get(f"{src}attn.qkv.bias").reshape(3, h, d)
            for j, name in enumerate(("query", "key", "value")):
                flat[f"{attn}{name}/bias"] = qkv_b[j]
            flat[f"{attn}proj_q/bias"] = get(f"{src}attn.proj_q.bias").reshape(h, d)
            flat[f"{attn}proj_kv/bias"] = get(f"{src}attn.proj_kv.bias").reshape(2, h, d)
        flat[f"{attn}out/kernel"] = get(f"{src}attn.proj.weight").T.reshape(h, d, dim)
        flat[f"{attn}out/bias"] = get(f"{src}attn.proj.bias")
        for fc, name in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            flat[f"{dst}MlpBlock_0/{name}/kernel"] = get(f"{src}mlp.{fc}.weight").T
            flat[f"{dst}MlpBlock_0/{name}/bias"] = get(f"{src}mlp.{fc}.bias")
    flat["encoder_norm/scale"] = get("norm.weight")
    flat["encoder_norm/bias"] = get("norm.bias")
    if has_pre_logits:
        flat["pre_logits/kernel"] = get("pre_logits.fc.weight").T
        flat["pre_logits/bias"] = get("pre_logits.fc.bias")
    flat["output_projection/kernel"] = np.concatenate(
        [get(f"{n}.weight").T for n in head_names], axis=1
    )
    flat["output_projection/bias"] = np.concatenate([get(f"{n}.bias") for n in head_names])
    flat = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in flat.items()}

    splits = [int(np.shape(state[f"{n}.bias"])[0]) for n in head_names]
    model_config = {
        "num_classes": sum(splits),
        "hidden_size": int(dim),
        "num_heads": h,
        "mlp_dim": mlp,
        "num_layers": layers,
        "patch_size": list(tubelet),
        "representation_size": int(dim) if has_pre_logits else None,
        "layer_norm_eps": 1e-6,
        "qkv_bias": qkv_bias,
        "original_temporal_values": bool(model_cfg.get("USE_ORIGINAL_TRAJ_ATTN_CODE", True)),
    }
    input_config = {"num_frames": slots * tubelet[0], "image_size": image_size}
    class_splits = splits if len(splits) > 1 else None
    return unflatten_params(flat), model_config, input_config, class_splits


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
