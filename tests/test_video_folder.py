"""``video_folder`` (a folder of one's own videos, read in place) and ``module:attr`` names
found beside the config file or in the current folder, as README's "Your own videos" says.

Videos are 8 frames of 32x32 written here with PyAV; the checkpoints are tiny random ViViTs.
"""

import json
import os
import subprocess
import sys
import textwrap

import av
import numpy as np
import pytest
from PIL import Image

from vtm_jax import plugins
from vtm_jax.cli import main
from vtm_jax.config.loading import load_config
from vtm_jax.data.datasets import dataset_names, open_split, reads_in_place, register_dataset
from vtm_jax.errors import UserError
from vtm_jax.jobs.evaluation.evaluate import evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES, SIZE = 8, 32
# The checkpoint's classes: the folders' names sit at other ids than their sorted order.
LABELS = ["zumba", "bowling", "archery", "air drumming"]


def write_video(path, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    frames = np.random.default_rng(seed).integers(0, 256, (FRAMES, SIZE, SIZE, 3), np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_frames(folder, seed):
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    for t in range(FRAMES):
        pixels = rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{t:05d}.jpg"))


def class_folders(root, classes=("archery", "bowling")):
    """Two videos per class, ``<root>/<class>/v<i>.mp4``."""
    for c, name in enumerate(classes):
        for i in range(2):
            write_video(root / name / f"v{i}.mp4", seed=10 * c + i)
    return root


@pytest.fixture(scope="module")
def labelled_checkpoint(tiny_checkpoint):
    """A tiny ViViT whose record names its classes (LABELS)."""
    return tiny_checkpoint("vivit", frames=FRAMES, size=SIZE, labels=tuple(LABELS))


def eval_args(checkpoint, manual_dir, results, config="vivit_b_k400"):
    """`vtm-jax eval` of a shipped paper config on a video folder, at the tiny model's input."""
    return [
        "eval",
        f"--config={config}",
        f"--config.checkpoint={checkpoint}",
        "--config.dataset_name=video_folder",
        f"--config.dataset_configs.manual_dir={manual_dir}",
        f"--config.dataset_configs.num_frames={FRAMES}",
        "--config.dataset_configs.stride=1",
        f"--config.dataset_configs.min_resize={SIZE}",
        f"--config.dataset_configs.crop_size={SIZE}",
        "--config.token_merging.r=4",
        "--config.eval.predictions=True",
        f"--config.results_path={results}",
    ]


def test_class_folders_evaluate_from_the_command_line(tmp_path, tiny_checkpoint, capsys):
    root = class_folders(tmp_path / "videos")
    (root / "archery" / "notes.txt").write_text("not a video")  # text beside videos is skipped
    results = tmp_path / "results.json"
    checkpoint = tiny_checkpoint("vivit", frames=FRAMES, num_classes=8)  # no class names
    assert main(eval_args(checkpoint, root, results)) == 0, capsys.readouterr().err
    written = json.loads(results.read_text())
    assert written["complete"] and written["sums"]["count"] == 4 and written["skipped"] == []
    assert written["run"]["dataset"] == "video_folder/validation"
    # Without class names in the checkpoint, the sorted folder names are ids 0, 1.
    assert written["run"]["source"]["classes"] == {"archery": 0, "bowling": 1}
    labels = {p["video_id"]: p["label"] for p in written["predictions"]}
    assert labels == {
        "archery/v0.mp4": 0,
        "archery/v1.mp4": 0,
        "bowling/v0.mp4": 1,
        "bowling/v1.mp4": 1,
    }


def test_class_names_map_to_the_checkpoints_ids(tmp_path, labelled_checkpoint, capsys):
    root = class_folders(tmp_path / "videos", ("archery", "bowling", "air_drumming"))
    results = tmp_path / "results.json"
    assert main(eval_args(labelled_checkpoint, root, results)) == 0, capsys.readouterr().err
    written = json.loads(results.read_text())
    assert written["sums"]["count"] == 6
    # By name, not by sorted position; 'air_drumming' is the checkpoint's 'air drumming'.
    classes = {"air_drumming": 3, "archery": 2, "bowling": 1}
    assert written["run"]["source"]["classes"] == classes
    for prediction in written["predictions"]:
        assert prediction["label"] == classes[prediction["video_id"].split("/")[0]]
    # A class the checkpoint does not have is one line naming it and a few valid ones.
    write_video(root / "archerry" / "v0.mp4", seed=99)
    capsys.readouterr()
    assert main(eval_args(labelled_checkpoint, root, tmp_path / "other.json")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vtm-jax: error: video_folder: class 'archerry'") and "\n" not in err
    assert "'archery'" in err and "4 classes" in err


def test_classes_without_names_must_fit_the_classifier(tmp_path):
    source = open_split(
        "video_folder", "test", data_dir="", manual_dir=str(class_folders(tmp_path / "v"))
    )
    source.use_checkpoint_classes(None, [8])
    assert source.num_classes == 8 and source[3]["label"] == 1
    with pytest.raises(
        UserError, match=r"2 classes \('archery', 'bowling'\), the checkpoint has 1"
    ):
        source.use_checkpoint_classes(None, [1])
    with pytest.raises(UserError, match="one label per video; the checkpoint has 2 heads"):
        source.use_checkpoint_classes(None, [97, 300])
    # Binding again starts from scratch: names from one checkpoint do not stick.
    source.use_checkpoint_classes(LABELS, [4])
    assert source.class_ids == {"archery": 2, "bowling": 1} and source.num_classes == 4


def test_corrupt_and_frame_folder_videos(tmp_path, tiny_checkpoint, capsys):
    root = class_folders(tmp_path / "videos")
    write_frames(root / "bowling" / "clip_frames", seed=5)  # a frame-folder video
    (root / "archery" / "broken.mp4").write_bytes(b"\x00not a video" * 40)
    results = tmp_path / "results.json"
    checkpoint = tiny_checkpoint("vivit", frames=FRAMES, num_classes=8)
    assert main(eval_args(checkpoint, root, results)) == 0, capsys.readouterr().err
    written = json.loads(results.read_text())
    assert written["sums"]["count"] == 5 and "bowling/clip_frames" in written["video_ids"]
    [skipped] = written["skipped"]
    assert skipped["video_id"] == "archery/broken.mp4" and skipped["reason"]
    assert "skipped 1 corrupt video" in capsys.readouterr().out


def test_unreadable_file_is_skipped_with_its_reason(tmp_path):
    from vtm_jax.data.pipeline import CorruptVideo, eval_views
    from vtm_jax.data.preprocessing import Preprocessing

    root = class_folders(tmp_path / "videos")
    source = open_split("video_folder", "test", data_dir="", manual_dir=str(root))
    example = source[0]
    os.remove(example["video_path"])  # gone between listing and reading
    prep = Preprocessing.from_dict(
        {
            "num_frames": 4,
            "stride": 1,
            "min_resize": 32,
            "crop_size": 32,
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
        }
    )
    with pytest.raises(CorruptVideo, match="cannot read .*v0.mp4"):
        eval_views(example, prep)
    assert eval_views(source[1], prep).shape == (1, 4, 32, 32, 3)


def test_video_lists(tmp_path, labelled_checkpoint):
    class_folders(tmp_path / "videos")
    rows = [("videos/archery/v0.mp4", "archery"), ("videos/bowling/v1.mp4", "bowling")]
    rows.append(("videos/archery/v1.mp4", "bowling"))  # the list's label wins over the folder
    csv_path = tmp_path / "my_list.csv"
    csv_path.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    source = open_split("video_folder", "test", data_dir="", manual_dir=str(csv_path))
    assert [s["video_id"] for s in source] == [p for p, _ in rows]
    results = evaluate(labelled_checkpoint, source, batch_size=2, progress=False, predictions=True)
    assert results["sums"]["count"] == 3
    assert [p["label"] for p in results["predictions"]] == [2, 1, 1]
    # videos.json at the top of manual_dir is the list of that folder (pairs or objects).
    items = [{"path": "archery/v0.mp4", "label": "archery"}, ["bowling/v0.mp4", "bowling"]]
    (tmp_path / "videos" / "videos.json").write_text(json.dumps(items))
    source = open_split(
        "video_folder", "validation", data_dir="", manual_dir=str(tmp_path / "videos")
    )
    assert len(source) == 2 and source.classes == ["archery", "bowling"]
    assert source[1]["video_path"] == str(tmp_path / "videos" / "bowling" / "v0.mp4")


def _open(manual_dir, split="test"):
    return open_split("video_folder", split, data_dir="", manual_dir=str(manual_dir))


def test_bad_folders_and_lists_are_one_line_errors(tmp_path):
    root = class_folders(tmp_path / "videos")
    (root / "cooking").mkdir()
    with pytest.raises(UserError, match=r"class folder .*cooking holds no videos"):
        _open(root)
    (root / "cooking" / ".DS_Store").write_text("")  # hidden files are not videos either
    with pytest.raises(UserError, match=r"cooking holds no videos"):
        _open(root)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.txt").write_text("my videos")
    with pytest.raises(UserError, match=r"no videos in .*empty: expected <class name>/<video>"):
        _open(tmp_path / "empty")
    write_video(tmp_path / "flat" / "a.mp4", seed=1)
    with pytest.raises(UserError, match=r"a\.mp4 is not in a class folder"):
        _open(tmp_path / "flat")
    with pytest.raises(UserError, match="does not exist"):
        _open(tmp_path / "nowhere")
    with pytest.raises(UserError, match="read in place: give its folder"):
        open_split("video_folder", "test", data_dir="")
    with pytest.raises(UserError, match="one split of every video, not slices"):
        _open(tmp_path / "videos", "test[:2]")
    with pytest.raises(UserError, match="takes no options, got frames"):
        open_split("video_folder", "test", data_dir="", manual_dir=str(root), config={"frames": 8})
    lists = [
        (
            "a.csv",
            "videos/archery/v0.mp4,archery\nvideos/archery/gone.mp4,archery\n",
            r"a\.csv:2: no such video file .*gone\.mp4",
        ),
        (
            "b.csv",
            "videos/archery/v0.mp4,archery,extra\n",
            r"b\.csv:1: expected 'path,label', got 3 fields",
        ),
        (
            "c.json",
            json.dumps([{"path": "videos/archery/v0.mp4", "label": 3}]),
            r"item 1: the label must be a class name",
        ),
        ("d.json", "{", "not valid JSON"),
        ("e.csv", "path,label\n", "lists no videos"),
        ("f.csv", "videos/archery/v0.mp4,a\nvideos/archery/v0.mp4,a\n", "listed twice"),
        (
            "g.txt",
            "videos/archery/v0.mp4,a\n",
            r"is a file; give a folder of class folders or a \.csv",
        ),
    ]
    for name, text, message in lists:
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=message) as raised:
            _open(tmp_path / name)
        assert "\n" not in str(raised.value)


def test_video_folder_is_a_built_in_name():
    assert "video_folder" in dataset_names() and reads_in_place("video_folder")
    with pytest.raises(ValueError, match="built in"):
        register_dataset("video_folder", lambda split, manual_dir: None)


# --- module:attr names beside the config and in the current folder ---------------------------

USER_DATA = textwrap.dedent(
    """
    import numpy as np

    class Clips:
        name, split, num_classes, class_splits = "clips", "test", 8, None

        def __len__(self):
            return 3

        def __getitem__(self, i):
            video = np.random.default_rng(i).integers(0, 256, (8, 32, 32, 3), np.uint8)
            return {"video": video, "label": i, "video_id": f"clip{i}"}

    def open_split(split, manual_dir, **options):
        return Clips()
    """
)

SCHEDULE = "def halve(num_layers, r, schedule):\n    return [r // 2] * num_layers\n"

CONFIG = textwrap.dedent(
    """
    from vtm_jax.config.paper import get_paper_config

    def get_config():
        config = get_paper_config("vivit", "k400")
        data = config.dataset_configs
        data.num_frames, data.stride, data.min_resize, data.crop_size = 8, 1, 32, 32
        config.token_merging.mode, config.token_merging.r = "merge", 4
        config.token_merging.r_schedule = "beside_config:halve"
        return config
    """
)

# A console script's sys.path: the current folder is not on it (python -P).
RUN = textwrap.dedent(
    """
    import os, sys
    assert "" not in sys.path and os.getcwd() not in sys.path, sys.path
    from vtm_jax.cli import main
    code = main(sys.argv[1:])
    assert "" not in sys.path and os.getcwd() not in sys.path, sys.path  # put back
    sys.exit(code)
    """
)


def test_module_attr_names_resolve_beside_the_config_and_in_the_current_folder(
    tmp_path, tiny_checkpoint
):
    configs, work = tmp_path / "configs", tmp_path / "work"
    configs.mkdir(), work.mkdir()
    (configs / "mine.py").write_text(CONFIG)
    (configs / "beside_config.py").write_text(SCHEDULE)
    (work / "my_data.py").write_text(USER_DATA)
    (work / "manual").mkdir()
    results = tmp_path / "results.json"
    args = [
        "eval",
        f"--config={configs / 'mine.py'}",
        f"--config.checkpoint={tiny_checkpoint('vivit', frames=FRAMES, num_classes=8)}",
        "--config.dataset_name=my_data:open_split",
        "--config.dataset_configs.manual_dir=manual",
        f"--config.results_path={results}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-P", "-c", RUN, *args], cwd=work, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads(results.read_text())
    assert written["sums"]["count"] == 3 and written["run"]["dataset"] == "my_data:open_split/test"
    assert written["run"]["token_merging"]["r_schedule"] == "beside_config:halve"


def test_names_only_a_data_file_holds_are_not_looked_for_nearby(tmp_path, monkeypatch):
    """A name that reaches load_object from a model.json (no loaded config holds it) gets
    sys.path only: data files never import code from the folders around them."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "imported"
    (tmp_path / "nearby_rules.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef keep(tokens, metric, r, ctx):\n    return tokens\n"
    )
    before = list(sys.path)
    with pytest.raises(UserError, match="cannot import 'nearby_rules' for mode"):
        plugins.load_object("nearby_rules:keep", what="mode")
    assert not marker.exists()
    # The same name held by a loaded config is looked for in the current folder.
    (tmp_path / "cfg.py").write_text(CONFIG.replace("beside_config:halve", "nearby_rules:keep"))
    config = load_config(f"{tmp_path / 'cfg.py'}")
    folders = plugins.local_folders("nearby_rules:keep")  # the config's folder, the current one
    assert {os.path.realpath(f) for f in folders} == {os.path.realpath(tmp_path)}
    assert plugins.load_object("nearby_rules:keep", what="mode").__name__ == "keep"
    assert marker.exists() and sys.path == before
    del config
    sys.modules.pop("nearby_rules", None)
