"""Pure steps over a train state: the initial state and one optimiser step.

The train state is a dict ``{"params", "opt_state", "step"}`` (orbax saves and restores it as
it is). The model, optimiser and settings are arguments: bind them with ``functools.partial``
and ``jax.jit`` the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

TrainState = dict[str, Any]


def init_state(
    model: Any, optimizer: optax.GradientTransformation, seed: int, clip_shape: Sequence[int]
) -> TrainState:
    """Fresh parameters (``model.init`` on a zero clip) and optimiser state at step 0."""
    clip = jnp.zeros((1, *clip_shape), jnp.float32)
    params = model.init(jax.random.PRNGKey(seed), clip)["params"]
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    """Mean softmax cross-entropy against (optionally smoothed) one-hot labels."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: Any,
    optimizer: optax.GradientTransformation,
    smoothing: float,
    merge_seed: int,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on ``batch`` (``inputs`` ``[B, T, S, S, 3]``, ``label`` ``[B]``).

    Random merging modes draw per step: the key is ``merge_seed`` folded with the step, so a
    resumed run draws what the uninterrupted one did.
    """
    clips, labels = batch["inputs"], batch["label"]
    merge_rng = jax.random.fold_in(jax.random.PRNGKey(merge_seed), state["step"])

    def loss_fn(params):
        logits = model.apply({"params": params}, clips, merge_rng=merge_rng)
        return cross_entropy(logits, labels, smoothing), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    accuracy = (logits.argmax(-1) == labels).mean()
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    return new_state, {"loss": loss, "accuracy": accuracy}
