"""Pieces every converter shares: torch-to-Flax tensor layouts, labels, lazy torch import."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from vtm_jax.errors import UserError

CONVERT_EXTRA = "pip install 'vtm-jax[convert]'"

# hidden_act -> gelu_approximate. gelu_fast, gelu_new and gelu_pytorch_tanh are all the tanh
# approximation; "gelu" is the exact erf form.
GELU_APPROXIMATE = {"gelu_fast": True, "gelu_new": True, "gelu_pytorch_tanh": True, "gelu": False}

# How a torch tensor becomes a Flax leaf; the torch shape follows from the Flax shape.
IDENTITY, LINEAR, QKV_KERNEL, QKV_BIAS, OUT_KERNEL, CONV = (
    "identity",
    "linear",
    "qkv_kernel",
    "qkv_bias",
    "out_kernel",
    "conv",
)


def torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == LINEAR:
        return shape[::-1]
    if kind == QKV_KERNEL:
        return (shape[1] * shape[2], shape[0])
    if kind == QKV_BIAS:
        return (shape[0] * shape[1],)
    if kind == OUT_KERNEL:
        return (shape[2], shape[0] * shape[1])
    if kind == CONV:
        t, h, w, cin, cout = shape
        return (cout, cin, t, h, w)
    return shape


def to_flax(kind: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    source = array
    if kind in (LINEAR, QKV_KERNEL, OUT_KERNEL):
        array = array.T.reshape(shape)
    elif kind == QKV_BIAS:
        array = array.reshape(shape)
    elif kind == CONV:
        array = array.transpose(2, 3, 4, 1, 0)  # (out, in, t, h, w) -> (t, h, w, in, out)
    array = np.ascontiguousarray(array, dtype=np.float32)
    # Arrays from a live torch state dict share its memory: never hand those out.
    return array.copy() if np.may_share_memory(array, source) else array


def import_torch(what: str) -> Any:
    try:
        import torch
    except ImportError as error:
        raise UserError(f"{what} needs PyTorch: {CONVERT_EXTRA}") from error
    return torch


def torch_to_numpy(tensor: Any) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.numpy()


def as_float32(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, e.g. from model.state_dict()
        return torch_to_numpy(value)
    array = np.asarray(value)
    if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
        array = array.astype(np.float32, copy=False)
    return array


def hf_labels(hf_config: Mapping[str, Any], num_classes: int) -> list[str] | None:
    id2label = hf_config.get("id2label")
    if not id2label:
        return None
    try:
        by_index = {int(k): str(v) for k, v in id2label.items()}
    except (ValueError, AttributeError) as error:
        raise UserError(f"config.json id2label is not an index -> name map: {error}") from error
    if sorted(by_index) != list(range(num_classes)):
        raise UserError(f"config.json id2label does not index classes 0..{num_classes - 1}")
    return [by_index[i] for i in range(num_classes)]
