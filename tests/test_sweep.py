"""`vtm-jax sweep`: every family of the paper on the synthetic data, resume, errors, and the r
values of the paper's models against docs/method.md §6."""

import json
import os
import subprocess
import sys

import pytest

from vtm_jax.cli import main
from vtm_jax.config.loading import record_from_config
from vtm_jax.config.paper import MODELS, get_paper_config
from vtm_jax.jobs.sweep_families import FAMILIES, TABLE_FAMILIES, family_names
from vtm_jax.jobs.sweep_plan import Pair, family_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ["--config.bench.iterations=1", "--config.bench.warmup=0", "--config.bench.batch_size=1"]
# Unoptimised XLA compiles the ~45 tiny programs several times faster; the numbers do not
# matter here, only that every run goes through and lands in its table.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def synthetic_runs(tmp_path, models):
    """A runs file: each (model, checkpoint) on 8 synthetic test videos, one batch of 8."""
    runs = {
        model: {
            "synthetic": {
                "checkpoint": checkpoint,
                "data_dir": str(tmp_path / "data"),
                "config": f"{REPO}/configs/vivit_synthetic.py",
                "overrides": {
                    "dataset_configs.builder_options.test_examples": 8,
                    "dataset_configs.builder_options.train_examples": 8,
                    "dataset_configs.test_batch_size": 8,
                },
            }
        }
        for model, checkpoint in models.items()
    }
    path = tmp_path / "runs.json"
    path.write_text(json.dumps(runs))
    return str(path)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_checkpoint):
    """`vtm-jax sweep --families all` once, over a tiny ViViT (every family covers ViViT)."""
    tmp = tmp_path_factory.mktemp("sweep")
    runs = synthetic_runs(tmp, {"vivit": tiny_checkpoint("vivit")})
    args = ["sweep", "--runs", runs, "--workdir", str(tmp / "out"), "--families", "all"]
    args += ["--curve-steps", "1", *TIMING]
    # In a subprocess only for the compile flags (they must be set before XLA starts).
    code = "import sys; from vtm_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out", args, proc.stdout


def read_table(out, name):
    return json.loads((out / f"{name}.json").read_text()), (out / f"{name}.md").read_text()


def tiny_r(family):
    """The r values each family gives the tiny ViViT (128 patches + CLS: r_max 64, the
    paper's fraction 300/1568 of it 12) with --curve-steps 1."""
    if family.startswith("baseline"):
        return []
    if family.startswith("curve"):
        return [64]
    fixed = {"r_max": [64], "r_25": [32], "r_12_5": [16], "r_6_25": [8], "confusion": [12, 16]}
    return fixed.get(family, [32] if family == "frames" else [12])  # frames: 8 frames, r_max 32


