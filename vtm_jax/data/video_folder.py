"""``video_folder``: a folder of your own videos, read in place, classes named by folders.

``manual_dir`` is one of:

* **Class folders**: ``<manual_dir>/<class name>/<video file>`` (any container PyAV reads:
  ``.mp4``, ``.avi``, ``.webm``, ``.mkv`` ...) and ``<manual_dir>/<class name>/<video id>/``
  folders of ``.jpg``/``.jpeg``/``.png`` frames (in file-name order, read as 30 fps). Hidden
  files and text files (``.txt``, ``.json``, ``.csv`` ...) in a class folder are not videos;
  every other file is one, and one PyAV cannot read is skipped and listed in the results.
* **A list**: a ``.csv`` or ``.json`` file given as ``manual_dir``, or ``videos.csv`` /
  ``videos.json`` at the top of the ``manual_dir`` folder (which then wins over its class
  folders). CSV rows are ``path,label`` (an optional ``path,label`` header); JSON is a list of
  ``{"path": ..., "label": ...}`` objects or ``[path, label]`` pairs. Paths are relative to the
  list's folder (or absolute) and name a video file or a frame folder; labels are class names.

Label ids: the class names sorted, or, once evaluation hands the source the checkpoint's class
names (:meth:`VideoFolderSource.use_checkpoint_classes`), the checkpoint's id of each name, so
a user's ``archery/`` folder gets Kinetics' archery id. Names match exactly, else ignoring case
and reading ``_`` as a space. The results record each class's id (``run.source.classes``).

A video folder has one split: whatever split is asked for (``test``, ``validation`` ...) holds
every video, and its name is only recorded. Nothing is copied or decoded before a view needs it.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from vtm_jax import paths
from vtm_jax.errors import UserError

NAME = "video_folder"
LIST_FILES = ("videos.csv", "videos.json")
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
# Files that sit beside videos but are not videos (anything else is handed to PyAV).
NOT_VIDEO_SUFFIXES = (".txt", ".md", ".csv", ".tsv", ".json", ".yaml", ".yml", ".xml", ".ini")
NOT_VIDEO_SUFFIXES += (".db", ".srt", ".vtt", ".nfo", ".log", ".pdf", ".zip", ".tar", ".gz")
# Video files directly in manual_dir, outside any class folder, are a mistake worth naming.
VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv")
VIDEO_SUFFIXES += (".flv", ".wmv", ".3gp", ".ts")


class VideoFolderSource:
    """Random access to the videos of a ``video_folder``, like ``VideoSource``.

    ``classes``: the class names found, sorted; ``labels``: the name of each label id (the
    checkpoint's names once bound); ``num_classes``, ``class_splits`` (None) and ``missing``
    (empty: a listed file that is missing is an error) as other sources have them.
    """

    def __init__(self, split: str, root: str, videos: list[tuple[str, str, str, bool]]):
        # videos: (video id, class name, path, is a frame folder), in listing order
        self.name, self.split, self.root = NAME, split, paths.absolute(root)
        self._videos = videos
        self.classes = sorted({video[1] for video in videos})
        self.class_splits: list[int] | None = None
        self.missing: list[str] = []
        self.class_ids = {name: i for i, name in enumerate(self.classes)}
        self.labels: list[str] | None = list(self.classes)
        self.num_classes = len(self.classes)

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What identifies the examples in the results: the place, and each class's id."""
        return {
            "name": self.name,
            "split": self.split,
            "root": self.root,
            "classes": self.class_ids,
        }

    def use_checkpoint_classes(self, labels: Sequence[str] | None, heads: Sequence[int]) -> None:
        """Take label ids from the checkpoint: its class name list ``labels`` (each class of
        the folder must be one of them), or with no names the sorted classes as ids 0, 1 ...
        (at most the classifier's ``heads[0]``). Evaluation calls this before it checks the
        class count; calling it again rebinds from scratch."""
        heads = [int(h) for h in heads]
        if len(heads) != 1:
            raise UserError(
                f"{NAME} gives one label per video; the checkpoint has {len(heads)} heads {heads}"
            )
        if labels:
            self.class_ids = match_classes(self.classes, list(labels))
            self.labels = list(labels)
        else:
            if len(self.classes) > heads[0]:
                raise UserError(
                    f"{NAME}: {len(self.classes)} classes ({_few(self.classes)}), the checkpoint "
                    f"has {heads[0]} and no class names to match them by"
                )
            self.class_ids = {name: i for i, name in enumerate(self.classes)}
            self.labels = list(self.classes)
        self.num_classes = heads[0]

    def __len__(self) -> int:
        return len(self._videos)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} examples")
        video_id, class_name, path, frames = self._videos[index]
        example: dict[str, Any] = {
            "video_id": video_id,
            "label": np.int64(self.class_ids[class_name]),
            "class_name": class_name,
        }
        if frames:  # listed now, not when opening: a big folder opens fast
            example["frame_paths"] = _frame_files(path)
        else:  # read by the frame reader, so an unreadable file is skipped, not a crash
            example["video_path"] = path
        return example

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return (
            f"VideoFolderSource({self.root!r}, split={self.split!r}, examples={len(self)}, "
            f"classes={len(self.classes)})"
        )


