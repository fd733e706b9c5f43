"""The shipped demo checkpoint: its recorded accuracy, and the paper's finding in miniature."""

from __future__ import annotations

import dataclasses

import pytest

from vtm_jax.checkpoints.store import load_record
from vtm_jax.data.datasets import open_split
from vtm_jax.jobs.demo import demo_config, shipped_checkpoint
from vtm_jax.jobs.evaluation.evaluate import evaluate
from vtm_jax.merging import MergingSettings


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    checkpoint = shipped_checkpoint()
    config = demo_config(checkpoint)
    data = config.dataset_configs
    source = open_split(
        config.dataset_name,
        data.split,
        data_dir=str(tmp_path_factory.mktemp("data")),
        config=dict(data.builder_options),
    )
    return checkpoint, config, source


def _top1(checkpoint, source, merging, batch=64):
    results = evaluate(
        checkpoint, source, merging=merging, batch_size=batch, attention="xla", progress=False
    )
    return results["metrics"]["top1"]


def test_the_shipped_checkpoint_has_its_recorded_accuracy(shipped):
    checkpoint, _, source = shipped
    trained = load_record(checkpoint).trained
    assert trained["test_examples"] == len(source) == 256
    # Recorded by `vtm-jax train` with its own batch of 32; argmax ties aside, the same clips.
    accuracy = _top1(checkpoint, source, MergingSettings())
    assert accuracy == pytest.approx(trained["test_accuracy"], abs=1 / 256)
    assert accuracy > 0.8


def test_merging_keeps_accuracy_where_random_merging_and_dropping_lose_it(shipped):
    """At the demo's r=64 (129 -> 65 -> ... -> 3 tokens) similarity-based merging stays within
    two points of r=0, while random merging and dropping lose several.

    The gap is smaller than the paper's collapse of random merging (measured here: about 9
    points, not 30): the shapes cover many tokens, so the task is robust to any reduction.
    """
    checkpoint, config, source = shipped
    base = MergingSettings.from_dict(config.token_merging)
    assert base.mode == "merge" and base.r == 64
    baseline = _top1(checkpoint, source, MergingSettings())
    merged = _top1(checkpoint, source, base)
    assert merged >= baseline - 0.02
    for mode in ("random_merge", "drop"):
        other = _top1(checkpoint, source, dataclasses.replace(base, mode=mode))
        assert other < merged - 0.05, mode
