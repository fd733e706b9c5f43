"""vtm-jax demo on a checkpoint trained in the test: the table, the plot and the pictures."""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from tests.test_train import tiny_config
from vtm_jax.config.blocks import bench_config
from vtm_jax.jobs.demo import demo_config, format_demo_table, run_demo
from vtm_jax.jobs.training.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    config = tiny_config(str(root / "data"), num_training_steps=8)
    config.demo = ml_collections.ConfigDict(
        {
            "modes": ("random_drop", "drop", "random_merge", "merge", "hybrid"),
            "hybrid_threshold": 0.3,
            "curve_r": (2, 4),
            "curve_modes": ("merge", "random_merge"),
            "visualize_layers": (1, 2),
            "attention": "xla",
        }
    )
    config.bench = bench_config(iterations=1, batch_size=4, attention="xla")
    train(config, str(root / "run"), progress=False)
    return config, str(root / "run" / "model"), root


def test_demo_writes_the_table_plot_and_pictures(trained):
    config, checkpoint, root = trained
    printed = []
    summary = run_demo(
        config, checkpoint=checkpoint, out_dir=str(root / "out"), progress=False, say=printed.append
    )
    table = summary["table"]
    assert [row["mode"] for row in table] == [
        "none",
        "random_drop",
        "drop",
        "random_merge",
        "merge",
        "hybrid",
    ]
    assert table[0]["speedup"] == pytest.approx(1.0)
    assert all(row["r"] == 4 for row in table[1:])
    # Every row but the baseline removes tokens, so it does less work.
    assert all(row["gmacs_per_clip"] < table[0]["gmacs_per_clip"] for row in table[1:])
    assert table[-1]["threshold"] == 0.3
    # The curve holds the sweep's other r values (r=4 merge is already in the table).
    assert sorted((row["mode"], row["r"]) for row in summary["curve"]) == [
        ("merge", 2),
        ("random_merge", 2),
    ]
    # The printed table is the one written, and it holds the measured numbers.
    markdown = open(root / "out" / "demo.md").read().strip()
    assert markdown in printed[-2] or any(markdown in p for p in printed)
    assert f"{100 * table[4]['top1']:.2f}" in markdown.splitlines()[6]
    saved = json.load(open(root / "out" / "demo.json"))
    assert saved["table"] == table
    with Image.open(root / "out" / "demo.png") as image:
        assert image.size[0] > 300
    assert summary["pictures"] and all(os.path.isfile(p) for p in summary["pictures"])
    assert any(p.endswith(".gif") for p in summary["pictures"])
    # The pictures are big enough to see: 8 frames of 16x16 drawn at 8x (128 px) in one row,
    # with a legend underneath (they were 142 x 40 px before).
    out = root / "out"
    assert sorted(os.path.basename(p) for p in summary["pictures"]) == [
        "demo_video_input.png",
        "demo_video_layer1.gif",
        "demo_video_layer1.png",
        "demo_video_layer2.gif",
        "demo_video_layer2.png",
    ]
    with Image.open(out / "demo_video_layer1.png") as image:
        assert image.size[0] == 8 * 128 + 7 * 2 and image.size[1] > 2 * 128 + 8
        pixels = np.asarray(image.convert("RGB"))
    merged = pixels[128 + 8 : 2 * 128 + 8, :128]  # the first merged frame: 8 x 8 blocks
    np.testing.assert_array_equal(merged, merged[::8, ::8].repeat(8, 0).repeat(8, 1))
    assert (pixels[2 * 128 + 8 :] != 255).any()  # the legend
    with Image.open(out / "demo_video_input.png") as image:
        assert image.size[0] == 8 * 128 + 7 * 2 and image.size[1] > 128
    with Image.open(out / "demo_video_layer2.gif") as image:
        assert image.size[0] == 2 * 128 + 2 and image.size[1] > 128


def test_demo_reads_the_config_its_checkpoint_was_trained_with(trained):
    config, checkpoint, _ = trained
    stored = demo_config(checkpoint)
    assert stored.token_merging.r == config.token_merging.r
    assert list(stored.demo.modes) == list(config.demo.modes)


def test_table_format():
    rows = [
        {
            "mode": "none",
            "r": 0,
            "threshold": None,
            "top1": 0.5,
            "clips_per_s": 10.0,
            "speedup": 1.0,
            "gmacs_per_clip": 2.0,
        },
        {
            "mode": "hybrid",
            "r": 8,
            "threshold": 0.4,
            "top1": 0.25,
            "clips_per_s": 20.0,
            "speedup": 2.0,
            "gmacs_per_clip": 1.0,
        },
    ]
    table = format_demo_table(rows, "vivit").splitlines()
    assert table[2] == "| vivit | 0 | - (baseline) | 50.00 | 10.0 | 1.00x | 2.000 |"
    assert table[3] == "| vivit | 8 | hybrid (threshold 0.4) | 25.00 | 20.0 | 2.00x | 1.000 |"
