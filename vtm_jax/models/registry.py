"""The backbones by architecture name, and building one from a checkpoint record.

A backbone meets :class:`vtm_jax.models.base.Backbone`; adding one is its module, its
converter, and one line in :data:`ARCHITECTURES` (or :func:`register_backbone` from outside
the package). Everything backbone-specific is asked of the backbone, never written here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vtm_jax import plugins
from vtm_jax.errors import UserError
from vtm_jax.merging import MergingSettings, Support, check_supported
from vtm_jax.models.attention import AttentionFn, get_attention
from vtm_jax.models.base import BACKBONE_OPTIONS
from vtm_jax.models.layers import compute_dtype, dtype_name
from vtm_jax.models.motionformer import Motionformer
from vtm_jax.models.timesformer import TimeSformer
from vtm_jax.models.videomae import VideoMAE
from vtm_jax.models.vivit import ViViT
from vtm_jax.models.vivit_factorised import FactorisedDotProductViViT, FactorisedSelfAttentionViViT
from vtm_jax.models.vivit_fe import FactorisedEncoderViViT

if TYPE_CHECKING:  # read by duck typing: models sit below checkpoints
    from vtm_jax.checkpoints.record import ModelRecord

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "vivit": ViViT,
    "vivit_factorised_encoder": FactorisedEncoderViViT,
    "vivit_factorised_self_attention": FactorisedSelfAttentionViViT,
    "vivit_factorised_dot_product": FactorisedDotProductViViT,
    "videomae": VideoMAE,
    "timesformer": TimeSformer,
    "motionformer": Motionformer,
}

# What a backbone class must define besides __call__ (see base.Backbone).
_CONTRACT = (
    "token_plan",
    "analytic_macs",
    "merging_layers",
    "source_layout",
    "temporal_tables",
    "options",
)


def register_backbone(name: str, module: type[nn.Module], *, replace: bool = False) -> None:
    """Add a backbone under ``name`` (a checkpoint record's ``architecture``).

    ``module`` is a Flax module class meeting :class:`~vtm_jax.models.base.Backbone`; its
    fields are the record's ``model`` entries plus ``merging`` and ``attention_fn`` (and
    ``dtype``, if it can compute in another dtype than float32).
    Registering the same class twice is a no-op; another under a taken name needs
    ``replace=True``.
    """
    if not (isinstance(module, type) and issubclass(module, nn.Module)):
        raise TypeError(f"a backbone must be a Flax module class, not {module!r}")
    lacking = [attr for attr in _CONTRACT if not hasattr(module, attr)]
    fields = getattr(module, "__dataclass_fields__", {})
    lacking += [f for f in ("merging", "attention_fn") if f not in fields]
    if lacking:
        raise TypeError(f"{module.__name__} lacks {', '.join(lacking)} (see models.base.Backbone)")
    unknown = sorted(set(module.options) - set(BACKBONE_OPTIONS))
    if unknown:
        raise TypeError(f"{module.__name__}.options names unknown options {', '.join(unknown)}")
    plugins.check_name(ARCHITECTURES, name, module, replace=replace)
    ARCHITECTURES[name] = module


def merging_support(module: type[nn.Module]) -> Support:
    """What a backbone's blocks offer a mode (``merging_support``; by default per-frame
    sequences reducing after attention on the keys, the least a merging backbone offers)."""
    return getattr(module, "merging_support", Support("frame"))


def check_settings_apply(architecture: str, merging: MergingSettings) -> None:
    """A UserError for a mode the architecture cannot run or a backbone-only option it would
    ignore.

    Each backbone lists the options it reads (``options``); one set away from its default on
    a backbone that does not list it would silently do nothing.
    """
    supports = {name: merging_support(cls) for name, cls in ARCHITECTURES.items()}
    check_supported(merging, architecture, supports)
    defaults = MergingSettings()
    for option in BACKBONE_OPTIONS:
        if getattr(merging, option) == getattr(defaults, option):
            continue
        if option not in ARCHITECTURES[architecture].options:
            readers = [name for name, cls in ARCHITECTURES.items() if option in cls.options]
            raise UserError(f"{option} applies only to {', '.join(readers)}, not {architecture}")


def build_model(
    record: ModelRecord,
    merging: MergingSettings | None = None,
    attention_fn: AttentionFn | None = None,
    dtype: Any = None,
) -> nn.Module:
    """The Flax module a record describes, with the given merging settings and attention.

    ``record`` is a :class:`~vtm_jax.checkpoints.record.ModelRecord` or anything else with its
    ``architecture`` and ``model_kwargs()``. ``dtype``: what activations and matmuls compute
    in, a name of ``vtm_jax.models.layers.DTYPES`` (``float32``, ``bfloat16``) or that dtype;
    None: float32. Parameters stay float32 either way, so the same checkpoint serves both.
    """
    name = record.architecture
    if name not in ARCHITECTURES:
        raise UserError(f"unknown architecture {name!r}; valid: {', '.join(ARCHITECTURES)}")
    merging = merging or MergingSettings()
    check_settings_apply(name, merging)
    extra = _dtype_field(ARCHITECTURES[name], name, dtype)
    try:
        return ARCHITECTURES[name](
            **record.model_kwargs(),
            merging=merging,
            attention_fn=attention_fn or get_attention("auto"),
            **extra,
        )
    except TypeError as e:
        raise UserError(f"checkpoint model config does not fit {name}: {e}") from None


def _dtype_field(module: type[nn.Module], name: str, dtype: Any) -> dict[str, Any]:
    """``{"dtype": ...}`` for a backbone with that field; nothing for one without (a
    registered backbone may lack it), which then runs float32 only."""
    value = compute_dtype(dtype)
    if "dtype" in getattr(module, "__dataclass_fields__", {}):
        return {"dtype": value}
    if dtype_name(value) != "float32":
        raise UserError(f"backbone {name} has no dtype field: it computes in float32 only")
    return {}


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
