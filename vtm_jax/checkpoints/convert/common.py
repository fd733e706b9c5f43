"""Pieces every converter shares: the name and layout machinery.

A converter maps *names*: a table from each checkpoint key to the Flax leaf (or leaves) it
fills and the layout that turns one into the other (:func:`map_tensors`). Shapes are never
written out by hand: the model says what it expects (``registry.architecture_param_shapes``,
``jax.eval_shape`` of its ``init``), and a checkpoint tensor is checked against that, named
the checkpoint's way. Also here: the key checks (:func:`check_keys`), torch tensors as float32
numpy, ViT's usual head counts, joining two classifier heads, and :class:`KeyMap`, which
renames keys between two layouts. Reading the files themselves is
:mod:`vtm_jax.checkpoints.convert.checkpoint_files`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from vtm_jax.errors import UserError

Params = dict[str, Any]

# hidden_act -> gelu_approximate. gelu_fast, gelu_new and gelu_pytorch_tanh are all the tanh
# approximation; "gelu" is the exact erf form.
GELU_APPROXIMATE = {"gelu_fast": True, "gelu_new": True, "gelu_pytorch_tanh": True, "gelu": False}

# How a torch tensor becomes a Flax leaf (its layout); the torch shape follows from the Flax
# shape. QKV_KERNEL: a Linear weight ``[H d, D]`` to ``(D, H, d)``, or to any ``(D, ...)``
# (Motionformer's ``proj_kv``: ``(D, 2, H, d)``); QKV_BIAS: a flat bias to ``(H, d)`` or any
# shape; CONV: a 3-D conv ``(out, in, t, h, w)``; CONV2D: a 2-D conv ``(out, in, h, w)``.
IDENTITY, LINEAR, QKV_KERNEL, QKV_BIAS, OUT_KERNEL, CONV, CONV2D = (
    "identity",
    "linear",
    "qkv_kernel",
    "qkv_bias",
    "out_kernel",
    "conv",
    "conv2d",
)


def torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of a tensor that becomes a Flax leaf of ``shape`` under ``kind``."""
    if kind == LINEAR:
        return shape[::-1]
    if kind == QKV_KERNEL:
        return (int(np.prod(shape[1:])), shape[0])
    if kind == QKV_BIAS:
        return (int(np.prod(shape)),)
    if kind == OUT_KERNEL:
        return (shape[-1], int(np.prod(shape[:-1])))
    if kind == CONV:
        t, h, w, cin, cout = shape
        return (cout, cin, t, h, w)
    if kind == CONV2D:
        h, w, cin, cout = shape
        return (cout, cin, h, w)
    return shape


