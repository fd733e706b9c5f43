"""HuggingFace VideoMAE classifiers (``VideoMAEForVideoClassification``) to vtm_jax's VideoMAE tree.

transformers 5 keeps VideoMAE's query and value biases as ``attention.attention.query.bias`` /
``value.bias`` in memory, but ``save_pretrained`` (and every hub checkpoint) writes them as the
original's ``q_bias`` / ``v_bias``; all other keys are the same in both. Either naming is
accepted, never a mix. Keys have no bias (in both). The position table is fixed and not stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from etils.epath import Path

from vtm_jax.checkpoints.convert.checkpoint_files import (
    hf_labels,
    hf_num_classes,
    read_hf_directory,
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
    check_keys,
    format_keys,
    map_tensors,
    model_shapes,
)
from vtm_jax.errors import UserError

# VideoMAEConfig's defaults: a config.json may leave out keys whose value equals them.
_HF_DEFAULTS: dict[str, Any] = {
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "num_frames": 16,
    "tubelet_size": 2,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "qv_bias": True,
    "use_mean_pooling": True,
}

# transformers' VideoMAE builds fc_norm as nn.LayerNorm(hidden_size): PyTorch's default epsilon,
# whatever the config says (the original model uses 1e-6 there).
HF_FC_NORM_EPS = 1e-5

# The paper's VideoMAE test pipeline (docs/method.md §3.8, its slowfast configs): 16 frames at
# stride 1 (K400, SSv2; EPIC-KITCHENS uses 2), short side TRAIN_JITTER_SCALES[0] = 256,
# centre crop 224, ImageNet mean / std on [0, 1] pixels.
DEFAULT_STRIDE = 1
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# The paper runs every VideoMAE experiment with TOME.PROP_ATTN False; MergingSettings
# defaults to True, so converted records carry this.
PAPER_TOKEN_MERGING: dict[str, Any] = {"mode": "none", "prop_attn": False}


_ATTN = "MultiHeadDotProductAttention_0"
_LAYER_PREFIX = "videomae.encoder.layer."
_COMMON_KEYS = {
    "videomae.embeddings.patch_embeddings.projection.weight": ("embedding/kernel", CONV),
    "videomae.embeddings.patch_embeddings.projection.bias": ("embedding/bias", IDENTITY),
    "fc_norm.weight": ("fc_norm/scale", IDENTITY),
    "fc_norm.bias": ("fc_norm/bias", IDENTITY),
    "classifier.weight": ("output_projection/kernel", LINEAR),
    "classifier.bias": ("output_projection/bias", IDENTITY),
}
_LAYER_KEYS = {
    "layernorm_before.weight": ("LayerNorm_0/scale", IDENTITY),
    "layernorm_before.bias": ("LayerNorm_0/bias", IDENTITY),
    "attention.attention.query.weight": (f"{_ATTN}/query/kernel", QKV_KERNEL),
    "attention.attention.key.weight": (f"{_ATTN}/key/kernel", QKV_KERNEL),
    "attention.attention.value.weight": (f"{_ATTN}/value/kernel", QKV_KERNEL),
    "attention.output.dense.weight": (f"{_ATTN}/out/kernel", OUT_KERNEL),
    "attention.output.dense.bias": (f"{_ATTN}/out/bias", IDENTITY),
    "layernorm_after.weight": ("LayerNorm_1/scale", IDENTITY),
    "layernorm_after.bias": ("LayerNorm_1/bias", IDENTITY),
    "intermediate.dense.weight": ("MlpBlock_0/Dense_0/kernel", LINEAR),
    "intermediate.dense.bias": ("MlpBlock_0/Dense_0/bias", IDENTITY),
    "output.dense.weight": ("MlpBlock_0/Dense_1/kernel", LINEAR),
    "output.dense.bias": ("MlpBlock_0/Dense_1/bias", IDENTITY),
}
# naming -> (query bias key, value bias key), relative to a layer
_BIAS_NAMINGS = {
    "disk": ("attention.attention.q_bias", "attention.attention.v_bias"),
    "memory": ("attention.attention.query.bias", "attention.attention.value.bias"),
}


def _pair(value: Any, name: str) -> int:
    """An int, or a square ``[a, a]``, from config.json."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise UserError(f"config.json {name}={value} is not square")
        value = value[0]
    if not isinstance(value, int) or value <= 0:
        raise UserError(f"config.json {name}={value!r} is not a positive int")
    return value


