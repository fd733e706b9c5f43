"""The command line: convert + predict reproduce HF, every mode runs, bad input is one line."""

import json
import os
import subprocess
import sys

import flax.serialization
import jax
import numpy as np
import pytest
import torch

from tests.hf_models import random_hf_vivit
from vtm_jax.cli import main
from vtm_jax.models.vivit import ViViT

FRAMES, SIZE = 8, 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A random HF ViViT saved to disk and converted with `vtm-jax convert --source hf`."""
    hf = random_hf_vivit(frames=FRAMES, size=SIZE, hidden=32, layers=2, labels=7)
    root = tmp_path_factory.mktemp("cli")
    hf.save_pretrained(root / "hf")
    assert (
        main(
            [
                "convert",
                "--source",
                "hf",
                "--input",
                str(root / "hf"),
                "--output",
                str(root / "ckpt"),
            ]
        )
        == 0
    )
    return hf, root


def test_convert_predict_reproduces_hf(converted, capsys):
    hf, root = converted
    video = np.random.default_rng(0).standard_normal((FRAMES, SIZE, SIZE, 3)).astype(np.float32)
    np.save(root / "clip.npy", video)
    out = root / "logits.npy"
    args = ["predict", "--checkpoint", str(root / "ckpt"), "--video", str(root / "clip.npy")]
    assert main([*args, "--save-logits", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1. LABEL_" in printed and "5. LABEL_" in printed
    with torch.no_grad():
        expected = hf(pixel_values=torch.from_numpy(video.transpose(0, 3, 1, 2))[None]).logits
    np.testing.assert_allclose(np.load(out), expected[0].numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "extra",
    [
        ["--r", "6"],
        ["--mode", "random_merge", "--r", "6", "--seed", "3"],
        ["--mode", "drop", "--r", "6"],
        ["--mode", "random_drop", "--r", "6"],
        ["--mode", "hybrid", "--r", "6", "--threshold", "0.4"],
        ["--mode", "merge", "--r", "10", "--schedule", "-1", "--head-aggregation", "concat"],
        ["--mode", "merge", "--r", "6", "--no-prop-attn", "--attention", "blockwise"],
    ],
)
def test_predict_modes(converted, extra, capsys):
    _, root = converted
    clip = root / "pixels.npy"
    pixels = np.random.default_rng(1).integers(0, 256, (20, 40, 50, 3), dtype=np.uint8)
    np.save(clip, pixels)  # uint8: sampled, resized and normalised as the record says
    out = root / "merged.npy"
    args = ["predict", "--checkpoint", str(root / "ckpt"), "--video", str(clip)]
    assert main([*args, *extra, "--save-logits", str(out)]) == 0
    logits = np.load(out)
    assert logits.shape == (7,) and np.isfinite(logits).all()
    mode = extra[extra.index("--mode") + 1] if "--mode" in extra else "merge"
    assert f"mode={mode} r=" in capsys.readouterr().out


def test_rule_options_from_the_command_line(converted, capsys, tmp_path):
    _, root = converted
    clip = tmp_path / "pixels.npy"
    np.save(clip, np.random.default_rng(2).integers(0, 256, (20, 40, 50, 3), dtype=np.uint8))
    args = ["predict", "--checkpoint", str(root / "ckpt"), "--video", str(clip)]
    hybrid = ["--mode", "hybrid", "--r", "6"]
    logits = []
    for flags in (["--threshold", "0.4"], ["--rule-option", "threshold=0.4"]):
        out = tmp_path / f"{flags[0][2:]}.npy"
        assert main([*args, *hybrid, *flags, "--save-logits", str(out)]) == 0
        logits.append(np.load(out))
    np.testing.assert_array_equal(logits[0], logits[1])
    capsys.readouterr()
    _bad([*args, *hybrid, "--rule-option", "threshold"], capsys, "--rule-option takes NAME=VALUE")
    _bad([*args, *hybrid, "--rule-option", "start=3"], capsys, "mode 'hybrid' has no option start")
    _bad([*args, *hybrid, "--rule-option", "threshold=high"], capsys, "threshold must be a finite")


def test_predict_video_file(converted):
    av = pytest.importorskip("av")
    _, root = converted
    path = str(root / "clip.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 48, 40, "yuv420p"
        for i in range(24):
            frame = np.full((40, 48, 3), (i * 10) % 256, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    assert main(["predict", "--checkpoint", str(root / "ckpt"), "--video", path]) == 0


def _bad(args, capsys, match):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vtm-jax: error:") and "\n" not in err, err
    assert match in err, err


def test_bad_input_is_one_line(converted, capsys, tmp_path):
    _, root = converted
    ckpt = str(root / "ckpt")
    np.save(tmp_path / "wrong.npy", np.zeros((FRAMES, SIZE, SIZE + 1, 3), np.float32))
    np.save(tmp_path / "ints.npy", np.zeros((FRAMES, SIZE, SIZE, 3), np.int16))
    np.save(tmp_path / "short.npy", np.zeros((3, SIZE, SIZE, 3), np.uint8))
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video at all")
    predict = ["predict", "--checkpoint", ckpt, "--video"]
    _bad([*predict, str(tmp_path / "missing.npy")], capsys, "no such file")
    _bad([*predict, str(tmp_path / "wrong.npy")], capsys, "must have shape (8, 32, 32, 3)")
    _bad([*predict, str(tmp_path / "ints.npy")], capsys, "int16")
    _bad([*predict, str(tmp_path / "corrupt.mp4")], capsys, "cannot decode")
    _bad(
        [*predict, str(tmp_path / "wrong.npy"), "--mode", "hybrid", "--r", "2"], capsys, "threshold"
    )
    _bad(["predict", "--checkpoint", str(tmp_path), "--video", "x.npy"], capsys, "not a vtm-jax")
    _bad(
        ["convert", "--source", "hf", "--input", str(tmp_path), "--output", str(tmp_path / "o")],
        capsys,
        "",
    )
    _bad(
        ["convert", "--source", "hf", "--input", str(root / "hf"), "--output", ckpt],
        capsys,
        "already",
    )


def test_unknown_mode_exits_nonzero_without_traceback(converted):
    _, root = converted
    proc = subprocess.run(
        [sys.executable, "-m", "vtm_jax.cli", "predict", "--checkpoint", str(root / "ckpt"),
         "--video", "x.npy", "--mode", "tome"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "vtm-jax: error: unknown mode 'tome'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("layout", ["optimizer", "params"])
def test_scenic_checkpoint_converts(tmp_path, layout, capsys):
    model = ViViT(
        num_classes=5, hidden_size=32, num_heads=4, mlp_dim=64, num_layers=2, patch_size=(2, 8, 8)
    )
    video = jax.random.normal(jax.random.PRNGKey(0), (1, FRAMES, SIZE, SIZE, 3))
    params = model.init(jax.random.PRNGKey(1), video)["params"]
    params = jax.tree.map(lambda p: p + 0.01, params)  # the zero-initialised head must matter
    state = {"optimizer": {"target": params}} if layout == "optimizer" else {"params": params}
    (tmp_path / "checkpoint_7").write_bytes(
        flax.serialization.msgpack_serialize(jax.device_get(state))
    )
    convert = ["convert", "--source", "scenic", "--input", str(tmp_path), "--output"]
    assert main([*convert, str(tmp_path / "ckpt"), "--num-frames", "8", "--image-size", "32"]) == 0
    np.save(tmp_path / "clip.npy", np.asarray(video[0]))
    out = tmp_path / "logits.npy"
    predict = [
        "predict",
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--video",
        str(tmp_path / "clip.npy"),
    ]
    assert main([*predict, "--save-logits", str(out)]) == 0
    np.testing.assert_allclose(np.load(out), model.apply({"params": params}, video)[0], atol=1e-5)
    _bad([*convert, str(tmp_path / "other")], capsys, "--num-frames")


def test_bench_tiny(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", f"--config={REPO}/configs/vivit_tiny.py", "--config.bench.iterations=2"]
    assert main([*args, "--config.token_merging.r=6", f"--output={out}"]) == 0
    printed = capsys.readouterr().out
    assert "tokens per layer: [59, 53]" in printed and "| merge | 6 |" in printed
    results = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in results] == ["none", "merge"]
    assert results[0]["speedup"] == 1.0 and results[1]["flop_limit"] > 1.0
    # --workdir: the same three files under fixed names in that directory.
    assert main([*args, "--config.token_merging.r=6", f"--workdir={tmp_path / 'w'}"]) == 0
    assert sorted(os.listdir(tmp_path / "w")) == ["bench.json", "bench.md", "bench.png"]
    assert "| merge | 6 |" in (tmp_path / "w" / "bench.md").read_text()
    # A batch of 2 run one clip at a time: the same plan, recorded in the results.
    stepped = ["--config.bench.batch_size=2", "--config.bench.clips_per_step=1"]
    assert main([*args, *stepped, "--config.token_merging.r=6", f"--output={out}"]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["clips_per_step"] for r in results] == [1, 1]
    assert results[1]["tokens_per_layer"] == [59, 53]
    capsys.readouterr()
    bad_step = ["--config.bench.batch_size=4", "--config.bench.clips_per_step=3"]
    _bad([*args, *bad_step], capsys, "clips_per_step must divide the batch of 4 clips")
    _bad([*args, f"--workdir={tmp_path / 'w'}", f"--output={out}"], capsys, "not both")
    _bad([*args, f"--workdir={out}"], capsys, f"--workdir {out} is a file")
    _bad([*args, "--config.token_merging.mode=tome"], capsys, "unknown mode 'tome'")
    _bad([*args, "--config.nonexistent=1"], capsys, "the config has no field 'nonexistent'")
    _bad(["bench", "--config=configs/nonexistent.py"], capsys, "no config file")
    _bad([*args, "--config.bench.batch_size=0"], capsys, "batch_size >= 1")
    _bad([*args, "--config.model.num_heads=5"], capsys, "not divisible by 5 heads")
    _bad([*args, "--config.token_merging.temporal_r=2"], capsys, "temporal_r applies only to")
    groups = "--config.token_merging.motionformer_groups=per_frame"
    _bad([*args, groups], capsys, "motionformer_groups applies only to motionformer, not vivit")


def test_two_head_checkpoint_prints_each_head(converted, capsys, tmp_path):
    _, root = converted
    ckpt = tmp_path / "ckpt"
    # Like EPIC-KITCHENS' verb (97) and noun (300) heads, stored as one head of 97 + 300.
    convert = ["convert", "--source", "hf", "--input", str(root / "hf")]
    assert main([*convert, "--output", str(ckpt), "--class-splits", "3,4"]) == 0
    record = json.loads((ckpt / "model.json").read_text())
    assert record["class_splits"] == [3, 4]
    np.save(tmp_path / "clip.npy", np.zeros((FRAMES, SIZE, SIZE, 3), np.float32))
    assert main(["predict", "--checkpoint", str(ckpt), "--video", str(tmp_path / "clip.npy")]) == 0
    out = capsys.readouterr().out
    assert "head_0:" in out and "head_1:" in out and "3. LABEL_2" not in out.split("head_1:")[1]
    assert "4. LABEL_" in out.split("head_1:")[1] and "5. LABEL_" not in out.split("head_1:")[1]
    _bad(
        [*convert, "--output", str(tmp_path / "b"), "--class-splits", "3,3"], capsys, "add up to 6"
    )
    _bad([*convert, "--output", str(tmp_path / "b"), "--class-splits", "verb"], capsys, "integers")
    record["class_splits"] = [3, 3]
    (ckpt / "model.json").write_text(json.dumps(record))
    _bad(
        ["predict", "--checkpoint", str(ckpt), "--video", str(tmp_path / "clip.npy")],
        capsys,
        "class_splits",
    )


def test_predict_short_clip_is_sampled_like_eval(converted, tmp_path):
    """Fewer frames than the model takes: the protocol stretches them, as evaluation does."""
    _, root = converted
    np.save(tmp_path / "short.npy", np.zeros((3, SIZE, SIZE, 3), np.uint8))
    out = tmp_path / "logits.npy"
    args = ["predict", "--checkpoint", str(root / "ckpt"), "--video", str(tmp_path / "short.npy")]
    assert main([*args, "--save-logits", str(out)]) == 0
    assert np.isfinite(np.load(out)).all()


def test_version_and_module_entry_point():
    import subprocess
    import sys

    import vtm_jax
    from vtm_jax.errors import UserError

    out = subprocess.run(
        [sys.executable, "-m", "vtm_jax", "--version"], capture_output=True, text=True, check=True
    )
    assert (
        out.stdout.strip() == f"vtm-jax {vtm_jax.__version__}"
        and vtm_jax.__version__ != "0+unknown"
    )
    assert issubclass(UserError, ValueError)  # library callers catch the ordinary kind


def test_visualize_and_demo_take_workdir_or_out(converted, tmp_path, capsys):
    _, root = converted
    np.save(tmp_path / "clip.npy", np.zeros((FRAMES, SIZE, SIZE, 3), np.float32))
    vis = ["visualize", "--checkpoint", str(root / "ckpt"), "--video", str(tmp_path / "clip.npy")]
    assert main([*vis, "--layers", "2", "--r", "8", "--workdir", str(tmp_path / "w")]) == 0
    assert sorted(os.listdir(tmp_path / "w")) == [
        "clip_input.png",
        "clip_layer2.gif",
        "clip_layer2.png",
    ]
    assert main([*vis, "--layers", "2", "--r", "8", "--out", str(tmp_path / "o")]) == 0
    assert sorted(os.listdir(tmp_path / "o")) == sorted(os.listdir(tmp_path / "w"))
    both = ["--workdir", str(tmp_path / "a"), "--out", str(tmp_path / "b")]
    _bad([*vis, *both], capsys, "give --workdir or --out (the same setting), not both")
    _bad(["demo", *both], capsys, "give --workdir or --out (the same setting), not both")
    _bad(["demo", "--workdir", str(tmp_path / "clip.npy")], capsys, "--workdir")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
