"""Scenic ViViT config files as they are: vtm-jax's defaults added, Scenic's fields read.

A Scenic config (``scenic/projects/vivit/configs/...``) runs unchanged through ``vtm-jax eval``
and ``vtm-jax bench``. :func:`vtm_jax.config.loading.load_config` reads one in two steps around the
command-line overrides:

1. :func:`add_defaults`, before the overrides: vtm-jax's own fields that the file lacks
   (``checkpoint``, ``results_path``, ``eval``, ``bench``, ``dataset_configs.data_dir`` ...)
   are added, and Scenic's data fields it leaves out get the defaults of Scenic's video
   loader, so ``--config.dataset_configs.data_dir=...`` overrides a field that exists.
   Scenic's ``checkpoint = True`` (its save-checkpoints switch) makes way for vtm-jax's
   checkpoint path.
2. :func:`finish`, after them: unsupported values are an error, ``zero_centering`` becomes
   vtm-jax's ``mean``/``std``, and every field vtm-jax does not read is listed once
   (:func:`ignored_fields`). A bare Scenic msgpack ``checkpoint`` is described by the config's
   model: :func:`vtm_jax.config.scenic_checkpoint.checkpoint_record` gives the record to load it with.

Training fields (``optimizer``, ``lr_configs``, ``init_from`` (the ImageNet initialisation),
``augmentation_params``, dropout rates ...) and Scenic's TFRecord locations (``base_dir``,
``tables``, ``examples_per_subset``) are such fields: vtm-jax evaluates with its own datasets
(``--config.dataset_name=synthetic|kinetics400|ssv2|epic_kitchens``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.config.blocks import bench_config, evaluation_config
from vtm_jax.data.preprocessing import PREPROCESSING_FIELDS
from vtm_jax.errors import UserError

SCENIC_VIVIT_MODELS = ("vivit_classification", "vivit_multihead_classification")
ATTENTION_TYPES = {
    "spacetime": "vivit",
    "factorized_encoder": "vivit_factorised_encoder",
    "factorized_self_attention_block": "vivit_factorised_self_attention",
    "factorized_dot_product_attention": "vivit_factorised_dot_product",
}
# Models 3 and 4: Scenic's ViViT has no class token for them, and model 3 needs its order.
FACTORISED_ATTENTION = ("factorized_self_attention_block", "factorized_dot_product_attention")
ATTENTION_ORDERS = ("time_space", "space_time")
CLASSIFIERS = ("token", "gap")
ENCODER_FIELDS = ("num_heads", "mlp_dim", "num_layers")

# Defaults of Scenic's video loader (vivit/data/video_tfrecord_dataset.py) for the fields vtm-jax
# reads; zero_centering (default True there) is added only where no mean/std is given.
LOADER_DEFAULTS: dict[str, Any] = {
    "num_frames": 32,
    "stride": 2,
    "min_resize": 256,
    "crop_size": 224,
    "num_test_clips": 1,
    "do_three_spatial_crops": False,
}

# Fields vtm-jax reads; a name ending in "." covers everything below it.
_TOP_USED = (
    "experiment_name",
    "model_name",
    "dataset_name",
    "model_dtype_str",
    "data_dtype_str",
    "multicrop_softmax_logits",
    "checkpoint",
    "results_path",
    "token_merging.",
    "eval.",
    "bench.",
)
_MODEL_USED = (
    "attention_config.type",
    "attention_config.spatial_only_baseline",
    "hidden_size",
    "patches.size",
    "temporal_encoding_config.method",
    "classifier",
    "representation_size",
    "return_prelogits",
    "return_preclassifier",
)
_DATA_USED = (
    "num_classes",
    "class_splits",
    *PREPROCESSING_FIELDS,
    "zero_centering",
    "num_test_clips",
    "do_three_spatial_crops",
    "test_batch_size",
    "data_dir",
    "manual_dir",
    "split",
    "test_split",
    "builder_options.",
)


# Top-level fields that a command reads besides those above (which eval and bench read).
_TRAIN_USED = (
    "rng_seed",
    "optimizer",
    "optimizer_configs.",
    "lr_configs.",
    "batch_size",
    "num_training_epochs",
    "num_training_steps",
    "max_grad_norm",
    "label_smoothing",
    "log_eval_steps",
    "checkpoint_steps",
    "training.",
    "demo.",  # kept in the exported record, where `vtm-jax demo` reads it
)
COMMAND_USED: dict[str, tuple[str, ...]] = {"train": _TRAIN_USED, "demo": ("demo.",)}

DTYPE_FIELDS = ("model_dtype_str", "data_dtype_str")
# Scenic's own ViViT defaults for the rates a config leaves out (vivit/model.py).
RATE_DEFAULTS = {
    "dropout_rate": 0.1,
    "attention_dropout_rate": 0.1,
    "stochastic_droplayer_rate": 0.0,
}


def is_scenic_vivit(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config`` is in Scenic's ViViT schema (``model_name`` vivit_classification)."""
    return config.get("model_name", "vivit_classification") in SCENIC_VIVIT_MODELS


