#!/usr/bin/env bash
# The main job: install, then benchmark a random-weight ViViT-B/16x2 (32x224x224) at r=0 and
# with the paper's r=300 merging; prints per-layer token counts, analytic GMACs and speedup.
# Extra arguments go to `vtm-jax bench` (e.g. --config.token_merging.mode=drop).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
.venv/bin/vtm-jax bench --config=configs/vivit_b_k400.py --output=out/bench_vivit_b.json "$@"
