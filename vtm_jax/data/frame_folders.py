"""Datasets stored as frame folders, read in place: the layouts the paper's loaders read.

* ``ssv2_frames``: Something-Something v2 as JPEG frames extracted at 30 fps (SlowFast's
  layout). ``manual_dir`` holds the label files of the ``ssv2`` builder
  (``something-something-v2-labels.json``, ``-validation.json``, ``-train.json``) and either
  SlowFast's frame lists (``val.csv`` / ``train.csv``: a header ``original_vido_id video_id
  frame_id path labels``, then one space-separated row per frame, paths relative to the list's
  folder or to ``manual_dir``) or one folder of ``.jpg`` frames per video named by its id
  (frames in file-name order).
* ``epic_kitchens_frames``: EPIC-KITCHENS-100 from the recordings' ``rgb_frames`` (1-based
  ``frame_0000000001.jpg`` ...), with the official ``EPIC_100_validation.csv`` /
  ``EPIC_100_train.csv``. A recording's folder may be ``P01/rgb_frames/P01_01`` (the
  official layout), ``rgb/P01/P01_01`` (the paper's configs) or ``P01_01`` anywhere below
  ``manual_dir``. As the paper's loader, a segment starts at ``round(start_timestamp * fps)``
  with 60 fps recordings (50 fps for the ``PXX_1XX`` ones) and timestamps read as its parser
  reads them (``timestamps='paper'``: the digits after the point count as hundredths, right
  for the official two-digit timestamps); ``timestamps='exact'`` reads them as decimals.

Nothing is copied or built: each example names its frame files, read when a view needs them.
``manual_dir`` may be remote (``gs://bucket/ssv2``): folders are listed and frames read
through epath (:mod:`vtm_jax.paths`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

from vtm_jax import paths
from vtm_jax.data import epic_kitchens, ssv2
from vtm_jax.data.manual import SPLIT_ALIASES, find_file
from vtm_jax.errors import UserError

SSV2_FRAME_LISTS = {"train": ("train.csv",), "validation": ("val.csv", "validation.csv")}
SSV2_FPS = 30  # the frames were extracted at 30 fps
EPIC_TIMESTAMPS = ("paper", "exact")
FRAME_TEMPLATE = "frame_{:010d}.jpg"


class FrameFolderSource:
    """Random access to one split of a frame-folder dataset, like ``VideoSource``."""

    def __init__(
        self,
        name: str,
        split: str,
        root: str,
        examples: list[dict[str, Any]],
        *,
        num_classes: int,
        labels: list[str] | None = None,
        class_splits: list[int] | None = None,
        missing: Sequence[str] = (),
    ):
        self.name, self.split, self.root = name, split, paths.absolute(root)
        self._examples = examples
        self.num_classes, self.labels, self.class_splits = num_classes, labels, class_splits
        self.missing = list(missing)
        self.fingerprint = {"name": name, "split": split, "root": self.root}

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} examples")
        return dict(self._examples[index])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return (
            f"FrameFolderSource({self.name!r}, split={self.split!r}, examples={len(self)}, "
            f"missing={len(self.missing)})"
        )


def _split_name(split: str) -> str:
    if "[" in split:
        raise UserError(f"frame-folder datasets take whole splits, not slices: {split!r}")
    return SPLIT_ALIASES.get(split, split)


def _jpegs(directory: str) -> list[str]:
    files = sorted(f for f in paths.listdir(directory) if f.lower().endswith((".jpg", ".jpeg")))
    return [paths.join(directory, f) for f in files]


def _folders_by_name(root: str) -> dict[str, str]:
    """Every directory below ``root`` by its name (the first in sorted walk order wins)."""
    found: dict[str, str] = {}
    for directory, subdirs, _ in paths.walk(root):
        subdirs.sort()
        for sub in subdirs:
            found.setdefault(sub, paths.join(directory, sub))
    return found


def read_frame_list(path: str, root: str) -> dict[str, list[str]]:
    """SlowFast's frame list: video id -> frame paths in list order."""
    frames: dict[str, list[str]] = {}
    base = paths.parent(path)
    with paths.open_file(path) as f:
        header = f.readline()
        if not header.startswith("original_vido_id"):
            raise UserError(f"{path}: expected SlowFast's frame list header 'original_vido_id ...'")
        for line_number, line in enumerate(f, start=2):
            row = line.split()
            if not row:
                continue
            if len(row) != 5:
                raise UserError(f"{path}:{line_number}: expected 5 fields, got {len(row)}")
            relative = row[3]
            given = os.path.isabs(relative) or paths.is_remote(relative)
            candidate = relative if given else paths.join(base, relative)
            if not given and not paths.exists(candidate):
                candidate = paths.join(root, relative)
            frames.setdefault(row[0], []).append(candidate)
    return frames


