"""The model record: model.json read and written unchanged, checked, its heads and its
preprocessing."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from vtm_jax.checkpoints.record import FORMAT_VERSION, ModelRecord, read_record
from vtm_jax.checkpoints.store import RECORD_FILE, load_checkpoint, load_record, save_checkpoint
from vtm_jax.errors import UserError
from vtm_jax.jobs.demo import shipped_checkpoint
from vtm_jax.merging import MergingSettings

JSON = {
    "architecture": "vivit",
    "model": {"num_classes": 5, "hidden_size": 8, "patch_size": [2, 8, 8]},
    "input": {"num_frames": 4, "image_size": 16},
    "preprocessing": {
        "num_frames": 4,
        "stride": 2,
        "min_resize": 18,
        "crop_size": 16,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    },
    "labels": None,
    "class_splits": [2, 3],
    "token_merging": {"mode": "none"},
}


def test_the_shipped_record_reads_and_writes_back_unchanged():
    path = os.path.join(shipped_checkpoint(), RECORD_FILE)
    with open(path) as f:
        stored = json.load(f)
    record = read_record(path)
    assert record.to_json() == stored
    assert list(record.to_json()) == list(stored)  # the same key order too
    assert (record.architecture, record.num_frames, record.image_size) == ("vivit", 16, 32)
    assert record.trained["steps"] == 768 and record.extra == {}
    # ... and its parameters still match the digests it records.
    _, loaded = load_checkpoint(shipped_checkpoint())
    assert loaded.params_digest == stored["params_digest"]


def test_a_saved_record_loads_as_it_was_built(tmp_path):
    record = ModelRecord(
        architecture="vivit",
        model={"num_classes": 2, "hidden_size": 8, "patch_size": (2, 8, 8)},  # a tuple
        num_frames=4,
        image_size=16,
        converted_from={"source": "hf", "path": "/x"},
        extra={"note": "kept"},
    )
    assert record.model["patch_size"] == [2, 8, 8]  # held as model.json reads it back
    params = {"w": np.ones(3, np.float32)}
    save_checkpoint(str(tmp_path / "c"), params, record)
    with open(tmp_path / "c" / RECORD_FILE) as f:
        stored = json.load(f)
    assert list(stored)[:4] == ["format_version", "architecture", "model", "input"]
    assert stored["note"] == "kept" and stored["labels"] is None
    loaded = load_record(str(tmp_path / "c"))
    assert loaded == dataclasses.replace(
        record,
        format_version=FORMAT_VERSION,
        params_digest=stored["params_digest"],
        params_files=stored["params_files"],
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architecture": None}, "'architecture' must be a JSON str"),
        ({"model": []}, "'model' must be a JSON dict"),
        ({"input": {"num_frames": 4.0, "image_size": 16}}, "input.num_frames must be an integer"),
        ({"input": {"num_frames": 0, "image_size": 16}}, "input.num_frames must be a positive"),
        ({"model": {"hidden_size": 8}}, "model.num_classes must be a positive integer"),
        ({"class_splits": [2, 2]}, "class_splits must be a list adding up to num_classes"),
        ({"class_splits": "2,3"}, "class_splits must be a list adding up to num_classes"),
        ({"labels": ["a", "b"]}, "2 labels for 5 classes"),
        ({"preprocessing": {"mean": [0.5, 0.5]}}, "preprocessing mean must be 3 finite numbers"),
        ({"preprocessing": {"std": [0.5, 0.5, 0]}}, "preprocessing std must be 3 finite numbers"),
        ({"params_digest": "md5:1"}, "params_digest must be a string 'sha256:...'"),
        ({"params_files": {"a": 1}}, "params_files must map file names to sha256 strings"),
    ],
)
def test_bad_records_are_named_errors(change, message):
    with pytest.raises(UserError, match=f"^where/model.json: {message}"):
        ModelRecord.from_json({**JSON, **change}, where="where/model.json")


def test_format_versions(tmp_path):
    """Version 1 records (hybrid's threshold beside the mode) read as version 2 ones do."""
    old = {"mode": "hybrid", "r": 4, "threshold": 0.4, "seed": 0, "trace_source": "none"}
    record = ModelRecord.from_json({**JSON, "format_version": 1, "token_merging": old})
    settings = MergingSettings.from_dict(record.token_merging)
    assert settings.rule_options == {"threshold": 0.4}
    assert settings == MergingSettings(mode="hybrid", r=4, rule_options={"threshold": 0.4})
    # The shipped checkpoint is version 1, with threshold null beside mode merge.
    shipped = read_record(os.path.join(shipped_checkpoint(), RECORD_FILE))
    assert shipped.format_version == 1 and shipped.token_merging["threshold"] is None
    assert MergingSettings.from_dict(shipped.token_merging).rule_options == {}
    # A checkpoint saved now says version 2 and keeps the options under rule_options.
    saved = dataclasses.replace(record, token_merging=settings.to_dict())
    save_checkpoint(str(tmp_path / "c"), {"w": np.ones(2, np.float32)}, saved)
    with open(tmp_path / "c" / RECORD_FILE) as f:
        stored = json.load(f)
    assert stored["format_version"] == FORMAT_VERSION == 2
    assert stored["token_merging"]["rule_options"] == {"threshold": 0.4}
    assert "threshold" not in stored["token_merging"]
    for version in (3, "2", True):
        with pytest.raises(UserError, match=f"m.json: format_version {version!r} is not one"):
            ModelRecord.from_json({**JSON, "format_version": version}, where="m.json")


def test_missing_entries_and_bad_json(tmp_path):
    for key in ("architecture", "model", "input"):
        data = {k: v for k, v in JSON.items() if k != key}
        with pytest.raises(UserError, match=f"m.json has no '{key}' entry"):
            ModelRecord.from_json(data, where="m.json")
    with pytest.raises(UserError, match="must hold a JSON object"):
        ModelRecord.from_json([JSON], where="m.json")
    (tmp_path / RECORD_FILE).write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        load_record(str(tmp_path))
    # Records built in code are checked as well.
    with pytest.raises(UserError, match="^model record: 2 labels for 5 classes"):
        ModelRecord("vivit", {"num_classes": 5}, 4, 16, labels=["a", "b"])


def test_heads():
    record = ModelRecord.from_json(JSON)
    assert record.heads() == [("head_0", 0, 2), ("head_1", 2, 5)]
    assert dataclasses.replace(record, class_splits=None).heads() == [(None, 0, 5)]
    named = dataclasses.replace(record, split_names=["left", "right"])
    assert named.heads() == [("left", 0, 2), ("right", 2, 5)]
    epic = ModelRecord("vivit", {"num_classes": 397}, 4, 16, class_splits=[97, 300])
    assert epic.heads() == [("verb", 0, 97), ("noun", 97, 397)]


def test_resolve_preprocessing():
    record = ModelRecord.from_json(JSON)
    assert record.resolve_preprocessing().to_dict() == {
        **JSON["preprocessing"],
        "sampling": "stride",
        "protocol": "centred",  # what records written before protocols were measured with
    }
    # Overrides win; entries of another protocol are dropped; numpy values become numbers.
    prep = record.resolve_preprocessing(
        {
            "stride": 3,
            "mean": np.full(3, 0.25),
            "protocol": "paper",
            "paper_loader": "ssv2",
            "is_test_split": True,
        }
    ).to_dict()
    assert prep["stride"] == 3 and prep["mean"] == [0.25] * 3
    assert prep["paper_loader"] == "ssv2" and "is_test_split" not in prep
    # The frame count and crop default to the input size.
    bare = dataclasses.replace(record, preprocessing={"stride": 1, "min_resize": 16})
    with pytest.raises(UserError, match="records no preprocessing mean, std"):
        bare.resolve_preprocessing()
    full = bare.resolve_preprocessing({"mean": [0.0] * 3, "std": [1.0] * 3}).to_dict()
    assert (full["num_frames"], full["crop_size"]) == (4, 16)
    with pytest.raises(UserError, match="unknown preprocessing entries size"):
        record.resolve_preprocessing({"size": 3})
    with pytest.raises(UserError, match="unknown protocol 'dmvr'"):
        record.resolve_preprocessing({"protocol": "dmvr"})
    with pytest.raises(UserError, match="preprocessing stride must be a positive integer"):
        record.resolve_preprocessing({"stride": 0})
