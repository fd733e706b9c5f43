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
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from vtm_jax import paths, plugins
from vtm_jax.data.manual import SPLIT_ALIASES
from vtm_jax.errors import UserError

# Datasets built once into data_dir: name -> (TFDS builder class, or its "module:Class"
# path imported on first use; whether it packs files from a manual_dir).
DATASETS: dict[str, tuple[str | type[tfds.core.DatasetBuilder], bool]] = {
    "synthetic": ("vtm_jax.data.synthetic:SyntheticVideos", False),
    "kinetics400": ("vtm_jax.data.kinetics:Kinetics400", True),
    "ssv2": ("vtm_jax.data.ssv2:SomethingSomethingV2", True),
    "epic_kitchens": ("vtm_jax.data.epic_kitchens:EpicKitchens100", True),
}
# Datasets read in place from manual_dir, nothing built: name -> open(split, manual_dir,
# **options) returning a source (the frame-folder datasets are vtm_jax.data.frame_folders').
READERS: dict[str, Callable[..., Any]] = {}


def register_dataset(
    name: str,
    dataset: type[tfds.core.DatasetBuilder] | Callable[..., Any],
    *,
    manual_dir: bool = True,
    replace: bool = False,
) -> Any:
    """Add a dataset, selectable as ``config.dataset_name`` / ``open_split(name, ...)``.

    ``dataset`` is either a TFDS builder class, built once into ``data_dir`` (from the files in
    ``manual_dir`` when ``manual_dir=True``; :class:`vtm_jax.data.manual.ManualVideoBuilder`
    does the packing), or a function ``open(split, manual_dir, **options)`` that reads the
    split in place and returns a source: ``len``, ``[i]`` giving ``{"video", "label",
    "video_id"}`` (video: encoded file bytes as a uint8 array, or uint8 frames ``[T, H, W,
    3]``), and ``name``, ``split``, ``num_classes``, ``class_splits`` attributes.
    Registering the same one twice is a no-op; another under a taken name needs
    ``replace=True``. Returns ``dataset``.
    """
    if name in _built_in_readers():
        raise ValueError(f"dataset {name!r} is built in; choose another name")
    if isinstance(dataset, type) and issubclass(dataset, tfds.core.DatasetBuilder):
        taken = {**DATASETS, **READERS}
        plugins.check_name(taken, name, (dataset, manual_dir), replace=replace)
        READERS.pop(name, None)
        DATASETS[name] = (dataset, manual_dir)
    elif callable(dataset) and not isinstance(dataset, type):
        plugins.check_name({**DATASETS, **READERS}, name, dataset, replace=replace)
        DATASETS.pop(name, None)
        READERS[name] = dataset
    else:
        raise TypeError("a dataset is a TFDS builder class or a function opening a split")
    return dataset


def _load_path(name: str) -> None:
    """A ``"package.module:attribute"`` dataset name: import it once, as a registered one."""
    if not plugins.is_path(name) or name in DATASETS or name in READERS:
        return
    dataset = plugins.load_object(name, what="dataset")
    if isinstance(dataset, type) and issubclass(dataset, tfds.core.DatasetBuilder):
        DATASETS[name] = (dataset, bool(getattr(dataset, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)))
    elif callable(dataset) and not isinstance(dataset, type):
        # Checked before any call: a path can name anything importable (os:system).
        plugins.check_function(dataset, name, what="dataset", arguments=("split", "manual_dir"))
        READERS[name] = dataset
    else:
        raise UserError(
            f"dataset {name!r} names a {type(dataset).__name__}, not a TFDS builder class "
            "or a function opening a split"
        )


def _built_in_readers() -> dict[str, Callable[..., Any]]:
    """The datasets vtm-jax reads in place: the frame folders and ``video_folder``."""
    from vtm_jax.data.frame_folders import FRAME_DATASETS
    from vtm_jax.data.video_folder import NAME, open_video_folder

    return {**FRAME_DATASETS, NAME: open_video_folder}


def reads_in_place(name: str) -> bool:
    """Whether dataset ``name`` is read from ``manual_dir`` as it is (no ``data_dir``)."""
    _load_path(name)
    return name in _built_in_readers() or name in READERS


def dataset_names() -> list[str]:
    return [*DATASETS, *_built_in_readers(), *READERS]


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
    _load_path(name)
    if name not in DATASETS:
        hint = ""
        if name == "video_tfrecord_dataset":  # a Scenic config's loader
            hint = (
                " (Scenic's TFRecord loader, which vtm-jax does not read: set "
                "--config.dataset_name and --config.dataset_configs.data_dir)"
            )
        raise UserError(f"unknown dataset {name!r}{hint}; valid: {', '.join(dataset_names())}")
    builder_cls = DATASETS[name][0]
    if isinstance(builder_cls, str):
        builder_cls = plugins.load_object(builder_cls, what="dataset")
    kwargs: dict[str, Any] = {"data_dir": paths.absolute(data_dir), "file_format": "array_record"}
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
    ``epic_kitchens_frames``: ``vtm_jax.data.frame_folders``) or a folder of your own videos
    (``video_folder``: ``vtm_jax.data.video_folder``). The other real datasets are
    built from the files in ``manual_dir`` (see each builder's docstring); once built,
    ``manual_dir`` is no longer needed. ``split`` may carry a TFDS slice, e.g.
    ``validation[:100]``; ``val`` means ``validation``. With ``build=False`` a dataset that is
    not built yet is an error (multi-host runs build on one process first).
    """
    from vtm_jax.data.frame_folders import FRAME_DATASETS, open_frame_split

    if name in FRAME_DATASETS:
        return open_frame_split(name, split, manual_dir, config)
    if name in _built_in_readers():  # video_folder: manual_dir may be a list file
        return _built_in_readers()[name](split, manual_dir, **dict(config or {}))
    _load_path(name)
    if name in READERS:
        if not manual_dir or not paths.is_dir(manual_dir):
            raise UserError(f"{name} is read in place: give its folder as manual_dir")
        return READERS[name](split, manual_dir, **dict(config or {}))
    if paths.exists(data_dir) and not paths.is_dir(data_dir):
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
        if DATASETS[name][1]:
            if not manual_dir:
                raise UserError(
                    f"{name} is not built in {data_dir} yet: give the directory holding its "
                    f"annotation and video files as manual_dir"
                )
            if not paths.is_dir(manual_dir) or not paths.listdir(manual_dir):
                raise UserError(f"manual_dir {manual_dir} does not exist or is empty")
            download_config = tfds.download.DownloadConfig(manual_dir=paths.absolute(manual_dir))
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
