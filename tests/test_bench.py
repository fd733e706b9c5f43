"""`vtm-jax bench`: sweeps, every local device, and several processes joined by jax.distributed."""

import json
import os
import socket
import subprocess
import sys

from vtm_jax.jobs.bench import sweep
from vtm_jax.merging import MergingSettings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    f"--config={REPO}/configs/vivit_tiny.py",
    "--config.bench.iterations=1",
    "--config.bench.warmup=0",
]


def test_sweep_combinations():
    base = MergingSettings(mode="merge", r=8, prop_attn=False)
    settings = sweep(base, modes=["merge", "drop"], r_values=[0, 4, 8], schedules=[0, -1])
    assert settings[0] == MergingSettings()
    assert len(settings) == 1 + 2 * 2 * 2  # r=0 is the baseline, not a sweep point
    assert {(s.mode, s.r, s.schedule) for s in settings[1:]} == {
        (m, r, float(sc)) for m in ("merge", "drop") for r in (4, 8) for sc in (0, -1)
    }
    assert all(not s.prop_attn for s in settings[1:])  # the rest of the base settings carry over
    assert sweep(MergingSettings()) == [MergingSettings()]


def run_bench(args, devices, env_extra=None):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        **(env_extra or {}),
    }
    cmd = [sys.executable, "-m", "vtm_jax.cli", "bench", *TINY, *args]
    return subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_bench_on_four_devices(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_bench(["--config.bench.r_values=(4, 8)", f"--output={out}"], devices=4)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    data = json.loads(out.read_text())
    assert data["run"]["devices"] == 4 and data["run"]["global_batch"] == 4
    assert [r["r"] for r in data["results"]] == [0, 4, 8]
    assert all(r["clips_per_s"] > 0 for r in data["results"])
    for r in data["results"]:  # XLA counts a multiply-add as 2 FLOPs, per clip on each device
        assert 1.6 < r["xla_gflops_per_clip"] / r["gmacs_per_clip"] < 2.4
    assert (tmp_path / "bench.md").read_text().startswith("| mode | r |")
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "4 cpu device(s) in 1 process(es)" in stdout


def test_bench_across_two_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        run_bench(
            [
                f"--coordinator=127.0.0.1:{port}",
                "--num-processes=2",
                f"--process-id={i}",
                f"--output={tmp_path / f'p{i}.json'}",
            ],
            devices=1,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    data = json.loads((tmp_path / "p0.json").read_text())
    assert data["run"]["processes"] == 2 and data["run"]["devices"] == 2
    assert not (tmp_path / "p1.json").exists()  # only process 0 writes results


def test_every_config_describes_its_backbone():
    """Each shipped config builds its model at the paper's r and plans the paper's counts."""
    from vtm_jax.config.loading import load_config, record_from_config
    from vtm_jax.models.registry import build_model

    expected = {
        "vivit_b_k400": ("vivit", [2837, 2537], 56),
        "vivit_b_fe_k400": ("vivit_factorised_encoder", [179, 161], 17),
        "videomae_b_k400": ("videomae", [1418, 1268], 28),
        "timesformer_b_k400": ("timesformer", [178, 160], 5),
        "motionformer_b_k400": ("motionformer", [178, 160], 5),
    }
    for name, (architecture, first, last) in expected.items():
        config = load_config([f"--config={REPO}/configs/{name}.py"])
        record = record_from_config(config)
        assert record.architecture == architecture
        merging = MergingSettings.from_dict(config.token_merging)
        model = build_model(record, merging)
        plan = model.token_plan(record.num_frames, record.image_size)
        assert [p.tokens_out for p in plan[:2]] == first and plan[-1].tokens_out == last, name