def test_every_family_writes_its_table(swept):
    out, _, stdout = swept
    assert "0 done before" in stdout
    for name in family_names():
        table, md = read_table(out, name)
        family = next(f for f in FAMILIES if f.name == name)
        rows = table["rows"]
        baselines = len(family.views)  # an r=0 row per view count
        assert all(row["r"] == 0 for row in rows[:baselines]), name
        assert all(row["reduction"].startswith("- (baseline") for row in rows[:baselines]), name
        assert sorted({row["r"] for row in rows[baselines:]}) == tiny_r(name), name
        if family.kind == "accuracy":
            assert table["columns"] == ["synthetic"]
            assert "| Model | r | Reduction | synthetic |" in md
        else:
            assert table["columns"] == ["synthetic FPS", "synthetic Speedup"]
            assert rows[0]["cells"]["synthetic Speedup"] == 1.0
        for row in rows:  # every number is the one its run file holds
            run = json.loads((out / row["runs"]["synthetic"]).read_text())
            assert run["complete"], name
            if family.kind == "accuracy":
                assert row["cells"]["synthetic"] == run["metrics"]["top1"]
                assert f"| {row['reduction']} | {100 * run['metrics']['top1']:.2f} |" in md
            else:
                assert row["cells"]["synthetic FPS"] == run["result"]["frames_per_s"] > 0
                assert run["result"]["settings"]["r"] == row["r"]
        if family.plot:
            assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_family_settings_reach_the_runs(swept):
    out, _, _ = swept

    def merging(name):
        table, _ = read_table(out, name)
        return [json.loads((out / r["runs"]["synthetic"]).read_text()) for r in table["rows"]]

    dup = merging("duplicate")
    assert [r["run"]["token_merging"]["duplicate"] for r in dup[1:]] == [[0, 2], [1, 2]]
    hybrid = merging("hybrid")[1]["run"]["token_merging"]
    assert (hybrid["mode"], hybrid["rule_options"]) == ("hybrid", {"threshold": 0.4})
    assert merging("concat")[1]["run"]["token_merging"]["head_aggregation"] == "concat"
    for name, schedule in [("random_drop_decreasing", -1.0), ("drop_increasing", 1.0)]:
        assert merging(name)[1]["run"]["token_merging"]["schedule"] == schedule
    assert merging("time_random_merge")[1]["result"]["mode"] == "random_merge"
    frames = merging("frames")
    assert all(
        r["run"]["frames"] == {"checkpoint": 16, "evaluated": 8, "position_embeddings": "paper"}
        for r in frames
    )
    views = merging("views")
    counts = [(r["run"]["num_clips"], r["run"]["three_crops"]) for r in views]
    assert counts == [(1, False), (1, True), (2, True), (4, True), (10, True)] * 2
    assert [r["run"]["token_merging"]["mode"] for r in views] == ["none"] * 5 + ["merge"] * 5
    confusion, md = read_table(out, "confusion")
    for row in confusion["rows"]:
        matrix = row["confusion_matrix"]["synthetic"]["label"]
        assert len(matrix) == 8 and sum(map(sum, matrix)) == 8
    assert "Confusion matrices" in md


def test_headline_table(swept):
    out, _, _ = swept
    table, md = read_table(out, "table")
    assert table["columns"] == ["synthetic", "FPS", "Speedup"]
    assert [r["reduction"] for r in table["rows"]] == [
        "- (baseline)",
        "random drop",
        "drop",
        "random merge",
        "merge",
        "hybrid (threshold 0.4)",
    ]
    assert [r["r"] for r in table["rows"]] == [0] + [12] * 5
    assert table["rows"][0]["cells"]["Speedup"] == 1.0
    assert table["rows"][-1]["cells"]["FPS"] is None  # hybrid is not timed, as in the paper
    merge = read_table(out, "time_merge")[0]["rows"][1]["cells"]
    assert table["rows"][4]["cells"]["FPS"] == merge["synthetic FPS"]
    assert md.splitlines()[2] == "| Model | r | Reduction | synthetic | FPS | Speedup |"
    assert set(TABLE_FAMILIES) <= {p.stem for p in out.glob("*.md")}


def test_rerun_skips_finished_runs(swept, capsys):
    out, args, _ = swept
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert f"0 runs run, {len(before)} done before" in stdout
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")} == before
    # A run whose results are gone is run again, and only that one.
    table, _ = read_table(out, "r_6_25")
    (out / table["rows"][1]["runs"]["synthetic"]).unlink()
    assert main([*args[:6], "r_6_25", *args[7:]]) == 0
    assert "1 runs run, 1 done before" in capsys.readouterr().out


def test_frames_family_doubles_videomae(tmp_path, tiny_checkpoint, capsys):
    """Family 34 for VideoMAE: twice the checkpoint's frames, r from the doubled token count."""
    runs = synthetic_runs(tmp_path, {"videomae": tiny_checkpoint("videomae", frames=8)})
    args = ["sweep", "--runs", runs, "--workdir", str(tmp_path / "out"), "--families", "frames"]
    assert main([*args, "--curve-steps", "1"]) == 0
    table, md = read_table(tmp_path / "out", "frames")
    # 16 frames of 32x32 in (2, 8, 8) tubelets: 128 tokens, no class token, r_max 64.
    assert [(r["r"], r["reduction"]) for r in table["rows"]] == [
        (0, "- (baseline, 16 frames)"),
        (64, "merge (16 frames)"),
    ]
    run = json.loads((tmp_path / "out" / table["rows"][1]["runs"]["synthetic"]).read_text())
    assert (
        run["run"]["frames"]["evaluated"] == 16 and run["run"]["preprocessing"]["num_frames"] == 16
    )
    assert run["run"]["token_merging"]["prop_attn"] is False  # VideoMAE, as in the paper
    assert "with a 8-frame checkpoint; position embeddings: paper" in md


