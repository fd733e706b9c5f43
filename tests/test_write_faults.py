"""Writers meeting a full disk or a kill: one line naming the file, the previous file intact,
no half-written one; and the next run finishes what a killed one left (issue 25: 4b, 6, 7)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from vtm_jax.checkpoints.store import load_checkpoint
from vtm_jax.cli import main

REPO = Path(__file__).resolve().parents[1]
FULL = "No space left on device"
# What tensorstore raises (through orbax) when the disk fills up under a checkpoint.
TENSORSTORE_FULL = (
    'RESOURCE_EXHAUSTED: Error writing "x/0.0.0" in OCDBT database at local file "{}": '
    "Failed to write 81116 bytes to file 11: No space left on device [os_error_code='28']"
)


def _one_line(capsys, args, *expected) -> str:
    assert main([str(a) for a in args]) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and "RESOURCE_EXHAUSTED" not in stderr, stderr
    err = stderr.strip().splitlines()[-1].split("\r")[-1]  # after any progress bar
    assert err.startswith("vtm-jax: error:"), stderr
    for text in expected:
        assert str(text) in err, err
    return err


class _FullFile:
    """A file object on a disk that fills up: after ``room`` bytes, writes fail."""

    def __init__(self, f, room: int) -> None:
        self._f, self._room = f, room

    def write(self, data):
        if len(data) > self._room:
            self._f.write(data[: self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, FULL)
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _scenic_input(path: Path, shift: float) -> Path:
    from vtm_jax.models.vivit import ViViT

    model = ViViT(
        num_classes=5, hidden_size=32, num_heads=4, mlp_dim=64, num_layers=2, patch_size=(2, 8, 8)
    )
    params = model.init(jax.random.PRNGKey(1), np.zeros((1, 8, 32, 32, 3), np.float32))["params"]
    params = jax.tree.map(lambda p: p + shift, params)
    path.mkdir()
    (path / "checkpoint_1").write_bytes(
        flax.serialization.msgpack_serialize(jax.device_get({"params": params}))
    )
    return path


def _convert(source: Path, out: Path, *extra: str) -> list[str]:
    return [
        "convert", "--source", "scenic", "--num-frames", "8", "--image-size", "32",
        "--input", str(source), "--output", str(out), *extra,
    ]  # fmt: skip


def _killed(script: str) -> None:
    """Run ``script`` in a subprocess that kills itself (``os._exit``) where it says."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert proc.returncode == 9, proc.stderr[-3000:]


# --- 7. a killed convert --------------------------------------------------------------------


def test_a_convert_killed_before_its_record_is_finished_by_the_next(tmp_path, capsys):
    source, out = _scenic_input(tmp_path / "in", 0.01), tmp_path / "ckpt"
    _killed(
        f"""
        import os
        from vtm_jax.checkpoints import store
        from vtm_jax.cli import main
        store.write_record = lambda path, record: os._exit(9)  # killed before model.json
        main({_convert(source, out)!r})
        """
    )
    # The half-written checkpoint is only the temporary folder beside the output.
    assert not out.exists() and os.listdir(tmp_path / "ckpt.tmp") == ["params"]
    clip = tmp_path / "clip.npy"
    np.save(clip, np.zeros((8, 32, 32, 3), np.float32))
    predict = ["predict", "--checkpoint", tmp_path / "ckpt.tmp", "--video", clip]
    _one_line(capsys, predict, "unfinished conversion or export", "rerun the command")
    assert main(_convert(source, out)) == 0
    params, _ = load_checkpoint(str(out))
    assert not (tmp_path / "ckpt.tmp").exists()


def test_a_replacement_killed_while_moving_in_is_finished_by_the_next(tmp_path, capsys):
    one, two = _scenic_input(tmp_path / "one", 0.01), _scenic_input(tmp_path / "two", 0.02)
    out = tmp_path / "ckpt"
    assert main(_convert(one, out)) == 0
    _killed(
        f"""
        import os
        from vtm_jax.checkpoints import store
        from vtm_jax.cli import main
        remove = store._remove
        def killed(path):  # the old model.json is gone, the new one not yet in place
            if path.endswith("params.old"):
                os._exit(9)
            remove(path)
        store._remove = killed
        main({_convert(two, out, "--overwrite")!r})
        """
    )
    assert sorted(os.listdir(out)) == ["params"]
    clip = tmp_path / "clip.npy"
    np.save(clip, np.zeros((8, 32, 32, 3), np.float32))
    predict = ["predict", "--checkpoint", out, "--video", clip]
    _one_line(capsys, predict, f"{out} holds params/ but no model.json", "unfinished conversion")
    assert main(_convert(two, out)) == 0  # no --overwrite needed: it finishes its own write
    params, _ = load_checkpoint(str(out))
    bias = params["output_projection"]["bias"]
    np.testing.assert_allclose(bias, np.full_like(bias, 0.02), atol=1e-6)
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "clip.npy", "one", "two"]


# --- 6. a full disk -------------------------------------------------------------------------


