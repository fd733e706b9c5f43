"""The one device path: a ``Mesh`` with a ``batch`` axis, its shardings, and jitted steps.

Evaluation, training and benchmarking all run here, on one CPU, on 8 fake CPU devices, on a GPU
or on a pod slice alike: parameters are replicated, batches are split over the ``batch`` axis,
and steps are ``jax.jit`` over those shardings. A step that needs explicit per-device work and
collectives (evaluation: each device draws its own random merging, then the counts are summed)
is a ``shard_map`` inside the jit (:func:`per_device_step`).

Two scopes of mesh: :func:`local_mesh` spans this process's devices (evaluation: processes
never wait on one another during a run, their results are gathered once at the end) and
:func:`global_mesh` spans every process's devices (benchmarks: one global batch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH = "batch"  # the mesh axis batches are split over

__all__ = [
    "BATCH",
    "batch_sharding",
    "global_batch",
    "global_mesh",
    "local_mesh",
    "per_device_step",
    "put_batch",
    "replicate",
    "replicated",
]


def local_mesh() -> Mesh:
    """This process's devices along ``batch``."""
    return Mesh(np.array(jax.local_devices()), (BATCH,))


def global_mesh() -> Mesh:
    """Every process's devices along ``batch``."""
    return Mesh(np.array(jax.devices()), (BATCH,))


def replicated(mesh: Mesh) -> NamedSharding:
    """One whole copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split over ``mesh``'s devices."""
    return NamedSharding(mesh, PartitionSpec(BATCH))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` (parameters, a train state) copied to every device of a local ``mesh``."""
    return jax.device_put(tree, replicated(mesh))


def put_batch(batch: Any, mesh: Mesh) -> Any:
    """A host batch (leading axis a multiple of the devices) split over a local ``mesh``."""
    return jax.device_put(batch, batch_sharding(mesh))


def global_batch(rows: np.ndarray, mesh: Mesh) -> jax.Array:
    """One global array from each process's own ``rows`` (the processes' rows in order)."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), rows)


def per_device_step(fn: Callable, mesh: Mesh, *, in_specs: tuple, out_specs: Any) -> Callable:
    """``fn`` run on each device's share (``shard_map``) inside one ``jax.jit``.

    ``in_specs`` / ``out_specs`` are ``PartitionSpec`` pytrees over ``mesh``'s ``batch`` axis:
    ``PartitionSpec()`` for what every device holds whole (parameters, ``psum``-ed counts),
    ``PartitionSpec("batch")`` for what is split (examples and per-example outputs).

    ``check_vma=False``: Pallas kernels (the TPU flash attention) declare no varying mesh axes
    for their outputs, which JAX's check refuses inside a ``shard_map``; the specs above hold
    by construction (whole outputs are ``psum``-ed), and ``tests/test_export_steps.py`` lowers
    the evaluation step with the kernel for a TPU.
    """
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return jax.jit(mapped)
