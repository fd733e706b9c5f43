"""Experiment configs: ml_collections files with Scenic's schema, read as Scenic reads them.

``--config=path/to/file.py`` names a file whose ``get_config()`` returns a ConfigDict, and
``--config.some.field=value`` overrides a field, exactly as absl's config flags do in Scenic and
big_vision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections

from vtm_jax.errors import UserError


def load_config(args: Sequence[str]) -> ml_collections.ConfigDict:
    """Parse ``--config=FILE`` and ``--config.x=y`` arguments into a ConfigDict."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["vtm-jax", *args]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    try:
        flag_values(argv)
        config = flag_values.config
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
        raise UserError(f"bad config: {str(e).splitlines()[0]}") from None
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"cannot read config: {e}") from None
    if config is None:
        raise UserError("no --config=FILE given")
    return config


def vivit_from_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The checkpoint record (architecture, model kwargs, input) a Scenic ViViT config describes."""
    model = config.model
    kind = model.get("attention_config", {}).get("type", "spacetime")
    if kind != "spacetime":
        raise UserError(f"attention_config.type {kind!r} is not supported yet; valid: spacetime")
    method = model.get("temporal_encoding_config", {}).get("method", "3d_conv")
    if method != "3d_conv":
        raise UserError(
            f"temporal_encoding_config.method {method!r} is not supported; valid: 3d_conv"
        )
    h, w, t = model.patches.size  # Scenic orders patch sizes (h, w, t)
    data = config.dataset_configs
    return {
        "architecture": "vivit",
        "model": {
            "num_classes": data.num_classes,
            "hidden_size": model.hidden_size,
            "num_heads": model.num_heads,
            "mlp_dim": model.mlp_dim,
            "num_layers": model.num_layers,
            "patch_size": [t, h, w],
            "classifier": model.get("classifier", "token"),
            "representation_size": model.get("representation_size"),
        },
        "input": {"num_frames": data.num_frames, "image_size": data.crop_size},
    }
