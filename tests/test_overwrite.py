"""No silent overwrite: a command replaces only its own earlier output (or, with --overwrite,
what is there), never one of its inputs, and never leaves half a file.

Each refusal is checked the way a user meets it: exit status 2, one line naming the path and
--overwrite, the file byte for byte as it was, and no work done (nothing timed, no dataset
built)."""

import json
import os

import flax.serialization
import jax
import matplotlib.figure
import numpy as np
import pytest
from PIL import Image

from vtm_jax.cli import main
from vtm_jax.jobs.pictures import PICTURE_MARKER

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = [
    "bench",
    "--config=vivit_tiny",
    "--config.bench.iterations=1",
    "--config.bench.warmup=0",
]
EVAL_RESULTS = '{"format": "vtm-jax-eval", "version": 1, "metrics": {"top1": 0.75}}\n'


def _bad(args, capsys, *expected):
    """``vtm-jax ARGS`` exits 2 with one line holding every ``expected`` piece."""
    assert main([str(a) for a in args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("vtm-jax: error:") and "\n" not in err, err
    for piece in expected:
        assert str(piece) in err, err
    return captured.out


def _temporary_files(directory) -> list[str]:
    return [name for _, _, files in os.walk(directory) for name in files if ".tmp" in name]


# --- bench ------------------------------------------------------------------------------------


def test_bench_refuses_an_eval_results_file_and_a_users_file(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(EVAL_RESULTS)
    out = _bad([*BENCH, f"--output={results}"], capsys, results, "vtm-jax-eval", "--overwrite")
    assert "compiling" not in out and "timing" not in out  # refused before any work
    assert results.read_text() == EVAL_RESULTS
    assert sorted(os.listdir(tmp_path)) == ["results.json"]

    # A user's file: the JSON itself, or a table or plot of the same stem.
    notes = tmp_path / "notes.json"
    notes.write_bytes(b'{"my": "numbers"}')
    _bad([*BENCH, f"--output={notes}"], capsys, notes, "not bench results", "--overwrite")
    assert notes.read_bytes() == b'{"my": "numbers"}'
    table = tmp_path / "table.md"
    table.write_text("my table\n")
    _bad([*BENCH, f"--output={tmp_path / 'table.json'}"], capsys, table, "--overwrite")
    assert table.read_text() == "my table\n" and not (tmp_path / "table.json").exists()
    # --workdir: the same rule for WORKDIR/bench.*.
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "bench.png").write_bytes(b"my picture")
    _bad([*BENCH, f"--workdir={tmp_path / 'w'}"], capsys, "--workdir", "bench.png")
    assert (tmp_path / "w" / "bench.png").read_bytes() == b"my picture"

    # With --overwrite (or the config's bench.overwrite) it is replaced.
    assert main([*BENCH, f"--output={results}", "--overwrite"]) == 0
    assert json.loads(results.read_text())["format"] == "vtm-jax-bench"
    assert main([*BENCH, f"--output={notes}", "--config.bench.overwrite=true"]) == 0
    assert json.loads(notes.read_text())["format"] == "vtm-jax-bench"
    assert not _temporary_files(tmp_path)


def test_bench_rewrites_its_own_results(tmp_path, capsys, monkeypatch):
    out = tmp_path / "speed.json"
    assert main([*BENCH, f"--output={out}"]) == 0
    first = json.loads(out.read_text())
    assert first["format"] == "vtm-jax-bench" and first["config"]["token_merging"]["r"] == 8
    assert main([*BENCH, f"--output={out}", "--config.token_merging.r=4"]) == 0
    second = json.loads(out.read_text())
    assert second["config"]["token_merging"]["r"] == 4 and second["results"][1]["r"] == 4
    assert "| merge | 4 |" in (tmp_path / "speed.md").read_text()

    # Results written before they carried a format are bench's own too.
    del second["format"]
    out.write_text(json.dumps(second))
    assert main([*BENCH, f"--output={out}"]) == 0
    assert json.loads(out.read_text())["format"] == "vtm-jax-bench"

    # A plot interrupted half-way (the disk fills up) leaves the earlier plot whole and no
    # temporary file.
    plot = (tmp_path / "speed.png").read_bytes()
    assert plot[:4] == b"\x89PNG"

    def disk_full(self, f, **kwargs):
        f.write(b"\x89PNG half a picture")
        raise OSError(28, "No space left on device", str(tmp_path / "speed.png.tmp"))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", disk_full)
    capsys.readouterr()
    _bad([*BENCH, f"--output={out}"], capsys, "No space left on device")
    assert (tmp_path / "speed.png").read_bytes() == plot
    assert not _temporary_files(tmp_path)


# --- predict ----------------------------------------------------------------------------------


def test_predict_never_writes_onto_its_clip(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    ckpt = tiny_checkpoint("vivit")
    clip = tmp_path / "clip.npy"
    np.save(clip, np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    before = clip.read_bytes()
    predict = ["predict", "--checkpoint", ckpt, "--video", clip, "--save-logits"]
    for target in (clip, tmp_path / "clip"):  # "clip" is written as clip.npy
        for extra in ([], ["--overwrite"]):
            out = _bad([*predict, target, *extra], capsys, clip, "--video", "own input")
            assert "1. " not in out  # refused before the model ran
    assert clip.read_bytes() == before

    # Another clip of the user's at that path is refused too, unless --overwrite.
    other = tmp_path / "other.npy"
    np.save(other, np.zeros((16, 32, 32, 3), np.uint8))
    kept = other.read_bytes()
    _bad([*predict, other], capsys, other, "not logits", "--overwrite")
    assert other.read_bytes() == kept

    # Its own logits are rewritten; --overwrite replaces the user's clip.
    logits = tmp_path / "logits.npy"
    for _ in range(2):
        assert main([str(a) for a in [*predict, logits]]) == 0
    assert np.load(logits).shape == (8,)
    assert main([str(a) for a in [*predict, other, "--overwrite"]]) == 0
    np.testing.assert_array_equal(np.load(other), np.load(logits))

    # Interrupted while writing: the earlier logits stay whole, no temporary file.
    saved = logits.read_bytes()

    def half_then_interrupted(f, array, **kwargs):
        f.write(b"\x93NUMPY half")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", half_then_interrupted)
    capsys.readouterr()
    assert main([str(a) for a in [*predict, logits]]) == 130
    assert logits.read_bytes() == saved and not _temporary_files(tmp_path)


# --- visualize --------------------------------------------------------------------------------


def test_visualize_refuses_a_users_picture(tiny_checkpoint, tmp_path, capsys):
    ckpt = tiny_checkpoint("vivit")
    clip = tmp_path / "clip.npy"
    np.save(clip, np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    out = tmp_path / "pictures"
    out.mkdir()
    mine = out / "clip_layer2.gif"
    Image.new("RGB", (4, 4), "red").save(mine)  # a user's picture of the same name
    kept = mine.read_bytes()
    vis = ["visualize", "--checkpoint", ckpt, "--video", clip, "--r", "8", "--workdir", out]
    _bad(vis, capsys, mine, "not a picture vtm-jax drew", "--overwrite")
    assert mine.read_bytes() == kept and sorted(os.listdir(out)) == ["clip_layer2.gif"]

    # Its own pictures are rewritten; with --overwrite the user's is replaced.
    assert main([str(a) for a in [*vis, "--layers", "1"]]) == 0
    assert main([str(a) for a in [*vis, "--layers", "1"]]) == 0
    with Image.open(out / "clip_layer1.png") as png, Image.open(out / "clip_layer1.gif") as gif:
        assert png.info["Software"] == PICTURE_MARKER
        assert gif.info["comment"] == PICTURE_MARKER.encode()
    assert main([str(a) for a in [*vis, "--overwrite"]]) == 0  # default layers: 1 and 2
    assert mine.read_bytes() != kept
    assert not _temporary_files(out)


# --- eval -------------------------------------------------------------------------------------


def _eval_args(tiny_checkpoint, tmp_path):
    return [
        "eval",
        f"--config={REPO}/configs/vivit_synthetic.py",
        f"--config.checkpoint={tiny_checkpoint('vivit')}",
        f"--config.dataset_configs.data_dir={tmp_path / 'data'}",
        "--config.dataset_configs.builder_options.test_examples=4",
        "--config.dataset_configs.builder_options.train_examples=4",
    ]


def test_eval_refuses_a_foreign_results_file_and_its_checkpoint(tiny_checkpoint, tmp_path, capsys):
    args = _eval_args(tiny_checkpoint, tmp_path)
    bench = tmp_path / "bench.json"
    bench.write_text('{"format": "vtm-jax-bench", "results": []}')
    _bad(
        [*args, f"--config.results_path={bench}"],
        capsys,
        bench,
        "not a vtm-jax results file",
        "--overwrite",
    )
    assert bench.read_text() == '{"format": "vtm-jax-bench", "results": []}'
    # The table beside the results: a user's r.md next to results not yet written.
    (tmp_path / "r.md").write_text("my notes\n")
    _bad([*args, f"--config.results_path={tmp_path / 'r.json'}"], capsys, "r.md", "--overwrite")
    assert (tmp_path / "r.md").read_text() == "my notes\n"
    # The checkpoint's own record is an input: refused even with --overwrite.
    record = os.path.join(tiny_checkpoint("vivit"), "model.json")
    before = open(record, "rb").read()
    for extra in ([], ["--overwrite"]):
        _bad([*args, f"--config.results_path={record}", *extra], capsys, "own input")
    assert open(record, "rb").read() == before
    assert not (tmp_path / "data").exists()  # every refusal came before the dataset was built

    # --overwrite replaces the foreign file with eval's results (and its table).
    assert main([*args, f"--config.results_path={bench}", "--overwrite"]) == 0
    assert json.loads(bench.read_text())["format"] == "vtm-jax-eval"


# --- convert ----------------------------------------------------------------------------------


def _scenic_checkpoint(path, shift):
    from vtm_jax.models.vivit import ViViT

    model = ViViT(
        num_classes=5, hidden_size=32, num_heads=4, mlp_dim=64, num_layers=2, patch_size=(2, 8, 8)
    )
    params = model.init(jax.random.PRNGKey(1), np.zeros((1, 8, 32, 32, 3), np.float32))["params"]
    params = jax.tree.map(lambda p: p + shift, params)
    path.mkdir(exist_ok=True)
    (path / "checkpoint_1").write_bytes(
        flax.serialization.msgpack_serialize(jax.device_get({"params": params}))
    )


def test_convert_replaces_a_checkpoint_only_when_asked(tmp_path, capsys):
    from vtm_jax.checkpoints.store import load_checkpoint

    convert = ["convert", "--source", "scenic", "--num-frames", "8", "--image-size", "32"]
    _scenic_checkpoint(tmp_path / "one", 0.01)
    _scenic_checkpoint(tmp_path / "two", 0.02)
    out = tmp_path / "ckpt"
    assert main([*convert, "--input", str(tmp_path / "one"), "--output", str(out)]) == 0
    record = (out / "model.json").read_bytes()
    again = [*convert, "--input", tmp_path / "two", "--output", out]
    _bad(again, capsys, "already holds a checkpoint", "--overwrite")
    assert (out / "model.json").read_bytes() == record
    assert main([str(a) for a in [*again, "--overwrite"]]) == 0
    params, _ = load_checkpoint(str(out))  # the digests of model.json fit the new parameters
    bias = params["output_projection"]["bias"]
    np.testing.assert_allclose(bias, np.full_like(bias, 0.02), atol=1e-6)
    assert sorted(os.listdir(out)) == ["model.json", "params"]
    # The output being the input is refused, --overwrite or not.
    for extra in ([], ["--overwrite"]):
        same = [*convert, "--input", tmp_path / "two", "--output", tmp_path / "two", *extra]
        _bad(same, capsys, "--input", "own input")
    assert sorted(os.listdir(tmp_path / "two")) == ["checkpoint_1"]


# --- train, demo, sweep -----------------------------------------------------------------------


def test_train_demo_and_sweep_refuse_what_is_not_theirs(tiny_checkpoint, tmp_path, capsys):
    train = ["train", "--config=vivit_demo", f"--config.dataset_configs.data_dir={tmp_path / 'd'}"]
    work = tmp_path / "work"
    (work / "checkpoints").mkdir(parents=True)  # no config.json: not a training run's
    _bad([*train, "--workdir", work], capsys, work / "checkpoints", "--overwrite")
    _bad([*train, "--workdir", tmp_path / "d", "--overwrite"], capsys, "data_dir", "own input")
    assert not (tmp_path / "d").exists()  # refused before the dataset was built

    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "demo.md").write_text("my notes\n")
    _bad(["demo", "--workdir", demo], capsys, demo / "demo.md", "demo results", "--overwrite")
    assert os.listdir(demo) == ["demo.md"]

    from tests.test_sweep import synthetic_runs

    runs = synthetic_runs(tmp_path, {"vivit": tiny_checkpoint("vivit")})
    sweep = ["sweep", "--runs", runs, "--families", "baseline", "--workdir", tmp_path]
    (tmp_path / "baseline.md").write_text("my table\n")
    _bad(sweep, capsys, tmp_path / "baseline.md", "a sweep table", "--overwrite")
    # The runs file where a table goes is refused, --overwrite or not.
    os.rename(runs, tmp_path / "baseline.json")
    sweep[2] = tmp_path / "baseline.json"
    _bad([*sweep, "--overwrite"], capsys, "the --runs file", "own input")
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "command", ["convert", "predict", "bench", "eval", "train", "visualize", "demo", "sweep"]
)
def test_every_writing_command_takes_overwrite(command, capsys):
    from vtm_jax.cli.parser import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    assert "--overwrite" in capsys.readouterr().out