def _few(names: Sequence[str], count: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:count])
    return shown + (f" ... ({len(names)} in all)" if len(names) > count else "")


def _normal(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()


def match_classes(classes: Sequence[str], labels: Sequence[str]) -> dict[str, int]:
    """Each class name's id among the checkpoint's ``labels``: the same name, else the one
    name equal ignoring case and ``_`` for space; an unknown class is a one-line error."""
    exact = {name: i for i, name in enumerate(labels)}
    loose: dict[str, list[int]] = {}
    for i, name in enumerate(labels):
        loose.setdefault(_normal(name), []).append(i)
    ids, unknown = {}, []
    for name in classes:
        if name in exact:
            ids[name] = exact[name]
        elif len(loose.get(_normal(name), [])) == 1:
            ids[name] = loose[_normal(name)][0]
        else:
            unknown.append(name)
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(labels), n=5, cutoff=0.5)
        more = f" (and {len(unknown) - 1} more unknown)" if len(unknown) > 1 else ""
        raise UserError(
            f"{NAME}: class {unknown[0]!r}{more} is not one of the checkpoint's {len(labels)} "
            f"classes; valid ones include {_few(close or sorted(labels))}"
        )
    return ids


def _frame_files(folder: str) -> list[str]:
    names = sorted(f for f in paths.listdir(folder) if f.lower().endswith(FRAME_SUFFIXES))
    return [paths.join(folder, name) for name in names]


def _is_video_name(name: str) -> bool:
    return not name.startswith(".") and not name.lower().endswith(NOT_VIDEO_SUFFIXES)


def _class_videos(root: str, class_name: str) -> list[tuple[str, str, str, bool]]:
    folder = paths.join(root, class_name)
    videos = []
    for entry in sorted(paths.listdir(folder)):
        path = paths.join(folder, entry)
        if paths.is_dir(path) and not entry.startswith("."):
            videos.append((f"{class_name}/{entry}", class_name, path, True))
        elif _is_video_name(entry):
            videos.append((f"{class_name}/{entry}", class_name, path, False))
    if not videos:
        raise UserError(f"{NAME}: class folder {folder} holds no videos (files or frame folders)")
    return videos


def scan_class_folders(root: str) -> list[tuple[str, str, str, bool]]:
    """Layout A: ``(video id, class, path, is a frame folder)`` of every video, by class."""
    entries = sorted(e for e in paths.listdir(root) if not e.startswith("."))
    stray = [e for e in entries if e.lower().endswith(VIDEO_SUFFIXES)]
    if stray:
        raise UserError(
            f"{NAME}: {paths.join(root, stray[0])} is not in a class folder: put each video in "
            f"<manual_dir>/<class name>/ (or list them in {' or '.join(LIST_FILES)})"
        )
    classes = [e for e in entries if paths.is_dir(paths.join(root, e))]
    if not classes:
        raise UserError(
            f"{NAME}: no videos in {root}: expected <class name>/<video> folders or a "
            f"{' or '.join(LIST_FILES)} list"
        )
    return [video for name in classes for video in _class_videos(root, name)]


