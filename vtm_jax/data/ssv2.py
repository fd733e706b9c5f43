"""Something-Something v2 from the user's own label files and videos (TFDS manual_dir).

Layout of ``manual_dir`` (files may sit in any subdirectory):

* ``labels.json`` (or ``something-something-v2-labels.json``): an object mapping each of the
  174 class names to its index as a string, e.g. ``"Approaching something with your camera":
  "0"``;
* ``train.json`` and ``validation.json`` (or ``something-something-v2-train.json`` /
  ``-validation.json``): lists of ``{"id", "label", "template", "placeholders"}``. The class is
  the ``template`` with its square brackets removed ("Putting [something] on a surface" ->
  "Putting something on a surface"), as the official loaders look it up; ``label`` is the
  filled-in caption. Only the splits whose file is present are built; the test list has no
  labels and is not built.
* videos ``{id}.webm`` (``.mp4`` also accepted), anywhere below ``manual_dir``.
"""

from __future__ import annotations

import json
from typing import Any

import tensorflow_datasets as tfds

from vtm_jax import paths
from vtm_jax.data.manual import ManualVideoBuilder, find_file
from vtm_jax.errors import UserError

LABEL_FILES = ("labels.json", "something-something-v2-labels.json")
SPLIT_FILES = {
    "train": ("train.json", "something-something-v2-train.json"),
    "validation": ("validation.json", "something-something-v2-validation.json"),
}


def template_class(template: str) -> str:
    """The class name of a template: its ``[something]`` placeholders lose their brackets."""
    return template.replace("[", "").replace("]", "")


def _load_json(path: str) -> Any:
    try:
        with paths.open_file(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def read_labels(path: str) -> list[str]:
    """Class names in index order from ``labels.json``."""
    table = _load_json(path)
    if not isinstance(table, dict):
        raise UserError(f"{path}: expected an object mapping class names to indices")
    try:
        by_index = {int(index): name for name, index in table.items()}
    except (TypeError, ValueError):
        raise UserError(f"{path}: class indices must be integers (as strings)") from None
    if sorted(by_index) != list(range(len(table))):
        raise UserError(f"{path}: class indices must be 0..{len(table) - 1}, each once")
    return [by_index[i] for i in range(len(table))]


def read_split(path: str) -> list[tuple[str, str]]:
    """``(video id, class name)`` of every video in a split file (``validation.json``)."""
    entries = _load_json(path)
    if not isinstance(entries, list):
        raise UserError(f"{path}: expected a list of videos")
    videos = []
    for entry in entries:
        try:
            videos.append((str(entry["id"]), template_class(entry["template"])))
        except (KeyError, TypeError, AttributeError):
            raise UserError(f"{path}: each video needs 'id' and 'template'") from None
    return videos


class SomethingSomethingV2(ManualVideoBuilder, skip_registration=True):
    """Something-Something v2: 174 classes of template actions, videos as downloaded (.webm)."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
    EXTENSIONS = (".webm", ".mp4")

    def _features(self) -> dict[str, tfds.features.FeatureConnector]:
        return {"template": tfds.features.Text(), "caption": tfds.features.Text()}

    def _read_annotations(self, root: str) -> tuple[dict[str, Any], dict[str, list]]:
        label_path = find_file(root, LABEL_FILES)
        if label_path is None:
            raise UserError(f"ssv2: no {' or '.join(LABEL_FILES)} under {root}")
        labels = read_labels(label_path)
        index = {name: i for i, name in enumerate(labels)}
        splits = {}
        for split, names in SPLIT_FILES.items():
            path = find_file(root, names)
            if path is None:
                continue
            entries = _load_json(path)
            if not isinstance(entries, list):
                raise UserError(f"{path}: expected a list of videos")
            items = []
            for entry in entries:
                try:
                    video_id, template = str(entry["id"]), entry["template"]
                except (KeyError, TypeError):
                    raise UserError(f"{path}: each video needs 'id' and 'template'") from None
                name = template_class(template)
                if name not in index:
                    raise UserError(f"{path}: video {video_id}: class {name!r} is not in labels")
                fields = {
                    "label": index[name],
                    "template": template,
                    "caption": str(entry.get("label", "")),
                }
                items.append((video_id, (video_id,), fields))
            splits[split] = items
        return {"labels": labels, "num_classes": len(labels)}, splits
