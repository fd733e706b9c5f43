"""Datasets by name: build TFDS array_record datasets on first use and read them without TF.

``open_split(name, split, data_dir=..., manual_dir=...)`` prepares the dataset (generating the
synthetic one, or packing the user's own video files for the real ones) and returns a
:class:`VideoSource`: random access to examples as numpy dicts, plus the class count.

Real datasets are packed by :class:`ManualVideoBuilder` subclasses: they read the annotation
files and the video files that the user already has in the TFDS ``manual_dir``, store each
video's encoded bytes (decoded later with PyAV), and record the listed videos they could not
find instead of failing; ``VideoSource.missing`` and the dataset's ``metadata.json`` list them.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from vtm_jax.errors import UserError

log = logging.getLogger("vtm_jax.data")

# name -> (module, builder class, whether it packs files from a manual_dir)
DATASETS = {
    "synthetic": ("vtm_jax.data.synthetic", "SyntheticVideos", False),
    "kinetics400": ("vtm_jax.data.kinetics", "Kinetics400", True),
    "ssv2": ("vtm_jax.data.ssv2", "SomethingSomethingV2", True),
    "epic_kitchens": ("vtm_jax.data.epic_kitchens", "EpicKitchens100", True),
}
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "validate": "validation"}


class VideoSource:
    """Random access (``len``, ``[i]``) to one split's examples as numpy dicts.

    ``video`` is uint8 frames ``[T, H, W, 3]`` (synthetic) or the encoded file bytes as a uint8
    1-D array; ``label`` is an int64 (-1 where a dataset has two heads, whose labels are
    ``verb`` and ``noun``); ``video_id`` and other text fields are str.

    Attributes: ``name``, ``split``, ``num_classes`` (the sum over heads for two heads),
    ``class_splits`` (None for one head, ``[97, 300]`` for EPIC-KITCHENS), ``labels`` (class
    names or None), ``missing`` (ids of listed videos that were not found when building),
    ``info`` (the TFDS DatasetInfo).
    """

    def __init__(self, name: str, split: str, builder: tfds.core.DatasetBuilder, data: Any):
        metadata = dict(builder.info.metadata or {})
        self.name = name
        self.split = split
        self.info = builder.info
        self._data = data
        self._text = [
            key
            for key, feature in builder.info.features.items()
            if isinstance(feature, tfds.features.Text)
        ]
        self.labels: list[str] | None = metadata.get("labels")
        self.class_splits: list[int] | None = metadata.get("class_splits")
        if self.class_splits:
            self.num_classes = int(sum(self.class_splits))
        else:
            self.num_classes = int(metadata.get("num_classes") or len(self.labels or []))
        base = split.split("[")[0]
        self.missing: list[str] = list((metadata.get("missing") or {}).get(base, []))

    def __len__(self) -> int:
        return len(self._data)

    def _convert(self, example: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(example)
        for key in self._text:
            out[key] = out[key].decode("utf-8") if isinstance(out[key], bytes) else out[key]
        for key in ("label", "verb", "noun"):
            if key in out:
                out[key] = np.int64(out[key])
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} examples")
        return self._convert(self._data[int(index) % len(self)])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self._convert(x) for x in self._data.__getitems__([int(i) for i in indices])]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return (
            f"VideoSource({self.name!r}, split={self.split!r}, examples={len(self)}, "
            f"num_classes={self.num_classes}, missing={len(self.missing)})"
        )


class _QuietConfigNotes(logging.Filter):
    """Drops TFDS's notes about every custom synthetic config and every not-yet-built folder."""

    NOTES = ("Using custom data configuration", "Variant folder")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTES)


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    absl_logger = logging.getLogger("absl")
    note_filter = _QuietConfigNotes()
    absl_logger.addFilter(note_filter)
    try:
        yield
    finally:
        absl_logger.removeFilter(note_filter)


