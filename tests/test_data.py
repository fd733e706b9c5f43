"""Datasets: TFDS array_record builders read back without TensorFlow, and the eval pipeline.

The real-dataset builders run on tiny fake copies made here (short videos written with PyAV,
label files in each dataset's released format), including listed-but-missing and corrupt
videos.
"""

import csv
import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest

from vtm_jax.data import synthetic
from vtm_jax.data.datasets import open_split
from vtm_jax.data.pipeline import (
    CorruptVideo,
    clip_indices,
    decode_bytes,
    eval_views,
    shard_indices,
)
from vtm_jax.data.preprocessing import Preprocessing
from vtm_jax.errors import UserError
from vtm_jax.jobs.evaluation.input import ExampleLoader, host_batch, loaded_batches

SYNTHETIC = {"train_examples": 64, "test_examples": 32}
PREP = {
    "num_frames": 4,
    "stride": 2,
    "min_resize": 20,
    "crop_size": 16,
    "mean": [0.45, 0.45, 0.45],
    "std": [0.225, 0.225, 0.225],
}
VIEWS = Preprocessing.from_dict(PREP)


def write_video(path, frames, codec="libx264", fps=10):
    """Encode uint8 frames [T, H, W, 3] (even H and W) with PyAV's bundled ffmpeg."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def ramp(frames=12, height=24, width=32, offset=0):
    """A video whose frame t is flat grey 20 * t + offset, easy to recognise after coding."""
    values = (20 * np.arange(frames) + offset).astype(np.uint8)
    return np.broadcast_to(values[:, None, None, None], (frames, height, width, 3)).copy()


def write_corrupt(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())


# --- synthetic ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_train(tmp_path_factory):
    return open_split(
        "synthetic", "train", data_dir=str(tmp_path_factory.mktemp("syn")), config=SYNTHETIC
    )


def test_synthetic_builds_and_reads_back(synthetic_train):
    source = synthetic_train
    assert len(source) == 64 and source.num_classes == 8 and source.class_splits is None
    assert source.labels == list(synthetic.CLASS_NAMES)
    example = source[0]
    assert example["video"].shape == (16, 32, 32, 3) and example["video"].dtype == np.uint8
    assert isinstance(example["label"], np.int64) and isinstance(example["video_id"], str)
    assert os.listdir(source.info.data_dir) and any(
        "array_record" in f for f in os.listdir(source.info.data_dir)
    )
    labels = np.array([source[i]["label"] for i in range(len(source))])
    assert np.bincount(labels, minlength=8).tolist() == [8] * 8
    ids = {source[i]["video_id"] for i in range(len(source))}
    assert len(ids) == 64


def test_datasets_are_built_and_read_without_tensorflow(tmp_path):
    # In a fresh interpreter: other tests' TensorBoard writers import TensorFlow in this one.
    config = {"train_examples": 4, "test_examples": 2}
    script = (
        "import sys; from vtm_jax.data.datasets import open_split; "
        f"s = open_split('synthetic', 'train', data_dir={str(tmp_path)!r}, config={config!r}); "
        "assert len(s) == 4 and s[0]['video'].shape == (16, 32, 32, 3); "
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


def test_synthetic_is_deterministic(synthetic_train, tmp_path):
    again = open_split("synthetic", "train", data_dir=str(tmp_path), config=SYNTHETIC)
    for i in range(len(again)):
        a, b = synthetic_train[i], again[i]
        assert a["video_id"] == b["video_id"] and a["label"] == b["label"]
        np.testing.assert_array_equal(a["video"], b["video"])
    index = int(synthetic_train[5]["video_id"].split("_")[1])
    expected = synthetic.generate("train", index, synthetic.make_config(**SYNTHETIC))
    np.testing.assert_array_equal(synthetic_train[5]["video"], expected["video"])
    test = open_split("synthetic", "test", data_dir=str(tmp_path), config=SYNTHETIC)
    assert len(test) == 32 and test[0]["video_id"].startswith("test_")


def estimated_motion(video):
    """The per-frame shift (dy, dx) of the one shape that moves (shapes have palette colours).

    The moving shape is drawn last, so it keeps its area; the static one changes only when
    the moving one passes over it.
    """
    for colour in synthetic.PALETTE:
        masks = np.all(video == colour, axis=-1)
        areas = masks.sum(axis=(1, 2))
        if areas[0] and (areas == areas[0]).all() and (masks != masks[0]).any():
            break
    else:
        raise AssertionError("nothing moves")
    candidates = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    errors = [
        sum(np.sum(np.roll(masks[t], shift, axis=(0, 1)) != masks[t + 1]) for t in range(15))
        for shift in candidates
    ]
    assert min(errors) == 0  # a rigid translation explains every frame
    return candidates[int(np.argmin(errors))]


def test_synthetic_class_is_in_the_motion_not_in_a_frame(synthetic_train, tmp_path):
    source = synthetic_train
    videos = np.stack([source[i]["video"] for i in range(len(source))])
    labels = np.array([source[i]["label"] for i in range(len(source))])
    # The motion alone gives every label.
    for video, label in zip(videos, labels, strict=True):
        assert estimated_motion(video) == synthetic.motion(int(label), 32)
    # A single frame does not: nearest class-mean on first frames is near chance (1/8) on test.
    first = videos[:, 0].reshape(len(videos), -1).astype(np.float32)
    means = np.stack([first[labels == c].mean(0) for c in range(8)])
    test = open_split("synthetic", "test", data_dir=str(tmp_path), config=SYNTHETIC)
    test_first = np.stack([test[i]["video"][0] for i in range(len(test))])
    test_first = test_first.reshape(len(test), -1).astype(np.float32)
    test_labels = np.array([test[i]["label"] for i in range(len(test))])
    guess = np.argmin(((test_first[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert np.mean(guess == test_labels) < 0.3
    # Large flat areas: most 4x4 patches of a frame hold one or two colours.
    patches = videos[:, 0].reshape(len(videos), 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(-1, 16, 3)
    few = [len(np.unique(p, axis=0)) <= 2 for p in patches]
    assert np.mean(few) > 0.5


def test_synthetic_options_are_checked(tmp_path):
    with pytest.raises(UserError, match="unknown synthetic option.*valid: frames"):
        open_split("synthetic", "train", data_dir=str(tmp_path), config={"frame": 8})
    with pytest.raises(UserError, match="bad synthetic option.*size=0"):
        open_split("synthetic", "train", data_dir=str(tmp_path), config={"size": 0})
    with pytest.raises(UserError, match="bad synthetic option.*object_scale=0.9"):
        open_split("synthetic", "train", data_dir=str(tmp_path), config={"object_scale": 0.9})


def test_synthetic_object_scale_sets_the_shape_size():
    from vtm_jax.data.synthetic import generate, make_config

    small, large = make_config(size=32), make_config(size=32, object_scale=0.2)
    assert small.name != large.name  # built in their own directories
    assert small.name == make_config().name  # the default keeps its old name and data

    def object_pixels(config):
        # The moving shape is the only thing that changes between frames.
        video = generate("train", 3, config)["video"].astype(int)
        return (np.abs(video[0] - video[-1]).sum(-1) > 0).sum()

    assert object_pixels(large) > 3 * object_pixels(small)


# --- Kinetics-400 ------------------------------------------------------------------------

KINETICS_HEADER = ["label", "youtube_id", "time_start", "time_end", "split", "is_cc"]


@pytest.fixture(scope="module")
def kinetics(tmp_path_factory):
    root = tmp_path_factory.mktemp("k400")
    manual = root / "manual"
    rows = {
        "train": [
            ("abseiling", "aaaaaaaaaaa", 10, 20),
            ("passing American football (in game)", "bbbbbbbbbbb", 0, 10),
            ("zumba", "ccccccccccc", 5, 15),
        ],
        "validate": [
            ("zumba", "ddddddddddd", 1, 11),
            ("abseiling", "eeeeeeeeeee", 30, 40),
            ("abseiling", "fffffffffff", 3, 13),  # listed, never downloaded
            ("passing American football (in game)", "ggggggggggg", 2, 12),  # corrupt file
        ],
    }
    for split, table in rows.items():
        os.makedirs(manual / "annotations", exist_ok=True)
        with open(manual / "annotations" / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(KINETICS_HEADER)
            for label, yid, start, end in table:
                writer.writerow([label, yid, start, end, split, 0])
    # The downloader's layout for train (one folder per class), a flat folder for validation.
    for k, (label, yid, start, end) in enumerate(rows["train"]):
        write_video(manual / "train" / label / f"{yid}_{start:06d}_{end:06d}.mp4", ramp(offset=k))
    write_video(manual / "val" / "ddddddddddd_000001_000011.mp4", ramp(offset=3))
    write_video(manual / "val" / "eeeeeeeeeee_000030_000040.mp4", ramp(height=40, width=24))
    write_corrupt(manual / "val" / "ggggggggggg_000002_000012.mp4")
    open_split("kinetics400", "validation", data_dir=str(root / "data"), manual_dir=str(manual))
    return root


def test_kinetics_builder(kinetics):
    data_dir, manual = str(kinetics / "data"), str(kinetics / "manual")
    val = open_split("kinetics400", "validation", data_dir=data_dir, manual_dir=manual)
    assert val.labels == ["abseiling", "passing American football (in game)", "zumba"]
    assert val.num_classes == 3 and val.class_splits is None
    assert len(val) == 3 and val.missing == ["fffffffffff_000003_000013"]
    examples = {val[i]["video_id"]: val[i] for i in range(len(val))}
    assert set(examples) == {
        "ddddddddddd_000001_000011",
        "eeeeeeeeeee_000030_000040",
        "ggggggggggg_000002_000012",
    }
    good = examples["ddddddddddd_000001_000011"]
    assert good["label"] == 2 and good["youtube_id"] == "ddddddddddd" and good["time_end"] == 11
    stored = good["video"]
    assert stored.dtype == np.uint8 and stored.ndim == 1
    with open(os.path.join(manual, "val", "ddddddddddd_000001_000011.mp4"), "rb") as f:
        assert stored.tobytes() == f.read()
    assert decode_bytes(stored).shape == (12, 24, 32, 3)
    views = eval_views(good, VIEWS, num_clips=2, three_crops=True)
    assert views.shape == (6, 4, 16, 16, 3) and views.dtype == np.float32
    portrait = eval_views(
        examples["eeeeeeeeeee_000030_000040"], VIEWS, num_clips=1, three_crops=True
    )
    assert portrait.shape == (3, 4, 16, 16, 3)
    with pytest.raises(CorruptVideo) as caught:
        eval_views(examples["ggggggggggg_000002_000012"], VIEWS, num_clips=1, three_crops=False)
    assert caught.value.video_id == "ggggggggggg_000002_000012" and caught.value.reason
    # Built once: the train split and the 'val' alias open without the manual files.
    train = open_split("kinetics400", "train", data_dir=data_dir, build=False)
    assert len(train) == 3 and train.missing == []
    labels = {train[i]["youtube_id"]: int(train[i]["label"]) for i in range(3)}
    assert labels == {"aaaaaaaaaaa": 0, "bbbbbbbbbbb": 1, "ccccccccccc": 2}
    assert len(open_split("kinetics400", "val[:2]", data_dir=data_dir, build=False)) == 2
    with pytest.raises(UserError, match="no split 'test'.*validation"):
        open_split("kinetics400", "test", data_dir=data_dir)


def test_evaluation_input_batches_pads_and_masks(kinetics):
    source = open_split("kinetics400", "validation", data_dir=str(kinetics / "data"), build=False)
    ids = [source[i]["video_id"] for i in range(len(source))]
    heads = [("label", 0, 3)]
    view_shape = (2, 4, 16, 16, 3)
    load = ExampleLoader(
        source, VIEWS, heads, num_clips=2, three_crops=False, view_shape=view_shape
    )
    loaded = list(loaded_batches(load, range(3), host_batch=2, workers=2))
    assert [len(items) for items in loaded] == [2, 1]
    first, last = (host_batch(items, 2, view_shape, num_heads=1) for items in loaded)
    assert first["inputs"].shape == (2, *view_shape)
    assert [item.video_id for items in loaded for item in items] == ids
    corrupt = ids.index("ggggggggggg_000002_000012")
    mask = np.concatenate([first["batch_mask"], last["batch_mask"]])
    assert mask.tolist() == [i != corrupt for i in range(3)] + [False]
    reasons = [item.reason for items in loaded for item in items]
    assert [bool(reason) for reason in reasons] == [i == corrupt for i in range(3)]
    assert not last["inputs"][1].any() and not first["inputs"][corrupt].any()


def test_real_datasets_need_their_files(tmp_path):
    with pytest.raises(UserError, match="manual_dir"):
        open_split("kinetics400", "train", data_dir=str(tmp_path))
    with pytest.raises(UserError, match="does not exist or is empty"):
        open_split("ssv2", "train", data_dir=str(tmp_path), manual_dir=str(tmp_path / "none"))
    with pytest.raises(UserError, match="not built"):
        open_split("epic_kitchens", "train", data_dir=str(tmp_path), build=False)
    with pytest.raises(
        UserError, match="unknown dataset 'k400'; valid: synthetic, kinetics400, ssv2, epic"
    ):
        open_split("k400", "train", data_dir=str(tmp_path))


# --- Something-Something v2 --------------------------------------------------------------


def test_ssv2_builder(tmp_path):
    manual = tmp_path / "manual"
    labels = {
        "Approaching something with your camera": "1",
        "Putting something on a surface": "0",
        "Pushing something from left to right": "2",
    }
    entries = {
        "train": [
            ("101", "Putting [something] on a surface", ["a cup"]),
            ("102", "Pushing [something] from left to right", ["a pen"]),
        ],
        "validation": [
            ("201", "Approaching [something] with your camera", ["a café menu"]),
            ("202", "Putting [something] on a surface", ["a phone"]),
            ("203", "Pushing [something] from left to right", ["a key"]),  # missing
        ],
    }
    os.makedirs(manual / "labels")
    with open(manual / "labels" / "labels.json", "w") as f:
        json.dump(labels, f)
    for split, table in entries.items():
        records = [
            {
                "id": vid,
                "label": template.replace("[something]", things[0]),
                "template": template,
                "placeholders": things,
            }
            for vid, template, things in table
        ]
        with open(manual / "labels" / f"{split}.json", "w") as f:
            json.dump(records, f)
    for vid in ("101", "102", "201", "202"):
        write_video(manual / "videos" / f"{vid}.webm", ramp(frames=8), codec="libvpx")
    data_dir = str(tmp_path / "data")
    val = open_split("ssv2", "validation", data_dir=data_dir, manual_dir=str(manual))
    assert val.labels == [
        "Putting something on a surface",
        "Approaching something with your camera",
        "Pushing something from left to right",
    ]
    assert val.num_classes == 3 and len(val) == 2 and val.missing == ["203"]
    examples = {val[i]["video_id"]: val[i] for i in range(len(val))}
    assert examples["201"]["label"] == 1 and examples["202"]["label"] == 0
    assert examples["201"]["caption"] == "Approaching a café menu with your camera"
    assert examples["202"]["template"] == "Putting [something] on a surface"
    assert decode_bytes(examples["201"]["video"]).shape == (8, 24, 32, 3)
    views = eval_views(examples["201"], VIEWS, num_clips=2, three_crops=True)
    assert views.shape == (6, 4, 16, 16, 3)
    train = open_split("ssv2", "train", data_dir=data_dir, build=False)
    assert sorted(int(train[i]["label"]) for i in range(2)) == [0, 2]


# --- EPIC-KITCHENS-100 -------------------------------------------------------------------

EPIC_HEADER = (
    "narration_id,participant_id,video_id,narration_timestamp,start_timestamp,stop_timestamp,"
    "start_frame,stop_frame,narration,verb,verb_class,noun,noun_class,all_nouns,all_noun_classes"
)


def test_epic_kitchens_builder(tmp_path):
    manual = tmp_path / "manual"
    os.makedirs(manual / "annotations")
    train = [
        "P01_01_0,P01,P01_01,00:00:01.089,00:00:00.14,00:00:03.37,8,202,open door,open,3,"
        "door,3,['door'],[3]",
        "P01_01_1,P01,P01_01,00:00:02.629,00:00:04.37,00:00:06.17,262,370,take plate and knife,"
        "take,0,plate,2,\"['plate', 'knife']\",\"[2, 4]\"",
    ]
    validation = [
        "P02_03_7,P02,P02_03,00:01:00.000,00:01:00.50,00:01:02.00,3030,3120,wash pan,wash,2,pan,"
        "299,['pan'],[299]",
        "P02_03_8,P02,P02_03,00:01:05.000,00:01:05.50,00:01:07.00,3330,3420,put pan,put,96,pan,"
        "299,['pan'],[299]",
        "P02_03_9,P02,P02_03,00:01:09.000,00:01:09.50,00:01:10.00,3570,3600,dry pan,dry,5,pan,"
        "299,['pan'],[299]",
    ]
    for name, rows in (("EPIC_100_train.csv", train), ("EPIC_100_validation.csv", validation)):
        with open(manual / "annotations" / name, "w") as f:
            f.write("\n".join([EPIC_HEADER, *rows]) + "\n")
    for nid in ("P01_01_0", "P01_01_1", "P02_03_7"):
        write_video(manual / "segments" / nid[:3] / f"{nid}.mp4", ramp(frames=10))
    with open(manual / "segments" / "P02_03_8.mp4", "wb"):
        pass  # an empty file, as failed cuts leave behind
    data_dir = str(tmp_path / "data")
    val = open_split("epic_kitchens", "validation", data_dir=data_dir, manual_dir=str(manual))
    assert val.class_splits == [97, 300] and val.num_classes == 397 and val.labels is None
    assert len(val) == 2 and val.missing == ["P02_03_9"]
    examples = {val[i]["video_id"]: val[i] for i in range(len(val))}
    wash = examples["P02_03_7"]
    assert (wash["label"], wash["verb"], wash["noun"]) == (-1, 2, 299)
    assert wash["participant_id"] == "P02" and wash["recording_id"] == "P02_03"
    assert (wash["start_frame"], wash["stop_frame"], wash["narration"]) == (3030, 3120, "wash pan")
    assert eval_views(wash, VIEWS, num_clips=2, three_crops=True).shape == (6, 4, 16, 16, 3)
    with pytest.raises(CorruptVideo, match="P02_03_8.*empty"):
        eval_views(examples["P02_03_8"], VIEWS)
    train_split = open_split("epic_kitchens", "train", data_dir=data_dir, build=False)
    pairs = sorted((int(x["verb"]), int(x["noun"])) for x in train_split)
    assert pairs == [(0, 2), (3, 3)]


def test_epic_kitchens_rejects_bad_annotations(tmp_path):
    manual = tmp_path / "manual"
    os.makedirs(manual)
    with open(manual / "EPIC_100_train.csv", "w") as f:
        f.write("narration_id,video_id,verb_class\nP01_01_0,P01_01,3\n")
    with pytest.raises(UserError, match="missing column.*participant_id"):
        open_split("epic_kitchens", "train", data_dir=str(tmp_path / "d"), manual_dir=str(manual))


# --- sampling, views, sharding -----------------------------------------------------------


def test_clip_indices():
    np.testing.assert_array_equal(clip_indices(20, 4, 2), [[6, 8, 10, 12]])
    np.testing.assert_array_equal(
        clip_indices(20, 4, 2, 3), [[0, 2, 4, 6], [6, 8, 10, 12], [13, 15, 17, 19]]
    )
    # Too short for stride 4: the largest stride that fits, here 2.
    np.testing.assert_array_equal(clip_indices(8, 4, 4, 2), [[0, 2, 4, 6], [1, 3, 5, 7]])
    # Fewer frames than the model takes: spread over the video, repeating frames.
    np.testing.assert_array_equal(clip_indices(3, 5, 2), [[0, 0, 1, 2, 2]])
    with pytest.raises(UserError):
        clip_indices(0, 4, 2)


def test_eval_views_crops_and_normalises():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (10, 20, 30, 3), dtype=np.uint8)
    prep = Preprocessing.from_dict(dict(PREP, min_resize=20))  # no resize: exact crops
    views = eval_views({"video": frames, "video_id": "x"}, prep, num_clips=2, three_crops=True)
    assert views.shape == (6, 4, 16, 16, 3)
    mean, std = np.float32(0.45), np.float32(0.225)
    clips = clip_indices(10, 4, 2, 2)
    for c, clip in enumerate(clips):
        for k, left in enumerate((0, 7, 14)):
            expected = (frames[clip, 2:18, left : left + 16] / np.float32(255) - mean) / std
            np.testing.assert_allclose(views[3 * c + k], expected, atol=1e-5)
    single = eval_views({"video": frames}, prep)  # one centred clip, centre crop
    expected = (frames[[1, 3, 5, 7], 2:18, 7:23] / np.float32(255) - mean) / std
    assert single.shape == (1, 4, 16, 16, 3)
    np.testing.assert_allclose(single[0], expected, atol=1e-5)
    with pytest.raises(UserError, match="lacks stride"):
        eval_views(
            {"video": frames},
            Preprocessing.from_dict({k: v for k, v in PREP.items() if k != "stride"}),
        )


def test_shard_indices_cover_and_partition():
    for n in (0, 1, 7, 10, 101):
        for count in (1, 2, 3, 8):
            shards = [shard_indices(n, i, count) for i in range(count)]
            flat = [i for shard in shards for i in shard]
            assert flat == list(range(n))
            sizes = [len(s) for s in shards]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(UserError):
        shard_indices(10, 2, 2)


def test_segment_sampling():
    """SSv2's test sampling: the middle of each of num_frames equal segments."""
    from vtm_jax.data.pipeline import segment_indices

    # 33 frames, 4 segments of 8: bounds 0, 8, 16, 24, 32 -> middles 4, 12, 20, 28.
    np.testing.assert_array_equal(segment_indices(33, 4), [[4, 12, 20, 28]])
    np.testing.assert_array_equal(segment_indices(3, 4), [[0, 0, 1, 2]])
    video = np.arange(40, dtype=np.uint8)[:, None, None, None] * np.ones((1, 8, 8, 3), np.uint8)
    prep = {
        "num_frames": 4,
        "stride": 9,
        "min_resize": 8,
        "crop_size": 8,
        "mean": [0.0] * 3,
        "std": [1 / 255] * 3,
    }
    segments = Preprocessing.from_dict({**prep, "sampling": "segments"})
    views = eval_views({"video": video, "video_id": "x"}, segments)
    np.testing.assert_allclose(views[0, :, 0, 0, 0], [5, 15, 24, 34], atol=1e-3)
    with pytest.raises(UserError, match="unknown sampling"):
        eval_views(
            {"video": video, "video_id": "x"},
            Preprocessing.from_dict({**prep, "sampling": "middle"}),
        )
