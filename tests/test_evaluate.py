"""Evaluation: metrics against numpy, 1 vs 8 devices vs 2 processes, resume, corrupt videos."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.checkpoints.store import save_checkpoint
from vtm_jax.errors import UserError
from vtm_jax.jobs.evaluation.evaluate import evaluate, format_results, view_metrics
from vtm_jax.merging import MergingSettings
from vtm_jax.models.vivit import ViViT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES, SIZE = 8, 32
NUM_VIDEOS = 21  # batches of 2 (1 device) or 16 (8 devices): the last batch is padded
CORRUPT = 7
PREPROCESSING = {
    "num_frames": FRAMES,
    "stride": 1,
    "min_resize": SIZE,
    "crop_size": SIZE,
    "mean": [0.45, 0.45, 0.45],
    "std": [0.225, 0.225, 0.225],
}
# Two clips x three crops: every video is six views.
RUN = {"batch_size": 2, "num_clips": 2, "three_crops": True, "progress": False}
SUM_KEYS = ("sums", "video_ids", "skipped", "predictions", "confusion_matrix", "done")


class FakeSource:
    """In-memory examples like ``open_split`` gives: uint8 frames, one of them undecodable."""

    name, split = "fake", "test"

    def __init__(self, num_classes=10, class_splits=None):
        self.num_classes, self.class_splits = num_classes, class_splits

    def __len__(self):
        return NUM_VIDEOS

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        if i == CORRUPT:
            video = np.frombuffer(b"this is not a video file", np.uint8)
        else:
            video = rng.integers(0, 256, (12, SIZE, SIZE + 8, 3), dtype=np.uint8)
        example = {"video": video, "video_id": f"vid{i:03d}".encode()}
        if self.class_splits:
            example["label"] = np.int64(-1)
            example["verb"] = np.int64(rng.integers(self.class_splits[0]))
            example["noun"] = np.int64(rng.integers(self.class_splits[1]))
        else:
            example["label"] = np.int64(rng.integers(self.num_classes))
        return example


def make_checkpoint(path, num_classes, class_splits=None):
    model = ViViT(
        num_classes=num_classes,
        hidden_size=32,
        num_heads=4,
        mlp_dim=64,
        num_layers=2,
        patch_size=(2, 8, 8),
    )
    video = jnp.zeros((1, FRAMES, SIZE, SIZE, 3))
    params = jax.device_get(model.init(jax.random.PRNGKey(0), video)["params"])
    # The classifier starts at zero; a unit-scale head makes predictions differ per video.
    kernel = params["output_projection"]["kernel"]
    params["output_projection"]["kernel"] = np.random.default_rng(1).normal(size=kernel.shape)
    record = {
        "architecture": "vivit",
        "model": {
            "num_classes": num_classes,
            "hidden_size": 32,
            "num_heads": 4,
            "mlp_dim": 64,
            "num_layers": 2,
            "patch_size": [2, 8, 8],
        },
        "input": {"num_frames": FRAMES, "image_size": SIZE},
        "preprocessing": PREPROCESSING,
        "labels": None,
        "class_splits": class_splits,
        "token_merging": {"mode": "merge", "r": 4},
    }
    save_checkpoint(str(path), params, ModelRecord.from_json(record))
    return str(path)


def reference_scores(checkpoint, source):
    """Each video's logits ``[views, classes]``, one video at a time (None where corrupt)."""
    from vtm_jax.checkpoints.store import load_checkpoint
    from vtm_jax.data.pipeline import CorruptVideo, eval_views
    from vtm_jax.data.preprocessing import Preprocessing
    from vtm_jax.models.registry import build_model

    params, record = load_checkpoint(checkpoint)
    model = build_model(record, MergingSettings.from_dict(record.token_merging))
    apply = jax.jit(model.apply)
    scores = []
    for i in range(len(source)):
        try:
            views = eval_views(
                source[i], Preprocessing.from_dict(PREPROCESSING), num_clips=2, three_crops=True
            )
        except CorruptVideo:
            scores.append(None)
            continue
        scores.append(np.asarray(apply({"params": params}, views)))
    return scores


def top5(scores):
    return np.argsort(-scores, kind="stable")[:5]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("eval") / "ckpt", 10)


@pytest.fixture(scope="module")
def baseline(checkpoint, tmp_path_factory):
    """One uninterrupted single-device run, with predictions and a confusion matrix."""
    path = str(tmp_path_factory.mktemp("baseline") / "results.json")
    results = evaluate(
        checkpoint,
        FakeSource(),
        results_path=path,
        predictions=True,
        confusion_matrix=True,
        **RUN,
    )
    return results, path