def test_bad_input_is_one_line(tmp_path, tiny_checkpoint, capsys):
    good = synthetic_runs(tmp_path, {"vivit": tiny_checkpoint("vivit")})
    out = ["--workdir", str(tmp_path / "out")]
    cases = [
        (["--runs", good, *out, "--families", "r_max,nope"], "unknown family 'nope'; valid: "),
        (["--runs", str(tmp_path / "missing.json"), *out], "cannot read runs file"),
        (["--runs", good], "sweep needs --workdir"),
        (["--runs", good, *out, "--config=configs/vivit_b_k400.py"], "not --config=FILE"),
        (["--runs", good, *out, "--curve-steps", "0"], "--curve-steps must be at least 1"),
    ]
    for runs in [
        "[1, 2]",
        '{"vivit": {"k400": {"data_dir": "d"}}}',
        '{"resnet": {"k400": {"checkpoint": "c", "data_dir": "d"}}}',
        '{"vivit": {"k400": {"checkpoint": "c", "data_dir": "d", "extra": 1}}}',
        '{"vivit": {"synthetic": {"checkpoint": "c", "data_dir": "d"}}}',
        '{"vivit": {"k400": {"checkpoint": "no/such/ckpt", "data_dir": "d"}}}',
        "{not json",
    ]:
        path = tmp_path / f"bad{len(cases)}.json"
        path.write_text(runs)
        cases.append((["--runs", str(path), *out], "runs file"))
    for args, message in cases:
        assert main(["sweep", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("vtm-jax: error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()  # nothing ran


def test_list_names_every_family(capsys):
    assert main(["sweep", "--list"]) == 0
    listed = capsys.readouterr().out
    paper = [f.paper for f in FAMILIES if f.paper != "-"]  # "-": vtm-jax's own (views)
    assert paper == [str(i) for i in range(1, 36)]  # docs/method.md §6
    for name in [*family_names(), "table", "all"]:
        assert f"\n{name} " in listed


# docs/method.md §6: each family's (model -> datasets, r values) and settings for the paper's models.
ALL = ("k400", "ssv2", "ek100")
KE = ("k400", "ek100")
PAPER_R = {"vivit": [300], "videomae": [150], "timesformer": [18], "motionformer": [18]}


FOUR = dict.fromkeys(MODELS, ALL)
CURVE = {"vivit": list(range(98, 1569, 98)), "videomae": list(range(49, 785, 49))}
PAPER_TABLE = {
    "baseline": (FOUR, {m: [] for m in MODELS}, {}),
    "baseline_time": (FOUR, {m: [] for m in MODELS}, {}),
    "r_max": (
        {**FOUR, "vivit": KE},
        {"vivit": [1568], "videomae": [784], "timesformer": [98], "motionformer": [98]},
        {"mode": "merge", "schedule": 0},
    ),
    "r_25": (
        {**FOUR, "vivit": KE},
        {"vivit": [784], "videomae": [392], "timesformer": [49], "motionformer": [49]},
        {"mode": "merge"},
    ),
    "r_12_5": (
        {**FOUR, "vivit": KE},
        {"vivit": [392], "videomae": [196], "timesformer": [24], "motionformer": [24]},
        {"mode": "merge"},
    ),
    "r_6_25": (
        {**FOUR, "vivit": KE},
        {"vivit": [196], "videomae": [98], "timesformer": [12], "motionformer": [12]},
        {"mode": "merge"},
    ),
    "r_paper": ({**FOUR, "vivit": KE}, PAPER_R, {"mode": "merge", "schedule": 0}),
    "r_paper_decreasing": (FOUR, PAPER_R, {"mode": "merge", "schedule": -1}),
    "r_paper_increasing": (FOUR, PAPER_R, {"mode": "merge", "schedule": 1}),
    "time_merge": (FOUR, PAPER_R, {"mode": "merge", "schedule": 0}),
    "time_merge_decreasing": (FOUR, PAPER_R, {"mode": "merge", "schedule": -1}),
    "time_merge_increasing": (FOUR, PAPER_R, {"mode": "merge", "schedule": 1}),
    "concat": (
        {"vivit": KE, "videomae": ALL},
        {"vivit": [300], "videomae": [150]},
        {"head_aggregation": "concat"},
    ),
    "duplicate": (
        {"vivit": KE, "videomae": ALL},
        {"vivit": [300], "videomae": [150]},
        {"duplicate": [(0, 12), (11, 12)]},
    ),
    "hybrid": (
        {"vivit": ALL, "videomae": ALL},
        {"vivit": [300], "videomae": [150]},
        {"mode": "hybrid", "threshold": {"vivit": 0.4, "videomae": 0.8}},
    ),
    "frames": (
        {"vivit": ("k400",), "videomae": ("k400",)},
        {"vivit": CURVE["videomae"], "videomae": CURVE["vivit"]},
        {"frames": {"vivit": 16, "videomae": 32}},
    ),
    "confusion": (
        {"vivit": ("ek100",), "videomae": ("ek100",)},
        {"vivit": [300, 400], "videomae": [150, 200]},
        {"confusion": True},
    ),
}
for _mode, _first in [("random_drop", 14), ("drop", 18), ("random_merge", 22)]:
    for _suffix, _schedule in [("", 0), ("_decreasing", -1), ("_increasing", 1)]:
        PAPER_TABLE[_mode + _suffix] = (FOUR, PAPER_R, {"mode": _mode, "schedule": _schedule})
    PAPER_TABLE[f"time_{_mode}"] = (FOUR, PAPER_R, {"mode": _mode, "schedule": 0})
# Not the paper's: the view-count family, every model and dataset at the paper's r.
PAPER_TABLE["views"] = (FOUR, PAPER_R, {"mode": "merge", "schedule": 0})
for _suffix, _schedule in [("", 0), ("_decreasing", -1), ("_increasing", 1)]:
    for _kind in ("", "_time"):
        PAPER_TABLE[f"curve{_kind}{_suffix}"] = (
            {"vivit": ("k400",), "videomae": ("k400",)},
            CURVE,
            {"mode": "merge", "schedule": _schedule},
        )


def test_paper_models_get_the_papers_r_values():
    """Every family on the paper's four models x three datasets gives experiments.sh's runs."""
    assert set(PAPER_TABLE) == set(family_names())
    pairs = [Pair(m, d, "ckpt", "data", None, "config.py", ()) for m in MODELS for d in ALL]
    records = {
        (p.model, p.dataset): record_from_config(get_paper_config(p.model, p.dataset))
        for p in pairs
    }
    for family in FAMILIES:
        coverage, r_values, settings = PAPER_TABLE[family.name]
        rows = family_rows(family, pairs, records)
        covered = {(row.model, d) for row in rows for d in row.runs}
        assert covered == {(m, d) for m, ds in coverage.items() for d in ds}, family.name
        for model, expected in r_values.items():
            got = sorted({row.r for row in rows if row.model == model and row.r > 0})
            assert got == expected, (family.name, model)
        for row in rows:
            for run in row.runs.values():
                s = run.settings
                assert run.kind == family.kind
                assert s["prop_attn"] is (row.model != "videomae"), family.name
                if row.r == 0:
                    assert s["mode"] == "none"
                    continue
                for key, value in settings.items():
                    if key == "duplicate":
                        assert s["duplicate"] in value
                    elif key == "threshold":
                        assert s["threshold"] == value[row.model]
                    elif key == "frames":
                        assert run.frames == value[row.model]
                    elif key == "confusion":
                        assert run.confusion is value
                    else:
                        assert s[key] == value, (family.name, key)
                if "frames" not in settings:
                    assert run.frames is None
        if family.name == "duplicate":
            assert {row.runs["k400"].settings["duplicate"] for row in rows if row.r} == {
                (0, 12),
                (11, 12),
            }


def test_paper_layout_from_results(tmp_path):
    """The headline table of the paper's models on K400, SSv2 and EPIC-KITCHENS (verb and noun
    heads), from results files written here: docs/method.md §8's columns, FPS from K400."""
    from vtm_jax.jobs.sweep_tables import format_markdown, headline_rows, headline_table

    pairs = [
        Pair(m, d, "ckpt", "data", None, "config.py", ())
        for m in ("vivit", "videomae")
        for d in ALL
    ]
    records = {
        (p.model, p.dataset): record_from_config(get_paper_config(p.model, p.dataset))
        for p in pairs
    }
    accuracy, time = headline_rows(pairs, records)
    paths = {}
    for i, run in enumerate({run for row in accuracy + time for run in row.runs.values()}):
        path = tmp_path / f"{i}.json"
        r = run.settings["r"]
        if run.kind == "time":  # r=0: 100 frames/s; the reduced settings 2.5x that
            path.write_text(json.dumps({"result": {"frames_per_s": 250.0 if r else 100.0}}))
        elif run.pair.dataset == "ek100":
            metrics = {"action_top1": 0.3, "verb_top1": 0.6, "noun_top1": 0.4, "top1": 0.0}
            path.write_text(json.dumps({"run": {}, "metrics": metrics}))
        else:
            top1 = {"k400": 0.6, "ssv2": 0.5}[run.pair.dataset] - r / 10000
            path.write_text(json.dumps({"run": {}, "metrics": {"top1": top1}}))
        paths[run] = str(path)
    table = headline_table(accuracy, time, paths, str(tmp_path))
    md = format_markdown(table).splitlines()
    assert md[2] == (
        "| Model | r | Reduction | K400 | SSv2 | EK-100 Action | EK-100 Verb | EK-100 Noun "
        "| FPS | Speedup |"
    )
    assert md[4:10] == [
        "| ViViT | 0 | - (baseline) | 60.00 | 50.00 | 30.00 | 60.00 | 40.00 | 100.00 | 1.00 |",
        "| ViViT | 300 | random drop | 57.00 | 47.00 | 30.00 | 60.00 | 40.00 | 250.00 | 2.50 |",
        "| ViViT | 300 | drop | 57.00 | 47.00 | 30.00 | 60.00 | 40.00 | 250.00 | 2.50 |",
        "| ViViT | 300 | random merge | 57.00 | 47.00 | 30.00 | 60.00 | 40.00 | 250.00 | 2.50 |",
        "| ViViT | 300 | merge | 57.00 | 47.00 | 30.00 | 60.00 | 40.00 | 250.00 | 2.50 |",
        "| ViViT | 300 | hybrid (threshold 0.4) | 57.00 | 47.00 | 30.00 | 60.00 | 40.00 | - | - |",
    ]
    assert md[10].startswith("| VideoMAE | 0 | - (baseline) | 60.00 |")
    assert md[15] == (
        "| VideoMAE | 150 | hybrid (threshold 0.8) | 58.50 | 48.50 | 30.00 | 60.00 | 40.00 | - | - |"
    )
    assert all(row["timed_on"] in ("k400", None) for row in table["rows"])


def test_a_failing_run_names_itself(tmp_path, tiny_checkpoint, capsys):
    """A run that eval refuses stops the sweep with one line naming the run; nothing is
    written for it."""
    runs = synthetic_runs(tmp_path, {"vivit": tiny_checkpoint("vivit")})
    args = ["sweep", "--runs", runs, "--workdir", str(tmp_path / "out"), "--families", "baseline"]
    assert main([*args, "--config.eval.workers=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "vtm-jax: error: vivit/synthetic accuracy-none-r0: eval.workers must be at least 1, not 0"
    )
    assert not list((tmp_path / "out").rglob("*.json"))
