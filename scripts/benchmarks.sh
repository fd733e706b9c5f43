#!/usr/bin/env bash
# Every number in BENCHMARKS.md, measured in one session on this machine (about 6 minutes on
# the 2-core development CPU). Results land in out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh convert
mkdir -p out
.venv/bin/vtm-jax bench --config=configs/vivit_b_k400.py --config.bench.iterations=3 \
    --output=out/bench_vivit_b_cpu.json
.venv/bin/python scripts/bench_pytorch.py --r 300 --iterations 3 --output out/torch_vivit_b_cpu.json
.venv/bin/python scripts/bench_merge_step.py --output out/merge_step_cpu.json
.venv/bin/python scripts/bench_attention.py