def test_view_metrics_match_numpy():
    """Top-1/top-5 per head, views averaged, padding masked; action = verb and noun right."""
    rng = np.random.default_rng(0)
    heads = [("verb", 0, 97), ("noun", 97, 397)]
    logits = rng.normal(size=(12, 3, 397)).astype(np.float32)
    mask = np.array([1] * 10 + [0] * 2, np.int32)
    for softmax_views in (False, True):
        labels, expected_best = [], []
        for h, (_, start, stop) in enumerate(heads):
            scores = logits[..., start:stop]
            if softmax_views:
                scores = np.exp(scores - scores.max(-1, keepdims=True))
                scores /= scores.sum(-1, keepdims=True)
            order = np.argsort(-scores.mean(1), axis=1, kind="stable")
            # Labels at rank 0, 3 or 20 of each video: right, top-5 only, wrong.
            ranks = np.resize([[0, 0, 3, 20, 0], [0, 3, 0, 0, 20]][h], len(order))
            labels.append(order[np.arange(len(order)), ranks])
            expected_best.append(order[:, :5])
        labels = np.stack(labels, 1)
        sums, best, combined = view_metrics(
            jnp.asarray(logits), jnp.asarray(labels), mask, heads, softmax_views=softmax_views
        )
        real = mask.astype(bool)
        right = [(b[:, 0] == labels[:, h]) & real for h, b in enumerate(expected_best)]
        in5 = [(b == labels[:, h, None]).any(1) & real for h, b in enumerate(expected_best)]
        assert {k: int(v) for k, v in sums.items()} == {
            "count": 10,
            "verb_top1": right[0].sum(),
            "verb_top5": in5[0].sum(),
            "noun_top1": right[1].sum(),
            "noun_top5": in5[1].sum(),
            "action_top1": (right[0] & right[1]).sum(),
            # SlowFast's multitask top-5: both labels within their head's top 5.
            "action_top5": (in5[0] & in5[1]).sum(),
        }
        assert 0 < sums["action_top1"] < sums["verb_top1"] < sums["verb_top5"] < 10
        assert (
            sums["action_top1"] < sums["action_top5"] <= min(sums["verb_top5"], sums["noun_top5"])
        )
        for h in range(2):
            np.testing.assert_array_equal(best[h], expected_best[h])
        assert combined.shape == (12, 397)
        if not softmax_views:
            np.testing.assert_allclose(combined, logits.mean(1), atol=1e-5)

    sums, _, _ = view_metrics(
        jnp.asarray(logits), jnp.asarray(labels[:, :1]), mask, [(None, 0, 97)]
    )
    assert set(sums) == {"count", "top1", "top5"}


def test_view_metrics_max_ensemble():
    """SlowFast's max ensemble: the elementwise maximum over views, starting from zero."""
    logits = np.array(
        [[[-3.0, -1.0, -2.0], [-0.5, -4.0, -6.0]], [[1.0, 2.0, 0.5], [3.0, 0.0, 0.2]]]
    )
    labels = np.array([[1], [0]])
    sums, best, combined = view_metrics(
        jnp.asarray(logits, jnp.float32),
        jnp.asarray(labels),
        np.ones(2),
        [(None, 0, 3)],
        ensemble="max",
    )
    np.testing.assert_allclose(combined, [[0.0, 0.0, 0.0], [3.0, 2.0, 0.5]])
    # Video 0: every score ties at 0, so class 0 ranks first (lower index); summing would
    # have ranked class 1 first.
    assert best[0][0, 0] == 0 and best[0][1, 0] == 0 and int(sums["top1"]) == 1


