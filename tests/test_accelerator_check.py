"""scripts/accelerator_check.sh, proven before any accelerator: its smoke run (the whole script
on the CPU with a tiny model) writes a JSON document and a Markdown table that agree, its time
guard records what it skips, and the rows it would run on a GPU or TPU lower for that device."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import time

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import accelerator_common as common  # noqa: E402
import accelerator_matrix as matrix  # noqa: E402
import accelerator_report as report  # noqa: E402


def run_check(out, *options: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    command = ["bash", "scripts/accelerator_check.sh", *options, "--out", str(out)]
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def table_rows(markdown: str, header: str) -> list[list[str]]:
    """The cells of each line of the table under ``header`` (up to the first blank line)."""
    lines = markdown.splitlines()
    start = lines.index(header) + 2  # the header, then its |---| line
    rows = []
    for line in lines[start:]:
        if not line.strip():
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerator_smoke")
    start = time.monotonic()
    proc = run_check(out, "--smoke")
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "table.json").read_text())
    return doc, (out / "table.md").read_text(), seconds


def test_smoke_document(smoke):
    doc, _, seconds = smoke
    assert doc["format"] == report.FORMAT and doc["smoke"] is True and doc["complete"] is True
    run = doc["run"]
    assert run["platform"] == "cpu" and run["device"] and run["devices"] >= 1
    assert run["jax"] == jax.__version__
    assert doc["model"]["architecture"] == "vivit" and doc["model"]["image_size"] == 32
    assert 0 < doc["elapsed_s"] < min(doc["budget_s"], seconds)
    paper_r = doc["merging"]["paper"]["r"]
    assert paper_r == 300  # the config's (vivit_b_k400), clamped by the schedule to the tiny model
    expected = itertools.product(
        matrix.SMOKE.batches, matrix.DTYPES, matrix.PLATFORM_BACKENDS["cpu"], (0, paper_r)
    )
    got = [(row["batch"], row["dtype"], row["backend"], row["r"]) for row in doc["rows"]]
    assert got == list(expected)
    assert all(set(row) == set(matrix.ROW_FIELDS) for row in doc["rows"])
    assert doc["parity"]["rows"] and all(row["ok"] is True for row in doc["parity"]["rows"])


def test_smoke_rows(smoke):
    doc, _, _ = smoke
    rows = doc["rows"]
    assert {row["status"] for row in rows} <= {"ok", "n/a"}  # nothing skipped, nothing failed
    assert all(row["reason"] for row in rows if row["status"] == "n/a")
    ok = [row for row in rows if row["status"] == "ok"]
    assert any(row["dtype"] == "bfloat16" for row in ok)
    for row in ok:
        assert row["clips_per_s"] > 0 and len(row["seconds"]) == matrix.SMOKE.iterations
        assert row["program_bytes"] > 0 and row["compile_s"] > 0
        assert row["peak_bytes_in_use"] is None  # the CPU keeps no memory_stats
        if row["r"] == 0:
            assert row["speedup"] == 1.0 and row["flop_limit"] == 1.0
            assert row["flop_share"] is None
        else:  # the tiny model still merges: fewer MACs than at r=0
            assert row["flop_limit"] > 1.05
            assert math.isclose(row["flop_share"], row["speedup"] / row["flop_limit"])
        # float32 matches float32 XLA; bfloat16 inputs change the logits, a little
        if row["dtype"] == "float32":
            assert row["rel_logit_diff"] < 1e-5
        else:
            assert 1e-7 < row["rel_logit_diff"] < 2e-2


def test_table_matches_json(smoke):
    doc, markdown, _ = smoke
    assert markdown.startswith("**Smoke run**")
    lines = table_rows(markdown, report.MATRIX_HEADER)
    assert len(lines) == len(doc["rows"])
    for cells, row in zip(lines, doc["rows"], strict=True):
        assert cells[:4] == [str(row["batch"]), row["dtype"], row["backend"], str(row["r"])]
        if row["status"] != "ok":
            assert cells[4] == row["status"] and cells[-1] == row["reason"]
            continue
        for cell, value in ((4, "clips_per_s"), (5, "speedup"), (6, "flop_limit")):
            assert math.isclose(float(cells[cell]), row[value], rel_tol=1e-3), (cells, value)
        assert math.isclose(float(cells[11]), row["rel_logit_diff"], rel_tol=1e-2, abs_tol=1e-12)
    parity = table_rows(markdown, report.PARITY_HEADER)
    assert [c[:3] for c in parity] == [
        [row["backbone"], str(row["r"]), row["backend"]] for row in doc["parity"]["rows"]
    ]


def test_time_guard_records_what_it_skips(tmp_path):
    proc = run_check(tmp_path, "--smoke", "--budget-s", "0", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "table.json").read_text())
    assert doc["complete"] is False and doc["rows"] and doc["parity"]["rows"]
    skipped = [r for r in doc["rows"] + doc["parity"]["rows"] if r["status"] != "n/a"]
    assert skipped and all(r["status"] == "skipped" for r in skipped)
    assert all(r["reason"].startswith("time budget") for r in skipped)
    markdown = (tmp_path / "table.md").read_text()
    assert "**incomplete**" in markdown
    assert len(table_rows(markdown, report.MATRIX_HEADER)) == len(doc["rows"])


def test_needs_an_accelerator_or_smoke(tmp_path):
    proc = run_check(tmp_path, timeout=120)
    assert proc.returncode == 2 and "--smoke" in proc.stderr
    assert not (tmp_path / "table.json").exists()
    proc = run_check(tmp_path, "--fast", timeout=30)
    assert proc.returncode == 2 and "unknown option --fast" in proc.stderr


def test_budget_estimates_from_the_steps_so_far():
    budget = common.Budget(100.0, start=time.monotonic() - 20.0)  # 20 s spent
    assert budget.estimate(8) == 0.0 and budget.allows(8)
    budget.record(8, 30.0)
    budget.record(8, 50.0)
    assert budget.estimate(8) == 50.0 and budget.estimate(32) == 50.0  # none of 32 yet
    budget.record(32, 90.0)
    assert budget.allows(8) and not budget.allows(32)  # 20 + 50 fit in 100 s, 20 + 90 do not
    assert not common.Budget(-1.0).allows("anything")  # past its deadline: nothing more


# A CPU jaxlib cannot tell cuDNN's version, which JAX's cuDNN lowering asks for
# (tests/test_export.py pins it the same way).
@pytest.fixture
def gpu_or_tpu(monkeypatch):
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa
    from jax._src.lib import cuda_versions

    if cuda_versions is None:
        monkeypatch.setattr(cudnn_fa, "check_cudnn_version", lambda: 91000)

    def pretend(platform: str) -> None:  # get_attention's platform check, for lowering only
        monkeypatch.setattr(jax, "default_backend", lambda: platform)

    return pretend


@pytest.mark.parametrize(
    "platform,backend,export_platform,kernel",
    [
        ("gpu", "cudnn", "cuda", "__cudnn$fmha"),
        ("tpu", "pallas_tpu", "tpu", "tpu_custom_call"),
    ],
)
def test_accelerator_rows_lower(gpu_or_tpu, platform, backend, export_platform, kernel):
    """Each dtype of the accelerator-only backends, on one full-size ViViT-B layer at the paper's
    r, lowers for its device; bfloat16 reaches the program and float32 leaves none."""
    from jax import export

    gpu_or_tpu(platform)
    record, paper = common.load("vivit_b_k400", smoke=False, num_layers=1)
    size = record.image_size
    clip = jax.ShapeDtypeStruct((1, record.num_frames, size, size, 3), jax.numpy.float32)
    for dtype in matrix.DTYPES:
        model, _ = matrix.build_for(record, paper, backend, dtype)
        params = jax.eval_shape(model.init, jax.random.PRNGKey(0), clip)["params"]
        targets = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaScaleBiasSoftmax")
        waived = [export.DisabledSafetyCheck.custom_call(t) for t in targets]
        lowered = export.export(
            jax.jit(common.forward(model)), platforms=[export_platform], disabled_checks=waived
        )(params, clip)
        text = lowered.mlir_module()
        assert kernel in text
        assert ("bf16" in text) == (dtype == "bfloat16"), (backend, dtype)
