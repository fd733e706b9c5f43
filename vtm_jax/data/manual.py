"""What every dataset reader shares: split aliases, finding the user's files, and the base of
the TFDS builders that pack the user's own annotated video files (``ManualVideoBuilder``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from vtm_jax import paths
from vtm_jax.errors import UserError

log = logging.getLogger("vtm_jax.data")
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "validate": "validation"}


def index_files(root: str, extensions: Sequence[str]) -> dict[str, str]:
    """Every file under ``root`` with one of ``extensions`` (any case), by name without extension.

    Flat directories, per-split and per-class subdirectories all work. Where two files share a
    name, the first in sorted walk order wins.
    """
    wanted = {e.lower() for e in extensions}
    found: dict[str, str] = {}
    for directory, subdirs, files in paths.walk(root):
        subdirs.sort()
        for file in sorted(files):
            stem, ext = os.path.splitext(file)
            if ext.lower() in wanted:
                found.setdefault(stem, paths.join(directory, file))
    return found


def find_file(root: str, names: Sequence[str]) -> str | None:
    """The first of ``names`` present in ``root`` or, failing that, anywhere below it."""
    for name in names:
        if paths.is_file(paths.join(root, name)):
            return paths.join(root, name)
    for directory, subdirs, files in paths.walk(root):
        subdirs.sort()
        for name in names:
            if name in files:
                return paths.join(directory, name)
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
                data = np.frombuffer(paths.read_bytes(path), np.uint8)  # local or gs://
            except OSError:
                self.info.metadata["missing"][split].append(key)
                log.warning("%s %s: cannot read %s", self.name, split, path)
                continue
            yield key, {"video": data, "video_id": key, **fields}
