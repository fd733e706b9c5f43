"""EPIC-KITCHENS-100 action segments from the user's own files (TFDS manual_dir).

Layout of ``manual_dir`` (files may sit in any subdirectory):

* ``EPIC_100_train.csv`` and ``EPIC_100_validation.csv`` from the official annotations, with
  columns ``narration_id, participant_id, video_id, narration_timestamp, start_timestamp,
  stop_timestamp, start_frame, stop_frame, narration, verb, verb_class, noun, noun_class,
  all_nouns, all_noun_classes``. Only the splits whose file is present are built (the test
  timestamps have no labels).
* one video file per action segment, ``{narration_id}.mp4`` (or ``.MP4``), already cut from
  the full recording, e.g. with
  ``ffmpeg -ss {start_timestamp} -to {stop_timestamp} -i P01_01.MP4 P01_01_0.mp4``.
  This is the one supported layout: the full recordings (``{video_id}.MP4``, up to an hour of
  1080p each) and the extracted JPEG frame folders are not read.
* optionally ``EPIC_100_verb_classes.csv`` and ``EPIC_100_noun_classes.csv`` (columns ``id``
  and ``key``) for class names.

Each example has ``verb`` (97 classes) and ``noun`` (300 classes) and ``label`` = -1; a
classifier for it has one concatenated head, ``class_splits = [97, 300]``.
"""

from __future__ import annotations

import csv
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from vtm_jax import paths
from vtm_jax.data.manual import ManualVideoBuilder, find_file, log
from vtm_jax.errors import UserError

SPLIT_FILES = {
    "train": ("EPIC_100_train.csv",),
    "validation": ("EPIC_100_validation.csv",),
}
CLASS_FILES = ("EPIC_100_verb_classes.csv", "EPIC_100_noun_classes.csv")
CLASS_SPLITS = [97, 300]
COLUMNS = (
    "narration_id",
    "participant_id",
    "video_id",
    "start_frame",
    "stop_frame",
    "narration",
    "verb_class",
    "noun_class",
)
TIMESTAMP_COLUMNS = ("start_timestamp", "stop_timestamp")


def read_segments(path: str, *, timestamps: bool = False) -> list[dict[str, Any]]:
    """The labelled action segments of an EPIC-KITCHENS-100 annotation CSV (with their
    ``start_timestamp`` and ``stop_timestamp`` when ``timestamps``)."""
    columns = COLUMNS + (TIMESTAMP_COLUMNS if timestamps else ())
    with paths.open_file(path, newline="") as f:
        reader = csv.DictReader(f)
        absent = [c for c in columns if c not in (reader.fieldnames or [])]
        if absent:
            raise UserError(f"{path}: missing column(s) {', '.join(absent)}")
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                numbers = {
                    k: int(row[k])
                    for k in ("start_frame", "stop_frame", "verb_class", "noun_class")
                }
            except (TypeError, ValueError):
                raise UserError(
                    f"{path}:{line}: start_frame, stop_frame, verb_class and noun_class must be "
                    f"integers"
                ) from None
            for head, count in zip(("verb_class", "noun_class"), CLASS_SPLITS, strict=True):
                if not 0 <= numbers[head] < count:
                    raise UserError(f"{path}:{line}: {head} {numbers[head]} is not in [0, {count})")
            rows.append({**{k: row[k] for k in columns}, **numbers})
    return rows


def class_names(root: str) -> list[str] | None:
    """Verb names then noun names, where both class files are present and complete."""
    names: list[str] = []
    for file, count in zip(CLASS_FILES, CLASS_SPLITS, strict=True):
        path = find_file(root, (file,))
        if path is None:
            return None
        try:
            with paths.open_file(path, newline="") as f:
                keys = {int(row["id"]): row["key"] for row in csv.DictReader(f)}
        except (KeyError, TypeError, ValueError):
            log.warning("epic_kitchens: cannot read class names from %s", path)
            return None
        if sorted(keys) != list(range(count)):
            log.warning("epic_kitchens: %s does not list ids 0..%d", path, count - 1)
            return None
        names.extend(keys[i] for i in range(count))
    return names


class EpicKitchens100(ManualVideoBuilder, skip_registration=True):
    """EPIC-KITCHENS-100 action segments: verb (97) and noun (300) classes, one file per segment."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
    EXTENSIONS = (".mp4",)

    def _features(self) -> dict[str, tfds.features.FeatureConnector]:
        integer = tfds.features.Tensor(shape=(), dtype=np.int64)
        return {
            "verb": integer,
            "noun": integer,
            "participant_id": tfds.features.Text(),
            "recording_id": tfds.features.Text(),
            "start_frame": integer,
            "stop_frame": integer,
            "narration": tfds.features.Text(),
        }

    def _read_annotations(self, root: str) -> tuple[dict[str, Any], dict[str, list]]:
        splits = {}
        for split, names in SPLIT_FILES.items():
            path = find_file(root, names)
            if path is None:
                continue
            items = []
            for row in read_segments(path):
                fields = {
                    "label": -1,
                    "verb": row["verb_class"],
                    "noun": row["noun_class"],
                    "participant_id": row["participant_id"],
                    "recording_id": row["video_id"],
                    "start_frame": row["start_frame"],
                    "stop_frame": row["stop_frame"],
                    "narration": row["narration"],
                }
                items.append((row["narration_id"], (row["narration_id"],), fields))
            splits[split] = items
        classes = {"class_splits": CLASS_SPLITS, "labels": class_names(root)}
        return classes, splits
