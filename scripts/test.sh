#!/usr/bin/env bash
# The whole test suite, offline on the CPU: install with every extra, lint, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh convert,video,test
export HF_HUB_OFFLINE=1 JAX_PLATFORMS=cpu
.venv/bin/ruff check vtm_jax tests configs scripts examples
.venv/bin/ruff format --check vtm_jax tests configs scripts examples
.venv/bin/python -m pytest -q "$@"