def test_results_match_numpy(checkpoint, baseline):
    """Every video's top-5 and the counts equal numpy on the model's logits, video by video."""
    results, path = baseline
    source = FakeSource()
    scores = reference_scores(checkpoint, source)
    expected = [(i, top5(s.mean(0))) for i, s in enumerate(scores) if s is not None]
    assert [p["index"] for p in results["predictions"]] == [i for i, _ in expected]
    for prediction, (i, best) in zip(results["predictions"], expected, strict=True):
        assert prediction["top5"] == best.tolist()
        assert prediction["label"] == int(source[i]["label"])
    labels = [int(source[i]["label"]) for i, _ in expected]
    assert results["sums"] == {
        "count": NUM_VIDEOS - 1,
        "top1": sum(b[0] == y for (_, b), y in zip(expected, labels, strict=True)),
        "top5": sum(y in b for (_, b), y in zip(expected, labels, strict=True)),
    }
    assert 0 < results["sums"]["top1"] < results["sums"]["top5"] < NUM_VIDEOS - 1
    assert results["metrics"]["top1"] == results["sums"]["top1"] / (NUM_VIDEOS - 1)
    matrix = np.asarray(results["confusion_matrix"]["label"])
    assert matrix.sum() == NUM_VIDEOS - 1 and np.trace(matrix) == results["sums"]["top1"]
    # The corrupt video is listed and skipped; the run went on.
    assert [s["video_id"] for s in results["skipped"]] == [f"vid{CORRUPT:03d}"]
    assert results["skipped"][0]["reason"]
    assert f"vid{CORRUPT:03d}" not in results["video_ids"] and len(results["video_ids"]) == 20
    with open(path) as f:
        saved = json.load(f)
    assert saved["complete"] and saved["sums"] == results["sums"]
    assert saved["run"]["token_merging"]["r"] == 4 and saved["info"]["devices"] == 1
    table = format_results(results)
    assert "| top1 |" in table and "skipped 1 corrupt video" in table and "vid007" in table


def test_resume_after_interruption(checkpoint, baseline, tmp_path):
    """A run stopped after 3 batches and restarted ends with the uninterrupted run's numbers."""
    path = str(tmp_path / "results.json")
    batches = []

    def stop_after_three(state):
        batches.append(state.done)
        if len(batches) == 3:
            raise KeyboardInterrupt

    kwargs = dict(results_path=path, predictions=True, confusion_matrix=True, **RUN)
    with pytest.raises(KeyboardInterrupt):
        evaluate(checkpoint, FakeSource(), on_batch=stop_after_three, **kwargs)
    with open(path) as f:
        partial = json.load(f)
    assert not partial["complete"] and partial["done"] == 6 and len(partial["video_ids"]) == 6

    batches.clear()
    resumed = evaluate(
        checkpoint, FakeSource(), on_batch=lambda s: batches.append(s.done), **kwargs
    )
    assert batches[0] == 8 and batches[-1] == NUM_VIDEOS  # only the rest was evaluated
    expected, _ = baseline
    for key in SUM_KEYS:
        assert resumed[key] == expected[key], key
    assert resumed["metrics"] == expected["metrics"]

    # A finished file is resumed too: nothing is left to do.
    again = evaluate(checkpoint, FakeSource(), on_batch=pytest.fail, **kwargs)
    assert again["sums"] == expected["sums"]


def test_a_results_file_from_before_rule_options_resumes(checkpoint, tmp_path):
    """Files written before rules had options keep hybrid's threshold beside the mode."""
    path = str(tmp_path / "hybrid.json")
    hybrid = MergingSettings(mode="hybrid", r=4, rule_options={"threshold": 0.4})
    kwargs = dict(merging=hybrid, limit=4, results_path=path, **RUN)
    first = evaluate(checkpoint, FakeSource(), **kwargs)
    assert "token merging: mode=hybrid, r=4, threshold=0.4" in format_results(first)
    with open(path) as f:
        saved = json.load(f)
    stored = saved["run"]["token_merging"]
    assert stored["rule_options"] == {"threshold": 0.4}
    del stored["rule_options"]
    stored["threshold"] = 0.4  # as vtm-jax wrote it before
    with open(path, "w") as f:
        json.dump(saved, f)
    again = evaluate(checkpoint, FakeSource(), on_batch=pytest.fail, **kwargs)
    assert again["sums"] == first["sums"]
    # The old form still names its own run: another threshold is another run.
    other = dataclasses.replace(hybrid, rule_options={"threshold": 0.5})
    with pytest.raises(UserError, match="different run.*token_merging"):
        evaluate(checkpoint, FakeSource(), **{**kwargs, "merging": other})


def test_clips_per_step_gives_the_same_results(checkpoint, baseline):
    """A device batch (2 videos x 6 views) run 3 clips at a time: the same sums and ids."""
    expected, _ = baseline
    stepped = evaluate(
        checkpoint, FakeSource(), clips_per_step=3, predictions=True, confusion_matrix=True, **RUN
    )
    for key in SUM_KEYS:
        assert stepped[key] == expected[key], key
    assert stepped["info"]["clips_per_step"] == 3
    with pytest.raises(UserError, match="must divide the 12 clips of a device batch"):
        evaluate(checkpoint, FakeSource(), clips_per_step=5, **RUN)


