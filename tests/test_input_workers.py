"""Input workers as processes (``worker_kind="processes"``): the examples threads read, in the
same order, with the same values; interrupted runs resume; bad settings are one line.

Each run with processes starts them (a fresh interpreter that imports grain and JAX: about
two CPU seconds each), so the runs here are few and tiny. test_evaluate's resume test runs
again here with every reader switched to processes (test_reliability's resume test reads the
same way and passes so too, but costs three more starts).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tests import test_evaluate
from tests.test_evaluate import FakeSource, baseline, checkpoint  # noqa: F401  (fixtures)
from vtm_jax.errors import UserError
from vtm_jax.jobs.evaluation import input as eval_input

WORKERS = 2  # two processes: each reads every other example, and the reader interleaves them


def processes_everywhere(monkeypatch, count: int) -> list[str]:
    """Every grain reader of evaluation and training uses ``count`` worker processes; the
    list returned fills with the kind each reader was asked for."""
    read_ahead = eval_input.read_ahead
    kinds = []

    def in_processes(dataset, workers, kind, buffer):
        kinds.append(kind)
        return read_ahead(dataset, count, "processes", buffer)

    monkeypatch.setattr(eval_input, "read_ahead", in_processes)
    return kinds


def test_processes_give_the_threads_labels_and_logits_in_order(checkpoint, tmp_path):  # noqa: F811
    """A tiny evaluation (one corrupt video among them) read by threads and by processes: the
    same videos in the same order, the same labels and the same scores, exactly."""
    from vtm_jax.jobs.evaluation.evaluate import evaluate

    runs = {}
    for kind in ("threads", "processes"):
        path = tmp_path / f"{kind}.json"
        runs[kind] = evaluate(
            checkpoint,
            FakeSource(),
            limit=9,  # video 7 is corrupt
            workers=WORKERS,
            worker_kind=kind,
            results_path=str(path),
            save_scores=True,
            predictions=True,
            **test_evaluate.RUN,
        )
        runs[kind]["scores"] = dict(np.load(tmp_path / f"{kind}.scores.npz"))
    threads, processes = runs["threads"], runs["processes"]
    assert threads["video_ids"] == [f"vid{i:03d}" for i in range(9) if i != 7]
    for key in ("video_ids", "sums", "skipped", "predictions"):
        assert processes[key] == threads[key], key
    assert set(processes["scores"]) == set(threads["scores"])
    for key, value in threads["scores"].items():
        np.testing.assert_array_equal(processes["scores"][key], value, err_msg=key)


def test_an_interrupted_evaluation_resumes_with_processes(
    checkpoint,  # noqa: F811
    baseline,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    """test_evaluate's resume test, read by two processes: the resumed run starts mid-split."""
    kinds = processes_everywhere(monkeypatch, WORKERS)
    test_evaluate.test_resume_after_interruption(checkpoint, baseline, tmp_path)
    assert len(kinds) >= 2  # the interrupted run and the resumed one


def test_training_batches_from_any_step_are_the_same_with_processes():
    """Worker processes read each training step's examples in order from any step (what a
    resumed run needs); the examples pickle, their epoch cache is rebuilt in each process."""
    from vtm_jax.jobs.training.input import TrainExamples, batch_indices, train_batches

    class Indices(TrainExamples):
        def __call__(self, position):
            return {"index": np.int64(self.index(position))}

    examples = Indices(range(20), {}, seed=0, batch_size=4)  # 5 batches per epoch
    examples.index(0)  # the cache holds an epoch: it must not travel
    streamed = [b["index"] for b in train_batches(examples, 3, 12, WORKERS, "processes")]
    assert len(streamed) == 9
    for step, indices in enumerate(streamed, 3):
        np.testing.assert_array_equal(indices, batch_indices(0, step, 4, 20))


def test_bad_worker_settings_are_one_line_errors():
    from vtm_jax.config.blocks import evaluation_config, training_config
    from vtm_jax.jobs.evaluation.spec import EvalSpec

    with pytest.raises(
        UserError, match="worker_kind must be one of threads, processes, not 'fork'"
    ):
        EvalSpec(worker_kind="fork")
    assert evaluation_config().worker_kind == training_config().worker_kind == "threads"

    class Locked(FakeSource):
        def __init__(self):
            super().__init__()
            self.lock = threading.Lock()

    load = eval_input.ExampleLoader(
        Locked(), None, [], num_clips=1, three_crops=False, view_shape=(1,)
    )
    with pytest.raises(UserError, match="does not pickle .*use worker_kind 'threads'"):
        eval_input.loaded_batches(load, range(4), 2, 2, "processes")
    # Threads read it in this process: no pickling, no error.
    eval_input.loaded_batches(load, range(4), 2, 2, "threads").close()


def test_the_setting_comes_from_configs_and_the_command_line():
    import os

    from vtm_jax.config.loading import load_config
    from vtm_jax.jobs.evaluation.spec import EvalSpec

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    demo = f"--config={repo}/configs/vivit_demo.py"
    train = load_config([demo, "--config.training.worker_kind=processes"], command="train")
    assert train.training.worker_kind == "processes"
    evaluation = load_config([demo, "--config.eval.worker_kind=processes"], command="eval")
    assert EvalSpec.from_config(evaluation, devices=1).worker_kind == "processes"
    evaluation.eval.worker_kind = "forks"
    with pytest.raises(UserError, match="eval.worker_kind must be one of threads, processes"):
        EvalSpec.from_config(evaluation, devices=1)