def test_convert_onto_a_full_disk_keeps_the_old_checkpoint(tmp_path, capsys, monkeypatch):
    one, two = _scenic_input(tmp_path / "one", 0.01), _scenic_input(tmp_path / "two", 0.02)
    out = tmp_path / "ckpt"
    assert main(_convert(one, out)) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    save = ocp.StandardCheckpointer.save

    def full(self, directory, *args, **kwargs):
        save(self, directory, *args, **kwargs)  # part of it is written, then the disk is full
        raise ValueError(TENSORSTORE_FULL.format(directory))

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", full)
    _one_line(capsys, _convert(two, out, "--overwrite"), f"{out}: {FULL}")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "ckpt.tmp").exists()
    # The record's write failing the same way (a write() naming no file) is told alike.
    monkeypatch.undo()
    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return _FullFile(f, 10) if str(path).endswith("model.json.tmp") else f

    monkeypatch.setattr("vtm_jax.outputs.open", full_open, raising=False)
    _one_line(capsys, _convert(two, out, "--overwrite"), f"{out / 'model.json'}: {FULL}")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "ckpt.tmp").exists()


def test_eval_results_onto_a_full_disk(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    results = tmp_path / "results.json"
    args = [
        "eval",
        f"--config={REPO}/configs/vivit_synthetic.py",
        f"--config.checkpoint={tiny_checkpoint('vivit')}",
        f"--config.dataset_configs.data_dir={tmp_path / 'data'}",
        "--config.dataset_configs.builder_options.test_examples=8",
        "--config.dataset_configs.builder_options.train_examples=8",
        f"--config.results_path={results}",
    ]
    assert main(args) == 0
    capsys.readouterr()
    good = results.read_bytes()
    real_open = open

    def full_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return _FullFile(f, 100) if str(path) == f"{results}.tmp" else f

    monkeypatch.setattr("vtm_jax.outputs.open", full_open, raising=False)
    _one_line(capsys, [*args, "--overwrite"], f"{results}: {FULL}")
    assert results.read_bytes() == good
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


# --- train: its writers on a full disk, and a killed export ---------------------------------


def _train_args(tmp_path: Path, **overrides) -> list[str]:
    config = tmp_path / "config.py"
    settings = {"num_training_steps": 12, "log_eval_steps": 0, "checkpoint_steps": 4, **overrides}
    config.write_text(
        "from tests.test_train import tiny_config\n"
        "def get_config():\n"
        f"    return tiny_config({str(tmp_path / 'data')!r}, **{settings!r})\n"
    )
    return ["train", f"--config={config}", "--workdir", str(tmp_path / "run")]


def _steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_train_checkpoint_onto_a_full_disk(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    save = ocp.CheckpointManager.save

    def full(self, step, *args, **kwargs):
        if step < 8:
            return save(self, step, *args, **kwargs)
        (run / "checkpoints" / f"{step}.orbax-checkpoint-tmp-1" / "d").mkdir(parents=True)
        raise ValueError(TENSORSTORE_FULL.format(run / "checkpoints"))

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    _one_line(capsys, _train_args(tmp_path), f"{run / 'checkpoints'}: {FULL}")
    assert sorted(os.listdir(run / "checkpoints")) == ["4"]  # the earlier one, and no tmp
    assert not (run / "model").exists()
    monkeypatch.undo()
    assert main(_train_args(tmp_path)) == 0  # resumes from step 4
    load_checkpoint(str(run / "model"))
    assert _steps_logged(run) == [10, 12]


def test_train_log_onto_a_full_disk(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    log = run / "train_log.jsonl"
    real_open = type(epath.Path(tmp_path)).open

    def full_open(self, mode="r", *args, **kwargs):
        f = real_open(self, mode, *args, **kwargs)
        return _FullFile(f, 150) if str(self) == str(log) and "a" in mode else f

    monkeypatch.setattr(type(epath.Path(tmp_path)), "open", full_open)
    _one_line(capsys, _train_args(tmp_path), f"{log}: {FULL}")
    assert log.read_text().count("\n") == 1  # step 10's line, and half of step 12's
    assert not (run / "model").exists()
    monkeypatch.undo()
    assert main(_train_args(tmp_path)) == 0  # resumes from step 8, the half line dropped
    load_checkpoint(str(run / "model"))
    assert _steps_logged(run) == [10, 12]


def test_train_events_onto_a_full_disk(tmp_path, capsys, monkeypatch):
    from vtm_jax.jobs import tensorboard

    if not tensorboard.tensorboard_available():
        pytest.skip("clu and TensorFlow are not installed")
    from clu.metric_writers import SummaryWriter

    def full(self, step, scalars):
        raise OSError(errno.ENOSPC, FULL)  # as a write() names no file

    monkeypatch.setattr(SummaryWriter, "write_scalars", full)
    run = tmp_path / "run"
    _one_line(capsys, _train_args(tmp_path), f"{run}/events.out.tfevents.*: {FULL}")


def test_a_training_killed_while_exporting_exports_on_the_rerun(tmp_path, capsys):
    run = tmp_path / "run"
    args = _train_args(tmp_path, num_training_steps=4)
    _killed(
        f"""
        import os
        from vtm_jax.checkpoints import store
        from vtm_jax.cli import main
        store.write_record = lambda path, record: os._exit(9)  # killed before model.json
        main({args!r})
        """
    )
    assert not (run / "model").exists() and (run / "model.tmp" / "params").is_dir()
    assert main(args) == 0
    assert f"model in {run / 'model'}" in capsys.readouterr().out
    params, record = load_checkpoint(str(run / "model"))
    assert record.trained["steps"] == 4 and not (run / "model.tmp").exists()
    # An export an earlier vtm-jax left unfinished (params/ without model.json) is redone too.
    (run / "model" / "model.json").unlink()
    assert main(args) == 0
    again, _ = load_checkpoint(str(run / "model"))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
