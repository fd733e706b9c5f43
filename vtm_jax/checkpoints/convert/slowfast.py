"""Torch checkpoint files of the paper's code and of the releases it starts from.

The paper's code is built on SlowFast, whose checkpoints are ``torch.save({'epoch',
'model_state', 'optimizer_state', 'cfg'})`` with ``cfg`` the run's yacs config as YAML text.
Four architectures come in such files, told apart here by their keys:

* **ViViT**: the paper's model *is* a transformers ``VivitForVideoClassification``, so its keys
  are HF's (``vivit.embeddings.*``, ``vivit.encoder.layer.N.*``, ``vivit.layernorm.*``,
  ``classifier.*``; EPIC-KITCHENS: ``verb_classifier.*`` and ``noun_classifier.*``) and go
  through :mod:`vtm_jax.checkpoints.convert.hf_vivit`. The HF config is not in the file: its settings are
  the paper's (``gelu_fast``, LayerNorm eps 1e-6); the sizes come from the shapes.
* **TimeSformer**: the original release (``TimeSformer_divST_*.pyth``) and the paper's wrapper
  both hold ``model.cls_token``, ``model.pos_embed``, ``model.time_embed``,
  ``model.patch_embed.proj``, ``model.blocks.N.{norm1, attn.qkv, attn.proj, temporal_norm1,
  temporal_attn.qkv, temporal_attn.proj, temporal_fc, norm2, mlp.fc1, mlp.fc2}``,
  ``model.norm`` and ``model.head`` (EPIC-KITCHENS: ``head0``, ``head1``). These are renamed to
  HF's TimeSformer keys (the HF port renames the same tensors) and go through
  :mod:`vtm_jax.checkpoints.convert.hf_timesformer`.
* **VideoMAE**: MCG-NJU's fine-tuned ``.pth`` (weights under ``module`` or ``model``, keys
  unprefixed) or the paper's wrapper (``model.`` prefix): ``patch_embed.proj``,
  ``blocks.N.{norm1, attn.qkv (no bias), attn.q_bias, attn.v_bias, attn.proj, norm2, mlp.fc1,
  mlp.fc2}``, ``fc_norm`` and ``head`` (or ``head0``/``head1``). The fused ``qkv`` is split and
  the rest renamed to HF's VideoMAE keys for :mod:`vtm_jax.checkpoints.convert.hf_videomae`. There is no
  position table (it is a fixed sinusoid), so the input size is the cfg's or the flags' (16
  frames at 224 px by default); LayerNorms, ``fc_norm`` included, use eps 1e-6.
* **Motionformer**: the original keys, unprefixed (:mod:`vtm_jax.checkpoints.convert.motionformer`).

Two heads (EPIC-KITCHENS verb and noun) become one concatenated head with ``class_splits``.
Frame count and crop size come from the command line, else the cfg's ``DATA.NUM_FRAMES`` and
``DATA.TRAIN_CROP_SIZE``, else the paper's; the head count (in no tensor shape) from the command
line, else ViT's usual count for the width. The preprocessing record is the paper's test
pipeline: ``DATA.SAMPLING_RATE``, ``DATA.MEAN`` / ``DATA.STD`` and ``DATA.TRAIN_JITTER_SCALES[0]``
(short side) from the cfg where it has them, else :data:`vtm_jax.data.protocols.PAPER_MODEL_INPUTS` for the model
and the dataset its classes imply; Something-Something v2 (174 classes) samples segments. The
key tables and the helpers that read sizes off the tensors are in
:mod:`vtm_jax.checkpoints.convert.slowfast_keys`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from etils.epath import Path

from vtm_jax.checkpoints.convert.checkpoint_files import parse_cfg_yaml, read_torch_checkpoint
from vtm_jax.checkpoints.convert.common import Params, default_num_heads, format_keys
from vtm_jax.checkpoints.convert.slowfast_keys import (
    TIMESFORMER_KEYS,
    VIDEOMAE_KEYS,
    count_layers,
    join_heads,
    require_tensor,
    split_qkv,
    with_hf_errors,
)
from vtm_jax.errors import UserError

ARCHITECTURES = ("vivit", "videomae", "timesformer", "motionformer")
_NAMES = {
    "vivit": "ViViT",
    "videomae": "VideoMAE",
    "timesformer": "TimeSformer",
    "motionformer": "Motionformer",
}
# The paper's input size per model when neither the flags nor the cfg give one.
_DEFAULT_FRAMES = {"vivit": 32, "videomae": 16}
_DEFAULT_SIZE = 224
# The paper's ViViT config JSON (VIVIT.CONFIG_PATH): tanh GELU, LayerNorm eps 1e-6.
_VIVIT_HIDDEN_ACT = "gelu_fast"
_EPS = 1e-6
_SSV2_CLASSES = 174
_EPIC_SPLITS = [97, 300]


# (params, model constructor arguments, input size, class splits)
Converted = tuple[Params, dict[str, Any], dict[str, int], list[int] | None]


class Overrides(NamedTuple):
    """What the command line says about the model; None: the file's cfg, else the default."""

    num_frames: int | None = None
    image_size: int | None = None
    num_heads: int | None = None