def test_other_run_on_the_same_path_is_refused(checkpoint, baseline, tmp_path):
    _, path = baseline
    other = MergingSettings(mode="drop", r=4)
    with pytest.raises(UserError, match="different run.*token_merging.*overwrite"):
        evaluate(checkpoint, FakeSource(), merging=other, results_path=path, **RUN)
    with pytest.raises(UserError, match="different run.*num_examples"):
        evaluate(checkpoint, FakeSource(), limit=4, results_path=path, predictions=True, **RUN)
    junk = tmp_path / "notes.json"
    junk.write_text("my notes")
    with pytest.raises(UserError, match="not a vtm-jax results file"):
        evaluate(checkpoint, FakeSource(), results_path=str(junk), **RUN)
    with pytest.raises(UserError, match=r"dataset has classes \[12\]"):
        evaluate(checkpoint, FakeSource(num_classes=12), **RUN)
    with pytest.raises(UserError, match="unknown preprocessing entries crop"):
        evaluate(checkpoint, FakeSource(), preprocessing={"crop": 3}, **RUN)

    small = evaluate(
        checkpoint,
        FakeSource(),
        merging=other,
        limit=4,
        results_path=str(junk),
        overwrite=True,
        **RUN,
    )
    assert small["done"] == 4 and small["run"]["token_merging"]["mode"] == "drop"


