"""Reading checkpoint files: HuggingFace directories and torch checkpoint files.

An HF directory is ``config.json`` plus ``model.safetensors`` or ``pytorch_model.bin``, maybe
sharded (:func:`read_hf_directory`), with its processor config and labels beside; a torch
checkpoint file is SlowFast's ``.pyth`` (with its yacs ``cfg`` as YAML), MCG-NJU's ``.pth`` or
a bare state dict (:func:`read_torch_checkpoint`), read with ``torch.load(weights_only=True)``
and never unsafely. PyTorch is imported lazily (:func:`import_torch`). Files are named by
:class:`etils.epath.Path`, so a checkpoint may sit on ``gs://``; the readers that want a local
file (safetensors' ``load_file``, ``torch.load`` by name) get the remote one's bytes instead
(:func:`_local_or_bytes`).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from etils.epath import Path

from vtm_jax import paths
from vtm_jax.checkpoints.convert.common import as_float32, format_keys, torch_to_numpy
from vtm_jax.errors import UserError

CONVERT_EXTRA = "pip install 'vtm-jax[convert]'"


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
