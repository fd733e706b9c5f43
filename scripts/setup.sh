#!/usr/bin/env bash
# Create .venv (if needed) and install vtm-jax into it with the extras given as arguments.
#   bash scripts/setup.sh              # core only
#   bash scripts/setup.sh convert,video,test
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
extras="${1:-}"
spec="."
[ -n "$extras" ] && spec=".[$extras]"
.venv/bin/python -m pip install --quiet --upgrade pip
# scripts/constraints.txt pins torch to the 2.13.0 CPU build: others pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet -c scripts/constraints.txt -e "$spec"