def make_builder(
    name: str, *, data_dir: str, config: Mapping[str, Any] | None = None
) -> tfds.core.DatasetBuilder:
    """The TFDS builder of dataset ``name``, writing array_record files under ``data_dir``.

    ``config`` holds builder options; only ``synthetic`` has any (``frames``, ``size``,
    ``train_examples``, ``test_examples``, ``seed``).
    """
    if name not in DATASETS:
        from vtm_jax.data.frame_folders import FRAME_DATASETS

        hint = ""
        if name == "video_tfrecord_dataset":  # a Scenic config's loader
            hint = (
                " (Scenic's TFRecord loader, which vtm-jax does not read: set "
                "--config.dataset_name and --config.dataset_configs.data_dir)"
            )
        valid = ", ".join([*DATASETS, *FRAME_DATASETS])
        raise UserError(f"unknown dataset {name!r}{hint}; valid: {valid}")
    module_name, class_name, _ = DATASETS[name]
    builder_cls = getattr(importlib.import_module(module_name), class_name)
    kwargs: dict[str, Any] = {"data_dir": os.path.abspath(data_dir), "file_format": "array_record"}
    options = dict(config or {})
    if name == "synthetic":
        from vtm_jax.data.synthetic import SyntheticConfig, make_config

        fields = set(SyntheticConfig.__dataclass_fields__) - set(
            tfds.core.BuilderConfig.__dataclass_fields__
        )
        unknown = sorted(set(options) - fields)
        if unknown:
            raise UserError(
                f"unknown synthetic option(s) {', '.join(unknown)}; valid: "
                f"{', '.join(sorted(fields))}"
            )
        least = {"seed": 0, "size": 8}
        scale = options.get("object_scale", 0.1)
        bad = [
            f"{k}={v!r}"
            for k, v in options.items()
            if k != "object_scale"
            and (not isinstance(v, int) or isinstance(v, bool) or v < least.get(k, 1))
        ]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 0.5:
            bad.append(f"object_scale={scale!r}")
        if bad:
            raise UserError(
                f"bad synthetic option(s) {', '.join(bad)}: integers, size >= 8, seed >= 0, "
                f"object_scale in (0, 0.5], the others >= 1"
            )
        built = make_config(**options)
        default = builder_cls.BUILDER_CONFIGS[0]
        # The default config by name, which spares TFDS's "custom configuration" warning.
        kwargs["config"] = default.name if built.name == default.name else built
    elif options:
        raise UserError(f"dataset {name!r} takes no options, got {', '.join(sorted(options))}")
    with _quiet_tfds():
        return builder_cls(**kwargs)


def open_split(
    name: str,
    split: str,
    *,
    data_dir: str,
    manual_dir: str | None = None,
    build: bool = True,
    config: Mapping[str, Any] | None = None,
) -> VideoSource:
    """Random access to ``split`` of dataset ``name``, building it in ``data_dir`` if needed.

    ``name`` is one of ``synthetic``, ``kinetics400``, ``ssv2``, ``epic_kitchens``, or a
    frame-folder dataset read in place from ``manual_dir`` (``ssv2_frames``,
    ``epic_kitchens_frames``: ``vtm_jax.data.frame_folders``). The other real datasets are
    built from the files in ``manual_dir`` (see each builder's docstring); once built,
    ``manual_dir`` is no longer needed. ``split`` may carry a TFDS slice, e.g.
    ``validation[:100]``; ``val`` means ``validation``. With ``build=False`` a dataset that is
    not built yet is an error (multi-host runs build on one process first).
    """
    from vtm_jax.data.frame_folders import FRAME_DATASETS, open_frame_split

    if name in FRAME_DATASETS:
        return open_frame_split(name, split, manual_dir, config)
    if os.path.lexists(data_dir) and not os.path.isdir(data_dir):
        raise UserError(f"data_dir {data_dir} is a file, not a directory")
    builder = make_builder(name, data_dir=data_dir, config=config)
    with _quiet_tfds():
        prepared = builder.is_prepared()
    if not prepared:
        if not build:
            raise UserError(f"{name} is not built in {data_dir}; build it first")
        from vtm_jax.outputs import check_output_dir

        check_output_dir(data_dir, what="data_dir")  # a built dataset may sit in a read-only one
        download_config = None
        if DATASETS[name][2]:
            if not manual_dir:
                raise UserError(
                    f"{name} is not built in {data_dir} yet: give the directory holding its "
                    f"annotation and video files as manual_dir"
                )
            if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
                raise UserError(f"manual_dir {manual_dir} does not exist or is empty")
            download_config = tfds.download.DownloadConfig(manual_dir=os.path.abspath(manual_dir))
        builder.download_and_prepare(download_config=download_config)
    base, _, slicing = split.partition("[")
    base = SPLIT_ALIASES.get(base, base)
    available = list(builder.info.splits.keys())
    if base not in available:
        missing = (builder.info.metadata or {}).get("missing", {}).get(base)
        why = f" (none of its {len(missing)} listed videos was found)" if missing else ""
        raise UserError(
            f"{name} has no split {base!r}{why}; it has: {', '.join(sorted(available))}"
        )
    full = f"{base}[{slicing}" if slicing else base
    try:
        data = builder.as_data_source(split=full)
    except (ValueError, AssertionError) as e:
        raise UserError(f"bad split {split!r}: {e}".splitlines()[0]) from None
    return VideoSource(name, full, builder, data)