def _settings(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """Validated model and input settings from an HF VideoMAE config.json dict."""
    model_type = hf_config.get("model_type")
    if model_type not in (None, "videomae"):
        raise UserError(f"config.json is for model_type={model_type!r}, not 'videomae'")

    def get(key: str) -> Any:
        return hf_config.get(key, _HF_DEFAULTS[key])

    if get("hidden_act") != "gelu":
        raise UserError(
            f"config.json hidden_act={get('hidden_act')!r} is not supported; VideoMAE uses 'gelu'"
        )
    if get("use_mean_pooling") is not True:
        raise UserError(
            "config.json has use_mean_pooling=false; only mean pooling with fc_norm is supported"
        )
    if get("num_channels") != 3:
        raise UserError(f"config.json has num_channels={get('num_channels')}; only 3 is supported")
    hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    if heads <= 0 or hidden % heads:
        raise UserError(
            f"config.json hidden_size={hidden} is not a multiple of num_attention_heads={heads}"
        )
    patch = _pair(get("patch_size"), "patch_size")
    tubelet = _pair(get("tubelet_size"), "tubelet_size")
    return {
        "num_classes": hf_num_classes(hf_config),  # None: taken from the classifier weight
        "hidden_size": hidden,
        "num_heads": heads,
        "mlp_dim": int(get("intermediate_size")),
        "num_layers": int(get("num_hidden_layers")),
        "patch_size": (tubelet, patch, patch),
        "layer_norm_eps": float(get("layer_norm_eps")),
        "fc_norm_eps": HF_FC_NORM_EPS,
        "qv_bias": bool(get("qv_bias")),
        "num_frames": int(get("num_frames")),
        "image_size": _pair(get("image_size"), "image_size"),
    }


def _bias_naming(keys: list[str]) -> str:
    found = {
        naming: [k for k in keys if k.endswith(tuple(f".{s}" for s in suffixes))]
        for naming, suffixes in _BIAS_NAMINGS.items()
    }
    if found["disk"] and found["memory"]:
        raise UserError(
            f"mixed key namings: on-disk q_bias/v_bias (e.g. {found['disk'][0]}) and "
            f"transformers' in-memory names (e.g. {found['memory'][0]})"
        )
    return "memory" if found["memory"] else "disk"


def _check_is_classifier(keys: list[str]) -> None:
    """A clear error for a base model or a pre-training checkpoint (no classifier)."""
    if not any(k.startswith(("videomae.", "classifier.", "fc_norm.")) for k in keys):
        if any(k.startswith(("embeddings.", "encoder.layer.")) for k in keys):
            raise UserError(
                "no classifier head: this is a base VideoMAEModel checkpoint (keys without the "
                "'videomae.' prefix); convert a VideoMAEForVideoClassification checkpoint"
            )
        raise UserError(
            f"not a HuggingFace VideoMAE checkpoint; keys: {format_keys(keys) or 'none'}"
        )
    if any(k.startswith("decoder.") or k.startswith("encoder_to_decoder") for k in keys):
        raise UserError(
            "this is a VideoMAEForPreTraining checkpoint (decoder keys, no classifier); "
            "convert a VideoMAEForVideoClassification checkpoint"
        )


def _name_table(keys: list[str], num_layers: int, qv_bias: bool) -> dict[str, Target]:
    """Every HF key of a VideoMAE classifier, q/v biases in the naming ``keys`` use."""
    layer_keys = dict(_LAYER_KEYS)
    if qv_bias:
        q_bias, v_bias = _BIAS_NAMINGS[_bias_naming(keys)]
        layer_keys[q_bias] = (f"{_ATTN}/query/bias", QKV_BIAS)
        layer_keys[v_bias] = (f"{_ATTN}/value/bias", QKV_BIAS)
    table: dict[str, Target] = dict(_COMMON_KEYS)
    for i in range(num_layers):
        for suffix, (path, kind) in layer_keys.items():
            table[f"{_LAYER_PREFIX}{i}.{suffix}"] = (f"Transformer/encoderblock_{i}/{path}", kind)
    return table


def convert_videomae(
    state_dict: Mapping[str, Any], hf_config: Mapping[str, Any]
) -> tuple[Params, dict[str, Any], dict[str, int]]:
    """Map an HF VideoMAE classifier state dict (either naming) to vtm_jax's VideoMAE tree.

    Returns ``(params, model_config, input_config)``. Any unknown, missing or mis-shaped key
    is a UserError that names it. Without q/v biases (``qv_bias=false``) they are zeros.
    """
    settings = _settings(hf_config)
    qv_bias = settings.pop("qv_bias")
    keys = list(state_dict)
    _check_is_classifier(keys)
    table = _name_table(keys, settings["num_layers"], qv_bias)
    check_keys(keys, table, "HF VideoMAE")
    if settings["num_classes"] is None:
        settings["num_classes"] = int(state_dict["classifier.weight"].shape[0])
    model_config = {k: v for k, v in settings.items() if k not in ("num_frames", "image_size")}
    input_config = {"num_frames": settings["num_frames"], "image_size": settings["image_size"]}
    t, p, _ = model_config["patch_size"]
    if input_config["num_frames"] % t or input_config["image_size"] % p:
        raise UserError(
            f"config.json num_frames={input_config['num_frames']} / image_size="
            f"{input_config['image_size']} are not multiples of the tubelet {(t, p, p)}"
        )
    shapes = model_shapes("videomae", model_config, input_config)
    # Without q/v biases in the file, the model's query and value biases are zero.
    zeros = [
        f"Transformer/encoderblock_{i}/{_ATTN}/{name}/bias"
        for i in range(0 if qv_bias else model_config["num_layers"])
        for name in ("query", "value")
    ]
    params = map_tensors(state_dict, table, shapes, "HF VideoMAE", zeros=zeros)
    return params, model_config, input_config


def paper_preprocessing(input_config: Mapping[str, int]) -> dict[str, Any]:
    """The paper's VideoMAE test pipeline for this input size (docs/method.md §3.8)."""
    size = int(input_config["image_size"])
    return {
        "num_frames": int(input_config["num_frames"]),
        "stride": DEFAULT_STRIDE,
        "min_resize": round(size * 256 / 224),
        "crop_size": size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }


def load_hf_videomae(directory: str | Path) -> dict[str, Any]:
    """Load an HF VideoMAE classifier checkpoint directory.

    Returns ``{'params', 'model', 'input', 'labels', 'preprocessing', 'class_splits',
    'token_merging'}``: the parameter tree, :class:`VideoMAE`'s constructor arguments,
    ``{'num_frames', 'image_size'}``, class names from ``id2label`` (or None), the paper's
    preprocessing, ``None`` (one head), and the paper's merging defaults for VideoMAE
    (proportional attention off).
    """
    hf_config, state = read_hf_directory(directory)
    params, model_config, input_config = convert_videomae(state, hf_config)
    return {
        "params": params,
        "model": model_config,
        "input": input_config,
        "labels": hf_labels(hf_config, model_config["num_classes"]),
        "preprocessing": paper_preprocessing(input_config),
        "class_splits": None,
        "token_merging": dict(PAPER_TOKEN_MERGING),
    }
