"""The built wheel carries the shipped configs, and installed outside the checkout it runs the
README's quick start (its Installation section)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import sysconfig
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in (REPO / "vtm_jax" / "configs").glob("*.py") if p.stem[0] != "_")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    """The wheel ``pip wheel`` builds from this checkout."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("vtm_jax-*.whl")
    return built


@pytest.fixture(scope="module")
def unpacked_wheel(wheel, tmp_path_factory) -> pathlib.Path:
    """The files the wheel installs."""
    site = tmp_path_factory.mktemp("site")
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


@pytest.fixture(scope="module")
def fresh_env(wheel, tmp_path_factory) -> pathlib.Path:
    """A new virtual environment with the wheel installed (``pip install --no-deps``), its
    dependencies taken from this test environment through a ``.pth`` line: it does not see the
    checkout (this environment's editable install of it is a ``.pth`` hook that is not run)."""
    env = tmp_path_factory.mktemp("env")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    site = pathlib.Path(
        sysconfig.get_paths(vars={"base": str(env), "platbase": str(env)})["purelib"]
    )
    (site / "test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install"]
        + ["--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
        capture_output=True,
    )
    return env


def _installed(env: pathlib.Path, cwd: pathlib.Path, *args: str):
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [str(env / "bin" / "vtm-jax"), *args],
        cwd=cwd,
        env={**environment, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )


def test_the_installed_wheel_runs_the_quick_start(fresh_env, tmp_path):
    """README, Installation: `vtm-jax configs`, `vtm-jax bench --config=vivit_tiny` and
    `vtm-jax demo` (here on 32 test videos instead of 256, and one mode, to keep it short)."""
    where = subprocess.run(
        [str(fresh_env / "bin" / "python"), "-c", "import vtm_jax; print(vtm_jax.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(fresh_env)) and str(REPO) not in where, where

    listed = _installed(fresh_env, tmp_path, "configs")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert [line.split()[0] for line in listed.stdout.splitlines()[: len(SHIPPED)]] == SHIPPED

    bench = _installed(fresh_env, tmp_path, "bench", "--config=vivit_tiny")
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert "| merge | 8 |" in bench.stdout

    small = ["--config.dataset_configs.builder_options.test_examples=32"]
    small += ["--config.dataset_configs.builder_options.train_examples=8"]
    small += ["--config.demo.modes=('merge',)", "--config.demo.curve_r=(32,)"]
    small += ["--config.demo.curve_modes=('merge',)", "--config.bench.iterations=1"]
    demo = _installed(fresh_env, tmp_path, "demo", "--config=vivit_demo", *small)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert "| vivit | 64 | merge |" in demo.stdout
    assert (tmp_path / "out" / "demo" / "demo.md").is_file()  # the default workdir