def add_defaults(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Add vtm-jax's fields (and Scenic's loader defaults) that a Scenic ViViT ``config``
    lacks; in place. Returns the fields replaced, for the ignored-fields report."""
    notes = []
    if isinstance(config.get("checkpoint"), bool):
        notes.append(f"checkpoint={config.checkpoint} (Scenic's save-checkpoints switch)")
        del config["checkpoint"]
    for name in ("checkpoint", "results_path"):
        if name not in config:
            config[name] = config_dict.placeholder(str)
    if "eval" not in config:
        config.eval = evaluation_config()
    if "bench" not in config:
        config.bench = bench_config()
    if "dataset_configs" not in config:
        config.dataset_configs = ml_collections.ConfigDict()
    data = config.dataset_configs
    for name in ("data_dir", "manual_dir"):
        if name not in data:
            data[name] = config_dict.placeholder(str)
    if "split" not in data:
        data.split = data.get("test_split") or "test"
    if "builder_options" not in data:
        data.builder_options = config_dict.placeholder(dict)
    if "test_batch_size" not in data:
        data.test_batch_size = config_dict.placeholder(int)
    if "sampling" not in data:
        data.sampling = "stride"
    if "protocol" not in data:
        # A Scenic config file is evaluated with Scenic's own input pipeline (DMVR's sampling,
        # resize, crops and uint8 cast: vtm_jax/data/protocols.py).
        data.protocol = "scenic"
    for name, value in LOADER_DEFAULTS.items():
        if name not in data:
            data[name] = value
    has_mean = data.get("mean") is not None or data.get("std") is not None
    if "zero_centering" not in data and not has_mean:
        data.zero_centering = True
    for name in ("mean", "std"):
        if name not in data:
            data[name] = config_dict.placeholder(tuple)
    model = config.get("model")
    if isinstance(model, ml_collections.ConfigDict) and model.get("representation_size") is None:
        # Scenic writes None; a typed placeholder lets --config.model.representation_size=N work.
        if "representation_size" in model:
            del model["representation_size"]
        model.representation_size = config_dict.placeholder(int)
    return tuple(notes)


def finish(
    config: ml_collections.ConfigDict, notes: Sequence[str], *, command: str | None = None
) -> list[str]:
    """Check and translate a Scenic ViViT ``config`` after the overrides; returns the
    ignored-field report (``notes`` from :func:`add_defaults` first).

    ``command`` says which fields are read (:data:`COMMAND_USED`): ``train`` reads the
    training fields that evaluation ignores.
    """
    check_model(config)
    check_float32(config, DTYPE_FIELDS)
    data = config.dataset_configs
    if data.get("mean") is None and data.get("std") is None:
        if data.get("zero_centering") is not None:
            # Scenic's loader: pixels in [0, 1], then [-1, 1] with zero centring.
            data.mean = (0.5,) * 3 if data.zero_centering else (0.0,) * 3
            data.std = (0.5,) * 3 if data.zero_centering else (1.0,) * 3
    elif data.get("mean") is None or data.get("std") is None:
        raise UserError("dataset_configs.mean and dataset_configs.std go together")
    return [*notes, *ignored_fields(config, COMMAND_USED.get(command or "", ()))]


def check_model(config: ml_collections.ConfigDict) -> str:
    """A UserError for a Scenic ViViT setting vtm-jax does not implement; the architecture."""
    model = config.get("model")
    if not isinstance(model, ml_collections.ConfigDict):
        raise UserError("a Scenic ViViT config needs a model block")
    attention = model.get("attention_config") or {}
    kind = attention.get("type", "spacetime")
    if kind not in ATTENTION_TYPES:
        raise UserError(
            f"model.attention_config.type {kind!r} is not supported; valid: "
            f"{', '.join(ATTENTION_TYPES)}"
        )
    if attention.get("spatial_only_baseline", False):
        raise UserError("model.attention_config.spatial_only_baseline=True is not supported")
    method = (model.get("temporal_encoding_config") or {}).get("method", "3d_conv")
    if method != "3d_conv":
        raise UserError(
            f"model.temporal_encoding_config.method {method!r} is not supported; valid: 3d_conv"
        )
    classifier = model.get("classifier", "token")
    if classifier not in CLASSIFIERS:
        raise UserError(
            f"model.classifier {classifier!r} is not supported; valid: {', '.join(CLASSIFIERS)}"
        )
    if kind in FACTORISED_ATTENTION:
        check_factorised(kind, attention, model)
    for name in ("return_prelogits", "return_preclassifier"):
        if model.get(name, False):
            raise UserError(f"model.{name}=True is not supported: vtm-jax returns logits")
    size = (model.get("patches") or {}).get("size")
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 3
        or not all(isinstance(v, int) and v > 0 for v in size)
    ):
        raise UserError(
            f"model.patches.size must be 3 positive integers in Scenic's (h, w, t) order, "
            f"not {size!r}"
        )
    if config.get("model_name", "vivit_classification") == "vivit_multihead_classification":
        if not config.get("dataset_configs", {}).get("class_splits"):
            raise UserError("vivit_multihead_classification needs dataset_configs.class_splits")
    return ATTENTION_TYPES[kind]


def check_factorised(kind: str, attention: Any, model: ml_collections.ConfigDict) -> None:
    """What Scenic's ViViT requires of models 3 and 4: no class token, model 3's
    ``attention_order``, model 4's heads split evenly between time and space."""
    if model.get("classifier", "token") == "token":
        raise UserError(
            f"model.classifier 'token' is not available for attention type {kind} (Scenic's "
            "ViViT has no class token there); valid: gap"
        )
    if kind == "factorized_self_attention_block":
        order = attention.get("attention_order")
        if order not in ATTENTION_ORDERS:
            raise UserError(
                f"model.attention_config.attention_order must be one of "
                f"{', '.join(ATTENTION_ORDERS)} for {kind}, not {order!r}"
            )
    heads = model.get("num_heads")
    if kind == "factorized_dot_product_attention" and isinstance(heads, int) and heads % 2:
        raise UserError(
            f"model.num_heads must be even for {kind} (half the heads attend over time, half "
            f"over space), not {heads}"
        )


