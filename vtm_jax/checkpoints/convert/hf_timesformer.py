"""HuggingFace TimeSformer checkpoints (``TimesformerForVideoClassification``) to vtm_jax's tree.

transformers 5 uses the same key names in memory and on disk for TimeSformer
(``timesformer.encoder.layer.N.attention.attention.qkv``, ``temporal_attention``,
``temporal_dense``, ``intermediate.dense``, ...), and hub checkpoints use them too. The fused
``qkv`` projection is split into Flax's ``query`` / ``key`` / ``value`` kernels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from etils.epath import Path

from vtm_jax.checkpoints.convert.checkpoint_files import (
    hf_labels,
    hf_num_classes,
    read_hf_directory,
    read_processor_config,
)
from vtm_jax.checkpoints.convert.common import (
    CONV2D,
    GELU_APPROXIMATE,
    IDENTITY,
    LINEAR,
    OUT_KERNEL,
    QKV_BIAS,
    QKV_KERNEL,
    Params,
    Target,
    check_keys,
    format_keys,
    map_tensors,
    model_shapes,
)
from vtm_jax.errors import UserError

# TimesformerConfig's defaults: save_pretrained may leave out keys whose value equals them.
_HF_DEFAULTS: dict[str, Any] = {
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "num_frames": 8,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "qkv_bias": True,
    "attention_type": "divided_space_time",
}

# hidden_act -> gelu_approximate ("gelu" is the exact erf form both TimeSformers use).

# The paper's TimeSformer test pipeline (docs/method.md §3.8; slowfast defaults): 8 frames, short
# side resized to the first jitter scale 256, centre crop 224, mean 0.45 / std 0.225. Frame
# stride 32 for Kinetics (the 8x32 configs); Something-Something v2 uses 8.
DEFAULT_STRIDE = 32
SSV2_STRIDE = 8
SSV2_CLASSES = 174
DEFAULT_MEAN = [0.45, 0.45, 0.45]
DEFAULT_STD = [0.225, 0.225, 0.225]

# HF attention module -> ours (spatial and temporal).
_ATTN = {
    "attention": "MultiHeadDotProductAttention_0",
    "temporal_attention": "MultiHeadDotProductAttention_temporal",
}

_QKV = ("query", "key", "value")


def _name_table(num_layers: int) -> dict[str, Target]:
    """Every key of a TimesformerForVideoClassification state dict with ``num_layers`` layers.

    The fused ``qkv`` weight and bias each fill the query, key and value leaves, in that order.
    """
    emb = "timesformer.embeddings."
    table: dict[str, Target] = {
        f"{emb}cls_token": ("cls", IDENTITY),
        f"{emb}position_embeddings": ("posembed_input/pos_embedding", IDENTITY),
        f"{emb}time_embeddings": ("time_embedding", IDENTITY),
        f"{emb}patch_embeddings.projection.weight": ("embedding/kernel", CONV2D),
        f"{emb}patch_embeddings.projection.bias": ("embedding/bias", IDENTITY),
        "timesformer.layernorm.weight": ("Transformer/encoder_norm/scale", IDENTITY),
        "timesformer.layernorm.bias": ("Transformer/encoder_norm/bias", IDENTITY),
        "classifier.weight": ("output_projection/kernel", LINEAR),
        "classifier.bias": ("output_projection/bias", IDENTITY),
    }
    for i in range(num_layers):
        hf, ours = f"timesformer.encoder.layer.{i}.", f"Transformer/encoderblock_{i}/"
        for norm, name in (
            ("temporal_layernorm", "LayerNorm_temporal"),
            ("layernorm_before", "LayerNorm_0"),
            ("layernorm_after", "LayerNorm_1"),
        ):
            table[f"{hf}{norm}.weight"] = (f"{ours}{name}/scale", IDENTITY)
            table[f"{hf}{norm}.bias"] = (f"{ours}{name}/bias", IDENTITY)
        for hf_attn, attn in _ATTN.items():
            attn = ours + attn
            qkv = f"{hf}{hf_attn}.attention.qkv"
            table[f"{qkv}.weight"] = (tuple(f"{attn}/{p}/kernel" for p in _QKV), QKV_KERNEL)
            table[f"{qkv}.bias"] = (tuple(f"{attn}/{p}/bias" for p in _QKV), QKV_BIAS)
            table[f"{hf}{hf_attn}.output.dense.weight"] = (f"{attn}/out/kernel", OUT_KERNEL)
            table[f"{hf}{hf_attn}.output.dense.bias"] = (f"{attn}/out/bias", IDENTITY)
        for hf_dense, dense in (
            ("temporal_dense", "temporal_fc"),
            ("intermediate.dense", "MlpBlock_0/Dense_0"),
            ("output.dense", "MlpBlock_0/Dense_1"),
        ):
            table[f"{hf}{hf_dense}.weight"] = (f"{ours}{dense}/kernel", LINEAR)
            table[f"{hf}{hf_dense}.bias"] = (f"{ours}{dense}/bias", IDENTITY)
    return table


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise UserError(f"config.json {name}={value!r} is not an int or [h, w]")


def _settings(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """Validated model and input settings from an HF TimeSformer config.json dict."""
    model_type = hf_config.get("model_type", "timesformer")
    if model_type != "timesformer":
        raise UserError(f"config.json has model_type={model_type!r}, not 'timesformer'")

    def get(key: str) -> Any:
        return hf_config.get(key, _HF_DEFAULTS[key])

    if get("attention_type") != "divided_space_time":
        raise UserError(
            f"config.json attention_type={get('attention_type')!r}: only "
            "'divided_space_time' TimeSformers are supported"
        )
    hidden_act = get("hidden_act")
    if hidden_act not in GELU_APPROXIMATE:
        raise UserError(
            f"config.json hidden_act={hidden_act!r} is not supported; "
            f"expected one of {', '.join(sorted(GELU_APPROXIMATE))}"
        )
    if get("qkv_bias") is not True:
        raise UserError("config.json has qkv_bias=false; only TimeSformers with q/k/v biases load")
    if get("num_channels") != 3:
        raise UserError(f"config.json has num_channels={get('num_channels')}; only 3 is supported")
    image = _pair(get("image_size"), "image_size")
    if image[0] != image[1]:
        raise UserError(f"config.json image_size={list(image)} is not square")
    patch = _pair(get("patch_size"), "patch_size")
    if image[0] % patch[0] or image[1] % patch[1]:
        raise UserError(f"config.json image_size {image[0]} is not a multiple of patch {patch}")
    hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    if heads <= 0 or hidden % heads:
        raise UserError(
            f"config.json hidden_size={hidden} is not a multiple of num_attention_heads={heads}"
        )
    return {
        "num_classes": hf_num_classes(hf_config),  # None: taken from the classifier weight
        "hidden_size": hidden,
        "num_heads": heads,
        "mlp_dim": int(get("intermediate_size")),
        "num_layers": int(get("num_hidden_layers")),
        "patch_size": patch,
        "layer_norm_eps": float(get("layer_norm_eps")),
        "gelu_approximate": GELU_APPROXIMATE[hidden_act],
        "num_frames": int(get("num_frames")),
        "image_size": image[0],
    }


def convert_timesformer(
    state_dict: Mapping[str, Any], hf_config: Mapping[str, Any]
) -> tuple[Params, dict[str, Any], dict[str, int]]:
    """Map an HF TimeSformer state dict to vtm_jax's tree.

    Returns ``(params, model_config, input_config)``. Any unknown, missing or mis-shaped key
    is a UserError that names it.
    """
    settings = _settings(hf_config)
    keys = list(state_dict)
    if not any(k.startswith("classifier.") for k in keys):
        if any(k.startswith(("embeddings.", "encoder.layer.")) for k in keys):
            raise UserError(
                "no classifier head: this is a base TimesformerModel checkpoint; convert a "
                "TimesformerForVideoClassification checkpoint"
            )
        if not any(k.startswith("timesformer.") for k in keys):
            raise UserError(
                f"not a HuggingFace TimeSformer checkpoint; keys: {format_keys(keys) or 'none'}"
            )
    if settings["num_classes"] is None:
        if "classifier.weight" not in state_dict:
            raise UserError(
                "HF TimeSformer checkpoint keys do not match: missing classifier.weight"
            )
        settings["num_classes"] = int(np.shape(state_dict["classifier.weight"])[0])

    table = _name_table(settings["num_layers"])
    check_keys(keys, table, "HF TimeSformer")
    model_config = {k: v for k, v in settings.items() if k not in ("num_frames", "image_size")}
    model_config["patch_size"] = list(model_config["patch_size"])
    input_config = {"num_frames": settings["num_frames"], "image_size": settings["image_size"]}
    shapes = model_shapes("timesformer", model_config, input_config)
    params = map_tensors(state_dict, table, shapes, "HF TimeSformer")
    return params, model_config, input_config


def _per_channel(value: Any, name: str, path: Path) -> list[float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise UserError(f"{path}: {name}={value!r} does not have 3 channels")
    return values


def read_preprocessing(
    directory: str | Path, input_config: Mapping[str, int], num_classes: int
) -> dict[str, Any]:
    """Input pipeline settings; ``mean`` / ``std`` apply to pixels scaled to [0, 1].

    Defaults are the paper's (docs/method.md §3.8): short side 256/224 of the crop, mean 0.45,
    std 0.225, frame stride 32 (8 for a 174-class Something-Something v2 head). A processor
    config in the directory overrides the resize, crop and normalisation, as transformers
    would apply them (pixels ``p * rescale_factor``, then ``(x - image_mean) / image_std``).
    """
    image_size = int(input_config["image_size"])
    prep: dict[str, Any] = {
        "num_frames": int(input_config["num_frames"]),
        "stride": SSV2_STRIDE if num_classes == SSV2_CLASSES else DEFAULT_STRIDE,
        "min_resize": round(image_size * 256 / 224),
        "crop_size": image_size,
        "mean": list(DEFAULT_MEAN),
        "std": list(DEFAULT_STD),
    }
    found = read_processor_config(directory)
    if found is None:
        return prep
    path, cfg = found
    if cfg.get("do_resize", True) and "size" in cfg:
        size = cfg["size"]
        if isinstance(size, int):
            prep["min_resize"] = size
        elif isinstance(size, Mapping) and "shortest_edge" in size:
            prep["min_resize"] = int(size["shortest_edge"])
        else:
            raise UserError(f"{path}: only shortest-edge resizing is supported, got size={size}")
    crop = cfg.get("crop_size")
    if cfg.get("do_center_crop", True) and crop is not None:
        crop = crop if isinstance(crop, int) else crop.get("height")
        if crop != image_size:
            raise UserError(f"{path}: crop_size {crop} differs from the model's {image_size}")
    scale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
    if cfg.get("do_normalize", True):
        mean = _per_channel(cfg.get("image_mean", DEFAULT_MEAN), "image_mean", path)
        std = _per_channel(cfg.get("image_std", DEFAULT_STD), "image_std", path)
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    # (p scale - mean) / std == (p / 255 - mean / (255 scale)) / (std / (255 scale))
    prep["mean"] = [round(v / (255 * scale), 12) for v in mean]
    prep["std"] = [round(v / (255 * scale), 12) for v in std]
    return prep


def load_hf_timesformer(directory: str | Path) -> dict[str, Any]:
    """Load an HF ``TimesformerForVideoClassification`` checkpoint directory.

    Returns ``{'params', 'model', 'input', 'labels', 'preprocessing', 'class_splits'}``:
    the parameter tree, :class:`~vtm_jax.models.timesformer.TimeSformer`'s constructor
    arguments, ``{'num_frames', 'image_size'}``, class names from ``id2label`` (or None),
    :func:`read_preprocessing`'s settings and ``class_splits`` (None: one head).
    """
    hf_config, state = read_hf_directory(directory)
    params, model_config, input_config = convert_timesformer(state, hf_config)
    num_classes = model_config["num_classes"]
    return {
        "params": params,
        "model": model_config,
        "input": input_config,
        "labels": hf_labels(hf_config, num_classes),
        "preprocessing": read_preprocessing(directory, input_config, num_classes),
        "class_splits": None,
    }
