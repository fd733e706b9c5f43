"""The model record: what a checkpoint's model is and how to feed it (``model.json``).

:class:`ModelRecord` is the one form of it in memory: the architecture and its constructor
arguments, the input size, the stored preprocessing, labels, classifier heads and reduction
settings, and where the parameters came from. It checks itself when built, says its
classifier heads (:meth:`ModelRecord.heads`) and resolves its preprocessing against defaults
and overrides (:meth:`ModelRecord.resolve_preprocessing`). :func:`read_record` and
:func:`write_record` are the only code that reads or writes ``model.json``; the JSON form is
the one vtm-jax has always written, so existing checkpoints load unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from vtm_jax.checkpoints import integrity
from vtm_jax.data.preprocessing import (
    NORMALISATION_FIELDS,
    PREPROCESSING_FIELDS,
    REQUIRED_FIELDS,
    Preprocessing,
    check_names,
    check_normalisation,
)
from vtm_jax.errors import UserError
from vtm_jax.merging.settings import check_data_names

Head = tuple[str | None, int, int]  # (name, start, stop) in the concatenated logits

# The model.json format. 2: token_merging keeps a rule's options (hybrid's threshold) under
# rule_options; version 1 records, with threshold at the top level, read the same.
FORMAT_VERSION = 2

# model.json's optional entries that are written even when empty (as `convert` and `train`
# always wrote them); the other optional entries are left out when unset.
_ALWAYS_WRITTEN = ("preprocessing", "labels", "class_splits", "token_merging")
_JSON_TYPES = {"architecture": str, "model": dict, "preprocessing": dict, "token_merging": dict}
_JSON_TYPES |= {"labels": list, "split_names": list}


@dataclasses.dataclass(frozen=True)
class ModelRecord:
    """What a checkpoint's model is and how it is fed.

    ``model`` holds the architecture's constructor arguments as JSON values (lists, not
    tuples); ``preprocessing`` the input pipeline the model was made for (resolved by
    :meth:`resolve_preprocessing`); ``token_merging`` the stored merging settings
    (``MergingSettings.from_dict``). ``class_splits`` cut one concatenated classifier into
    heads (EPIC-KITCHENS verb and noun). ``params_digest`` / ``params_files`` identify the
    parameters (set when a checkpoint is written, checked when it is read). Entries of a
    ``model.json`` that vtm-jax does not know are kept in ``extra`` and written back.

    ``where`` names the record in error messages (the ``model.json`` path); it is not stored.
    """

    architecture: str
    model: dict[str, Any]
    num_frames: int
    image_size: int
    preprocessing: dict[str, Any] | None = None
    labels: list[str] | None = None
    class_splits: list[int] | None = None
    split_names: list[str] | None = None
    token_merging: dict[str, Any] | None = None
    converted_from: dict[str, Any] | None = None
    trained: dict[str, Any] | None = None
    scenic_checkpoint: str | None = None  # the bare Scenic checkpoint a config describes
    params_digest: str | None = None
    params_files: dict[str, str] | None = None
    format_version: int | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    where: dataclasses.InitVar[str] = "model record"

    def __post_init__(self, where: str) -> None:
        version = self.format_version
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION
        ):
            raise UserError(
                f"{where}: format_version {version!r} is not one this vtm-jax reads "
                f"(1 to {FORMAT_VERSION}); a newer vtm-jax wrote it"
            )
        # Code builds records with tuples too; the record holds what model.json reads back.
        for name in ("model", "preprocessing", "labels", "class_splits", "split_names"):
            object.__setattr__(self, name, _lists(getattr(self, name)))
        object.__setattr__(self, "token_merging", _lists(self.token_merging))
        for name, kind in _JSON_TYPES.items():
            value = getattr(self, name)
            required = name in ("architecture", "model")
            if (value is not None or required) and not isinstance(value, kind):
                raise UserError(f"{where}: {name!r} must be a JSON {kind.__name__}")
        for name in ("num_frames", "image_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{where}: input.{name} must be a positive integer")
        num_classes = self.model.get("num_classes")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise UserError(f"{where}: model.num_classes must be a positive integer")
        splits = self.class_splits
        if splits is not None and (
            not isinstance(splits, list)
            or not all(isinstance(v, int) and v > 0 for v in splits)
            or sum(splits) != num_classes
        ):
            raise UserError(f"{where}: class_splits must be a list adding up to num_classes")
        if self.labels is not None and len(self.labels) != num_classes:
            raise UserError(f"{where}: {len(self.labels)} labels for {num_classes} classes")
        for key in NORMALISATION_FIELDS:
            value = (self.preprocessing or {}).get(key)
            if value is not None:
                check_normalisation(key, value, where=f"{where}: preprocessing")
        digest = self.params_digest
        if digest is not None and not (
            isinstance(digest, str) and digest.startswith(integrity.DIGEST_PREFIX)
        ):
            raise UserError(f"{where}: params_digest must be a string 'sha256:...', not {digest!r}")
        files = self.params_files
        if files is not None and not (
            isinstance(files, dict) and all(isinstance(v, str) for v in files.values())
        ):
            raise UserError(f"{where}: params_files must map file names to sha256 strings")

    @property
    def input(self) -> dict[str, int]:
        """The clip size the model takes: ``{'num_frames', 'image_size'}``."""
        return {"num_frames": self.num_frames, "image_size": self.image_size}

    @property
    def num_classes(self) -> int:
        """Classes of the (concatenated) classifier."""
        return self.model["num_classes"]

    def model_kwargs(self) -> dict[str, Any]:
        """The architecture's constructor arguments, lists as tuples (Flax fields hash)."""
        return {k: tuple(v) if isinstance(v, list) else v for k, v in self.model.items()}

    def heads(self) -> list[Head]:
        """``(name, start, stop)`` of each classifier head in the logits.

        Multi-head models (EPIC-KITCHENS verb and noun) store one concatenated output layer and
        its ``class_splits``; each head gets its own softmax.
        """
        splits = self.class_splits
        if not splits:
            return [(None, 0, self.num_classes)]
        names = self.split_names or (
            ["verb", "noun"] if splits == [97, 300] else [f"head_{i}" for i in range(len(splits))]
        )
        heads, start = [], 0
        for name, size in zip(names, splits, strict=False):
            heads.append((name, start, start + size))
            start += size
        return heads

    def resolve_preprocessing(self, override: Mapping[str, Any] | None = None) -> Preprocessing:
        """The stored preprocessing, its gaps filled and ``override``'s entries replacing it.

        The frame count and crop default to the input size, ``sampling`` to ``stride`` and the
        protocol to ``centred`` (:class:`Preprocessing`'s defaults). Every entry is checked
        here (unknown protocols and loaders included), so a bad one fails before any video is
        read. Stored entries that are no preprocessing entry are left out.
        """
        check_names(override or {})
        prep = {"num_frames": self.num_frames, "crop_size": self.image_size}
        prep |= {k: v for k, v in (self.preprocessing or {}).items() if k in PREPROCESSING_FIELDS}
        prep |= {k: v for k, v in (override or {}).items() if v is not None}
        missing = [k for k in REQUIRED_FIELDS if prep.get(k) is None]
        if missing:
            raise UserError(
                f"the checkpoint records no preprocessing {', '.join(missing)}; "
                "give them explicitly"
            )
        return Preprocessing.from_dict(prep)

    def to_json(self) -> dict[str, Any]:
        """The ``model.json`` object, in the order vtm-jax has always written it."""
        data: dict[str, Any] = {}
        if self.format_version is not None:
            data["format_version"] = self.format_version
        data |= {"architecture": self.architecture, "model": self.model, "input": self.input}
        for name in ("preprocessing", "labels", "class_splits", "split_names", "token_merging"):
            value = getattr(self, name)
            if value is not None or name in _ALWAYS_WRITTEN:
                data[name] = value
        for name in ("converted_from", "trained", "scenic_checkpoint"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        data |= self.extra
        for name in ("params_digest", "params_files"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        return data

    @classmethod
    def from_json(cls, data: Any, *, where: str = "model record") -> ModelRecord:
        """The record a ``model.json`` object describes; UserErrors name ``where``."""
        if not isinstance(data, dict):
            raise UserError(f"{where} must hold a JSON object")
        for key in ("architecture", "model", "input"):
            if key not in data:
                raise UserError(f"{where} has no {key!r} entry")
        size = data["input"]
        if not isinstance(size, dict):
            raise UserError(f"{where}: 'input' must be a JSON dict")
        for key in ("num_frames", "image_size"):
            if not isinstance(size.get(key), int):
                raise UserError(f"{where}: input.{key} must be an integer")
        # A data file: its merging settings may name registered modes only, never code.
        check_data_names(data.get("token_merging"), where)
        names = {f.name for f in dataclasses.fields(cls)} - {"num_frames", "image_size", "extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k != "input"}
        return cls(
            **known,
            num_frames=size["num_frames"],
            image_size=size["image_size"],
            extra=extra,
            where=where,
        )


def read_record(path: str) -> ModelRecord:
    """The record in the ``model.json`` at ``path``, checked."""
    from vtm_jax.paths import open_file

    try:
        with open_file(path) as f:  # a local or remote (gs://) checkpoint
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    return ModelRecord.from_json(data, where=path)


def write_record(path: str, record: ModelRecord) -> None:
    """Write ``record`` as ``model.json`` at ``path``, atomically."""
    from vtm_jax.outputs import write_json

    write_json(path, record.to_json(), indent=2)


def _lists(value: Any) -> Any:
    """``value`` with every tuple a list, as it reads back from JSON."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value
