"""Names in data files: never code (a module:attribute) and never a path out of the workdir;
what predict prints is what runs; a rule option outside the range its rule can use is refused.

A data file (model.json, a results file, a runs file) may name registered modes, schedules
and datasets only: naming ``module:attribute`` would import that module, and importing runs
its code. Each case runs as the console script does, with a module on the path whose import
leaves a marker file behind.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from vtm_jax.cli import main
from vtm_jax.errors import UserError
from vtm_jax.merging import MergingSettings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = "import sys; from vtm_jax.cli import main; sys.exit(main(sys.argv[1:]))"
REFUSED = "a module:attribute path; data files may name registered modes"


@pytest.fixture
def evil(tmp_path):
    """A folder on the path holding ``evil_mod``, whose import writes ``marker``."""
    folder = tmp_path / "site"
    folder.mkdir()
    marker = tmp_path / "marker"
    (folder / "evil_mod.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "def rule(tokens, metric, r, ctx):\n    return tokens\n"
    )
    return folder, marker


def run_cli(evil, args):
    """``vtm-jax ARGS`` as the console script runs it (``-P``: the current folder is not on
    sys.path), from the folder holding ``evil_mod``, which is also on the path."""
    folder, _ = evil
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(folder)}
    return subprocess.run(
        [sys.executable, "-P", "-c", CODE, *args],
        capture_output=True,
        text=True,
        cwd=folder,
        env=env,
    )


def assert_refused(proc, *parts):
    err = proc.stderr.strip()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert err.startswith("vtm-jax: error: ") and "\n" not in err, err
    for part in parts:
        assert part in err, err


def copied_checkpoint(tiny_checkpoint, tmp_path, **merging):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("vivit"), path)
    record = json.loads((path / "model.json").read_text())
    record["token_merging"] = {"mode": "merge", "r": 4, **merging}
    (path / "model.json").write_text(json.dumps(record))
    return path


def clip(tmp_path):
    path = tmp_path / "clip.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    return path


# --- 1. code from data files ---------------------------------------------------------------


@pytest.mark.parametrize("field", ["mode", "r_schedule"])
def test_a_model_json_naming_a_module_is_refused_before_import(
    tiny_checkpoint, tmp_path, evil, field
):
    ckpt = copied_checkpoint(tiny_checkpoint, tmp_path, **{field: "evil_mod:rule"})
    proc = run_cli(evil, ["predict", "--checkpoint", str(ckpt), "--video", str(clip(tmp_path))])
    assert_refused(proc, str(ckpt / "model.json"), f"token_merging.{field}", REFUSED)
    assert not evil[1].exists()


def test_a_results_file_being_resumed_imports_nothing(tiny_checkpoint, tmp_path, evil, capsys):
    results = tmp_path / "results.json"
    args = [
        "eval",
        f"--config={REPO}/configs/vivit_synthetic.py",
        f"--config.checkpoint={tiny_checkpoint('vivit')}",
        f"--config.dataset_configs.data_dir={tmp_path / 'data'}",
        "--config.dataset_configs.builder_options.test_examples=2",
        "--config.dataset_configs.builder_options.train_examples=2",
        "--config.dataset_configs.test_batch_size=2",
        f"--config.results_path={results}",
        "--config.token_merging.r=4",
    ]
    assert main(args) == 0
    capsys.readouterr()
    saved = json.loads(results.read_text())
    saved["run"]["token_merging"]["mode"] = "evil_mod:rule"  # an edited results file
    results.write_text(json.dumps(saved))
    proc = run_cli(evil, args)
    # Compared as it is stored, never imported: it names another run than merge's.
    assert_refused(proc, str(results), "different run (token_merging differ)")
    assert not evil[1].exists()
    assert json.loads(results.read_text()) == saved  # left as it was


def runs_file(tmp_path, ckpt, dataset="synthetic", **entry):
    runs = {
        "vivit": {
            dataset: {
                "checkpoint": str(ckpt),
                "data_dir": str(tmp_path / "data"),
                "config": f"{REPO}/configs/vivit_synthetic.py",
                **entry,
            }
        }
    }
    path = tmp_path / "runs.json"
    path.write_text(json.dumps(runs))
    return str(path)


def test_a_runs_file_naming_a_module_is_refused_before_import(tiny_checkpoint, tmp_path, evil):
    overrides = {"token_merging.mode": "evil_mod:rule"}
    runs = runs_file(tmp_path, tiny_checkpoint("vivit"), overrides=overrides)
    out = tmp_path / "out"
    proc = run_cli(evil, ["sweep", "--runs", runs, "--workdir", str(out), "--families", "r_max"])
    assert_refused(proc, runs, "token_merging.mode", REFUSED)
    assert not evil[1].exists() and not out.exists()


@pytest.mark.parametrize(
    "overrides",
    [
        {"token_merging.r_schedule": "evil_mod:rule"},
        {"dataset_name": "evil_mod:Builder"},
        {"bench.modes": ["merge", "evil_mod:rule"]},
        {"token_merging": {"mode": "evil_mod:rule"}},
        ["--config.token_merging.mode=evil_mod:rule"],
        ["--config.dataset_name=evil_mod:Builder"],
    ],
)
def test_runs_file_overrides_name_no_code(tiny_checkpoint, tmp_path, capsys, overrides):
    runs = runs_file(tmp_path, tiny_checkpoint("vivit"), overrides=overrides)
    out = tmp_path / "out"
    assert main(["sweep", "--runs", runs, "--workdir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vtm-jax: error: runs file ") and REFUSED in err and "\n" not in err
    assert "evil_mod" not in sys.modules and not out.exists()


def test_configs_and_command_lines_still_name_modules(tmp_path):
    """Code may name a path: the same settings built from a config or the API import it."""
    assert MergingSettings.from_dict({"mode": "vtm_jax.merging.rules:_merge"}).mode.endswith(
        ":_merge"
    )
    with pytest.raises(UserError, match=r"where: token_merging.mode is .*data files may name"):
        MergingSettings.from_data({"mode": "vtm_jax.merging.rules:_merge"}, "where")
    assert MergingSettings.from_data({"mode": "merge", "r": 2}, "where").r == 2


# --- 2. names from data become paths -------------------------------------------------------


@pytest.mark.parametrize("dataset", ["../../../escaped", "/abs/escaped", "..", "a/b", ""])
def test_runs_file_keys_never_lead_out_of_the_workdir(tiny_checkpoint, tmp_path, capsys, dataset):
    if dataset.startswith("/"):
        dataset = str(tmp_path / "abs" / "escaped")
    runs = runs_file(tmp_path, tiny_checkpoint("vivit"), dataset=dataset)
    out = tmp_path / "deep" / "er" / "out"
    assert main(["sweep", "--runs", runs, "--workdir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vtm-jax: error: runs file ") and "\n" not in err, err
    assert "is not a plain name" in err and "dataset of vivit" in err
    written = {p.name for p in tmp_path.rglob("*")} - {"runs.json", "data"}
    assert not (tmp_path / "deep").exists() and "escaped" not in written


# --- 3. what predict prints, the range of a rule option ------------------------------------


def test_predict_prints_the_r_the_model_applies(tiny_checkpoint, tmp_path, capsys):
    args = ["predict", "--checkpoint", tiny_checkpoint("vivit"), "--video", str(clip(tmp_path))]
    assert main([*args, "--r", "1000"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    # 128 tokens and a class token: a layer removes at most half, 64 then 32.
    assert first == "mode=merge r=64,32 schedule=0.0 (asked r=1000: a layer removes at most " + (
        "what its tokens allow)"
    ), first
    assert main([*args, "--r", "8"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "mode=merge r=8 schedule=0.0"


def test_hybrid_threshold_must_be_a_similarity(tiny_checkpoint, tmp_path, capsys):
    for threshold in (-1, 1, 0.4):
        settings = MergingSettings(mode="hybrid", r=4, rule_options={"threshold": threshold})
        assert settings.rule_options["threshold"] == threshold
    for threshold in (5, -1.5, 1.0001):
        with pytest.raises(UserError, match=rf"threshold must be in \[-1, 1\], not {threshold}"):
            MergingSettings(mode="hybrid", r=4, rule_options={"threshold": threshold})
    args = ["predict", "--checkpoint", tiny_checkpoint("vivit"), "--video", str(clip(tmp_path))]
    assert main([*args, "--mode", "hybrid", "--r", "4", "--threshold", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "vtm-jax: error: threshold must be in [-1, 1], not 5.0", err
