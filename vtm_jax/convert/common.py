"""Pieces every converter shares: torch-to-Flax tensor layouts, labels, lazy torch import, and
the reader of torch checkpoint files (SlowFast, MCG-NJU, bare state dicts) with their cfg."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from vtm_jax.convert.scenic import format_keys
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


# ---------------------------------------------------------------------------------------------
# Torch checkpoint files (SlowFast ``.pyth``, MCG-NJU ``.pth``, bare state dicts)

# Top-level entries of a SlowFast checkpoint besides the weights.
SLOWFAST_EXTRAS = ("epoch", "optimizer_state", "cfg", "scaler_state")
# Where weights sit in the files the paper's loader reads: SlowFast's ``model_state``, and
# ``module`` or ``model`` in MCG-NJU's VideoMAE releases.
_WRAPPERS = ("model_state", "module", "model")

# ViT widths and their usual head counts (64-wide heads, except ViT-H's 80).
_VIT_HEADS = {384: 6, 768: 12, 1024: 16, 1280: 16}


class TorchCheckpoint(NamedTuple):
    """A torch checkpoint file's weights (float32 numpy) and what else it says."""

    state: dict[str, np.ndarray]
    cfg_text: str | None  # SlowFast's ``cfg``: the run's yacs config as YAML
    wrapper: str  # where the weights were: model_state, module, model, bare or safetensors


def unsafe_pickle_error(path: Path, error: Exception) -> UserError:
    """One line for a file ``torch.load(weights_only=True)`` refuses."""
    text = str(error)
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsafe:
        return UserError(
            f"{path} pickles {unsafe.group(1)}, an object torch.load(weights_only=True) "
            "refuses to load; re-save the weights alone, e.g. "
            "torch.save({'model_state': model.state_dict()}, path)"
        )
    found = re.search(r"Unsupported [^\n.]*", text)
    detail = found.group(0) if found else (text.strip().splitlines() or [repr(error)])[0]
    return UserError(f"cannot read {path} as a torch checkpoint: {detail}")


def _load_pickle(path: Path) -> Any:
    torch = import_torch(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise unsafe_pickle_error(path, error) from None


def _load_safetensors_file(path: Path) -> dict[str, Any]:
    try:
        from safetensors.torch import load_file
    except ImportError as error:
        raise UserError(f"{path} needs safetensors and PyTorch: {CONVERT_EXTRA}") from error
    try:
        return dict(load_file(path))
    except Exception as error:  # SafetensorError, OSError
        raise UserError(f"cannot read {path}: {str(error).splitlines()[0]}") from None


def _unwrap(path: Path, checkpoint: Any) -> tuple[Mapping[str, Any], str | None, str]:
    """The state dict inside a loaded checkpoint, its ``cfg`` text and the wrapper's name."""
    torch = import_torch(str(path))
    if not isinstance(checkpoint, Mapping):
        raise UserError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    for wrapper in _WRAPPERS:
        inner = checkpoint.get(wrapper)
        if isinstance(inner, Mapping):
            cfg = checkpoint.get("cfg")
            return inner, cfg if isinstance(cfg, str) else None, wrapper
        if inner is not None and wrapper == "model_state":
            raise UserError(f"{path}: 'model_state' is a {type(inner).__name__}, not a state dict")
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint, None, "bare"
    raise UserError(
        f"{path} has no 'model_state', 'module' or 'model' entry and is not a state dict; "
        f"top-level keys: {format_keys(list(checkpoint)) or 'none'}"
    )


def read_torch_checkpoint(path: str | Path) -> TorchCheckpoint:
    """Read a torch checkpoint file with ``torch.load(weights_only=True)`` (never unsafely).

    Accepts SlowFast's ``{'model_state', 'cfg', ...}``, MCG-NJU's ``{'module': ...}`` or
    ``{'model': ...}``, a bare state dict, and ``.safetensors`` files. A ``module.`` prefix on
    every key (a DDP wrapper) is dropped. Floats become float32.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        state, cfg, wrapper = _load_safetensors_file(path), None, "safetensors"
    else:
        state, cfg, wrapper = _unwrap(path, _load_pickle(path))
    torch = import_torch(str(path))
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UserError(f"{path}: {wrapper} has non-tensor entries {format_keys(not_tensors)}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}  # saved from a DDP wrapper
    return TorchCheckpoint({k: torch_to_numpy(v) for k, v in state.items()}, cfg, wrapper)


def parse_cfg_yaml(text: str | None) -> dict[str, Any]:
    """A SlowFast ``cfg`` (YAML text) as a dict; ``{}`` when absent."""
    if not text:
        return {}
    try:
        import yaml
    except ImportError:
        raise UserError(
            "reading a SlowFast checkpoint's cfg needs PyYAML: pip install 'vtm-jax[convert]'"
        ) from None
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as error:
        detail = str(error).replace("\n", " ")
        raise UserError(f"the checkpoint's cfg is not valid YAML: {detail}") from None
    return cfg if isinstance(cfg, dict) else {}


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
