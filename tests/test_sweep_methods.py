"""The `methods` sweep family: every mode at MACs matched to merge's, one table and one plot."""

import json
import os
import subprocess
import sys

import pytest

from tests.test_sweep import FAST_COMPILE, REPO, TIMING, synthetic_runs
from vtm_jax.jobs.sweep_families import family_names, get_families
from vtm_jax.jobs.sweep_methods import (
    BUDGETS,
    MATCH_TOLERANCE,
    UNMATCHED_MODES,
    method_modes,
    total_macs,
)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_checkpoint):
    """`vtm-jax sweep --families methods` once over a tiny ViViT (a class token: the methods
    that assume none protect it; VideoMAE runs the same code without one)."""
    tmp = tmp_path_factory.mktemp("methods")
    checkpoints = {"vivit": tiny_checkpoint("vivit")}
    runs = synthetic_runs(tmp, checkpoints)
    args = ["sweep", "--runs", runs, "--workdir", str(tmp / "out"), "--families", "methods"]
    code = "import sys; from vtm_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args, *TIMING],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads((tmp / "out" / "methods.json").read_text())
    return tmp / "out", table, (tmp / "out" / "methods.md").read_text()


def test_every_method_at_every_budget(swept):
    _, table, md = swept
    for model in ("vivit",):
        rows = [row for row in table["rows"] if row["model"] == model]
        assert rows[0]["budget"] == "r=0" and rows[0]["mode"] == "none"
        for budget in BUDGETS:
            modes = [row["mode"] for row in rows if row["budget"] == budget]
            expected = [m for m in method_modes() if m not in UNMATCHED_MODES]
            assert modes == expected, (model, budget)
        assert "| ViViT | r=0 | none |" in md
        (own,) = [row for row in rows if row["budget"] == "own"]
        assert own["mode"] == "rlt" and own["token_merging"]["bucket"] == 16  # 4 x 4 patches


def test_macs_matched_to_merge(swept, tiny_checkpoint):
    from vtm_jax.checkpoints.store import load_record

    _, table, _ = swept
    for row in table["rows"]:
        if row["budget"] in ("r=0", "own"):
            continue
        reference = next(
            r
            for r in table["rows"]
            if (r["model"], r["budget"], r["mode"]) == (row["model"], row["budget"], "merge")
        )
        # The MACs the table reports are the model's own analytic count under the run's fields.
        record = load_record(tiny_checkpoint(row["model"]))
        macs = total_macs(record, row["token_merging"], record.num_frames)
        assert row["gmacs"] == pytest.approx(macs / 1e9)
        assert row["token_merging"]["mode"] == row["mode"]
        gap = row["gmacs"] / reference["gmacs"] - 1
        assert row["macs_vs_target"] == pytest.approx(gap)
        assert row["matched"] == (abs(gap) <= MATCH_TOLERANCE)
        below_r0 = next(r for r in table["rows"] if r["model"] == row["model"])["gmacs"]
        assert row["gmacs"] < below_r0, row


def test_cells_come_from_the_runs(swept):
    out, table, md = swept
    for row in table["rows"]:
        acc = json.loads((out / row["runs"]["synthetic"]).read_text())
        assert row["cells"]["synthetic"] == acc["metrics"]["top1"]
        timed = json.loads((out / row["runs"]["synthetic time"]).read_text())
        assert timed["result"]["settings"]["mode"] == row["mode"]
        assert row["cells"]["synthetic clips/s"] > 0
        if row["budget"] == "r=0":
            assert row["cells"]["synthetic Speedup"] == 1.0
    assert (out / "methods.png").read_bytes()[:4] == b"\x89PNG"
    assert "MACs vs merge" in md


def test_methods_is_listed_but_not_in_all():
    assert "methods" not in family_names()
    chosen, _ = get_families(["methods"])
    assert [f.name for f in chosen] == ["methods"]
    from vtm_jax.jobs.sweep_families import describe_families

    assert "methods" in describe_families()