def open_ssv2_frames(split: str, manual_dir: str) -> FrameFolderSource:
    split = _split_name(split)
    if split not in SSV2_FRAME_LISTS:
        raise UserError(f"ssv2_frames has splits {', '.join(SSV2_FRAME_LISTS)}, not {split!r}")
    label_path = find_file(manual_dir, ssv2.LABEL_FILES)
    if label_path is None:
        raise UserError(f"ssv2_frames: no {' or '.join(ssv2.LABEL_FILES)} under {manual_dir}")
    labels = ssv2.read_labels(label_path)
    index = {name: i for i, name in enumerate(labels)}
    videos_path = find_file(manual_dir, ssv2.SPLIT_FILES[split])
    if videos_path is None:
        raise UserError(
            f"ssv2_frames: no {' or '.join(ssv2.SPLIT_FILES[split])} under {manual_dir}"
        )
    list_path = find_file(manual_dir, SSV2_FRAME_LISTS[split])
    listed = read_frame_list(list_path, manual_dir) if list_path else None
    folders = None if listed is not None else _folders_by_name(manual_dir)
    examples, missing = [], []
    for video_id, template in ssv2.read_split(videos_path):
        if template not in index:
            raise UserError(f"{videos_path}: video {video_id}: class {template!r} is not in labels")
        if listed is not None:
            paths = listed.get(video_id)
        else:
            folder = folders.get(video_id)
            paths = _jpegs(folder) if folder else None
        if not paths:
            missing.append(video_id)  # as the paper's loader, videos without frames are left out
            continue
        examples.append(
            {"video_id": video_id, "label": index[template], "frame_paths": paths, "fps": SSV2_FPS}
        )
    if not examples:
        raise UserError(f"ssv2_frames: found the frames of none of the {split} videos")
    return FrameFolderSource(
        "ssv2_frames",
        split,
        manual_dir,
        examples,
        num_classes=len(labels),
        labels=labels,
        missing=missing,
    )


def timestamp_seconds(timestamp: str, how: str = "paper") -> float:
    """Seconds of an ``HH:MM:SS.ff`` timestamp; ``paper`` reads the fraction as hundredths
    whatever its length, as the paper's loader does; ``exact`` as a decimal fraction."""
    try:
        clock, _, fraction = timestamp.strip().partition(".")
        hours, minutes, seconds = (int(part) for part in clock.split(":"))
        whole = hours * 3600 + minutes * 60 + seconds
        if not fraction:
            return float(whole)
        if how == "paper":
            return whole + float(fraction) / 100
        return whole + float("0." + fraction)
    except ValueError:
        raise UserError(f"bad timestamp {timestamp!r}: expected HH:MM:SS.ff") from None


def recording_fps(video_id: str) -> int:
    """EPIC-KITCHENS-100 frame rate: 50 for the extension's ``PXX_1XX`` recordings, else 60."""
    parts = video_id.split("_")
    return 50 if len(parts) > 1 and len(parts[1]) == 3 else 60


def _recording_folder(root: str, participant: str, video_id: str, folders: dict) -> str | None:
    for candidate in (
        paths.join(root, participant, "rgb_frames", video_id),
        paths.join(root, "rgb", participant, video_id),
        paths.join(root, video_id),
    ):
        if paths.is_dir(candidate):
            return candidate
    return folders.get(video_id)


def open_epic_kitchens_frames(
    split: str, manual_dir: str, *, timestamps: str = "paper"
) -> FrameFolderSource:
    split = _split_name(split)
    if timestamps not in EPIC_TIMESTAMPS:
        raise UserError(f"unknown timestamps {timestamps!r}; valid: {', '.join(EPIC_TIMESTAMPS)}")
    if split not in epic_kitchens.SPLIT_FILES:
        raise UserError(
            f"epic_kitchens_frames has splits {', '.join(epic_kitchens.SPLIT_FILES)}, not {split!r}"
        )
    path = find_file(manual_dir, epic_kitchens.SPLIT_FILES[split])
    if path is None:
        raise UserError(
            f"epic_kitchens_frames: no {epic_kitchens.SPLIT_FILES[split][0]} under {manual_dir}"
        )
    rows = epic_kitchens.read_segments(path, timestamps=True)
    folders: dict[str, str] | None = None
    examples, missing = [], []
    for row in rows:
        video_id = row["video_id"]
        folder = _recording_folder(manual_dir, row["participant_id"], video_id, {})
        if folder is None:
            if folders is None:
                folders = _folders_by_name(manual_dir)
            folder = folders.get(video_id)
        if folder is None:
            missing.append(row["narration_id"])
            continue
        fps = recording_fps(video_id)
        start = int(round(timestamp_seconds(row["start_timestamp"], timestamps) * fps))
        stop = int(round(timestamp_seconds(row["stop_timestamp"], timestamps) * fps))
        examples.append(
            {
                "video_id": row["narration_id"],
                "label": -1,
                "verb": row["verb_class"],
                "noun": row["noun_class"],
                "recording_id": video_id,
                "frame_template": paths.join(folder, FRAME_TEMPLATE),
                "fps": fps,
                "segment_start": start,
                "segment_frames": stop - start,
            }
        )
    if not examples:
        raise UserError(f"epic_kitchens_frames: found the frames of none of the {split} segments")
    return FrameFolderSource(
        "epic_kitchens_frames",
        split,
        manual_dir,
        examples,
        num_classes=sum(epic_kitchens.CLASS_SPLITS),
        labels=epic_kitchens.class_names(manual_dir),
        class_splits=list(epic_kitchens.CLASS_SPLITS),
        missing=missing,
    )


FRAME_DATASETS = {
    "ssv2_frames": open_ssv2_frames,
    "epic_kitchens_frames": open_epic_kitchens_frames,
}


def open_frame_split(
    name: str, split: str, manual_dir: str | None, options: dict[str, Any] | None = None
) -> FrameFolderSource:
    """One split of a frame-folder dataset, read from ``manual_dir`` in place."""
    if not manual_dir or not paths.is_dir(manual_dir):
        raise UserError(
            f"{name} is read in place: give its folder as manual_dir (got {manual_dir})"
        )
    options = dict(options or {})
    if name == "epic_kitchens_frames":
        unknown = sorted(set(options) - {"timestamps"})
        if unknown:
            raise UserError(f"unknown epic_kitchens_frames option(s) {', '.join(unknown)}")
        return open_epic_kitchens_frames(split, manual_dir, **options)
    if options:
        raise UserError(f"dataset {name!r} takes no options, got {', '.join(sorted(options))}")
    return FRAME_DATASETS[name](split, manual_dir)
