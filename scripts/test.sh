#!/usr/bin/env bash
# The whole test suite, offline on the CPU: install with every extra, lint, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh convert,video,test
export HF_HUB_OFFLINE=1 JAX_PLATFORMS=cpu
.venv/bin/ruff check vtm_jax tests scripts examples
.venv/bin/ruff format --check vtm_jax tests scripts examples
# One test file per worker (the files' shared fixtures stay in one process): XLA compiles on
# one thread, so two workers on two CPUs take about 40% less time than one.
.venv/bin/python -m pytest -q -n auto --maxprocesses=4 --dist loadfile "$@"
