"""Pure steps over a train state: the initial state and one optimiser step.

The train state is a dict ``{"params", "opt_state", "step"}`` (orbax saves and restores it as
it is). The model, optimiser and settings are arguments: bind them with ``functools.partial``,
or take the step over a mesh from :func:`compiled_train_step`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from vtm_jax.runtime import mesh as device_mesh

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
    axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on ``batch`` (``inputs`` ``[B, T, S, S, 3]``, ``label`` ``[B]``).

    Random merging modes draw per step: the key is ``merge_seed`` folded with the step, so a
    resumed run draws what the uninterrupted one did. ``axis_name``: run on one device's share
    of the batch inside a ``shard_map``; the gradients, loss and accuracy are averaged over
    that axis, and each device of several draws its own random merging.
    """
    clips, labels = batch["inputs"], batch["label"]
    merge_rng = jax.random.fold_in(jax.random.PRNGKey(merge_seed), state["step"])
    if axis_name is not None and jax.lax.axis_size(axis_name) > 1:
        merge_rng = jax.random.fold_in(merge_rng, jax.lax.axis_index(axis_name))

    def loss_fn(params):
        logits = model.apply({"params": params}, clips, merge_rng=merge_rng)
        return cross_entropy(logits, labels, smoothing), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    accuracy = (logits.argmax(-1) == labels).mean()
    if axis_name is not None:  # equal shares: the mean of the means is the batch's
        grads, loss, accuracy = jax.lax.pmean((grads, loss, accuracy), axis_name)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    return new_state, {"loss": loss, "accuracy": accuracy}


def compiled_train_step(
    model: Any,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    smoothing: float,
    merge_seed: int,
) -> Callable:
    """:func:`train_step` over ``mesh``: the state whole on every device, the batch split.

    Each device runs the step on its share (``runtime.mesh.per_device_step``, a ``shard_map``)
    rather than leaving the partitioning to XLA, which cannot partition a Pallas kernel (the
    TPU flash attention): ``tests/test_export_steps.py`` lowers it for GPUs and TPUs.
    """
    fn = functools.partial(
        train_step,
        model=model,
        optimizer=optimizer,
        smoothing=smoothing,
        merge_seed=merge_seed,
        axis_name=device_mesh.BATCH,
    )
    whole, split = PartitionSpec(), PartitionSpec(device_mesh.BATCH)
    return device_mesh.per_device_step(fn, mesh, in_specs=(whole, split), out_specs=(whole, whole))