# --- building real datasets from the user's files ------------------------------------------


def index_files(root: str, extensions: Sequence[str]) -> dict[str, str]:
    """Every file under ``root`` with one of ``extensions`` (any case), by name without extension.

    Flat directories, per-split and per-class subdirectories all work. Where two files share a
    name, the first in sorted walk order wins.
    """
    wanted = {e.lower() for e in extensions}
    found: dict[str, str] = {}
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs.sort()
        for file in sorted(files):
            stem, ext = os.path.splitext(file)
            if ext.lower() in wanted:
                found.setdefault(stem, os.path.join(directory, file))
    return found


def find_file(root: str, names: Sequence[str]) -> str | None:
    """The first of ``names`` present in ``root`` or, failing that, anywhere below it."""
    for name in names:
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs.sort()
        for name in names:
            if name in files:
                return os.path.join(directory, name)
    return None


class ManualVideoBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of builders that pack the user's own annotated video files.

    A subclass sets ``EXTENSIONS`` and implements ``_features()``, ``_read_annotations(root)``
    (returning the class metadata and, per split, a list of ``(key, candidate file names,
    example fields)``) and may override ``_describe()``.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    EXTENSIONS: tuple[str, ...] = (".mp4",)
    # TFDS finds a checksums file beside a packaged builder's code through `importlib_resources`,
    # which it imports always but declares only for Python < 3.9; nothing is downloaded here.
    code_path = None

    def _features(self) -> dict[str, tfds.features.FeatureConnector]:
        raise NotImplementedError

    def _read_annotations(
        self, root: str
    ) -> tuple[dict[str, Any], dict[str, list[tuple[str, Sequence[str], dict[str, Any]]]]]:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "video": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
            "video_id": tfds.features.Text(),
            "label": tfds.features.Tensor(shape=(), dtype=np.int64),
            **self._features(),
        }
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__class__.__doc__,
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        root = os.fspath(dl_manager.manual_dir)
        classes, splits = self._read_annotations(root)
        if not splits:
            raise UserError(f"{self.name}: found no annotation files in {root}")
        files = index_files(root, self.EXTENSIONS)
        missing: dict[str, list[str]] = {}
        generators = {}
        for split, items in splits.items():
            found, absent, seen = [], [], set()
            for key, names, fields in items:
                if key in seen:
                    continue  # annotation files repeat a few clips; keep the first
                seen.add(key)
                path = next((files[n] for n in names if n in files), None)
                if path is None:
                    absent.append(key)
                else:
                    found.append((key, path, fields))
            missing[split] = absent
            if absent:
                log.warning(
                    "%s %s: %d of %d listed videos are missing",
                    self.name,
                    split,
                    len(absent),
                    len(seen),
                )
            if found:
                generators[split] = self._generate_examples(split, found)
        self.info.metadata.update(classes)
        self.info.metadata["missing"] = missing
        if not generators:
            raise UserError(f"{self.name}: none of the listed videos was found under {root}")
        return generators

    def _generate_examples(
        self, split: str, items: list[tuple[str, str, dict[str, Any]]]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        for key, path, fields in items:
            try:
                with open(path, "rb") as f:
                    data = np.frombuffer(f.read(), np.uint8)
            except OSError:
                self.info.metadata["missing"][split].append(key)
                log.warning("%s %s: cannot read %s", self.name, split, path)
                continue
            yield key, {"video": data, "video_id": key, **fields}
