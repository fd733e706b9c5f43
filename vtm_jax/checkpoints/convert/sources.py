"""One entry point for every weight format ``vtm-jax convert`` reads.

``hf`` (HuggingFace directories), ``scenic`` (msgpack), ``motionformer`` (original
Motionformer ``.pyth``), ``slowfast`` (any SlowFast-format ``.pyth`` of the paper's code or the
releases it starts from: ViViT, VideoMAE, TimeSformer, Motionformer, told apart by their keys)
and ``videomae`` (MCG-NJU's fine-tuned VideoMAE ``.pth``); see :mod:`vtm_jax.checkpoints.convert.slowfast`.

Each source's reader gives the same dict: ``architecture``, ``params`` (Scenic-style tree of
numpy arrays), ``model`` (constructor arguments), ``input``, ``preprocessing``, ``labels`` and
``class_splits`` (EPIC-KITCHENS verb/noun heads stored as one concatenated head), and maybe
``token_merging``; :func:`load_source` returns its parameters and its
:class:`~vtm_jax.checkpoints.record.ModelRecord` (:func:`record_from_converted`).
"""

from __future__ import annotations

import json
from typing import Any

from vtm_jax import paths
from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.errors import UserError

SOURCES = ("hf", "scenic", "motionformer", "slowfast", "videomae")
# Sources whose files do not say their input size or head count: the command line may.
_TAKES_OVERRIDES = {
    "scenic": ("num_frames", "image_size"),
    "motionformer": ("num_frames", "image_size", "num_heads"),
    "slowfast": ("num_frames", "image_size", "num_heads"),
    "videomae": ("num_frames", "image_size", "num_heads"),
}


def scenic_preprocessing(num_frames: int, image_size: int) -> dict[str, Any]:
    """Scenic's ViViT input, read as Scenic's DMVR pipeline reads it."""
    from vtm_jax.checkpoints.convert.scenic import vivit_preprocessing

    return {
        **vivit_preprocessing(num_frames, image_size),
        "protocol": "scenic",  # DMVR's sampling, resize and crops (vtm_jax/data/protocols.py)
    }


def record_from_converted(converted: dict[str, Any]) -> ModelRecord:
    """The checkpoint record of a reader's dict (its ``params`` aside); a reader that stores
    no merging settings gets none (``mode`` ``none``)."""
    return ModelRecord(
        architecture=converted["architecture"],
        model=converted["model"],
        num_frames=converted["input"]["num_frames"],
        image_size=converted["input"]["image_size"],
        preprocessing=converted["preprocessing"],
        labels=converted["labels"],
        class_splits=converted.get("class_splits"),
        token_merging=converted.get("token_merging", {"mode": "none"}),
    )


def _load_hf(path: str) -> dict[str, Any]:
    config_path = paths.join(path, "config.json")
    if not paths.is_file(config_path):
        raise UserError(f"{path} is not a HuggingFace model directory (no config.json)")
    with paths.open_file(config_path) as f:
        try:
            model_type = json.load(f).get("model_type")
        except (json.JSONDecodeError, AttributeError) as e:
            raise UserError(f"{config_path} is not a JSON object: {e}") from None
    loaders = {
        "vivit": ("vtm_jax.checkpoints.convert.hf_vivit", "load_hf_vivit", "vivit"),
        "videomae": ("vtm_jax.checkpoints.convert.hf_videomae", "load_hf_videomae", "videomae"),
        "timesformer": (
            "vtm_jax.checkpoints.convert.hf_timesformer",
            "load_hf_timesformer",
            "timesformer",
        ),
    }
    if model_type not in loaders:
        raise UserError(
            f"HuggingFace model_type {model_type!r} is not supported; valid: {', '.join(loaders)}"
        )
    module, function, architecture = loaders[model_type]
    import importlib

    converted = getattr(importlib.import_module(module), function)(path)
    return {"architecture": architecture, "class_splits": None, **converted}


def _load_scenic(path: str, num_frames: int, image_size: int) -> dict[str, Any]:
    from vtm_jax.checkpoints.convert import scenic

    params = scenic.read_scenic_checkpoint(path)
    if "SpatialTransformer" in params:
        architecture = "vivit_factorised_encoder"
        model, input_config = scenic.factorised_config_from_params(params)
    else:
        architecture = "vivit"
        model, input_config = scenic.vivit_config_from_params(
            params, num_frames=num_frames, image_size=image_size
        )
    return {
        "architecture": architecture,
        "params": params,
        "model": model,
        "input": input_config,
        "labels": None,
        "class_splits": None,
        "preprocessing": scenic_preprocessing(
            input_config["num_frames"], input_config["image_size"]
        ),
    }


def _check_overrides(source: str, given: dict[str, int | None]) -> None:
    """A flag the source would ignore is an error, never silently dropped."""
    takes = _TAKES_OVERRIDES.get(source, ())
    ignored = [k for k, v in given.items() if v is not None and k not in takes]
    if ignored:
        flags = ", ".join("--" + k.replace("_", "-") for k in ignored)
        raise UserError(f"{flags} not used by --source {source}: its files say")
    for name, value in given.items():
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, not {value}")


def load_source(
    source: str,
    path: str,
    *,
    num_frames: int | None = None,
    image_size: int | None = None,
    num_heads: int | None = None,
) -> tuple[Any, ModelRecord]:
    """Read weights in ``source`` format and check that they fit the model they describe;
    returns ``(params, record)``.

    ``num_frames`` / ``image_size`` / ``num_heads``: what the command line says (None: the
    file's cfg, else the model's usual); a source whose files say them refuses them.
    """
    from vtm_jax.models.registry import build_model, check_params_fit

    if source not in SOURCES:
        raise UserError(f"unknown source {source!r}; valid: {', '.join(SOURCES)}")
    if source == "hf" and not paths.exists(path):
        from vtm_jax.checkpoints.convert.hub import cached_snapshot, looks_like_repo_id

        if looks_like_repo_id(path):  # a Hub repo id: its snapshot in the local cache
            path = cached_snapshot(path)
    if not paths.exists(path):  # local, or remote (gs://...) read through epath
        raise UserError(f"no such file or directory: {path}")
    given = {"num_frames": num_frames, "image_size": image_size, "num_heads": num_heads}
    _check_overrides(source, given)
    if source == "hf":
        converted = _load_hf(path)
    elif source == "scenic":
        converted = _load_scenic(path, num_frames or 32, image_size or 224)
    elif source == "motionformer":
        from vtm_jax.checkpoints.convert.motionformer import load_motionformer

        converted = {"architecture": "motionformer", **load_motionformer(path, **given)}
    else:
        from vtm_jax.checkpoints.convert.slowfast import ARCHITECTURES, Overrides, load_slowfast

        accepted = ("videomae",) if source == "videomae" else ARCHITECTURES
        converted = load_slowfast(path, architectures=accepted, overrides=Overrides(**given))
    record = record_from_converted(converted)
    check_params_fit(build_model(record), converted["params"], record.input)
    return converted["params"], record
