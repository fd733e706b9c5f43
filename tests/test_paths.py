"""``gs://`` paths end to end, on a fake Cloud Storage.

The fake (:class:`FakeGcs`) is an epath backend that stores ``gs://bucket/key`` as the local
file ``<root>/bucket/key``, installed for the ``gs`` scheme in place of ``tf.io.gfile``. Its
errors are what the real backends raise: the message names the ``gs://`` path and there is
no errno. Orbax writes array data with tensorstore, which has its own GCS driver; the test
points that driver at the same local root, so orbax's metadata (through epath) and its arrays
(through tensorstore) meet in one fake bucket.

A second fake (:class:`TfRam`) puts ``gs://`` on TensorFlow's in-memory ``ram://`` file
system through epath's own ``tf.io.gfile`` backend, the one a TPU host with TensorFlow uses:
its lazy opens and its errors (a missing object's NotFoundError has an empty message).

Code that used ``os`` on a ``gs://`` string instead of epath would create or look for a local
``gs:`` folder in the working directory: each test runs in an empty one and checks it stays
empty.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath

from vtm_jax import outputs, paths
from vtm_jax.errors import UserError, expected_failure

PREFIX = "gs://"


class FakeGcs(epath_backend.Backend):
    """``gs://bucket/key`` kept in ``<root>/bucket/key``; errors as a remote backend's."""

    def __init__(self, root: str):
        self.root = root
        self.local = epath_backend._OsPathBackend()

    def _local(self, path: os.PathLike | str) -> str:
        path = os.fspath(path)
        assert path.startswith(PREFIX), f"the fake only holds gs:// paths, not {path}"
        return os.path.join(self.root, path[len(PREFIX) :])

    def _remote(self, local: os.PathLike | str) -> str:
        return PREFIX + os.path.relpath(os.fspath(local), self.root).replace(os.sep, "/")

    @contextlib.contextmanager
    def _errors(self, path: os.PathLike | str) -> Iterator[None]:
        # tf.io.gfile's errors reach epath's callers as OSErrors with a message, no errno.
        try:
            yield
        except OSError as e:
            raise type(e)(f"{os.fspath(path)}: {e.strerror or e}") from None

    def open(self, path, mode):
        with self._errors(path):
            return self.local.open(self._local(path), mode)

    def exists(self, path):
        return self.local.exists(self._local(path))

    def isdir(self, path):
        return self.local.isdir(self._local(path))

    def listdir(self, path):
        with self._errors(path):
            return self.local.listdir(self._local(path))

    def glob(self, path):
        return [self._remote(p) for p in self.local.glob(self._local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in self.local.walk(self._local(top), top_down=top_down):
            yield self._remote(root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        with self._errors(path):
            self.local.makedirs(self._local(path), exist_ok=exist_ok)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        with self._errors(path):
            self.local.mkdir(self._local(path), exist_ok=exist_ok)

    def rmtree(self, path):
        with self._errors(path):
            self.local.rmtree(self._local(path))

    def remove(self, path):
        with self._errors(path):
            self.local.remove(self._local(path))

    def rename(self, path, dst):
        with self._errors(path):
            self.local.rename(self._local(path), self._local(dst))

    def replace(self, path, dst):
        with self._errors(path):
            self.local.replace(self._local(path), self._local(dst))

    def copy(self, path, dst, overwrite=False):
        with self._errors(path):
            self.local.copy(self._local(path), self._local(dst), overwrite=overwrite)

    def stat(self, path):
        with self._errors(path):
            return self.local.stat(self._local(path))


@pytest.fixture
def gcs(tmp_path, monkeypatch) -> Iterator[FakeGcs]:
    """The fake for ``gs://``; a bucket ``gs://bucket`` exists; cwd is an empty folder."""
    fake = FakeGcs(str(tmp_path / "storage"))
    os.makedirs(os.path.join(fake.root, "bucket"))
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", fake)
    # With TensorFlow installed epath would pick tf.io.gfile for gs://, past the table.
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    monkeypatch.setattr(gpath, "_GCS_BACKENDS", frozenset({fake}))
    _point_tensorstore_at(fake, monkeypatch)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    yield fake
    assert not os.listdir(work), "a gs:// path was used as a local one"


def _point_tensorstore_at(fake: FakeGcs, monkeypatch) -> None:
    """Orbax's tensorstore GCS driver spec for ``gs://bucket/path``, as a local file driver."""
    from orbax.checkpoint._src.path import gcs_utils

    def kvstore(path: str) -> dict:
        return {"driver": "file", "path": fake._local(path)}

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)


def test_fake_gcs_is_what_epath_uses(gcs):
    from etils import epath

    path = epath.Path("gs://bucket/a/b.txt")
    path.parent.mkdir(parents=True)
    path.write_text("hello")
    assert os.path.isfile(os.path.join(gcs.root, "bucket", "a", "b.txt"))
    assert paths.read_text("gs://bucket/a/b.txt") == "hello"
    assert paths.listdir("gs://bucket/a") == ["b.txt"]
    assert [d for d, _, _ in paths.walk("gs://bucket")] == ["gs://bucket", "gs://bucket/a"]


def test_checkpoint_round_trip_on_gcs(gcs, tiny_checkpoint):
    from vtm_jax.checkpoints.store import load_checkpoint, save_checkpoint

    params, record = load_checkpoint(tiny_checkpoint("vivit"))
    save_checkpoint("gs://bucket/ckpt", params, record)
    stored = os.path.join(gcs.root, "bucket", "ckpt")
    assert sorted(os.listdir(stored)) == ["model.json", "params"]
    written = json.loads(paths.read_text("gs://bucket/ckpt/model.json"))
    assert written["params_files"] and written["params_digest"] == record.params_digest

    loaded, loaded_record = load_checkpoint("gs://bucket/ckpt")
    assert loaded_record.params_digest == record.params_digest
    flat = dict(_leaves(params))
    for name, value in _leaves(loaded):
        np.testing.assert_array_equal(value, flat[name])


def test_damaged_checkpoint_on_gcs_is_named(gcs, tiny_checkpoint):
    from vtm_jax.checkpoints.store import load_checkpoint, save_checkpoint

    params, record = load_checkpoint(tiny_checkpoint("vivit"))
    save_checkpoint("gs://bucket/ckpt", params, record)
    files = json.loads(paths.read_text("gs://bucket/ckpt/model.json"))["params_files"]
    name = next(n for n in sorted(files) if n.startswith("ocdbt.process_0/d/"))
    with open(gcs._local(f"gs://bucket/ckpt/params/{name}"), "r+b") as f:
        f.write(b"\xff" * 8)
    with pytest.raises(UserError, match=f"gs://bucket/ckpt/params/{name} damaged"):
        load_checkpoint("gs://bucket/ckpt")
    with pytest.raises(UserError, match="already holds a checkpoint"):
        save_checkpoint("gs://bucket/ckpt", params, record)
    with pytest.raises(UserError, match="not a vtm-jax checkpoint"):
        load_checkpoint("gs://bucket/nothing")


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for key in sorted(tree):
            yield from _leaves(tree[key], f"{prefix}{key}/")
    else:
        yield prefix, np.asarray(tree)


def test_results_written_atomically_on_gcs(gcs):
    outputs.write_json("gs://bucket/results.json", {"top1": 0.5})
    assert json.loads(paths.read_text("gs://bucket/results.json")) == {"top1": 0.5}
    with pytest.raises(RuntimeError):
        with outputs.atomic_file("gs://bucket/results.json") as f:
            f.write("{half")
            raise RuntimeError("interrupted")
    # The old result stands and no temporary file is left.
    assert json.loads(paths.read_text("gs://bucket/results.json")) == {"top1": 0.5}
    assert paths.listdir("gs://bucket") == ["results.json"]
    with outputs.atomic_file("gs://bucket/logits.npy", "wb") as f:
        np.save(f, np.arange(3))
    assert paths.read_bytes("gs://bucket/logits.npy").startswith(b"\x93NUMPY")


def test_output_checks_accept_gcs(gcs):
    paths.makedirs("gs://bucket/runs")
    outputs.write_json("gs://bucket/runs/a.json", {})
    assert outputs.check_output_file("gs://bucket/runs/b.json", what="--output")
    assert outputs.check_output_file("gs://bucket/runs/a.json", what="--output")
    assert outputs.check_output_dir("gs://bucket/new/workdir", what="--workdir")
    assert outputs.check_output_dir("gs://bucket/runs", what="--workdir")
    with pytest.raises(UserError, match="is a directory"):
        outputs.check_output_file("gs://bucket/runs", what="--output")
    with pytest.raises(UserError, match="no directory gs://bucket/missing"):
        outputs.check_output_file("gs://bucket/missing/b.json", what="--output")
    with pytest.raises(UserError, match="is a file, not a directory"):
        outputs.check_output_dir("gs://bucket/runs/a.json", what="--workdir")


def test_remote_storage_errors_are_one_line(gcs):
    with pytest.raises(OSError) as caught:
        paths.read_bytes("gs://bucket/absent.mp4")
    assert expected_failure(caught.value) == "gs://bucket/absent.mp4: No such file or directory"
    # Raised past vtm_jax.paths (inside orbax, say), the message names the path: one line too.
    assert expected_failure(FileNotFoundError("gs://bucket/x: gone")) == "gs://bucket/x: gone"
    # An OSError that names no remote path is still a bug with a traceback.
    assert expected_failure(FileNotFoundError("no such asset")) is None


def _encoded_video(frames: int = 20, size: int = 32) -> bytes:
    """A small H.264 clip, encoded in memory with PyAV."""
    import io

    import av

    pixels = np.random.default_rng(0).integers(0, 256, (frames, size, size, 3), np.uint8)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for frame in pixels:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def test_video_and_checkpoint_on_gcs_predict(gcs, tiny_checkpoint, tmp_path, capsys):
    from vtm_jax.checkpoints.store import load_checkpoint, save_checkpoint
    from vtm_jax.cli import main
    from vtm_jax.jobs.predict import load_clip, predict

    local_ckpt = tiny_checkpoint("vivit")
    params, record = load_checkpoint(local_ckpt)
    save_checkpoint("gs://bucket/ckpt", params, record)
    video = _encoded_video()
    local_video = tmp_path / "clip.mp4"
    local_video.write_bytes(video)
    paths.as_path("gs://bucket/clip.mp4").write_bytes(video)

    clip = load_clip("gs://bucket/clip.mp4", record)
    np.testing.assert_array_equal(clip, load_clip(str(local_video), record))
    logits, _ = predict("gs://bucket/ckpt", "gs://bucket/clip.mp4")
    expected, _ = predict(local_ckpt, str(local_video))
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)

    args = ["predict", "--checkpoint", "gs://bucket/ckpt", "--video", "gs://bucket/clip.mp4"]
    assert main([*args, "--save-logits", "gs://bucket/logits"]) == 0
    assert "logits written to gs://bucket/logits.npy" in capsys.readouterr().out
    saved = np.load(paths.as_path("gs://bucket/logits.npy").open("rb"))
    np.testing.assert_allclose(saved, expected, rtol=1e-5, atol=1e-5)
    missing = ["predict", "--checkpoint", "gs://bucket/ckpt", "--video", "gs://bucket/no.mp4"]
    assert main(missing) == 2
    assert "no such file: gs://bucket/no.mp4" in capsys.readouterr().err


def _jpeg(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_frame_folders_on_gcs(gcs):
    from PIL import Image

    from vtm_jax.data.datasets import open_split
    from vtm_jax.data.readers import CorruptVideo, reader_for

    root = "gs://bucket/ssv2"
    labels = {"Pushing something": "0", "Pulling something": "1"}
    entries = [
        {"id": "11", "template": "Pushing [something]", "label": "x", "placeholders": []},
        {"id": "12", "template": "Pulling [something]", "label": "x", "placeholders": []},
    ]
    paths.makedirs(f"{root}/frames/11")
    paths.as_path(f"{root}/something-something-v2-labels.json").write_text(json.dumps(labels))
    paths.as_path(f"{root}/something-something-v2-validation.json").write_text(json.dumps(entries))
    pixels = np.random.default_rng(1).integers(0, 256, (3, 24, 32, 3), np.uint8)
    for i, frame in enumerate(pixels):
        paths.as_path(f"{root}/frames/11/{i:05d}.jpg").write_bytes(_jpeg(frame))

    source = open_split("ssv2_frames", "validation", data_dir="unused", manual_dir=root)
    assert len(source) == 1 and source.missing == ["12"] and source.root == root
    example = source[0]
    assert example["frame_paths"] == [f"{root}/frames/11/{i:05d}.jpg" for i in range(3)]
    frames = reader_for(example).frames([2, 0])
    local = gcs._local(f"{root}/frames/11/00002.jpg")
    np.testing.assert_array_equal(frames[0], np.asarray(Image.open(local).convert("RGB")))

    # SlowFast's frame list, paths relative to the list's folder.
    rows = ["original_vido_id video_id frame_id path labels"]
    rows += [f'11 1 {i} frames/11/{i:05d}.jpg ""' for i in (2, 1)]
    paths.as_path(f"{root}/val.csv").write_text("\n".join(rows) + "\n")
    listed = open_split("ssv2_frames", "val", data_dir="unused", manual_dir=root)[0]
    assert listed["frame_paths"] == [f"{root}/frames/11/00002.jpg", f"{root}/frames/11/00001.jpg"]
    missing = {**example, "frame_paths": [f"{root}/frames/11/00009.jpg"]}
    with pytest.raises(CorruptVideo, match="missing frame gs://bucket/ssv2/frames/11/00009.jpg"):
        reader_for(missing).frames([0])


def test_manual_files_found_on_gcs(gcs):
    from vtm_jax.data.manual import find_file, index_files

    paths.makedirs("gs://bucket/k400/videos/val")
    paths.as_path("gs://bucket/k400/videos/val/a_000001_000011.MP4").write_bytes(b"x")
    paths.as_path("gs://bucket/k400/videos/b.webm").write_bytes(b"y")
    paths.as_path("gs://bucket/k400/videos/val/validate.csv").write_text("label\n")
    assert index_files("gs://bucket/k400", [".mp4", ".webm"]) == {
        "b": "gs://bucket/k400/videos/b.webm",
        "a_000001_000011": "gs://bucket/k400/videos/val/a_000001_000011.MP4",
    }
    found = find_file("gs://bucket/k400", ["validate.csv"])
    assert found == "gs://bucket/k400/videos/val/validate.csv"


def test_hf_directory_converted_from_gcs(gcs, tmp_path):
    """A HuggingFace directory on gs:// (safetensors read from its bytes)."""
    from safetensors.numpy import save_file

    from vtm_jax.checkpoints.convert.checkpoint_files import read_hf_directory

    weights = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    save_file(weights, str(tmp_path / "model.safetensors"))
    paths.makedirs("gs://bucket/hf")
    data = (tmp_path / "model.safetensors").read_bytes()
    paths.as_path("gs://bucket/hf/model.safetensors").write_bytes(data)
    paths.as_path("gs://bucket/hf/config.json").write_text(json.dumps({"model_type": "vivit"}))
    config, state = read_hf_directory("gs://bucket/hf")
    assert config == {"model_type": "vivit"}
    np.testing.assert_array_equal(state["a.weight"], weights["a.weight"])


def test_local_paths_unchanged(tmp_path):
    """Without a scheme, the helpers are the os calls they replaced."""
    target = tmp_path / "out.json"
    outputs.write_json(target, {"a": 1})
    assert json.loads(paths.read_text(target)) == {"a": 1}
    assert paths.absolute("rel") == os.path.abspath("rel")
    assert paths.join(str(tmp_path), "x") == os.path.join(str(tmp_path), "x")
    assert paths.parent(target) == str(tmp_path)
    assert not paths.is_remote(target) and paths.is_remote("gs://b/x")
    assert paths.join("gs://b", "x", "y") == "gs://b/x/y"
    assert paths.parent("gs://b/x/y") == "gs://b/x"


def test_visualize_writes_to_gcs(gcs, tiny_checkpoint):
    from PIL import Image

    from vtm_jax.jobs.visualize import visualize
    from vtm_jax.merging import MergingSettings

    paths.as_path("gs://bucket/clip.mp4").write_bytes(_encoded_video())
    merging = MergingSettings.from_dict({"mode": "merge", "r": 8})
    written = visualize(
        tiny_checkpoint("vivit"),
        "gs://bucket/clip.mp4",
        layers=[1],
        out_dir="gs://bucket/pictures",
        merging=merging,
    )
    assert sorted(written) == [
        "gs://bucket/pictures/clip_input.png",
        "gs://bucket/pictures/clip_layer1.gif",
        "gs://bucket/pictures/clip_layer1.png",
    ]
    with Image.open(gcs._local("gs://bucket/pictures/clip_layer1.png")) as image:
        assert image.format == "PNG"


class TfRam(epath_backend.Backend):
    """``gs://`` on TensorFlow's in-memory ``ram://`` file system, through epath's own
    ``tf.io.gfile`` backend: gfile's semantics (lazy opens, its errors), no network."""

    def __init__(self, prefix: str):
        self.prefix = prefix  # ram://<unique>/ : the ram file system lives as long as the process
        self.tf = epath_backend.tf_backend

    def _m(self, path):
        path = os.fspath(path)
        assert path.startswith(PREFIX), path
        return self.prefix + path[len(PREFIX) :]

    def _r(self, path):
        return PREFIX + os.fspath(path)[len(self.prefix) :]

    def open(self, path, mode):
        return self.tf.open(self._m(path), mode)

    def exists(self, path):
        return self.tf.exists(self._m(path))

    def isdir(self, path):
        return self.tf.isdir(self._m(path))

    def listdir(self, path):
        return self.tf.listdir(self._m(path))

    def glob(self, path):
        return [self._r(p) for p in self.tf.glob(self._m(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in self.tf.walk(self._m(top), top_down=top_down, on_error=on_error):
            yield self._r(root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        self.tf.makedirs(self._m(path), exist_ok=exist_ok)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        self.tf.mkdir(self._m(path), exist_ok=exist_ok)

    def rmtree(self, path):
        self.tf.rmtree(self._m(path))

    def remove(self, path):
        self.tf.remove(self._m(path))

    def rename(self, path, dst):
        self.tf.rename(self._m(path), self._m(dst))

    def replace(self, path, dst):
        self.tf.replace(self._m(path), self._m(dst))

    def copy(self, path, dst, overwrite=False):
        self.tf.copy(self._m(path), self._m(dst), overwrite=overwrite)

    def stat(self, path):
        return self.tf.stat(self._m(path))


def _install_tf_ram(work: str) -> TfRam:
    """``gs://`` on a fresh ``ram://`` tree, as the ``gcs`` fixture installs FakeGcs."""
    import uuid

    fake = TfRam(f"ram://{uuid.uuid4().hex}/")
    gpath._PREFIX_TO_BACKEND["gs"] = fake
    gpath._is_tf_installed = lambda: False
    gpath._GCS_BACKENDS = frozenset({fake})
    os.chdir(work)
    return fake


def _tf_gfile_checks() -> None:
    """Writes, checks and reads on tf.io.gfile's semantics (run in a child process)."""
    from vtm_jax.data.readers import reader_for

    paths.makedirs("gs://bucket/runs")
    outputs.write_json("gs://bucket/runs/a.json", {"top1": 0.25})
    outputs.write_json("gs://bucket/runs/a.json", {"top1": 0.5})  # replaced in place
    assert json.loads(paths.read_text("gs://bucket/runs/a.json")) == {"top1": 0.5}
    assert paths.listdir("gs://bucket/runs") == ["a.json"]
    assert outputs.check_output_file("gs://bucket/runs/b.json", what="--output")
    with pytest.raises(UserError, match="is a directory"):
        outputs.check_output_file("gs://bucket/runs", what="--output")
    pixels = np.random.default_rng(2).integers(0, 256, (2, 16, 16, 3), np.uint8)
    frames = [f"gs://bucket/frames/{i:05d}.jpg" for i in range(2)]
    paths.makedirs("gs://bucket/frames")
    for name, frame in zip(frames, pixels, strict=True):
        paths.as_path(name).write_bytes(_jpeg(frame))
    decoded = reader_for({"video_id": "v", "frame_paths": frames}).frames([1, 0])
    assert decoded.shape == (2, 16, 16, 3)
    # gfile fails at the first read, with an empty message: the error still names the path.
    with pytest.raises(FileNotFoundError) as caught:
        paths.read_bytes("gs://bucket/absent.mp4")
    assert expected_failure(caught.value) == "gs://bucket/absent.mp4: No such file or directory"


def _tf_error_checks() -> None:
    import tensorflow as tf

    with pytest.raises(PermissionError) as caught:
        with paths.named_errors("gs://bucket/x"):
            raise tf.errors.PermissionDeniedError(None, None, "403 Forbidden")
    assert expected_failure(caught.value) == "gs://bucket/x: 403 Forbidden"
    # A tf error that names its gs:// path but reaches the command line unconverted.
    error = tf.errors.PermissionDeniedError(None, None, "gs://bucket/x: 403 Forbidden")
    assert expected_failure(error) == "gs://bucket/x: 403 Forbidden"


def _in_child(tmp_path, checks: str) -> None:
    """Run ``checks`` of this module in a fresh interpreter: TensorFlow, once imported, stays
    in ``sys.modules``, and other tests check that vtm-jax never imports it."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("tensorflow") is None:  # found, not imported here
        pytest.skip("needs TensorFlow (the tensorboard extra)")
    work = tmp_path / "cwd"
    work.mkdir()
    code = f"import tests.test_paths as t; t._install_tf_ram({str(work)!r}); t.{checks}()"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not os.listdir(work), "a gs:// path was used as a local one"


def test_results_and_frames_through_tf_gfile(tmp_path):
    """The same writes, checks and reads as above on tf.io.gfile (in memory)."""
    _in_child(tmp_path, "_tf_gfile_checks")


def test_tf_errors_are_named_and_one_line(tmp_path):
    _in_child(tmp_path, "_tf_error_checks")


class _Clips:
    """Eight random 16-frame 32x32 clips, as a dataset source gives them."""

    name, split, num_classes, class_splits = "clips", "test", 8, None

    def __len__(self):
        return 8

    def __getitem__(self, i):
        video = np.random.default_rng(i).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
        return {"video": video, "video_id": f"clip{i}", "label": np.int64(i % 8)}


def test_evaluation_resumes_on_gcs(gcs, tiny_checkpoint):
    from vtm_jax.checkpoints.store import load_checkpoint, save_checkpoint
    from vtm_jax.jobs.evaluation.evaluate import evaluate

    save_checkpoint("gs://bucket/ckpt", *load_checkpoint(tiny_checkpoint("vivit")))
    run = dict(batch_size=2, progress=False, save_scores=True)
    results = "gs://bucket/eval/results.json"
    paths.makedirs("gs://bucket/eval")

    def stop_after_two(state):
        if state.done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate("gs://bucket/ckpt", _Clips(), results_path=results, on_batch=stop_after_two, **run)
    partial = json.loads(paths.read_text(results))
    assert not partial["complete"] and partial["done"] == 4
    done = []
    resumed = evaluate(
        "gs://bucket/ckpt",
        _Clips(),
        results_path=results,
        on_batch=lambda state: done.append(state.done),
        **run,
    )
    assert done == [6, 8]  # only the rest was evaluated
    assert resumed["complete"] and resumed["run"]["checkpoint"] == "gs://bucket/ckpt"
    fresh = evaluate(tiny_checkpoint("vivit"), _Clips(), batch_size=2, progress=False)
    assert resumed["sums"] == fresh["sums"]
    stored = sorted(paths.listdir("gs://bucket/eval"))
    assert "results.json" in stored and any(name.endswith(".scores.npz") for name in stored)
