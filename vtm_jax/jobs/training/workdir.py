"""What a training workdir holds, and when ``train`` may write into one.

A workdir holds one run: ``config.json`` (the run's config, which says the workdir is a
training run's), the orbax ``checkpoints/``, ``train_log.jsonl``, TensorBoard event files and,
when it ends, the exported checkpoint ``model/``. Rerun with the same config, it resumes.
Anything else where those files go (another config's run, files no run's ``config.json``
vouches for) is refused before any data is read (``vtm_jax.outputs.claim_outputs``), unless
``overwrite``: then the run's files are removed and it starts afresh.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from etils import epath

from vtm_jax.errors import UserError
from vtm_jax.outputs import (
    Owner,
    check_not_inputs,
    claim_outputs,
    read_json_object,
    write_json,
)
from vtm_jax.paths import exists, join

CONFIG_FILE = "config.json"
STATE_DIR = "checkpoints"
MODEL_DIR = "model"
LOG_FILE = "train_log.jsonl"
RUN_FILES = (CONFIG_FILE, STATE_DIR, MODEL_DIR, LOG_FILE)
EVENTS_PREFIX = "events.out.tfevents."  # TensorBoard's event files


def config_json(config: Any) -> dict[str, Any]:
    """The config as ``config.json`` holds it."""
    return json.loads(config.to_json_best_effort())


def other_config(workdir: str, saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """What tells a saved run's config from this one's; None when they are the same."""
    if saved == current:
        return None
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return f"{workdir} holds a run with another config (differs in {', '.join(changed)})"


def _owners(workdir: str, config: Any) -> dict[str, Owner]:
    current = config_json(config)
    config_path = join(workdir, CONFIG_FILE)

    def config_owner(path: str) -> str | None:
        saved = read_json_object(path)
        if saved is None:
            return "exists and is not a vtm-jax training run's config"
        differs = other_config(workdir, saved, current)
        return None if differs is None else f"is another run's config: {differs}"

    def run_owner(path: str) -> str | None:
        if exists(config_path) and read_json_object(config_path) is not None:
            return None  # whether it is this config's run is config_owner's to say
        return f"exists and is not part of a training run (there is no {config_path} beside it)"

    owners = {config_path: config_owner}
    owners.update({join(workdir, name): run_owner for name in RUN_FILES[1:]})
    return owners


def claim_workdir(
    workdir: str,
    config: Any,
    *,
    overwrite: bool = False,
    inputs: Mapping[str, str | None] | None = None,
) -> bool:
    """Before any data is read: ``workdir`` is new, this config's run (resumed), or, with
    ``overwrite``, replaced. Returns whether a run's files are there to be removed first."""
    check_not_inputs([workdir], what="--workdir", inputs=inputs)
    owners = _owners(workdir, config)
    claim_outputs(owners, what="--workdir", overwrite=overwrite, inputs=inputs)
    return overwrite and any(exists(path) for path in owners)


def clear_run(workdir: str) -> None:
    """Remove a run's files from ``workdir`` (``overwrite``): it starts afresh."""
    root = epath.Path(workdir)
    for name in RUN_FILES:
        path = root / name
        if path.is_dir():
            path.rmtree()
        elif path.exists():
            path.unlink()
    for path in root.iterdir():
        if path.name.startswith(EVENTS_PREFIX) and path.is_file():
            path.unlink()


def check_same_config(workdir: str, config: Any) -> None:
    """A workdir holds one run: resuming with another config would mix two trainings."""
    path = join(workdir, CONFIG_FILE)
    current = config_json(config)
    if epath.Path(path).exists():
        saved = read_json_object(path)
        if saved is None:
            differs = f"{path} is not a vtm-jax training run's config"
        else:
            differs = other_config(workdir, saved, current)
        if differs is not None:
            raise UserError(f"{differs}; use a new --workdir or pass --overwrite to start afresh")
        return
    write_json(path, current, indent=2)