def _list_rows(path: str) -> list[tuple[int, Any, Any]]:
    """``(row number, path, label)`` of a CSV or JSON list, as written."""
    text = paths.read_text(path)
    if path.lower().endswith(".json"):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(items, list):
            raise UserError(f"{path}: expected a list of {{'path', 'label'}} objects")
        rows = []
        for number, item in enumerate(items, start=1):
            if isinstance(item, dict) and set(item) >= {"path", "label"}:
                rows.append((number, item["path"], item["label"]))
            elif isinstance(item, list) and len(item) == 2:
                rows.append((number, item[0], item[1]))
            else:
                raise UserError(f"{path}: item {number}: expected {{'path': ..., 'label': ...}}")
        return rows
    rows = []
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or not any(field.strip() for field in row):
            continue
        if len(row) != 2:
            raise UserError(f"{path}:{number}: expected 'path,label', got {len(row)} fields")
        if number == 1 and [f.strip().lower() for f in row] == ["path", "label"]:
            continue  # the header
        rows.append((number, row[0].strip(), row[1].strip()))
    return rows


def read_video_list(path: str) -> list[tuple[str, str, str, bool]]:
    """Layout B: the videos a CSV or JSON list names, each file checked to exist."""
    base = paths.parent(path)
    videos, seen = [], set()
    for number, relative, label in _list_rows(path):
        where = f"{path}:{number}" if path.lower().endswith(".csv") else f"{path}: item {number}"
        if not isinstance(relative, str) or not relative:
            raise UserError(f"{where}: the path must be a non-empty string, not {relative!r}")
        if not isinstance(label, str) or not label:
            raise UserError(f"{where}: the label must be a class name (a string), not {label!r}")
        given = os.path.isabs(relative) or paths.is_remote(relative)
        video = relative if given else paths.join(base, relative)
        if not paths.exists(video):
            raise UserError(f"{where}: no such video file or frame folder {video}")
        if relative in seen:
            raise UserError(f"{where}: {relative} is listed twice")
        seen.add(relative)
        videos.append((relative, label, video, paths.is_dir(video)))
    if not videos:
        raise UserError(f"{NAME}: {path} lists no videos")
    return videos


def _list_file(manual_dir: str) -> str | None:
    """The list ``manual_dir`` is or holds at its top, None for class folders."""
    if paths.is_dir(manual_dir):
        found = [paths.join(manual_dir, n) for n in LIST_FILES]
        return next((f for f in found if paths.is_file(f)), None)
    if not paths.exists(manual_dir):
        raise UserError(f"{NAME}: manual_dir {manual_dir} does not exist")
    if not manual_dir.lower().endswith((".csv", ".json")):
        raise UserError(
            f"{NAME}: manual_dir {manual_dir} is a file; give a folder of class folders or "
            "a .csv / .json list"
        )
    return manual_dir


def open_video_folder(split: str, manual_dir: str | None, **options: Any) -> VideoFolderSource:
    """The videos under ``manual_dir`` (the module docstring's layouts) as one split."""
    if options:
        raise UserError(f"dataset {NAME!r} takes no options, got {', '.join(sorted(options))}")
    if not manual_dir:
        raise UserError(
            f"{NAME} is read in place: give its folder (or a .csv / .json list) as manual_dir"
        )
    if "[" in split:
        raise UserError(
            f"{NAME} has one split of every video, not slices: {split!r} (eval.limit "
            "evaluates the first N)"
        )
    list_path = _list_file(manual_dir)
    videos = read_video_list(list_path) if list_path else scan_class_folders(manual_dir)
    return VideoFolderSource(split, manual_dir, videos)
