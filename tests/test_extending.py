"""A dataset and an attention backend added from outside the package, as README's "Adding a
dataset" and "Adding an attention backend" describe (rules and schedules: test_extensions.py;
backbones: test_backbones.py)."""

import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtm_jax.checkpoints.store import load_checkpoint
from vtm_jax.cli import main
from vtm_jax.data import datasets
from vtm_jax.errors import UserError
from vtm_jax.jobs.evaluation.evaluate import evaluate
from vtm_jax.merging import MergingSettings
from vtm_jax.models import attention
from vtm_jax.models.registry import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A user's dataset, read in place: one .npy clip per video in manual_dir/<split>/, labels in
# manual_dir/labels.json.
USER_DATASET = textwrap.dedent(
    """
    import json
    import os

    import numpy as np


    class Clips:
        def __init__(self, split, root, labels, num_classes):
            self.name, self.split, self.num_classes, self.class_splits = "clips", split, num_classes, None
            self.ids = sorted(f[:-4] for f in os.listdir(os.path.join(root, split)))
            self.root, self.labels = root, labels

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            video = np.load(os.path.join(self.root, self.split, self.ids[i] + ".npy"))
            return {"video": video, "label": self.labels[self.ids[i]], "video_id": self.ids[i]}


    def open_clips(split, manual_dir, num_classes=8, **options):
        with open(os.path.join(manual_dir, "labels.json")) as f:
            labels = json.load(f)
        return Clips(split, manual_dir, labels, num_classes)
    """
)


@pytest.fixture
def user_dataset(tmp_path, monkeypatch):
    """The user's module on sys.path, and a manual_dir of 6 clips of 16 frames at 32x32."""
    package = tmp_path / "user"
    package.mkdir()
    (package / "my_clips.py").write_text(USER_DATASET)
    monkeypatch.syspath_prepend(str(package))
    manual = tmp_path / "manual"
    (manual / "test").mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = {}
    for i in range(6):
        np.save(manual / "test" / f"clip{i}.npy", rng.integers(0, 256, (16, 32, 32, 3), np.uint8))
        labels[f"clip{i}"] = i % 8
    (manual / "labels.json").write_text(json.dumps(labels))
    yield manual
    datasets.READERS.pop("my_clips", None)
    datasets.READERS.pop("my_clips:open_clips", None)


def test_registered_dataset_opens_and_evaluates(user_dataset, tiny_checkpoint):
    import my_clips

    datasets.register_dataset("my_clips", my_clips.open_clips)
    assert "my_clips" in datasets.dataset_names() and datasets.reads_in_place("my_clips")
    source = datasets.open_split("my_clips", "test", data_dir="", manual_dir=str(user_dataset))
    assert len(source) == 6 and source[2]["video_id"] == "clip2"
    results = evaluate(tiny_checkpoint("vivit"), source, batch_size=2, progress=False)
    assert results["complete"] and results["video_ids"] == [f"clip{i}" for i in range(6)]
    # A taken name is refused, the same function again is not.
    datasets.register_dataset("my_clips", my_clips.open_clips)
    with pytest.raises(ValueError, match="already registered"):
        datasets.register_dataset("my_clips", lambda split, manual_dir: None)
    with pytest.raises(ValueError, match="built in"):
        datasets.register_dataset("ssv2_frames", my_clips.open_clips)
    with pytest.raises(TypeError, match="TFDS builder class or a function"):
        datasets.register_dataset("other", 42)
    with pytest.raises(UserError, match="read in place: give its folder as manual_dir"):
        datasets.open_split("my_clips", "test", data_dir="")


def test_dataset_by_path_from_the_command_line(user_dataset, tiny_checkpoint, tmp_path, capsys):
    results = tmp_path / "results.json"
    args = [
        "eval",
        f"--config={REPO}/configs/vivit_synthetic.py",
        f"--config.checkpoint={tiny_checkpoint('vivit')}",
        "--config.dataset_name=my_clips:open_clips",
        f"--config.dataset_configs.manual_dir={user_dataset}",
        f"--config.results_path={results}",
        "--config.token_merging.r=2",
    ]
    assert main(args) == 0, capsys.readouterr().err
    written = json.loads(results.read_text())
    assert written["complete"] and len(written["video_ids"]) == 6
    assert main([*args[:3], "--config.dataset_name=my_clips:nothing", *args[4:]]) == 2
    assert "has no attribute 'nothing'" in capsys.readouterr().err
    # A path naming something that is not a split opener is refused before it is called.
    assert main([*args[:3], "--config.dataset_name=os:system", *args[4:]]) == 2
    err = capsys.readouterr().err.strip()
    assert "dataset 'os:system'" in err and "\n" not in err, err


def plain_attention(q, k, v, *, bias=None):
    """A user's backend: softmax attention written out in jnp, [B, N, H, d] in and out."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


@pytest.fixture
def user_attention():
    yield attention.register_attention("plain_user", plain_attention)
    attention.BACKENDS.pop("plain_user", None)
    attention.NEEDS_PLATFORM.pop("plain_user", None)
    attention.BACKENDS.pop("gpu_only_user", None)
    attention.NEEDS_PLATFORM.pop("gpu_only_user", None)


def test_registered_attention_backend_runs_a_model(user_attention, tiny_checkpoint, capsys):
    checkpoint = tiny_checkpoint("vivit")
    params, record = load_checkpoint(checkpoint)
    video = jax.random.uniform(jax.random.PRNGKey(0), (1, 16, 32, 32, 3), minval=-1, maxval=1)
    merging = MergingSettings(mode="merge", r=8, prop_attn=True)  # a key bias reaches it
    logits = {
        name: build_model(record, merging, attention.get_attention(name)).apply(
            {"params": params}, video
        )
        for name in ("plain_user", "xla")
    }
    np.testing.assert_allclose(logits["plain_user"], logits["xla"], atol=1e-5)
    # From the command line, by name.
    folder = os.path.dirname(checkpoint)
    clip = os.path.join(folder, "clip.npy")
    np.save(clip, np.asarray((video[0] + 1) * 127.5, np.uint8))
    saved = {}
    for name in ("plain_user", "xla"):
        saved[name] = os.path.join(folder, f"logits_{name}.npy")
        command = ["predict", f"--checkpoint={checkpoint}", f"--video={clip}"]
        assert main([*command, f"--attention={name}", f"--save-logits={saved[name]}"]) == 0
    np.testing.assert_allclose(np.load(saved["plain_user"]), np.load(saved["xla"]), atol=1e-5)
    capsys.readouterr()
    # A backend that needs another platform is refused by name.
    attention.register_attention("gpu_only_user", plain_attention, platform="gpu")
    with pytest.raises(UserError, match="gpu"):
        attention.get_attention("gpu_only_user")
