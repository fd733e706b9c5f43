"""The built wheel carries the shipped configs, and its commands run outside the checkout."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in (REPO / "vtm_jax" / "configs").glob("*.py") if p.stem[0] != "_")


@pytest.fixture(scope="module")
def unpacked_wheel(tmp_path_factory) -> pathlib.Path:
    """The wheel ``pip wheel`` builds from this checkout, unpacked (the files it installs)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("vtm_jax-*.whl")
    site = out / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def _run_outside(site: pathlib.Path, tmp_path: pathlib.Path, *args: str):
    """``vtm-jax ARGS`` from a folder outside the checkout, importing the wheel's vtm_jax."""
    code = (
        "import sys, vtm_jax, vtm_jax.cli\n"
        f"assert vtm_jax.__file__.startswith({str(site)!r}), vtm_jax.__file__\n"
        "sys.exit(vtm_jax.cli.main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )


def test_the_wheel_holds_every_shipped_config(unpacked_wheel):
    packaged = sorted(p.stem for p in (unpacked_wheel / "vtm_jax" / "configs").glob("*.py"))
    assert [name for name in packaged if name[0] != "_"] == SHIPPED
    assert "vivit_tiny" in SHIPPED and len(SHIPPED) >= 16


def test_configs_by_name_outside_the_checkout(unpacked_wheel, tmp_path):
    listed = _run_outside(unpacked_wheel, tmp_path, "configs")
    assert listed.returncode == 0, listed.stderr[-2000:]
    names = [line.split()[0] for line in listed.stdout.splitlines()[: len(SHIPPED)]]
    assert names == SHIPPED
    assert "A tiny ViViT" in listed.stdout  # each with the first line of its docstring

    output = tmp_path / "tiny.json"
    bench = ["bench", "--config=vivit_tiny", "--config.bench.iterations=1"]
    bench += ["--config.bench.warmup=0", f"--output={output}"]
    ran = _run_outside(unpacked_wheel, tmp_path, *bench)
    assert ran.returncode == 0, ran.stderr[-2000:]
    results = json.loads(output.read_text())["results"]
    assert [r["mode"] for r in results] == ["none", "merge"]

    unknown = _run_outside(unpacked_wheel, tmp_path, "bench", "--config=vivit_huge")
    assert unknown.returncode == 2
    assert "no shipped config of that name" in unknown.stderr and "vivit_tiny" in unknown.stderr
    assert "Traceback" not in unknown.stderr
