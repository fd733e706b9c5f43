"""The optimiser and learning-rate schedule of a Scenic-style training config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections
import optax

from vtm_jax.errors import UserError

OPTIMIZERS = ("momentum", "adamw")


def learning_rate_schedule(lr: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Linear warm-up to ``base_learning_rate`` then cosine decay to ``end_learning_rate``."""
    base = float(lr.get("base_learning_rate", 0.1))
    warmup = int(lr.get("warmup_steps", 0))
    if not 0 <= warmup < total_steps:
        raise UserError(f"lr_configs.warmup_steps {warmup} must be in [0, {total_steps})")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=base,
        warmup_steps=warmup,
        decay_steps=total_steps,
        end_value=float(lr.get("end_learning_rate", 0.0)),
    )


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """Gradient clipping, then SGD with momentum (L2 weight decay) or AdamW (decoupled)."""
    name = config.get("optimizer", "momentum")
    options = dict(config.get("optimizer_configs", {}) or {})
    schedule = learning_rate_schedule(config.get("lr_configs", {}) or {}, total_steps)
    decay = float(options.get("weight_decay", 0.0))
    parts = []
    if config.get("max_grad_norm"):
        parts.append(optax.clip_by_global_norm(float(config.max_grad_norm)))
    if name == "momentum":
        if decay:
            parts.append(optax.add_decayed_weights(decay))
        parts.append(
            optax.sgd(schedule, momentum=float(options.get("momentum", 0.9)), nesterov=False)
        )
    elif name == "adamw":
        parts.append(
            optax.adamw(
                schedule,
                b1=float(options.get("beta1", 0.9)),
                b2=float(options.get("beta2", 0.999)),
                weight_decay=decay,
            )
        )
    else:
        raise UserError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    return optax.chain(*parts)


def learning_rate(config: ml_collections.ConfigDict, total_steps: int, step: int) -> float:
    """The schedule's value at ``step`` (for the log)."""
    return float(learning_rate_schedule(config.get("lr_configs", {}) or {}, total_steps)(step))