def check_float32(config: ml_collections.ConfigDict, names: Sequence[str] = DTYPE_FIELDS) -> None:
    """A UserError for a dtype field other than float32 (vtm-jax computes in float32)."""
    for name in names:
        value = config.get(name, "float32")
        if value != "float32":
            raise UserError(f"{name} {value!r} is not supported: vtm-jax runs float32")


def check_no_dropout(config: ml_collections.ConfigDict) -> None:
    """A UserError for a non-zero dropout, attention-dropout or drop-layer rate.

    vtm_jax's ViViT has no dropout, so a rate Scenic would apply (its defaults are 0.1, 0.1
    and 0 when the config leaves them out) is an error rather than silently off. Only
    training reads them: evaluation lists them as ignored fields.
    """
    model = config.get("model") or {}
    for name, default in RATE_DEFAULTS.items():
        rate = model.get(name, default)
        if rate:
            raise UserError(
                f"model.{name}={rate} is not supported: vtm_jax's ViViT has no dropout "
                f"(set it to 0; Scenic's default is {default})"
            )


def vivit_record(config: ml_collections.ConfigDict) -> ModelRecord:
    """The record (architecture, model kwargs, input) of a Scenic ViViT config.

    The class count comes from ``dataset_configs.num_classes``; an unsupported setting or a
    missing field is a UserError.
    """
    try:
        if not is_scenic_vivit(config):
            raise UserError(
                f"model_name {config.get('model_name')!r} is not a Scenic ViViT model; "
                f"valid: {', '.join(SCENIC_VIVIT_MODELS)}"
            )
        architecture = check_model(config)
        model = config.model
        h, w, t = model.patches.size  # Scenic orders patch sizes (h, w, t)
        data = config.dataset_configs
        common = {
            "num_classes": data.num_classes,
            "hidden_size": model.hidden_size,
            "patch_size": [t, h, w],
            "classifier": model.get("classifier", "token"),
            "representation_size": model.get("representation_size"),
        }
        if architecture == "vivit_factorised_encoder":
            sizes = {
                f"{part}_{field}": model[f"{part}_transformer"][field]
                for part in ("spatial", "temporal")
                for field in ("num_layers", "num_heads", "mlp_dim")
            }
        else:
            sizes = {field: model[field] for field in ENCODER_FIELDS}
        if architecture == "vivit_factorised_self_attention":
            sizes["attention_order"] = model.attention_config.attention_order
        return ModelRecord(
            architecture=architecture,
            model={**common, **sizes},
            num_frames=data.num_frames,
            image_size=data.crop_size,
        )
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # As vtm_jax.config.loading.record_from_config says it for vtm-jax's own schema.
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"config does not describe a model: {first}") from None


