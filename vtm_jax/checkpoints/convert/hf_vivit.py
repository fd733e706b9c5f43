"""HuggingFace ViViT checkpoints (``VivitForVideoClassification``) to the Scenic ViViT tree.

transformers 5 names the weights one way in memory (``vivit.layers.N.attention.q_proj``,
``mlp.fc1``) and another on disk (``vivit.encoder.layer.N.attention.attention.query``,
``intermediate.dense``); hub checkpoints use the on-disk names. Both are accepted, never mixed.
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
    CONV,
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
from vtm_jax.checkpoints.convert.scenic import num_tokens, vivit_preprocessing
from vtm_jax.errors import UserError

# VivitConfig's defaults: save_pretrained may leave out keys whose value equals them.
_HF_DEFAULTS: dict[str, Any] = {
    "image_size": 224,
    "num_frames": 32,
    "tubelet_size": [2, 16, 16],
    "num_channels": 3,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu_fast",
    "layer_norm_eps": 1e-6,
    "qkv_bias": True,
}


# VivitImageProcessor's normalisation where a processor config leaves it out.
DEFAULT_MEAN = [0.5, 0.5, 0.5]
DEFAULT_STD = [0.5, 0.5, 0.5]


_ATTN = "MultiHeadDotProductAttention_0"
_COMMON_KEYS = {
    "vivit.embeddings.cls_token": ("cls", IDENTITY),
    "vivit.embeddings.position_embeddings": ("Transformer/posembed_input/pos_embedding", IDENTITY),
    "vivit.embeddings.patch_embeddings.projection.weight": ("embedding/kernel", CONV),
    "vivit.embeddings.patch_embeddings.projection.bias": ("embedding/bias", IDENTITY),
    "vivit.layernorm.weight": ("Transformer/encoder_norm/scale", IDENTITY),
    "vivit.layernorm.bias": ("Transformer/encoder_norm/bias", IDENTITY),
    "classifier.weight": ("output_projection/kernel", LINEAR),
    "classifier.bias": ("output_projection/bias", IDENTITY),
}
_LAYER_NORMS = {
    "layernorm_before.weight": ("LayerNorm_0/scale", IDENTITY),
    "layernorm_before.bias": ("LayerNorm_0/bias", IDENTITY),
    "layernorm_after.weight": ("LayerNorm_1/scale", IDENTITY),
    "layernorm_after.bias": ("LayerNorm_1/bias", IDENTITY),
}


def _layer_keys(q: str, k: str, v: str, o: str, fc1: str, fc2: str) -> dict[str, tuple[str, str]]:
    keys = dict(_LAYER_NORMS)
    for hf, scenic in ((q, "query"), (k, "key"), (v, "value")):
        keys[f"{hf}.weight"] = (f"{_ATTN}/{scenic}/kernel", QKV_KERNEL)
        keys[f"{hf}.bias"] = (f"{_ATTN}/{scenic}/bias", QKV_BIAS)
    keys[f"{o}.weight"] = (f"{_ATTN}/out/kernel", OUT_KERNEL)
    keys[f"{o}.bias"] = (f"{_ATTN}/out/bias", IDENTITY)
    keys[f"{fc1}.weight"] = ("MlpBlock_0/Dense_0/kernel", LINEAR)
    keys[f"{fc1}.bias"] = ("MlpBlock_0/Dense_0/bias", IDENTITY)
    keys[f"{fc2}.weight"] = ("MlpBlock_0/Dense_1/kernel", LINEAR)
    keys[f"{fc2}.bias"] = ("MlpBlock_0/Dense_1/bias", IDENTITY)
    return keys


# naming -> (layer prefix, per-layer key suffixes)
_NAMINGS = {
    "disk": (
        "vivit.encoder.layer.",
        _layer_keys(
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ),
    ),
    "memory": (
        "vivit.layers.",
        _layer_keys(
            "attention.q_proj",
            "attention.k_proj",
            "attention.v_proj",
            "attention.o_proj",
            "mlp.fc1",
            "mlp.fc2",
        ),
    ),
}


# ---------------------------------------------------------------------------------------------
# Converting


def _settings(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """Validated model and input settings from an HF ViViT config.json dict."""
    model_type = hf_config.get("model_type", "vivit")
    if model_type != "vivit":
        raise UserError(f"config.json has model_type={model_type!r}, not 'vivit'")

    def get(key: str) -> Any:
        return hf_config.get(key, _HF_DEFAULTS[key])

    hidden_act = get("hidden_act")
    if hidden_act not in GELU_APPROXIMATE:
        raise UserError(
            f"config.json hidden_act={hidden_act!r} is not supported; "
            f"expected one of {', '.join(sorted(GELU_APPROXIMATE))}"
        )
    if get("qkv_bias") is not True:
        raise UserError("config.json has qkv_bias=false; only ViViT with q/k/v biases is supported")
    if get("num_channels") != 3:
        raise UserError(f"config.json has num_channels={get('num_channels')}; only 3 is supported")
    image_size = get("image_size")
    if isinstance(image_size, (list, tuple)):
        if len(image_size) != 2 or image_size[0] != image_size[1]:
            raise UserError(f"config.json image_size={image_size} is not square")
        image_size = image_size[0]
    tubelet = get("tubelet_size")
    if not isinstance(tubelet, (list, tuple)) or len(tubelet) != 3:
        raise UserError(f"config.json tubelet_size={tubelet!r} is not [t, h, w]")
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
        "patch_size": tuple(int(x) for x in tubelet),
        "classifier": "token",
        "representation_size": None,
        "layer_norm_eps": float(get("layer_norm_eps")),
        "gelu_approximate": GELU_APPROXIMATE[hidden_act],
        "num_frames": int(get("num_frames")),
        "image_size": int(image_size),
    }


def _detect_naming(keys: list[str]) -> str:
    disk = [k for k in keys if k.startswith(_NAMINGS["disk"][0])]
    memory = [k for k in keys if k.startswith(_NAMINGS["memory"][0])]
    if disk and memory:
        raise UserError(
            "mixed key namings: on-disk names (e.g. "
            f"{disk[0]}) and transformers' in-memory names (e.g. {memory[0]})"
        )
    if memory:
        return "memory"
    if any(k.startswith(("vivit.", "classifier.")) for k in keys):
        return "disk"
    if any(k.startswith(("embeddings.", "encoder.layer.", "layers.")) for k in keys):
        raise UserError(
            "no classifier head: this is a base VivitModel checkpoint (keys without the "
            "'vivit.' prefix); convert a VivitForVideoClassification checkpoint"
        )
    raise UserError(f"not a HuggingFace ViViT checkpoint; keys: {format_keys(keys) or 'none'}")


def _name_table(keys: list[str], num_layers: int) -> dict[str, Target]:
    """Every HF key of a ViViT with ``num_layers`` layers, in the naming ``keys`` use."""
    prefix, layer_keys = _NAMINGS[_detect_naming(keys)]
    table: dict[str, Target] = dict(_COMMON_KEYS)
    for i in range(num_layers):
        for suffix, (path, kind) in layer_keys.items():
            table[f"{prefix}{i}.{suffix}"] = (f"Transformer/encoderblock_{i}/{path}", kind)
    return table


def convert_vivit(
    state_dict: Mapping[str, Any], hf_config: Mapping[str, Any]
) -> tuple[Params, dict[str, Any], dict[str, int]]:
    """Map an HF ViViT state dict (either naming) to the Scenic tree.

    Returns ``(params, model_config, input_config)``. Any unknown, missing or mis-shaped key
    is a UserError that names it.
    """
    settings = _settings(hf_config)
    keys = list(state_dict)
    table = _name_table(keys, settings["num_layers"])
    if not any(k.startswith("classifier.") for k in keys):
        raise UserError(
            "no classifier head (no classifier.weight / classifier.bias): convert a "
            "VivitForVideoClassification checkpoint"
        )
    check_keys(keys, table, "HF ViViT")
    if settings["num_classes"] is None:
        settings["num_classes"] = int(np.shape(state_dict["classifier.weight"])[0])
    model_config = {k: v for k, v in settings.items() if k not in ("num_frames", "image_size")}
    input_config = {"num_frames": settings["num_frames"], "image_size": settings["image_size"]}
    # A clear error for an input the tubelet cannot cut, before the model is asked its shapes.
    num_tokens(**input_config, patch_size=model_config["patch_size"], classifier="token")
    shapes = model_shapes("vivit", model_config, input_config)
    return map_tensors(state_dict, table, shapes, "HF ViViT"), model_config, input_config


# ---------------------------------------------------------------------------------------------
# Labels and preprocessing


def _per_channel(value: Any, name: str) -> list[float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise UserError(f"preprocessor {name}={value!r} does not have 3 channels")
    return values


def _square_size(value: Any, name: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping) and "height" in value and value["height"] == value.get("width"):
        return int(value["height"])
    raise UserError(f"preprocessor {name}={value!r} is not a square size")


def read_preprocessing(directory: str | Path, input_config: Mapping[str, int]) -> dict[str, Any]:
    """Input pipeline settings: ``mean`` / ``std`` apply to pixels scaled to [0, 1].

    Without a processor config these are Scenic's ViViT settings. With one, they reproduce
    what transformers' VivitImageProcessor computes from it: rescale ``p * rescale_factor``,
    minus 1 when ``offset``, then ``(x - image_mean) / image_std`` when ``do_normalize``.
    Note that this double normalisation with the processor's own defaults gives [-3, 1], not
    the [-1, 1] Scenic trained on; it is kept as written, so outputs match transformers.
    """
    image_size = int(input_config["image_size"])
    prep = vivit_preprocessing(int(input_config["num_frames"]), image_size)
    found = read_processor_config(directory)
    if found is None:
        return prep
    path, cfg = found
    name = path.name

    if cfg.get("do_resize", True):
        size = cfg.get("size", {"shortest_edge": 256})
        if isinstance(size, int):
            prep["min_resize"] = size
        elif isinstance(size, Mapping) and "shortest_edge" in size:
            prep["min_resize"] = int(size["shortest_edge"])
        else:
            raise UserError(f"{path}: only shortest-edge resizing is supported, got size={size}")
    if cfg.get("do_center_crop", True):
        crop = _square_size(cfg.get("crop_size", {"height": 224, "width": 224}), "crop_size")
        if crop != image_size:
            raise UserError(
                f"{path}: crop_size {crop} differs from the model's image_size {image_size}"
            )
        prep["crop_size"] = crop

    # Express transformers' affine map of raw pixels p in [0, 255] as (p / 255 - mean) / std.
    do_rescale = cfg.get("do_rescale", True)
    scale = float(cfg.get("rescale_factor", 1 / 127.5)) if do_rescale else 1.0
    # The video processor always offsets when it rescales; the image processor reads `offset`.
    offset = 1.0 if do_rescale and (name.startswith("video") or cfg.get("offset", True)) else 0.0
    if cfg.get("do_normalize", True):
        mean = _per_channel(cfg.get("image_mean", DEFAULT_MEAN), "image_mean")
        std = _per_channel(cfg.get("image_std", DEFAULT_STD), "image_std")
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    prep["mean"] = [round((offset + m) / (255 * scale), 12) for m in mean]
    prep["std"] = [round(s / (255 * scale), 12) for s in std]
    return prep


def load_hf_vivit(directory: str | Path) -> dict[str, Any]:
    """Load an HF ViViT checkpoint directory.

    Returns ``{'params', 'model', 'input', 'labels', 'preprocessing'}``: the Scenic tree,
    the model config, ``{'num_frames', 'image_size'}``, class names from ``id2label`` (or
    None) and :func:`read_preprocessing`'s settings.
    """
    hf_config, state = read_hf_directory(directory)
    params, model_config, input_config = convert_vivit(state, hf_config)
    return {
        "params": params,
        "model": model_config,
        "input": input_config,
        "labels": hf_labels(hf_config, model_config["num_classes"]),
        "preprocessing": read_preprocessing(directory, input_config),
    }