# ---------------------------------------------------------------------------------------------
# Telling the file apart


def has_prefix(state: Mapping[str, np.ndarray], prefix: str) -> bool:
    """Whether every key starts with ``prefix`` (the paper's wrappers hold models as ``model``)."""
    return bool(state) and all(k.startswith(prefix) for k in state)


def detect_architecture(keys: Sequence[str]) -> str:
    """Which of :data:`ARCHITECTURES` a state dict (``model.`` prefix removed) belongs to."""
    keyset = set(keys)
    if any(k.startswith("vivit.") for k in keys):
        return "vivit"
    if {"patch_embed_3d.proj.weight", "temp_embed"} & keyset:
        return "motionformer"
    if "time_embed" in keyset or any(".temporal_attn." in k for k in keys):
        return "timesformer"
    if "fc_norm.weight" in keyset or any(k.endswith((".q_bias", ".v_bias")) for k in keys):
        return "videomae"
    raise UserError(
        "cannot tell the model from its keys (expected ViViT's vivit.*, TimeSformer's "
        "time_embed, VideoMAE's fc_norm or Motionformer's temp_embed); keys: "
        f"{format_keys(sorted(keys)) or 'none'}"
    )


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _section(cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    section = cfg.get(name)
    return section if isinstance(section, dict) else {}


def _input_size(cfg: Mapping[str, Any], over: Overrides, frames: int, size: int) -> tuple[int, int]:
    """Frames and crop: the flags, else the cfg's DATA section, else ``frames`` / ``size``."""
    data = _section(cfg, "DATA")
    if over.num_frames is not None:
        frames = over.num_frames
    elif data.get("NUM_FRAMES") is not None:
        frames = int(data["NUM_FRAMES"])
    if over.image_size is not None:
        size = over.image_size
    elif data.get("TRAIN_CROP_SIZE") is not None:
        size = int(data["TRAIN_CROP_SIZE"])
    return frames, size


# ---------------------------------------------------------------------------------------------
# Per architecture: (params, model, input, class_splits)


def _vivit(state: dict[str, np.ndarray], cfg: Mapping[str, Any], over: Overrides) -> Converted:
    from vtm_jax.checkpoints.convert.hf_vivit import convert_vivit

    state, splits = join_heads(state, ("verb_classifier", "noun_classifier"), "classifier")
    conv = require_tensor(state, "vivit.embeddings.patch_embeddings.projection.weight", 5, "ViViT")
    width = int(conv.shape[0])
    fc1 = [
        v for k, v in state.items() if k.endswith(("intermediate.dense.weight", "mlp.fc1.weight"))
    ]
    frames, size = _input_size(cfg, over, _DEFAULT_FRAMES["vivit"], _DEFAULT_SIZE)
    classes = state["classifier.weight"].shape[0] if "classifier.weight" in state else None
    hf_config = {
        "model_type": "vivit",
        "image_size": size,
        "num_frames": frames,
        "tubelet_size": [int(s) for s in conv.shape[2:]],
        "hidden_size": width,
        "num_hidden_layers": count_layers(list(state), "ViViT"),
        "num_attention_heads": over.num_heads or default_num_heads(width),
        "intermediate_size": int(fc1[0].shape[0]) if fc1 else 4 * width,
        "hidden_act": _VIVIT_HIDDEN_ACT,
        "layer_norm_eps": _EPS,
        "qkv_bias": True,
        "num_labels": classes,
    }
    params, model, inputs = convert_vivit(state, hf_config)  # its errors name HF's keys: ours
    return params, model, inputs, splits


def _timesformer(
    state: dict[str, np.ndarray], cfg: Mapping[str, Any], over: Overrides
) -> Converted:
    from vtm_jax.checkpoints.convert.hf_timesformer import convert_timesformer

    attention = _section(cfg, "TIMESFORMER").get("ATTENTION_TYPE", "divided_space_time")
    if attention != "divided_space_time":
        raise UserError(
            f"cfg TIMESFORMER.ATTENTION_TYPE={attention!r}: only divided_space_time "
            "TimeSformers are supported"
        )
    state, splits = join_heads(state, ("head0", "head1"), "head")
    conv = require_tensor(state, "patch_embed.proj.weight", 4, "TimeSformer")
    pos = require_tensor(state, "pos_embed", 3, "TimeSformer")
    time = require_tensor(state, "time_embed", 3, "TimeSformer")
    width, patch = int(conv.shape[0]), int(conv.shape[2])
    grid = round((pos.shape[1] - 1) ** 0.5)
    frames, size = _input_size(cfg, over, int(time.shape[1]), grid * patch)
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    hf_config = {
        "model_type": "timesformer",
        "image_size": size,
        "patch_size": [int(conv.shape[2]), int(conv.shape[3])],
        "num_frames": frames,
        "hidden_size": width,
        "num_hidden_layers": count_layers(list(state), "TimeSformer"),
        "num_attention_heads": over.num_heads or default_num_heads(width),
        "intermediate_size": int(fc1.shape[0]) if fc1 is not None else 4 * width,
        "hidden_act": "gelu",
        "layer_norm_eps": _EPS,
        "qkv_bias": True,
    }
    hf_state = TIMESFORMER_KEYS.rename(state, "TimeSformer")
    params, model, inputs = with_hf_errors(
        lambda: convert_timesformer(hf_state, hf_config), TIMESFORMER_KEYS, "TimeSformer"
    )
    return params, model, inputs, splits


def _videomae(state: dict[str, np.ndarray], cfg: Mapping[str, Any], over: Overrides) -> Converted:
    from vtm_jax.checkpoints.convert.hf_videomae import convert_videomae

    state, splits = join_heads(state, ("head0", "head1"), "head")
    conv = require_tensor(state, "patch_embed.proj.weight", 5, "VideoMAE")
    width, tubelet, patch = int(conv.shape[0]), int(conv.shape[2]), int(conv.shape[3])
    frames, size = _input_size(cfg, over, _DEFAULT_FRAMES["videomae"], _DEFAULT_SIZE)
    if frames % tubelet or size % patch:
        raise UserError(
            f"{frames} frames of {size} px do not fit VideoMAE's tubelet "
            f"{(tubelet, patch, patch)}; give --num-frames and --image-size"
        )
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    hf_config = {
        "model_type": "videomae",
        "image_size": size,
        "patch_size": patch,
        "num_frames": frames,
        "tubelet_size": tubelet,
        "hidden_size": width,
        "num_hidden_layers": count_layers(list(state), "VideoMAE"),
        "num_attention_heads": over.num_heads or default_num_heads(width),
        "intermediate_size": int(fc1.shape[0]) if fc1 is not None else 4 * width,
        "hidden_act": "gelu",
        "layer_norm_eps": _EPS,
        "qv_bias": any(k.endswith(".attn.q_bias") for k in state),
        "use_mean_pooling": True,
    }
    split, rest = split_qkv(state)
    hf_state = {**VIDEOMAE_KEYS.rename(rest, "VideoMAE"), **split}
    params, model, inputs = with_hf_errors(
        lambda: convert_videomae(hf_state, hf_config), VIDEOMAE_KEYS, "VideoMAE"
    )
    model["fc_norm_eps"] = _EPS  # the original's fc_norm is eps 1e-6 (HF's port: 1e-5)
    return params, model, inputs, splits


# ---------------------------------------------------------------------------------------------
# Preprocessing and the entry point


_LOADERS = {"k400": "kinetics", "ssv2": "ssv2", "ek100": "epic_kitchens"}


def _dataset(num_classes: int, splits: list[int] | None) -> str:
    """The paper's dataset a classifier was made for, by its classes (Kinetics otherwise)."""
    if splits == _EPIC_SPLITS:
        return "ek100"
    return "ssv2" if num_classes == _SSV2_CLASSES else "k400"


def paper_preprocessing(
    architecture: str,
    cfg: Mapping[str, Any],
    input_config: Mapping[str, int],
    num_classes: int,
    splits: list[int] | None,
) -> dict[str, Any]:
    """The paper's test pipeline for this model: the cfg's DATA values, else its protocol."""
    from vtm_jax.data.protocols import PAPER_MODEL_INPUTS

    _, strides, mean, std = PAPER_MODEL_INPUTS[architecture]
    data = _section(cfg, "DATA")
    crop = int(input_config["image_size"])
    scales = data.get("TRAIN_JITTER_SCALES")
    dataset = _dataset(num_classes, splits)
    prep = {
        "num_frames": int(input_config["num_frames"]),
        "stride": int(data.get("SAMPLING_RATE", strides[dataset])),
        # slowfast's single-crop test resizes the short side to TRAIN_JITTER_SCALES[0].
        "min_resize": int(scales[0]) if scales else round(crop * 256 / 224),
        "crop_size": crop,
        "mean": [float(v) for v in data.get("MEAN", mean)],
        "std": [float(v) for v in data.get("STD", std)],
        "sampling": "segments" if dataset == "ssv2" else "stride",
        "protocol": "paper",
        "paper_loader": _LOADERS[dataset],
    }
    for name in ("mean", "std"):
        if len(prep[name]) != 3:
            raise UserError(f"cfg DATA.{name.upper()}={prep[name]} does not have 3 channels")
    return prep


def _motionformer(
    state: dict[str, np.ndarray], cfg: Mapping[str, Any], over: Overrides
) -> dict[str, Any]:
    from vtm_jax.checkpoints.convert import motionformer

    cfg = motionformer.with_overrides(cfg, **over._asdict())
    converted = motionformer.motionformer_from_state(state, cfg)
    dataset = _dataset(converted["model"]["num_classes"], converted.get("class_splits"))
    converted["preprocessing"].update(protocol="paper", paper_loader=_LOADERS[dataset])
    if dataset == "ssv2":
        converted["preprocessing"]["sampling"] = "segments"  # the `centred` protocol's
    return converted


_CONVERTERS = {"vivit": _vivit, "timesformer": _timesformer, "videomae": _videomae}


def load_slowfast(
    path: str | Path,
    *,
    architectures: Sequence[str] = ARCHITECTURES,
    overrides: Overrides | None = None,
) -> dict[str, Any]:
    """Load a SlowFast-format (or MCG-NJU VideoMAE, or bare) torch checkpoint file.

    Returns ``{'architecture', 'params', 'model', 'input', 'labels', 'preprocessing',
    'class_splits'}`` (and ``token_merging`` for VideoMAE: the paper runs it without
    proportional attention). ``architectures``: the models this source accepts.
    """
    checkpoint = read_torch_checkpoint(path)
    cfg = parse_cfg_yaml(checkpoint.cfg_text)
    prefixed = has_prefix(checkpoint.state, "model.")
    state = {k[len("model.") :] if prefixed else k: v for k, v in checkpoint.state.items()}
    architecture = detect_architecture(list(state))
    if architecture not in architectures:
        wanted = " or ".join(_NAMES[a] for a in architectures)
        raise UserError(
            f"{path} is a {_NAMES[architecture]} checkpoint, not {wanted}; "
            "convert it with --source slowfast"
        )
    try:
        return _convert(architecture, state, cfg, overrides or Overrides())
    except UserError as error:
        if prefixed:  # errors name the keys as the converter saw them
            raise UserError(f"{error} (keys named without the file's 'model.' prefix)") from None
        raise


def _convert(
    architecture: str, state: dict[str, np.ndarray], cfg: Mapping[str, Any], overrides: Overrides
) -> dict[str, Any]:
    if architecture == "motionformer":
        return {"architecture": architecture, **_motionformer(state, cfg, overrides)}
    params, model, inputs, splits = _CONVERTERS[architecture](state, cfg, overrides)
    converted = {
        "architecture": architecture,
        "params": params,
        "model": model,
        "input": inputs,
        "labels": None,
        "preprocessing": paper_preprocessing(
            architecture, cfg, inputs, model["num_classes"], splits
        ),
        "class_splits": splits,
    }
    if architecture == "videomae":
        from vtm_jax.checkpoints.convert.hf_videomae import PAPER_TOKEN_MERGING

        converted["token_merging"] = dict(PAPER_TOKEN_MERGING)
    return converted
