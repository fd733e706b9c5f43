"""Bad input and faults, one test per class: each ends in one line and exit status 2 (or a
documented warning), never a traceback, never exit 0 with a NaN or wrong answer.

The classes are those of the reliability issue: non-finite values, checkpoint integrity,
eval resume against other parameters, unwritable outputs, a corrupt orbax manifest, user
errors that were tracebacks, misleading messages, and settings that were silently accepted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.checkpoints.store import load_checkpoint, save_checkpoint
from vtm_jax.cli import main
from vtm_jax.errors import UserError
from vtm_jax.jobs.evaluation.evaluate import NONFINITE_OUTPUT, evaluate
from vtm_jax.models.vivit import ViViT
from vtm_jax.outputs import atomic_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES, SIZE, CLASSES = 4, 16, 4
MODEL = dict(
    num_classes=CLASSES, hidden_size=16, num_heads=2, mlp_dim=32, num_layers=2, patch_size=(2, 8, 8)
)
RECORD = {
    "architecture": "vivit",
    "model": {**MODEL, "patch_size": [2, 8, 8]},
    "input": {"num_frames": FRAMES, "image_size": SIZE},
    # Pixels in [0, 1] as they are: a black video is all zeros to the model.
    "preprocessing": {
        "num_frames": FRAMES,
        "stride": 1,
        "min_resize": SIZE,
        "crop_size": SIZE,
        "mean": [0.0] * 3,
        "std": [1.0] * 3,
    },
    "labels": None,
    "token_merging": {"mode": "merge", "r": 2},
}


def tiny_params(seed: int = 0) -> dict:
    video = jnp.zeros((1, FRAMES, SIZE, SIZE, 3))
    params = jax.device_get(ViViT(**MODEL).init(jax.random.PRNGKey(seed), video)["params"])
    # The classifier starts at zero; a unit-scale head makes predictions differ per model.
    kernel = params["output_projection"]["kernel"]
    params["output_projection"]["kernel"] = np.random.default_rng(seed).normal(size=kernel.shape)
    return params


def make_checkpoint(path, seed: int = 0, params=None, **record) -> str:
    save_checkpoint(
        str(path),
        tiny_params(seed) if params is None else params,
        ModelRecord.from_json({**RECORD, **record}),
    )
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("reliability") / "ckpt")


def _bad(args, capsys, match):
    """``vtm-jax ARGS`` ends with exit status 2 and one line ``vtm-jax: error: ...``."""
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vtm-jax: error:") and "\n" not in err, err
    assert match in err, err
    return err


class FakeSource:
    """Videos in memory: black ones (all zeros to the model) and random ones."""

    name, split, num_classes = "fake", "test", CLASSES

    def __init__(self, kinds: str):
        self.kinds = kinds  # one letter per video: b(lack) or r(andom)

    def __len__(self):
        return len(self.kinds)

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        shape = (FRAMES, SIZE, SIZE, 3)
        video = np.zeros(shape, np.uint8) if self.kinds[i] == "b" else rng.integers(0, 256, shape)
        return {
            "video": video.astype(np.uint8),
            "video_id": f"v{i}".encode(),
            "label": np.int64(i % CLASSES),
        }


def no_temporary_files(directory) -> bool:
    return not [name for _, _, files in os.walk(directory) for name in files if ".tmp" in name]


# --- 1. non-finite values ------------------------------------------------------------------


def test_non_finite_values_are_refused_or_skipped_never_predicted(ckpt, tmp_path, capsys):
    clip = np.random.default_rng(0).random((FRAMES, SIZE, SIZE, 3)).astype(np.float32)
    nan = clip.copy()
    nan[1, 2, 3, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "huge64.npy", np.full(clip.shape, 1e300))  # inf as float32
    np.save(tmp_path / "overflow.npy", np.full(clip.shape, 3e38, np.float32))
    predict = ["predict", "--checkpoint", ckpt, "--video"]
    _bad([*predict, tmp_path / "nan.npy"], capsys, "nan.npy holds 1 NaN or infinite value")
    _bad([*predict, tmp_path / "huge64.npy"], capsys, "(as float32) holds")
    _bad(
        [*predict, tmp_path / "overflow.npy", "--save-logits", tmp_path / "l.npy"],
        capsys,
        "not finite",
    )
    assert not (tmp_path / "l.npy").exists()  # no NaN logits written
    _bad(
        [
            "visualize",
            "--checkpoint",
            ckpt,
            "--video",
            tmp_path / "nan.npy",
            "--out",
            tmp_path / "v",
        ],
        capsys,
        "NaN or infinite",
    )
    assert not (tmp_path / "v").exists() or not os.listdir(tmp_path / "v")  # nothing drawn

    # Evaluation: a video whose logits overflow is skipped and listed, like a corrupt one.
    params = tiny_params()
    params["embedding"]["kernel"] = np.full_like(params["embedding"]["kernel"], 1e37)
    huge = make_checkpoint(tmp_path / "huge", params=params)  # finite, so it loads
    results = evaluate(huge, FakeSource("brbr"), batch_size=2, progress=False)
    assert results["sums"]["count"] == 2 and results["video_ids"] == ["v0", "v2"]
    assert [s["video_id"] for s in results["skipped"]] == ["v1", "v3"]
    assert {s["reason"] for s in results["skipped"]} == {NONFINITE_OUTPUT}
    # Nothing finite at all: an error, not "top1 0.00% (0/0)".
    with pytest.raises(UserError, match="no video was evaluated: 2 of 2 skipped"):
        evaluate(huge, FakeSource("rr"), batch_size=2, progress=False)


# --- 2. checkpoint integrity ---------------------------------------------------------------


def _largest_file(directory) -> str:
    files = [os.path.join(r, f) for r, _, names in os.walk(directory) for f in names]
    return max(files, key=os.path.getsize)


def test_damaged_replaced_or_non_finite_checkpoints_are_named_on_load(ckpt, tmp_path, capsys):
    record = json.loads(open(os.path.join(ckpt, "model.json")).read())
    assert record["params_digest"].startswith("sha256:") and record["params_files"]
    params, loaded = load_checkpoint(ckpt)
    assert loaded.params_digest == record["params_digest"]

    # 16 flipped bytes in a parameter file: that file is named, before orbax parses it.
    damaged = shutil.copytree(ckpt, tmp_path / "damaged")
    target = _largest_file(damaged / "params")
    with open(target, "r+b") as f:
        f.seek(os.path.getsize(target) // 2)
        chunk = bytearray(f.read(16))
        f.seek(-16, os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in chunk))
    with pytest.raises(UserError, match=f"{os.path.basename(target)} damaged: sha256 differs"):
        load_checkpoint(str(damaged))
    clip = tmp_path / "clip.npy"
    np.save(clip, np.zeros((FRAMES, SIZE, SIZE, 3), np.float32))
    _bad(["predict", "--checkpoint", damaged, "--video", clip], capsys, "damaged")

    # Another checkpoint's params/ under this model.json.
    swapped = shutil.copytree(ckpt, tmp_path / "swapped")
    other = make_checkpoint(tmp_path / "other", seed=1)
    shutil.rmtree(swapped / "params")
    shutil.copytree(os.path.join(other, "params"), swapped / "params")
    with pytest.raises(UserError, match="another checkpoint's parameters|damaged"):
        load_checkpoint(str(swapped))

    # A model.json whose digest is not its parameters' (copied from elsewhere, edited).
    edited = shutil.copytree(ckpt, tmp_path / "edited")
    other_record = json.loads(open(os.path.join(other, "model.json")).read())
    record_edit = {**record, "params_digest": other_record["params_digest"]}
    (edited / "model.json").write_text(json.dumps(record_edit))
    with pytest.raises(UserError, match="not the ones .* was written with"):
        load_checkpoint(str(edited))
    assert (
        load_checkpoint(str(edited), verify=False)[1].params_digest
        == (
            other_record["params_digest"]  # skipped on request: the record is taken at its word
        )
    )

    # Written before digests existed: loads, and is identified by its content all the same.
    legacy = shutil.copytree(ckpt, tmp_path / "legacy")
    (legacy / "model.json").write_text(json.dumps(RECORD))
    assert load_checkpoint(str(legacy))[1].params_digest == record["params_digest"]

    # Infinite parameters: never written, and refused on load where an old file holds them.
    bad = tiny_params()
    bad["cls"] = np.full_like(bad["cls"], np.inf)
    with pytest.raises(UserError, match="cls hold NaN or infinite"):
        make_checkpoint(tmp_path / "inf", params=bad)
    assert not (tmp_path / "inf" / "params").exists()
    import orbax.checkpoint as ocp

    legacy_inf = tmp_path / "legacy_inf"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(str(legacy_inf / "params"), bad)
    checkpointer.wait_until_finished()
    (legacy_inf / "model.json").write_text(json.dumps(RECORD))
    _bad(["predict", "--checkpoint", legacy_inf, "--video", clip], capsys, "NaN or infinite")

    # The shipped checkpoint carries digests, and they hold.
    from vtm_jax.jobs.demo import shipped_checkpoint

    assert load_checkpoint(shipped_checkpoint())[1].params_digest.startswith("sha256:")


# --- 3. eval resume against other parameters ------------------------------------------------


def test_eval_resume_refuses_a_checkpoint_swapped_at_the_same_path(tmp_path):
    path = tmp_path / "ckpt"
    make_checkpoint(path, seed=0)
    source = FakeSource("rrrrrr")
    results = tmp_path / "results.json"

    def stop_after_one_batch(state):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(str(path), source, batch_size=2, results_path=str(results), progress=False,
                 on_batch=stop_after_one_batch)  # fmt: skip
    assert json.loads(results.read_text())["done"] == 2
    assert no_temporary_files(tmp_path)

    # Another model at the same path: the stopped run must not be continued with it.
    shutil.move(path, tmp_path / "first")
    make_checkpoint(path, seed=1)
    with pytest.raises(UserError, match="computed with other parameters"):
        evaluate(str(path), source, batch_size=2, results_path=str(results), progress=False)

    # The first model back: the run resumes and ends as an uninterrupted one.
    shutil.rmtree(path)
    shutil.move(tmp_path / "first", path)
    resumed = evaluate(str(path), source, batch_size=2, results_path=str(results), progress=False)
    whole = evaluate(str(path), source, batch_size=2, progress=False)
    assert resumed["sums"] == whole["sums"] and resumed["video_ids"] == whole["video_ids"]
    assert no_temporary_files(tmp_path)

    # Results from before digests were recorded cannot vouch for their parameters.
    saved = json.loads(results.read_text())
    del saved["run"]["params_digest"]
    saved["complete"], saved["done"] = False, 2
    results.write_text(json.dumps(saved))
    with pytest.raises(UserError, match="records no params_digest"):
        evaluate(str(path), source, batch_size=2, results_path=str(results), progress=False)


# --- 4. unwritable outputs ------------------------------------------------------------------


def test_unwritable_outputs_fail_first_in_one_line(ckpt, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    under_file = a_file / "inside"
    clip = tmp_path / "clip.npy"
    np.save(clip, np.zeros((FRAMES, SIZE, SIZE, 3), np.float32))
    hf = tmp_path / "hf"
    hf.mkdir()

    convert = ["convert", "--source", "hf", "--input", hf, "--output"]
    _bad([*convert, a_file], capsys, f"--output {a_file} is a file, not a directory")
    _bad([*convert, under_file], capsys, f"{a_file} is a file, not a directory")
    _bad([*convert, ckpt], capsys, "already holds a checkpoint")
    predict = ["predict", "--checkpoint", ckpt, "--video", clip, "--save-logits"]
    _bad([*predict, a_dir], capsys, f"--save-logits {a_dir} is a directory")
    _bad([*predict, under_file / "x.npy"], capsys, "is a file, not a directory")
    _bad([*predict, tmp_path / "no_dir" / "x.npy"], capsys, "no directory")
    bench = ["bench", f"--config={REPO}/configs/vivit_tiny.py", "--output"]
    _bad([*bench, a_dir], capsys, "is a directory")
    _bad([*bench, under_file / "b.json"], capsys, "is a file, not a directory")
    train = ["train", f"--config={REPO}/configs/vivit_demo.py", "--workdir"]
    _bad([*train, a_file], capsys, "--workdir")
    data = f"--config.dataset_configs.data_dir={a_file}"
    _bad([*train, tmp_path / "w", data], capsys, f"data_dir {a_file} is a file")
    vis = ["visualize", "--checkpoint", ckpt, "--video", clip, "--out"]
    _bad([*vis, a_file], capsys, "--out")
    _bad(["demo", "--out", under_file], capsys, "is a file, not a directory")

    eval_args = [
        "eval",
        f"--config={REPO}/configs/vivit_synthetic.py",
        f"--config.checkpoint={ckpt}",
        f"--config.dataset_configs.data_dir={tmp_path / 'data'}",
    ]
    _bad([*eval_args, f"--config.results_path={a_dir}"], capsys, "results_path")
    _bad([*eval_args, f"--config.results_path={under_file}/r.json"], capsys, "is a file")
    _bad([*eval_args[:-1], data], capsys, f"data_dir {a_file} is a file")
    assert not (tmp_path / "data").exists()  # refused before any dataset was built

    if os.geteuid() != 0:  # root writes through a read-only mode
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            _bad([*predict, locked / "x.npy"], capsys, "is not writable")
            _bad([*eval_args, f"--config.results_path={locked}/r.json"], capsys, "not writable")
        finally:
            locked.chmod(0o700)

    # Writes are atomic: an interrupted one leaves the old file and no temporary file; a
    # killed one's leftover is reused by the next write and gone after it.
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_file(target) as f:
        f.write("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old" and not (tmp_path / "out.json.tmp").exists()
    (tmp_path / "out.json.tmp").write_text("orphan of a killed run")
    with atomic_file(target) as f:
        f.write("new")
    assert target.read_text() == "new" and not (tmp_path / "out.json.tmp").exists()


# --- 5. a corrupt orbax manifest ------------------------------------------------------------


def test_corrupt_orbax_manifest_is_one_line_without_event_loop_tracebacks(ckpt, tmp_path):
    legacy = shutil.copytree(ckpt, tmp_path / "legacy")
    (legacy / "model.json").write_text(json.dumps(RECORD))  # no file digests: orbax reads it
    (legacy / "params" / "manifest.ocdbt").write_bytes(b"garbage")
    clip = tmp_path / "clip.npy"
    np.save(clip, np.zeros((FRAMES, SIZE, SIZE, 3), np.float32))
    proc = subprocess.run(
        [sys.executable, "-m", "vtm_jax.cli", "predict", "--checkpoint", str(legacy),
         "--video", str(clip)],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vtm-jax: error: cannot restore") and "manifest.ocdbt" in last


# --- 6. user errors that were tracebacks ----------------------------------------------------


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "vtm_user_rules.py").write_text(
        "called = []\n"
        "def one_argument(x):\n"
        "    called.append(x)\n"
        "def keeps_everything(tokens, metric, r, ctx):\n"
        "    return tokens\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import vtm_user_rules

    return vtm_user_rules


def test_user_errors_are_one_line_not_tracebacks(ckpt, tmp_path, capsys, user_module, monkeypatch):
    config = tmp_path / "raises.py"
    config.write_text("def get_config():\n    raise RuntimeError('no dataset here')\n")
    _bad(
        ["bench", f"--config={config}"],
        capsys,
        "get_config() raised RuntimeError: no dataset here (line 2)",
    )

    clip = tmp_path / "clip.npy"
    np.save(clip, np.zeros((FRAMES, SIZE, SIZE, 3), np.float32))
    predict = ["predict", "--checkpoint", ckpt, "--video", clip]
    _bad([*predict, "--mode", "os:system"], capsys, "names a builtin, not a mode function")
    calls = []  # the same path to a Python function of one argument: refused, not called
    monkeypatch.setattr(os, "system", lambda command: calls.append(command))
    _bad([*predict, "--mode", "os:system"], capsys, "does not take the arguments")
    _bad([*predict, "--mode", "vtm_user_rules:one_argument"], capsys, "does not take the arguments")
    assert calls == [] and user_module.called == []  # checked, never called
    _bad(
        [*predict, "--mode", "vtm_user_rules:keeps_everything", "--r", "2"],
        capsys,
        "returned 9 tokens, not 9 - 2",
    )

    wrong_mean = shutil.copytree(ckpt, tmp_path / "wrong_mean")
    record = json.loads((wrong_mean / "model.json").read_text())
    record["preprocessing"]["mean"] = [0.5, 0.5]
    (wrong_mean / "model.json").write_text(json.dumps(record))
    _bad(
        ["predict", "--checkpoint", wrong_mean, "--video", clip],
        capsys,
        "mean must be 3 finite numbers",
    )

    bench = ["bench", f"--config={REPO}/configs/vivit_tiny.py"]
    hosts = ["--coordinator=localhost:1234", "--num-processes=1"]
    _bad([*bench, *hosts, "--process-id=3"], capsys, "--process-id must be in [0, 1)")
    _bad(["eval", f"--config={REPO}/configs/vivit_tiny.py", "--coordinator=bad", "--num-processes=2",
          "--process-id=0"], capsys, "--coordinator must be HOST:PORT")  # fmt: skip


# --- 7. misleading messages ---------------------------------------------------------------


def test_messages_say_what_is_wrong(ckpt, tmp_path, capsys):
    bench = ["bench", f"--config={REPO}/configs/vivit_tiny.py"]
    _bad(
        ["bench", f"--config={tmp_path}/missing.py"],
        capsys,
        f"no config file {tmp_path}/missing.py",
    )
    typed = tmp_path / "typed.py"
    typed.write_text(
        "import sys\n"
        f"sys.path.insert(0, {REPO + '/configs'!r})\n"
        "from vivit_tiny import get_config as tiny\n"
        "def get_config():\n"
        "    c = tiny()\n"
        "    c.model.num_layers = [1, 2]\n"
        "    return c\n"
    )
    _bad(["bench", f"--config={typed}"], capsys, "cannot be casted to type <class 'int'>")
    _bad([*bench, "--config.nonexistent=1"], capsys, "the config has no field 'nonexistent'")

    # The training fields are read by train, so only the others are reported as ignored.
    from vtm_jax.config.loading import load_config

    load_config([f"--config={REPO}/configs/vivit_demo.py"], command="train")
    train_note = capsys.readouterr().err
    load_config([f"--config={REPO}/configs/vivit_demo.py"], command="eval")
    eval_note = capsys.readouterr().err
    for field in ("optimizer", "lr_configs", "batch_size", "num_training_epochs"):
        assert field not in train_note and field in eval_note

    clip = tmp_path / "clip.npy"
    np.save(clip, np.zeros((FRAMES, SIZE, SIZE, 3), np.float32))
    out = tmp_path / "logits"
    assert (
        main(["predict", "--checkpoint", ckpt, "--video", str(clip), "--save-logits", str(out)])
        == 0
    )
    assert (
        f"logits written to {out}.npy" in capsys.readouterr().out
        and (tmp_path / "logits.npy").exists()
    )

    train = ["train", f"--config={REPO}/configs/vivit_demo.py", "--workdir", tmp_path / "w"]
    data = f"--config.dataset_configs.data_dir={tmp_path / 'data'}"
    _bad(
        [*train, data, "--config.num_training_steps=-1"],
        capsys,
        "num_training_steps must be a positive integer, not -1",
    )
    assert not (tmp_path / "data").exists()

    # A pickled HF pytorch_model.bin is refused in one line, without torch's advice to unpickle.
    torch = pytest.importorskip("torch")
    from vtm_jax.checkpoints.convert.checkpoint_files import read_state_dict

    hf = tmp_path / "hf"
    hf.mkdir()
    torch.save({"weight": torch.zeros(2), "config": Pickled()}, hf / "pytorch_model.bin")
    with pytest.raises(UserError) as info:
        read_state_dict(hf)
    message = str(info.value)
    assert "\n" not in message and "weights_only=False" not in message and "Pickled" in message


class Pickled:
    """An object a state dict should not hold: torch.load(weights_only=True) refuses it."""


# --- 8. settings that were silently accepted ------------------------------------------------


def test_silently_accepted_settings_are_errors(ckpt, tmp_path, capsys):
    from vtm_jax.config.loading import load_config
    from vtm_jax.merging import MergingSettings

    bench = ["bench", f"--config={REPO}/configs/vivit_tiny.py"]
    _bad(
        [*bench, "--config.token_merging.r=[1, 2, 3]"],
        capsys,
        "lists 3 values, the model has 2 layers",
    )
    # A per-layer list is one of the paper's forms of r: in a config file and as an override.
    per_layer = tmp_path / "per_layer.py"
    per_layer.write_text(
        "import sys\n"
        f"sys.path.insert(0, {REPO + '/configs'!r})\n"
        "from vivit_tiny import get_config as tiny\n"
        "def get_config():\n"
        "    c = tiny()\n"
        "    c.token_merging.r = [8, 4]\n"
        "    return c\n"
    )
    for args, expected in (
        ([], [8, 4]),
        (["--config.token_merging.r=[0, 6]"], [0, 6]),
        (["--config.token_merging.r=5"], [5, 5]),
    ):
        config = load_config([f"--config={per_layer}", *args])
        assert MergingSettings.from_dict(config.token_merging).layer_r(2) == expected

    clip = tmp_path / "clip.npy"
    np.save(clip, np.zeros((FRAMES, SIZE, SIZE, 3), np.float32))
    predict = ["predict", "--checkpoint", ckpt, "--video", clip]
    _bad([*predict, "--threshold", "0.4"], capsys, "--threshold is read only by mode hybrid")

    extra = tiny_params()
    extra["leftover"] = {"kernel": np.zeros((3, 3), np.float32)}
    with_extra = make_checkpoint(tmp_path / "extra", params=extra)
    _bad(
        ["predict", "--checkpoint", with_extra, "--video", clip],
        capsys,
        "unexpected leftover/kernel",
    )

    eval_args = [
        "eval",
        f"--config={REPO}/configs/vivit_synthetic.py",
        f"--config.checkpoint={ckpt}",
        f"--config.dataset_configs.data_dir={tmp_path / 'data'}",
    ]
    _bad([*eval_args, "--config.eval.limit=0"], capsys, "eval.limit must be at least 1")
    _bad(
        [*eval_args, "--config.dataset_configs.test_batch_size=0"],
        capsys,
        "test_batch_size must be at least 1",
    )
    assert not (tmp_path / "data").exists()
    with pytest.raises(UserError, match="limit must be a positive integer"):
        evaluate(ckpt, FakeSource("b"), limit=0, progress=False)