def ignored_fields(config: ml_collections.ConfigDict, also_used: Sequence[str] = ()) -> list[str]:
    """Fields of a Scenic ViViT config that vtm-jax does not read, whole blocks collapsed.

    ``also_used``: top-level fields the running command reads besides evaluation's.
    """
    model = config.get("model", {})
    kind = (model.get("attention_config") or {}).get("type", "spacetime")
    if kind == "factorized_encoder":
        sizes = tuple(
            f"{part}_transformer.{field}"
            for part in ("spatial", "temporal")
            for field in ENCODER_FIELDS
        )
    else:
        sizes = ENCODER_FIELDS
    if kind == "factorized_self_attention_block":
        sizes = (*sizes, "attention_config.attention_order")
    used = {
        "": _TOP_USED + tuple(also_used),
        "model.": _MODEL_USED + sizes,
        "dataset_configs.": _DATA_USED,
    }

    def is_used(path: str) -> bool:
        for prefix, names in used.items():
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            for name in names:
                if rest == name.rstrip(".") or (name.endswith(".") and rest.startswith(name)):
                    return True
        return False

    def collect(node: ml_collections.ConfigDict, prefix: str) -> tuple[list[str], bool]:
        """Ignored paths below ``node``, and whether nothing below it is used."""
        ignored: list[str] = []
        whole = True
        for key in node.keys():
            path = f"{prefix}{key}"
            value = node[key]
            if is_used(path):
                whole = False
            elif isinstance(value, ml_collections.ConfigDict) and len(value):
                inner, inner_whole = collect(value, path + ".")
                if inner_whole:
                    ignored.append(path)
                else:
                    ignored.extend(inner)
                    whole = False
            else:
                ignored.append(path)
        return ignored, whole

    return collect(config, "")[0]
