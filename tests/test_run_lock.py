"""One run per output folder (runtime.lock) and scores files that are complete or refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.test_evaluate import CORRUPT, RUN, FakeSource, make_checkpoint
from tests.test_train import tiny_config
from vtm_jax.cli import main
from vtm_jax.errors import UserError
from vtm_jax.jobs.evaluation.evaluate import evaluate
from vtm_jax.jobs.training.train import train
from vtm_jax.runtime import lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = 9  # batches of 2: five batches, one corrupt video (CORRUPT = 7)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("lock") / "ckpt", 10)


def scores_of(results_path):
    with np.load(str(results_path)[: -len(".json")] + ".scores.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def run_eval(checkpoint, path, **kwargs):
    return evaluate(
        checkpoint, FakeSource(), limit=LIMIT, results_path=str(path), save_scores=True,
        **RUN, **kwargs,
    )  # fmt: skip


# ----------------------------------------------------------------------------- scores


def test_a_finished_run_leaves_complete_scores_and_no_scratch(checkpoint, tmp_path):
    path = tmp_path / "run.json"
    results = run_eval(checkpoint, path)
    saved = scores_of(path)
    assert saved["index"].tolist() == [i for i in range(LIMIT) if i != CORRUPT]
    assert len(saved["index"]) == len(results["video_ids"]) == results["sums"]["count"]
    assert sorted(os.listdir(tmp_path)) == ["run.json", "run.scores.npz"]  # no parts, no lock
    # The documented rerun of a finished run keeps the complete scores (no parts to read),
    # also when an older vtm-jax left an empty parts folder behind.
    run_eval(checkpoint, path, on_batch=pytest.fail)
    os.mkdir(tmp_path / "run.scores.npz.parts")
    run_eval(checkpoint, path, on_batch=pytest.fail)
    again = scores_of(path)
    for key, value in saved.items():
        np.testing.assert_array_equal(again[key], value)
    assert not os.path.exists(tmp_path / "run.scores.npz.parts")


def interrupted(checkpoint, path, batches=2):
    seen = []

    def stop(state):
        seen.append(state.done)
        if len(seen) == batches:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_eval(checkpoint, path, on_batch=stop)
    assert not os.path.exists(str(path) + ".lock")  # released on Ctrl-C too


def test_a_resumed_run_with_its_parts_combines_every_video(checkpoint, tmp_path):
    path = tmp_path / "run.json"
    interrupted(checkpoint, path)
    results = run_eval(checkpoint, path)
    assert scores_of(path)["index"].tolist() == [i for i in range(LIMIT) if i != CORRUPT]
    assert results["sums"]["count"] == LIMIT - 1
    assert not os.path.exists(tmp_path / "run.scores.npz.parts")


def test_lost_parts_are_named_not_written_as_a_short_scores_file(checkpoint, tmp_path):
    path = tmp_path / "run.json"
    interrupted(checkpoint, path)
    parts = tmp_path / "run.scores.npz.parts"
    for name in os.listdir(parts):
        os.remove(parts / name)
    with pytest.raises(UserError) as error:
        run_eval(checkpoint, path, on_batch=pytest.fail)
    message = str(error.value)
    assert "\n" not in message
    assert "the scores of 4 of the 4 videos" in message and "--overwrite" in message
    assert not os.path.exists(tmp_path / "run.scores.npz")  # no short file
    # The fix it names: start afresh.
    results = run_eval(checkpoint, path, overwrite=True)
    assert len(scores_of(path)["index"]) == results["sums"]["count"] == LIMIT - 1


# ----------------------------------------------------------------------------- locks


HOLD = (
    "import sys, time\n"
    "from vtm_jax.runtime.lock import hold\n"
    "with hold(sys.argv[1], 'test'):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(120)\n"
)


def holding(lock_path):
    """A second process holding ``lock_path`` (via runtime.lock.hold) until it is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_eval_on_one_results_path_is_refused(checkpoint, tmp_path, capsys):
    results = tmp_path / "results.json"
    holder = holding(str(results) + ".lock")
    try:
        args = [
            "eval",
            f"--config={REPO}/configs/vivit_synthetic.py",
            f"--config.checkpoint={checkpoint}",
            f"--config.dataset_configs.data_dir={tmp_path / 'data'}",
            f"--config.results_path={results}",
        ]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("vtm-jax: error: results_path")
        assert f"in use by another vtm-jax run: pid {holder.pid} on {socket.gethostname()}" in err
        assert "if that process is gone, delete" in err
        assert not os.path.exists(tmp_path / "data")  # refused before the dataset was built
    finally:
        holder.kill()
        holder.wait()
    # Killed: its lock file stays, and the next run takes it over, saying so.
    assert lock.holder(str(results) + ".lock")["pid"] == holder.pid
    run_eval(checkpoint, results)
    assert "taking over the stale lock" in capsys.readouterr().err
    assert not os.path.exists(str(results) + ".lock")


def test_a_second_train_on_one_workdir_is_refused(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = holding(workdir / "vtm-jax.lock")
    try:
        with pytest.raises(UserError, match=f"--workdir .* pid {holder.pid} on "):
            train(tiny_config(str(tmp_path / "data")), str(workdir), progress=False)
        assert os.listdir(workdir) == ["vtm-jax.lock"]  # nothing written, nothing built
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_train_lock_is_taken_over_and_removed(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    workdir = tmp_path / "run"
    workdir.mkdir()
    stale = {"pid": dead.pid, "host": socket.gethostname(), "since": "2020-01-01T00:00:00"}
    (workdir / "vtm-jax.lock").write_text(json.dumps(stale))
    train(tiny_config(str(tmp_path / "data"), num_training_steps=4), str(workdir), progress=False)
    err = capsys.readouterr().err
    assert f"taking over the stale lock {workdir / 'vtm-jax.lock'} of pid {dead.pid}" in err
    assert not os.path.exists(workdir / "vtm-jax.lock")
    assert os.path.isdir(workdir / "model")


def test_a_lock_of_another_host_is_judged_by_age(tmp_path, capsys):
    path = str(tmp_path / "x.lock")
    with open(path, "w") as f:
        json.dump({"pid": 1, "host": "elsewhere", "since": "2020-01-01T00:00:00"}, f)
    with pytest.raises(UserError, match="pid 1 on elsewhere since 2020-01-01"):
        with lock.hold(path, "x"):
            pytest.fail("took a live lock of another host")
    old = time.time() - lock.STALE_S - 10
    os.utime(path, (old, old))
    with lock.hold(path, "x"):
        assert lock.holder(path)["pid"] == os.getpid()
        with lock.hold(path, "x"):  # this process again: nested, not refused
            pass
        assert os.path.exists(path)
    assert "untouched for" in capsys.readouterr().err
    assert not os.path.exists(path)


def test_a_killed_holder_leaves_a_lock_the_next_run_takes(tmp_path):
    path = tmp_path / "y.lock"
    holder = holding(path)
    with pytest.raises(UserError, match=f"pid {holder.pid}"):
        with lock.hold(str(path), "y"):
            pytest.fail("two holders")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with lock.hold(str(path), "y"):
        assert lock.holder(str(path))["pid"] == os.getpid()