def test_epic_two_heads(tmp_path):
    """Verb and noun heads each get their own top-k; action = both top-1 right."""
    checkpoint = make_checkpoint(tmp_path / "epic", 397, class_splits=[97, 300])
    source = FakeSource(num_classes=397, class_splits=[97, 300])
    results = evaluate(checkpoint, source, predictions=True, limit=9, **RUN)
    scores = reference_scores(checkpoint, source)
    expected = {k: 0 for k in results["sums"]}
    for i, s in enumerate(scores[:9]):
        if s is None:
            continue
        verb, noun = source[i]["verb"], source[i]["noun"]
        best_verb, best_noun = top5(s[:, :97].mean(0)), top5(s[:, 97:].mean(0))
        expected["count"] += 1
        expected["verb_top1"] += best_verb[0] == verb
        expected["verb_top5"] += verb in best_verb
        expected["noun_top1"] += best_noun[0] == noun
        expected["noun_top5"] += noun in best_noun
        expected["action_top1"] += best_verb[0] == verb and best_noun[0] == noun
        expected["action_top5"] += verb in best_verb and noun in best_noun
    assert results["sums"] == expected
    first = results["predictions"][0]
    assert set(first["top5"]) == {"verb", "noun"} and first["label"]["verb"] == source[0]["verb"]
    assert list(results["metrics"]) == [
        "verb_top1",
        "verb_top5",
        "noun_top1",
        "noun_top5",
        "action_top1",
        "action_top5",
    ]

    # Chosen labels: video 0 right on both heads, video 1 right on the verb only.
    class Chosen(FakeSource):
        def __getitem__(self, i):
            example = super().__getitem__(i)
            if i < 2:
                example["verb"] = top5(scores[i][:, :97].mean(0))[0]
                example["noun"] = top5(scores[i][:, 97:].mean(0))[i]
            return example

    results = evaluate(checkpoint, Chosen(397, [97, 300]), limit=2, **RUN)
    assert results["sums"]["verb_top1"] == 2 and results["sums"]["action_top1"] == 1


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(checkpoint, results_path, devices, process=0, processes=1, port=0):
    """``evaluate`` in a fresh interpreter with ``devices`` forced CPU devices."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    code = (
        "import sys, jax\n"
        "checkpoint, path, process, processes, port = sys.argv[1:]\n"
        "if int(processes) > 1:\n"
        "    jax.distributed.initialize(f'127.0.0.1:{port}', int(processes), int(process))\n"
        "from tests.test_evaluate import FakeSource, RUN\n"
        "from vtm_jax.jobs.evaluation.evaluate import evaluate\n"
        "RUN['progress'] = int(process) == 0\n"
        "evaluate(checkpoint, FakeSource(), results_path=path, predictions=True,\n"
        "         confusion_matrix=True, **RUN)\n"
    )
    args = [checkpoint, results_path, str(process), str(processes), str(port)]
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_eight_devices_and_two_processes_match_one_device(checkpoint, baseline, tmp_path):
    """8 devices (one padded batch of 16), then 2 processes x 2 devices: the same numbers."""
    expected, _ = baseline
    eight = str(tmp_path / "eight.json")
    proc = run_script(checkpoint, eight, devices=8)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "clips/s" in stderr  # the progress bar
    with open(eight) as f:
        results = json.load(f)
    assert results["info"]["devices"] == 8 and results["complete"]
    for key in SUM_KEYS:
        assert results[key] == expected[key], key

    two = str(tmp_path / "two.json")
    port = free_port()
    procs = [run_script(checkpoint, two, 2, i, 2, port) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outputs]
    with open(two) as f:
        results = json.load(f)
    assert results["info"]["devices"] == 4 and results["info"]["processes"] == 2
    for key in SUM_KEYS:
        assert results[key] == expected[key], key
    assert [p["done"] for p in results["per_process"]] == [10, 11]
    for i in range(2):  # each process kept its own progress file for resuming
        with open(f"{two}.process{i}") as f:
            assert json.load(f)["complete"]

    # One process's progress file is damaged: every process stops with the reason, none hangs.
    with open(f"{two}.process1", "w") as f:
        f.write("damaged")
    port = free_port()
    procs = [run_script(checkpoint, two, 2, i, 2, port) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [1, 1]
    assert "UserError: process 1: " in outputs[0][1]
    assert "process1 exists and is not a vtm-jax results file" in outputs[1][1]


def test_scores_dump_and_max_ensemble(tmp_path):
    """eval.save_scores: every video's combined scores in an .npz (no pickle), in dataset
    order; with the max ensemble they are SlowFast's max over views and zero."""
    checkpoint = make_checkpoint(tmp_path / "ckpt", 10)
    source = FakeSource()
    results_path = tmp_path / "run.json"
    results = evaluate(
        checkpoint,
        source,
        limit=9,
        results_path=str(results_path),
        ensemble="max",
        save_scores=True,
        **RUN,
    )
    assert results["run"]["ensemble"] == "max"
    saved = np.load(tmp_path / "run.scores.npz", allow_pickle=False)
    assert results["scores_path"] == str(tmp_path / "run.scores.npz")
    scores = reference_scores(checkpoint, source)
    kept = [i for i in range(9) if scores[i] is not None]
    assert saved["index"].tolist() == kept and CORRUPT in range(9) and CORRUPT not in kept
    assert saved["video_id"].tolist() == [f"vid{i:03d}" for i in kept]
    assert saved["labels"][:, 0].tolist() == [int(source[i]["label"]) for i in kept]
    expected = np.stack([np.maximum(scores[i].max(0), 0) for i in kept])
    np.testing.assert_allclose(saved["scores"], expected, atol=1e-4)
    top1 = sum(int(np.argmax(e) == source[i]["label"]) for e, i in zip(expected, kept, strict=True))
    assert results["sums"]["top1"] == top1
    # Run again: it resumes the finished run and writes the same scores.
    evaluate(
        checkpoint, source, limit=9, results_path=str(results_path), ensemble="max",
        save_scores=True, **RUN,
    )  # fmt: skip
    np.testing.assert_array_equal(np.load(tmp_path / "run.scores.npz")["scores"], saved["scores"])
    with pytest.raises(UserError, match="unknown ensemble"):
        evaluate(checkpoint, source, limit=1, ensemble="mean", **RUN)
    with pytest.raises(UserError, match="save_scores needs a results_path"):
        evaluate(checkpoint, source, limit=1, save_scores=True, **RUN)


class CountingSource(FakeSource):
    """FakeSource that records, at every read, how far reading is ahead of the counted videos."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()
        self.reads, self.consumed, self.ahead = [], 0, []

    def __getitem__(self, i):
        with self.lock:
            self.reads.append(i)
            self.ahead.append(len(self.reads) - self.consumed)
        return super().__getitem__(i)


def test_examples_are_streamed(checkpoint):
    """Videos are read a few at a time ahead of the devices, never the whole split at once."""
    from vtm_jax.jobs.evaluation.evaluate import PREFETCH_BATCHES

    source = CountingSource()
    workers, host_batch = 2, 1  # one device, one video per batch

    def counted(state):
        source.consumed = state.done

    results = evaluate(
        checkpoint, source, batch_size=1, workers=workers, on_batch=counted, progress=False
    )
    assert results["done"] == NUM_VIDEOS
    assert sorted(source.reads) == list(range(NUM_VIDEOS))  # each video read once
    # In memory at once: the prefetched batches, the batch on the devices, one per worker.
    window = (PREFETCH_BATCHES + 1) * host_batch + workers
    assert max(source.ahead) <= window < NUM_VIDEOS
