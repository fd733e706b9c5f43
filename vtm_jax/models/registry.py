"""Build a model from a checkpoint record (architecture name plus constructor arguments)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vtm_jax.attention import AttentionFn, get_attention
from vtm_jax.errors import UserError
from vtm_jax.models.motionformer import Motionformer
from vtm_jax.models.timesformer import TimeSformer
from vtm_jax.models.videomae import VideoMAE
from vtm_jax.models.vivit import ViViT
from vtm_jax.models.vivit_fe import FactorisedEncoderViViT
from vtm_jax.record import ModelRecord
from vtm_jax.reduction import ReductionSettings

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "vivit": ViViT,
    "vivit_factorised_encoder": FactorisedEncoderViViT,
    "videomae": VideoMAE,
    "timesformer": TimeSformer,
    "motionformer": Motionformer,
}


# Settings that only some backbones read; anywhere else they would be silently ignored.
ONLY_FOR: dict[str, tuple[Any, tuple[str, ...]]] = {
    "temporal_r": (0, ("vivit_factorised_encoder",)),
    "motionformer_groups": ("paper", ("motionformer",)),
    "motionformer_concat_keys": (False, ("motionformer",)),
    "size_weighted_pool": (False, ("vivit", "vivit_factorised_encoder", "videomae")),
}


def check_settings_apply(architecture: str, merging: ReductionSettings) -> None:
    """A UserError for a setting the architecture would ignore."""
    for field, (default, architectures) in ONLY_FOR.items():
        if getattr(merging, field) != default and architecture not in architectures:
            raise UserError(
                f"{field} applies only to {', '.join(architectures)}, not {architecture}"
            )


def build_model(
    record: ModelRecord,
    merging: ReductionSettings | None = None,
    attention_fn: AttentionFn | None = None,
) -> nn.Module:
    """The Flax module a record describes, with the given reduction settings and attention."""
    name = record.architecture
    if name not in ARCHITECTURES:
        raise UserError(f"unknown architecture {name!r}; valid: {', '.join(ARCHITECTURES)}")
    merging = merging or ReductionSettings()
    check_settings_apply(name, merging)
    try:
        return ARCHITECTURES[name](
            **record.model_kwargs(),
            merging=merging,
            attention_fn=attention_fn or get_attention("auto"),
        )
    except TypeError as e:
        raise UserError(f"checkpoint model config does not fit {name}: {e}") from None


def param_shapes(model: nn.Module, input_config: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Every parameter path (``a/b/c``) of ``model`` and its shape, for that input size.

    The model itself says (``jax.eval_shape`` of its ``init``: nothing is computed), so no
    converter or check writes the shapes out again.
    """
    size = input_config["image_size"]
    video = jax.ShapeDtypeStruct((1, input_config["num_frames"], size, size, 3), jnp.float32)
    return _flat_shapes(jax.eval_shape(model.init, jax.random.PRNGKey(0), video)["params"])


def architecture_param_shapes(
    architecture: str, model_config: Mapping[str, Any], input_config: Mapping[str, int]
) -> dict[str, tuple[int, ...]]:
    """:func:`param_shapes` of the model ``architecture`` builds from ``model_config``."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model_config.items()}
    return param_shapes(ARCHITECTURES[architecture](**kwargs), input_config)


def check_params_fit(
    model: nn.Module, params: Any, input_config: Mapping[str, int], *, where: str | None = None
) -> None:
    """A UserError naming every missing, unexpected or mis-shaped parameter of ``model``.

    ``where`` (e.g. a checkpoint path) leads the message of a mismatch.
    """
    expected = param_shapes(model, input_config)
    got = _flat_shapes(params)
    problems = []
    for label, keys in (
        ("missing", [k for k in expected if k not in got]),
        ("unexpected", [k for k in got if k not in expected]),
        (
            "mis-shaped",
            [
                f"{k} {got[k]} (expected {expected[k]})"
                for k in got
                if k in expected and got[k] != expected[k]
            ],
        ),
    ):
        if keys:
            problems.append(
                f"{label} {', '.join(keys[:5])}"
                + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            )
    if problems:
        lead = f"{where}: " if where else ""
        raise UserError(
            f"{lead}parameters do not fit {type(model).__name__}: {'; '.join(problems)}"
        )


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = traverse_util.flatten_dict(dict(tree), sep="/")
    return {path: tuple(np.shape(value)) for path, value in flat.items()}
