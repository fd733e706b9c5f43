"""Pieces every converter shares.

A converter maps *names*: a table from each checkpoint key to the Flax leaf (or leaves) it
fills and the layout that turns one into the other (:func:`map_tensors`). Shapes are never
written out by hand: the model says what it expects (``registry.architecture_param_shapes``,
``jax.eval_shape`` of its ``init``), and a checkpoint tensor is checked against that, named
the checkpoint's way. Also here: the HuggingFace directory reader (:func:`read_hf_directory`),
the key checks (:func:`check_keys`), labels, a lazy torch import, and the reader of torch
checkpoint files (SlowFast, MCG-NJU, bare state dicts) with their cfg.

Files are named by :class:`etils.epath.Path`, so a checkpoint may sit on ``gs://``; the
readers that want a local file (safetensors' ``load_file``, ``torch.load`` by name) get the
remote one's bytes instead (:func:`_local_or_bytes`).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from etils.epath import Path
from flax import traverse_util

from vtm_jax import paths
from vtm_jax.errors import UserError

Params = dict[str, Any]

CONVERT_EXTRA = "pip install 'vtm-jax[convert]'"

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


# ---------------------------------------------------------------------------------------------
# HuggingFace directories (config.json plus safetensors or pytorch_model.bin, maybe sharded)


def _local_or_bytes(path: Path) -> str | io.BytesIO:
    """A local file by name (readers map or seek it); a remote one read into memory, as
    ``torch.load`` and safetensors read only local files by name."""
    if paths.is_remote(path):
        return io.BytesIO(path.read_bytes())
    return str(path)


def _safetensors_load(path: Path, numpy: bool) -> dict[str, Any]:
    """safetensors' ``load_file`` (numpy or torch arrays), or ``load`` of a remote file's bytes."""
    if numpy:
        from safetensors import numpy as module
    else:
        from safetensors import torch as module
    source = _local_or_bytes(path)
    if isinstance(source, str):
        return module.load_file(source)
    return module.load(source.getvalue())


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors import SafetensorError
    except ImportError as error:
        raise UserError(f"{path} needs safetensors: {CONVERT_EXTRA}") from error

    try:
        return {k: as_float32(v) for k, v in _safetensors_load(path, numpy=True).items()}
    except TypeError:
        # numpy has no bfloat16: read such files through torch.
        import_torch(f"{path} (bfloat16)")
        return {k: torch_to_numpy(v) for k, v in _safetensors_load(path, numpy=False).items()}
    except (SafetensorError, OSError) as error:
        raise UserError(f"cannot read {path}: {error}") from error


def _load_torch_bin(path: Path) -> dict[str, np.ndarray]:
    torch = import_torch(str(path))
    try:
        state = torch.load(_local_or_bytes(path), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a corrupt or unsafe pickle
        # One line naming what was refused; never torch's advice to unpickle unsafely.
        raise unsafe_pickle_error(path, error) from None
    if not isinstance(state, Mapping):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UserError(f"{path} is not a flat state dict: non-tensor {format_keys(not_tensors)}")
    return {k: torch_to_numpy(v) for k, v in state.items()}


def _shard_files(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"cannot read the shard index {index_path}: {error}") from error
    files = [index_path.parent / name for name in dict.fromkeys(weight_map.values())]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise UserError(f"{index_path} lists shards that are not there: {format_keys(absent)}")
    return files


def read_state_dict(directory: str | Path) -> dict[str, np.ndarray]:
    """Read an HF checkpoint directory's weights as ``{key: numpy array}`` (floats as float32).

    Order: ``model.safetensors``, ``model.safetensors.index.json`` (shards),
    ``pytorch_model.bin``, ``pytorch_model.bin.index.json``; the last two need PyTorch.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"checkpoint directory not found: {directory}")
    candidates = (
        ("model.safetensors", False, _load_safetensors),
        ("model.safetensors.index.json", True, _load_safetensors),
        ("pytorch_model.bin", False, _load_torch_bin),
        ("pytorch_model.bin.index.json", True, _load_torch_bin),
    )
    found = next(((n, i, f) for n, i, f in candidates if (directory / n).is_file()), None)
    if found is None:
        raise UserError(
            f"no weights in {directory}: expected model.safetensors, "
            "model.safetensors.index.json or pytorch_model.bin"
        )
    name, is_index, load = found
    files = _shard_files(directory / name) if is_index else [directory / name]
    state: dict[str, np.ndarray] = {}
    for file in files:
        part = load(file)
        repeated = [k for k in part if k in state]
        if repeated:
            raise UserError(f"{file} repeats keys of another shard: {format_keys(repeated)}")
        state.update(part)
    return state


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    """An HF checkpoint directory's ``config.json``, which must be a JSON object."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"checkpoint directory not found: {directory}")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserError(f"no config.json in {directory}")
    try:
        hf_config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {config_path}: {error}") from error
    if not isinstance(hf_config, Mapping):
        raise UserError(f"{config_path} is not a JSON object")
    return hf_config


def read_hf_directory(directory: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(config.json, weights)`` of an HF checkpoint directory (:func:`read_state_dict`)."""
    return read_hf_config(directory), read_state_dict(directory)


def hf_num_classes(hf_config: Mapping[str, Any]) -> int | None:
    """The classes an HF config names (``id2label``, else ``num_labels``); None: the weights say."""
    id2label = hf_config.get("id2label")
    if id2label:
        return len(id2label)
    if hf_config.get("num_labels") is not None:
        return int(hf_config["num_labels"])
    return None


def read_processor_config(directory: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The directory's ``preprocessor_config.json`` (or the video one) and its path; None: none."""
    directory = Path(directory)
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        path = directory / name
        if path.is_file():
            try:
                return path, json.loads(path.read_text())
            except (OSError, ValueError) as error:
                raise UserError(f"cannot read {path}: {error}") from error
    return None


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
        return torch.load(_local_or_bytes(path), map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise unsafe_pickle_error(path, error) from None


def _load_safetensors_file(path: Path) -> dict[str, Any]:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError as error:
        raise UserError(f"{path} needs safetensors and PyTorch: {CONVERT_EXTRA}") from error
    try:
        return dict(_safetensors_load(path, numpy=False))
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
