"""`vtm-jax eval` from a config: the synthetic dataset end to end, then a resumed rerun."""

import json
import os

import jax
import numpy as np
import pytest

from tests.events import read_scalars
from vtm_jax.checkpoints.record import ModelRecord
from vtm_jax.checkpoints.store import save_checkpoint
from vtm_jax.cli import main
from vtm_jax.models.vivit import ViViT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_eval_synthetic_from_config(tmp_path, capsys):
    kwargs = dict(
        num_classes=8, hidden_size=32, num_heads=4, mlp_dim=64, num_layers=2, patch_size=(2, 8, 8)
    )
    video = np.zeros((1, 16, 32, 32, 3), np.float32)
    params = ViViT(**kwargs).init(jax.random.PRNGKey(0), video)["params"]
    params = jax.tree.map(
        lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params
    )
    record = {
        "architecture": "vivit",
        "model": {**kwargs, "patch_size": [2, 8, 8]},
        "input": {"num_frames": 16, "image_size": 32},
        "preprocessing": {
            "num_frames": 16,
            "stride": 1,
            "min_resize": 32,
            "crop_size": 32,
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
        },
        "labels": None,
        "token_merging": {"mode": "none"},
    }
    save_checkpoint(str(tmp_path / "ckpt"), jax.device_get(params), ModelRecord.from_json(record))
    results = tmp_path / "results.json"
    args = [
        "eval",
        f"--config={REPO}/configs/vivit_synthetic.py",
        f"--config.checkpoint={tmp_path / 'ckpt'}",
        f"--config.dataset_configs.data_dir={tmp_path / 'data'}",
        "--config.dataset_configs.builder_options.test_examples=16",
        "--config.dataset_configs.builder_options.train_examples=8",
        f"--config.results_path={results}",
        "--config.token_merging.r=4",
    ]
    assert main(args) == 0
    first = json.loads(results.read_text())
    out = capsys.readouterr().out
    assert "top1" in out and "results written to" in out
    # The table beside the JSON, as bench and demo write theirs.
    table = (tmp_path / "results.md").read_text()
    assert f"| top1 | {100 * first['metrics']['top1']:.2f}% |" in table
    assert first["complete"] and len(first["video_ids"]) == 16
    assert set(first["metrics"]) == {"top1", "top5"} and 0 <= first["metrics"]["top1"] <= 1
    # A rerun of the same run resumes from the file and gives the same numbers.
    assert main(args) == 0
    again = json.loads(results.read_text())
    assert again["metrics"] == first["metrics"]
    # Another setting on the same results file is refused with one line.
    assert main([*args[:-1], "--config.token_merging.r=2"]) == 2
    assert "choose another" in capsys.readouterr().err
    # Bad values are one-line errors before anything runs.
    for bad, message in [
        ("--config.dataset_configs.mean=(0.5, 0.5)", "mean must be 3 finite numbers"),
        ("--config.dataset_configs.std=(0.0, 0.5, 0.5)", "std > 0"),
        ("--config.eval.workers=-1", "workers must be at least 1"),
    ]:
        assert main([*args, bad]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err


def test_eval_cli_same_metrics_on_eight_devices(tmp_path):
    """The synthetic config through `vtm-jax eval` on 1 and on 8 forced CPU devices."""
    import subprocess
    import sys

    kwargs = dict(
        num_classes=8, hidden_size=32, num_heads=4, mlp_dim=64, num_layers=2, patch_size=(2, 8, 8)
    )
    params = ViViT(**kwargs).init(jax.random.PRNGKey(0), np.zeros((1, 16, 32, 32, 3), np.float32))[
        "params"
    ]
    params = jax.tree.map(
        lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params
    )
    record = {
        "architecture": "vivit",
        "model": {**kwargs, "patch_size": [2, 8, 8]},
        "input": {"num_frames": 16, "image_size": 32},
    }
    save_checkpoint(str(tmp_path / "ckpt"), jax.device_get(params), ModelRecord.from_json(record))
    metrics = {}
    for devices in (1, 8):
        results = tmp_path / f"results{devices}.json"
        cmd = [
            sys.executable,
            "-m",
            "vtm_jax.cli",
            "eval",
            f"--config={REPO}/configs/vivit_synthetic.py",
        ]
        cmd += [
            f"--config.checkpoint={tmp_path / 'ckpt'}",
            f"--config.dataset_configs.data_dir={tmp_path / 'data'}",
            "--config.dataset_configs.builder_options.test_examples=12",  # 8 devices: padded
            "--config.dataset_configs.builder_options.train_examples=8",
            f"--config.results_path={results}",
            # Random draws are keyed by example, so they do not depend on the device count.
            "--config.token_merging.mode=random_drop",
        ]
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        data = json.loads(results.read_text())
        assert data["complete"] and len(data["video_ids"]) == 12
        metrics[devices] = (data["metrics"], data["sums"])
    assert metrics[1] == metrics[8]


def test_eval_workdir_holds_the_results_table_and_events(tiny_checkpoint, tmp_path, capsys):
    """`--workdir`: eval.json, eval.md and TensorBoard scalars, Scenic-style; resumable."""
    workdir = tmp_path / "run"
    args = [
        "eval",
        f"--config={REPO}/configs/vivit_synthetic.py",
        f"--config.checkpoint={tiny_checkpoint('vivit')}",
        f"--config.dataset_configs.data_dir={tmp_path / 'data'}",
        "--config.dataset_configs.builder_options.test_examples=8",
        "--config.dataset_configs.builder_options.train_examples=8",
        "--config.token_merging.r=8",
    ]
    assert main([*args, f"--workdir={workdir}"]) == 0
    results = json.loads((workdir / "eval.json").read_text())
    assert results["complete"] and len(results["video_ids"]) == 8
    assert (
        f"| top1 | {100 * results['metrics']['top1']:.2f}% |" in (workdir / "eval.md").read_text()
    )
    scalars = read_scalars(workdir)
    assert set(scalars) == {"eval/top1", "eval/top5", "eval/clips_per_s"}
    assert scalars["eval/top1"] == [(0, pytest.approx(results["metrics"]["top1"]))]
    capsys.readouterr()
    both = [*args, f"--workdir={workdir}", f"--config.results_path={tmp_path / 'r.json'}"]
    assert main(both) == 2
    err = capsys.readouterr().err.strip()
    assert err == "vtm-jax: error: give --workdir or --config.results_path, not both"
    (tmp_path / "file").write_text("")
    assert main([*args, f"--workdir={tmp_path / 'file'}"]) == 2
    assert "--workdir" in capsys.readouterr().err
