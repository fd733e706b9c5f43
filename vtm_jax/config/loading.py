"""Experiment configs: ml_collections files with Scenic's schema, read as Scenic reads them.

``--config=path/to/file.py`` names a file whose ``get_config()`` returns a ConfigDict, and
``--config.some.field=value`` overrides a field, exactly as absl's config flags do in Scenic and
big_vision.

This is the front end for config files of either schema: Scenic ViViT configs are read by
:mod:`vtm_jax.config.scenic`, vtm-jax's own here. The blocks config files build
(``token_merging``, ``eval``, ``bench``) are in :mod:`vtm_jax.config.blocks`; they are
imported here too, for config files that import them from this module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from vtm_jax import plugins
from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.config import scenic as scenic_config
from vtm_jax.config.blocks import bench_config, evaluation_config, token_merging_config
from vtm_jax.config.shipped import config_file
from vtm_jax.errors import UserError, one_line

__all__ = [
    "bench_config",
    "evaluation_config",
    "load_config",
    "preprocessing_from_config",
    "record_from_config",
    "token_merging_config",
]


def load_config(
    args: str | Sequence[str],
    *,
    command: str | None = None,
    defaults: Mapping[str, Any] | None = None,
    values: Mapping[str, Any] | None = None,
) -> ml_collections.ConfigDict:
    """Parse ``--config=NAME|FILE`` and ``--config.x=y`` arguments into a ConfigDict.

    ``NAME`` is a shipped config (``vivit_tiny``; :mod:`vtm_jax.config.shipped`), a path wins;
    a single string ``args`` is that name or path alone (``load_config("vivit_tiny")``).
    Code that builds configs passes Python values rather than flag strings: ``defaults``
    (``{"bench.batch_size": 4}``) are set on the file's config before the ``--config.x=y``
    overrides, ``values`` after them; each must name an existing field and have its type.

    The file is loaded first; vtm-jax's fields it lacks are added (a ``token_merging`` block,
    and for Scenic ViViT configs the checkpoint, data and eval fields, see
    :mod:`vtm_jax.config.scenic`), so overrides of them work on a Scenic config file as it is.
    A ``token_merging`` block added here that no override touches is removed again, so
    ``vtm-jax eval`` still uses the settings a checkpoint stores.
    Then the overrides are applied, and a Scenic config's fields are checked and translated;
    the fields ``command`` (``eval``, ``bench``, ``train``, ``demo``; default: evaluation's)
    does not read are reported once, on stderr.

    Every failure is a one-line UserError: a missing file, a ``get_config()`` that raises (its
    exception and the config line it came from), an override naming no field, a value of the
    wrong type.
    """
    import sys

    from absl import flags
    from ml_collections import config_flags

    if isinstance(args, str):
        args = [f"--config={args}"]
    files = [a for a in args if a.startswith("--config=")]
    overrides = [a for a in args if not a.startswith("--config=")]
    if not files:
        raise UserError("no --config=FILE given")
    config = _read_config_file(files[-1])
    if config is None:
        raise UserError("no --config=FILE given")
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"get_config() must return a ConfigDict, not {type(config).__name__}")
    added_token_merging = "token_merging" not in config
    if added_token_merging:
        config.token_merging = token_merging_config()
    notes = scenic_config.add_defaults(config) if scenic_config.is_scenic_vivit(config) else ()
    config.lock()
    set_values(config, defaults or {})
    for arg in overrides:
        _check_override_path(config, arg)
    override_flags = flags.FlagValues()
    try:
        config_flags.DEFINE_config_dict(
            "config",
            config,
            flag_values=override_flags,
            lock_config=True,
            sys_argv=["vtm-jax", *overrides],
        )
        override_flags(["vtm-jax", *overrides])
        config = override_flags.config
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
        raise UserError(f"bad config override: {_cause(e)}") from None
    set_values(config, values or {})
    ignored = []
    given = [*overrides, *(f"--config.{k}=" for k in [*(defaults or {}), *(values or {})])]
    with config.unlocked():
        if added_token_merging and not any(
            arg.startswith(("--config.token_merging.", "--config.token_merging=")) for arg in given
        ):
            del config["token_merging"]
        if scenic_config.is_scenic_vivit(config):
            ignored = scenic_config.finish(config, notes, command=command)
    _merge_when_asked(config, given)
    if ignored:
        print(f"vtm-jax: ignored Scenic fields: {', '.join(ignored)}", file=sys.stderr)
    return config


def _merge_when_asked(config: ml_collections.ConfigDict, given: Sequence[str]) -> None:
    """Overrides asking a ``token_merging`` block whose mode is none to merge (r above 0, a
    schedule ...) without naming a mode switch it to ``merge``, said on stderr; the API and
    the command line's flags follow the same rule (``merging.settings.changed``)."""
    import sys

    from vtm_jax.merging import MergingSettings
    from vtm_jax.merging.settings import changed

    block = config.get("token_merging")
    prefix = "--config.token_merging."
    touched = {a[len(prefix) :].split("=", 1)[0] for a in given if a.startswith(prefix)}
    if not block or block.get("mode") != "none" or not touched or "mode" in touched:
        return
    settings = changed(MergingSettings(), {k: block.get(k) for k in touched if k in block})
    if settings.mode != "none":
        with config.unlocked():
            config.token_merging.mode = settings.mode
        fields = ", ".join(f"{k}={block.get(k)!r}" for k in sorted(touched))
        print(
            f"vtm-jax: token_merging.mode was none (nothing merges) and {fields} asks for "
            f"merging: mode {settings.mode} (set token_merging.mode to choose another)",
            file=sys.stderr,
        )


def set_values(config: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
    """Set ``{"a.b": value}`` on a locked ``config``: the fields must exist, types must fit.

    A JSON list given for a tuple field is read as the tuple (JSON has no tuples).
    """
    for dotted, value in values.items():
        _check_override_path(config, f"--config.{dotted}={value}")
        *parents, leaf = dotted.split(".")
        node: Any = config
        for part in parents:
            node = node[part]
        try:
            if isinstance(value, list) and node.get_type(leaf) is tuple:
                value = tuple(value)
            node[leaf] = value
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"bad config value {dotted}={value!r}: {_cause(e)}") from None


def _read_config_file(flag: str) -> Any:
    """What ``get_config()`` of the file ``--config=FILE[:ARG]`` returns, failures as one line."""
    from absl import flags
    from ml_collections import config_flags

    path = flag[len("--config=") :]
    file_path, colon, argument = path.partition(":")  # absl's FILE:ARG passes ARG to get_config
    if "://" in file_path:
        # absl imports the file as a Python module, which only a local file can be.
        raise UserError(f"config file {file_path}: copy it to a local path (it is Python code)")
    file_path = config_file(file_path)  # a path, or a shipped config's name
    flag = f"--config={file_path}{colon}{argument}"
    file_flags = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", flag_values=file_flags, lock_config=False, sys_argv=["vtm-jax", flag]
    )
    try:
        file_flags(["vtm-jax", flag])
        config = file_flags.config  # absl loads the file lazily: errors surface here
    except ImportError as e:
        hint = ""
        if (e.name or "").split(".")[0] == "scenic":
            hint = ' (the config imports Scenic: pip install "vtm-jax[scenic]")'
        raise UserError(f"cannot load config {file_path}: {_cause(e)}{hint}") from None
    except flags.Error as e:  # absl's wrapper: the cause is inside its message
        raise UserError(f"cannot load config {file_path}: {_cause(e)}") from None
    except Exception as e:  # the file is the user's code: whatever it raises is theirs
        import traceback

        here = os.path.abspath(file_path)
        lines = [
            frame.lineno
            for frame in traceback.extract_tb(e.__traceback__)
            if os.path.abspath(frame.filename) == here
        ]
        where = f" (line {lines[-1]})" if lines else ""
        raise UserError(
            f"cannot load config {file_path}: get_config() raised {type(e).__name__}: "
            f"{_cause(e)}{where}"
        ) from None
    plugins.config_loaded(config, file_path)  # its module:attr names may sit beside the file
    return config


