"""`convert --source hf` by Hub repo id, read from a fake local HuggingFace cache (offline)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

import vtm_jax
from tests.hf_models import random_hf_vivit
from vtm_jax.cli import main
from vtm_jax.jobs.predict import predict

REPO_ID = "tiny-org/vivit-tiny"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(hub, model) -> str:
    """``model`` laid out as huggingface_hub caches a download: blobs named by their hash,
    ``snapshots/<commit>/`` of links to them, and ``refs/main`` naming the commit."""
    repo = hub / ("models--" + REPO_ID.replace("/", "--"))
    staging = hub / "staging"
    model.save_pretrained(staging)
    snapshot = repo / "snapshots" / REVISION
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in os.listdir(staging):
        data = (staging / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return str(staging)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    directory = fake_cache(root / "hub", random_hf_vivit(frames=8, size=32, hidden=32, layers=1))
    return root, directory


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_convert_by_repo_id_reads_the_local_cache(cached, tmp_path, monkeypatch, variable):
    root, directory = cached
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, str(root / "hub" if variable == "HF_HUB_CACHE" else root))
    assert (
        main(["convert", "--source", "hf", "--input", REPO_ID, "--output", str(tmp_path / "c")])
        == 0
    )
    assert (
        main(["convert", "--source", "hf", "--input", directory, "--output", str(tmp_path / "d")])
        == 0
    )
    by_id = json.loads((tmp_path / "c" / "model.json").read_text())
    by_path = json.loads((tmp_path / "d" / "model.json").read_text())
    assert by_id["params_digest"] == by_path["params_digest"]  # the same weights
    snapshot = root / "hub" / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / REVISION
    assert by_id["converted_from"] == {"source": "hf", "repo_id": REPO_ID, "path": str(snapshot)}
    # The Python API reads the same id.
    model, params, record = vtm_jax.load(REPO_ID, source="hf")
    clip = np.zeros((8, 32, 32, 3), np.float32)
    expected, _ = predict(str(tmp_path / "d"), clip)
    np.testing.assert_allclose(vtm_jax.classify(model, params, clip), expected, atol=1e-6)


def test_an_uncached_repo_id_is_one_line_naming_the_cache(cached, tmp_path, monkeypatch, capsys):
    root, _ = cached
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hub"))
    out = str(tmp_path / "c")
    assert main(["convert", "--source", "hf", "--input", "tiny-org/missing", "--output", out]) == 2
    err = capsys.readouterr().err.strip()
    where = root / "hub" / "models--tiny-org--missing"
    assert err.startswith("vtm-jax: error: no such file or directory 'tiny-org/missing'")
    assert f"not in the local HuggingFace cache (looked in {where})" in err and "\n" not in err
    assert not os.path.exists(out)
    # A snapshot that refs/main does not lead to is not there either.
    broken = root / "hub" / "models--tiny-org--broken"
    (broken / "refs").mkdir(parents=True)
    (broken / "refs" / "main").write_text("f" * 40)
    assert main(["convert", "--source", "hf", "--input", "tiny-org/broken", "--output", out]) == 2
    assert "looked in" in capsys.readouterr().err
    # Something that is no repo id stays a missing path.
    assert main(["convert", "--source", "hf", "--input", "no/such/dir", "--output", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "vtm-jax: error: no such file or directory: no/such/dir"
    with pytest.raises(ValueError, match="not in the local HuggingFace cache"):
        vtm_jax.load("tiny-org/missing", source="hf")
