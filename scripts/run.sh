#!/usr/bin/env bash
# The main job: install, then the demo: the shipped ViViT (trained on the synthetic dataset,
# built on first use) at r=0 and with every merging mode; prints the paper-style table and
# writes results, a plot and merge pictures to out/demo. Extra arguments go to `vtm-jax demo`
# (e.g. --config.token_merging.r=16).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
.venv/bin/vtm-jax demo --config=vivit_demo --workdir=out/demo "$@"