def _check_override_path(config: ml_collections.ConfigDict, arg: str) -> None:
    """An override must name a field the config has (absl says only ``"'name'"``)."""
    if not arg.startswith("--config."):
        raise UserError(f"bad config override {arg!r}: write --config.FIELD=VALUE")
    dotted = arg[len("--config.") :].split("=", 1)[0]
    node: Any = config
    walked = []
    for part in dotted.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)):
            return  # below a leaf or a placeholder: absl's own message says what is wrong
        if part not in node:
            where = ".".join(walked) or "the config"
            fields = ", ".join(sorted(node.keys())[:12])
            raise UserError(
                f"{arg}: {where} has no field {part!r}"
                + (f" (its fields: {fields}{', ...' if len(node) > 12 else ''})" if fields else "")
            )
        walked.append(part)
        node = node[part]


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _cause(error: BaseException) -> str:
    """What went wrong, in one line: the exception at the bottom of any traceback text absl
    embeds in its message (``Error whilst parsing config file: Traceback ...``), with the
    config file line it came from."""
    text = str(error).strip()
    if "Traceback (most recent call last)" not in text:
        if isinstance(error, KeyError) and len(error.args) == 1:
            text = f"no field {error.args[0]!r}"
        return one_line(text) or type(error).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    files = [line.strip() for line in lines if line.strip().startswith('File "')]
    user = [f for f in files if "site-packages" not in f and "/ml_collections/" not in f]
    where = f" ({user[-1].split(', in ')[0]})" if user else ""
    return lines[-1].strip() + where


def record_from_config(config: ml_collections.ConfigDict) -> ModelRecord:
    """The record (architecture, model kwargs, input) a config describes.

    Scenic ViViT configs (``model_name`` ``vivit_classification``) are read in Scenic's schema
    (:func:`vtm_jax.config.scenic.vivit_record`); for vtm-jax's other backbones ``model_name``
    is the architecture and ``model.*`` holds its constructor arguments. The class count comes
    from ``dataset_configs.num_classes``.
    """
    from vtm_jax.models.registry import ARCHITECTURES

    if scenic_config.is_scenic_vivit(config):
        return scenic_config.vivit_record(config)
    try:
        name = config.get("model_name")
        if name not in ARCHITECTURES:
            valid = ", ".join([*scenic_config.SCENIC_VIVIT_MODELS, *ARCHITECTURES])
            raise UserError(f"unknown model_name {name!r}; valid: {valid}")
        data = config.dataset_configs
        return ModelRecord(
            architecture=name,
            model={**config.model.to_dict(), "num_classes": data.num_classes},
            num_frames=data.num_frames,
            image_size=data.crop_size,
        )
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"config does not describe a model: {_first_line(e)}") from None


def preprocessing_from_config(data: ml_collections.ConfigDict) -> dict[str, Any]:
    """A checkpoint record's ``preprocessing`` from a config's ``dataset_configs``: the
    entries a record must give (``Preprocessing``'s without a default)."""
    from vtm_jax.data.preprocessing import INTEGER_FIELDS, REQUIRED_FIELDS

    defaults = {"stride": 1, "min_resize": data.crop_size, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    prep: dict[str, Any] = {}
    for name in REQUIRED_FIELDS:
        value = data.get(name, defaults[name]) if name in defaults else data[name]
        prep[name] = int(value) if name in INTEGER_FIELDS else [float(v) for v in value]
    return prep