def to_flax(kind: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A torch tensor (as numpy) laid out as the Flax leaf of ``shape``: a fresh float32 copy."""
    source = array
    if kind in (LINEAR, QKV_KERNEL, OUT_KERNEL):
        array = array.T.reshape(shape)
    elif kind == QKV_BIAS:
        array = array.reshape(shape)
    elif kind == CONV:
        array = array.transpose(2, 3, 4, 1, 0)  # (out, in, t, h, w) -> (t, h, w, in, out)
    elif kind == CONV2D:
        array = array.transpose(2, 3, 1, 0)  # (out, in, h, w) -> (h, w, in, out)
    array = np.ascontiguousarray(array, dtype=np.float32)
    # Arrays from a live torch state dict share its memory: never hand those out.
    return array.copy() if np.may_share_memory(array, source) else array


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


# ---------------------------------------------------------------------------------------------
# Name tables: checkpoint key -> Flax leaf (or leaves) and layout

# One checkpoint key's target: a Flax path, or several for a fused tensor (a ``qkv`` weight
# whose rows are the query, key and value projections in turn), and the layout of each part.
Target = tuple[str | tuple[str, ...], str]


def format_keys(keys: Iterable[str], limit: int = 5) -> str:
    """``a, b, c`` or ``a, b, c, d, e and 7 more (12 in all)``: for one-line error messages."""
    keys = list(keys)
    shown = ", ".join(str(k) for k in keys[:limit])
    if len(keys) > limit:
        return f"{shown} and {len(keys) - limit} more ({len(keys)} in all)"
    return shown


def check_keys(
    keys: Iterable[str], expected: Iterable[str], what: str, *, optional: Iterable[str] = ()
) -> None:
    """A UserError naming every unknown and every missing key of a ``what`` checkpoint."""
    keys, expected = list(keys), list(expected)
    known = set(expected) | set(optional)
    present = set(keys)
    unknown = [k for k in keys if k not in known]
    missing = [k for k in expected if k not in present]
    if unknown or missing:
        parts = [f"unknown {format_keys(unknown)}"] if unknown else []
        parts += [f"missing {format_keys(missing)}"] if missing else []
        raise UserError(f"{what} checkpoint keys do not match: {'; '.join(parts)}")


def _paths(target: Target) -> tuple[str, ...]:
    paths = target[0]
    return (paths,) if isinstance(paths, str) else paths


def map_tensors(
    state: Mapping[str, Any],
    table: Mapping[str, Target],
    shapes: Mapping[str, tuple[int, ...]],
    what: str,
    *,
    zeros: Iterable[str] = (),
) -> Params:
    """The Flax tree ``table`` makes of ``state``: every key checked, then laid out.

    ``shapes`` are the model's own (``registry.architecture_param_shapes``); a tensor whose
    shape does not give its leaf's is named with its torch shape and the one expected.
    ``zeros``: leaves the checkpoint does not store that are zero (VideoMAE without q/v
    biases). Every key of ``state`` must be in ``table`` and the reverse.
    """
    check_keys(state, table, what)
    arrays = {k: as_float32(state[k]) for k in table}
    mis_shaped = []
    for key, target in table.items():
        parts = [torch_shape(target[1], shapes[p]) for p in _paths(target)]
        want = parts[0] if len(parts) == 1 else (sum(p[0] for p in parts), *parts[0][1:])
        if arrays[key].shape != want:
            mis_shaped.append(f"{key} {arrays[key].shape} (expected {want})")
    if mis_shaped:
        raise UserError(f"{what} checkpoint has mis-shaped tensors: {format_keys(mis_shaped)}")
    flat = {}
    for key, target in table.items():
        paths = _paths(target)
        for path, part in zip(paths, np.split(arrays[key], len(paths)), strict=True):
            flat[path] = to_flax(target[1], part, shapes[path])
    flat.update({path: np.zeros(shapes[path], np.float32) for path in zeros})
    unfilled = [p for p in shapes if p not in flat]
    if unfilled:  # the table and the model disagree: a converter's fault, named all the same
        raise UserError(f"{what} checkpoint leaves model parameters unset: {format_keys(unfilled)}")
    return unflatten(flat)


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts to ``{'a/b/c': leaf}``, in insertion order."""
    return traverse_util.flatten_dict(dict(tree), sep="/")


def unflatten(flat: Mapping[str, Any]) -> Params:
    """``{'a/b/c': leaf}`` back to nested dicts."""
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def model_shapes(
    architecture: str, model_config: Mapping[str, Any], input_config: Mapping[str, int]
) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of the model a converter describes, from the model itself."""
    from vtm_jax.models.registry import architecture_param_shapes

    return architecture_param_shapes(architecture, model_config, input_config)


# ViT widths and their usual head counts (64-wide heads, except ViT-H's 80).
_VIT_HEADS = {384: 6, 768: 12, 1024: 16, 1280: 16}


def default_num_heads(width: int) -> int:
    """ViT's head count for a width (no tensor shape tells it): the usual ones, else 64 wide."""
    return _VIT_HEADS.get(width, max(1, width // 64))


def concat_heads(
    state: Mapping[str, np.ndarray], names: Sequence[str], target: str
) -> tuple[dict[str, np.ndarray], list[int]]:
    """Replace heads ``names[i].{weight,bias}`` by one ``target`` head; returns the class splits.

    EPIC-KITCHENS models classify verbs and nouns with two heads on the same features; one
    concatenated head gives the same logits side by side.
    """
    keys = [f"{n}.{p}" for n in names for p in ("weight", "bias")]
    clash = [k for k in (f"{target}.weight", f"{target}.bias") if k in state]
    if clash:
        raise UserError(f"both {format_keys(clash)} and separate heads {', '.join(names)}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise UserError(f"classifier heads incomplete: missing {format_keys(missing)}")
    widths = {state[f"{n}.weight"].shape[1:] for n in names}
    splits = [int(state[f"{n}.weight"].shape[0]) for n in names]
    bad = [
        f"{n}.bias {state[f'{n}.bias'].shape}"
        for n, c in zip(names, splits, strict=True)
        if state[f"{n}.bias"].shape != (c,)
    ]
    if len(widths) != 1 or bad:
        shapes = format_keys(f"{k} {state[k].shape}" for k in keys)
        raise UserError(f"classifier heads do not fit together: {shapes}")
    out = {k: v for k, v in state.items() if k not in keys}
    out[f"{target}.weight"] = np.concatenate([state[f"{n}.weight"] for n in names])
    out[f"{target}.bias"] = np.concatenate([state[f"{n}.bias"] for n in names])
    return out, splits


def _key_pattern(template: str) -> re.Pattern[str]:
    """``blocks.{n}.norm1.`` -> a regex; a template ending in ``.`` is a prefix."""
    body = re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)")
    return re.compile(f"{body}(?P<rest>.+)" if template.endswith(".") else body)


class KeyMap:
    """Renames state dict keys between two layouts by templates (``{n}``: a layer index).

    One layout's converter then serves the other: the key tables stay in one place. Errors that
    converter raises name its keys; :meth:`explain` names the file's keys instead.
    ``reverse_only`` pairs are used for :meth:`explain` alone (keys split in two or more).
    """

    def __init__(
        self, pairs: Sequence[tuple[str, str]], reverse_only: Sequence[tuple[str, str]] = ()
    ):
        self._forward = [(_key_pattern(a), b) for a, b in pairs]
        self._backward = [(_key_pattern(b), a) for a, b in (*pairs, *reverse_only)]

    @staticmethod
    def _apply(rules: list[tuple[re.Pattern[str], str]], key: str) -> str | None:
        for pattern, target in rules:
            found = pattern.fullmatch(key)
            if found:
                groups = found.groupdict()
                return target.replace("{n}", groups.get("n") or "") + (groups.get("rest") or "")
        return None

    def target(self, key: str) -> str | None:
        """The other layout's name of ``key``; None when no template matches."""
        return self._apply(self._forward, key)

    def rename(self, state: Mapping[str, Any], what: str) -> dict[str, Any]:
        """``state`` under the other layout's names; a key no template knows is a UserError."""
        renamed = {k: self.target(k) for k in state}
        unknown = [k for k, v in renamed.items() if v is None]
        if unknown:
            raise UserError(f"{what} checkpoint keys do not match: unknown {format_keys(unknown)}")
        return {renamed[k]: v for k, v in state.items()}

    def explain(self, error: UserError, what: str) -> UserError:
        """``error`` with the other layout's keys named as in this one, for ``what`` files."""

        def back(found: re.Match[str]) -> str:
            return self._apply(self._backward, found.group(0)) or found.group(0)

        text = re.sub(r"[A-Za-z_][\w.]*\w", back, str(error))
        # Keys split in several (a fused qkv) come back as repeats of one name: say it once.
        text = re.sub(r"\b([\w.]+)(?:, \1\b)+", r"\1", text)
        text = re.sub(r"^HF \w+ checkpoint", f"{what} checkpoint", text)
        return UserError(text)
