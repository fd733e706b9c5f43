"""Kinetics-400 from the user's own annotation CSVs and clip files (TFDS manual_dir).

Layout of ``manual_dir`` (files may sit in any subdirectory):

* annotations ``train.csv``, ``validate.csv`` (or ``val.csv`` / ``validation.csv``) and
  ``test.csv``, with a header naming at least ``youtube_id``, ``time_start`` and ``time_end``,
  and ``label`` (the released files: ``label,youtube_id,time_start,time_end,split[,is_cc]``).
  Rows without a label (the original test list) get label -1. Only the splits whose CSV is
  present are built.
* clips named as the ActivityNet downloader names them,
  ``{youtube_id}_{time_start:06d}_{time_end:06d}.mp4`` (``.webm``, ``.mkv`` and ``.avi`` also
  accepted), or just ``{youtube_id}.mp4``; flat, per split or per class subdirectories.

Class indices are the sorted label strings of all CSVs present (400 for the full dataset), the
order of the released Kinetics checkpoints. The encoded clips are stored as they are.
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
    "train": ("train.csv", "kinetics_400_train.csv", "kinetics400_train.csv"),
    "validation": (
        "validate.csv",
        "val.csv",
        "validation.csv",
        "kinetics_400_val.csv",
        "kinetics400_val.csv",
    ),
    "test": ("test.csv", "kinetics_400_test.csv", "kinetics400_test.csv"),
}
NUM_CLASSES = 400


def clip_name(youtube_id: str, time_start: int, time_end: int) -> str:
    """The file name (without extension) the ActivityNet downloader gives a clip."""
    return f"{youtube_id}_{time_start:06d}_{time_end:06d}"


def read_csv(path: str) -> list[dict[str, Any]]:
    """Rows ``{label (str or None), youtube_id, time_start, time_end}`` of a Kinetics CSV."""
    with paths.open_file(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or [])
        needed = {"youtube_id", "time_start", "time_end"}
        if not needed <= fields:
            raise UserError(
                f"{path}: expected a header with label,youtube_id,time_start,time_end, got "
                f"{','.join(reader.fieldnames or [])}"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                start, end = int(float(row["time_start"])), int(float(row["time_end"]))
            except (TypeError, ValueError):
                raise UserError(f"{path}:{line}: time_start/time_end must be numbers") from None
            label = (row.get("label") or "").strip() or None
            rows.append(
                {
                    "label": label,
                    "youtube_id": row["youtube_id"].strip(),
                    "time_start": start,
                    "time_end": end,
                }
            )
    return rows


class Kinetics400(ManualVideoBuilder, skip_registration=True):
    """Kinetics-400 human action clips (about 10 s each), 400 classes, encoded as downloaded."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
    EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi")

    def _features(self) -> dict[str, tfds.features.FeatureConnector]:
        return {
            "youtube_id": tfds.features.Text(),
            "time_start": tfds.features.Tensor(shape=(), dtype=np.int64),
            "time_end": tfds.features.Tensor(shape=(), dtype=np.int64),
        }

    def _read_annotations(self, root: str) -> tuple[dict[str, Any], dict[str, list]]:
        tables = {}
        for split, names in SPLIT_FILES.items():
            path = find_file(root, names)
            if path is not None:
                tables[split] = read_csv(path)
        labels = sorted({row["label"] for rows in tables.values() for row in rows if row["label"]})
        if tables and len(labels) != NUM_CLASSES:
            log.warning("kinetics400: the CSVs name %d classes, not %d", len(labels), NUM_CLASSES)
        index = {name: i for i, name in enumerate(labels)}
        splits = {}
        for split, rows in tables.items():
            items = []
            for row in rows:
                key = clip_name(row["youtube_id"], row["time_start"], row["time_end"])
                fields = {
                    "label": index[row["label"]] if row["label"] else -1,
                    "youtube_id": row["youtube_id"],
                    "time_start": row["time_start"],
                    "time_end": row["time_end"],
                }
                items.append((key, (key, row["youtube_id"]), fields))
            splits[split] = items
        return {"labels": labels, "num_classes": len(labels)}, splits
