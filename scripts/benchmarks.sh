#!/usr/bin/env bash
# Every CPU number in BENCHMARKS.md, measured in one session on this machine (about an hour on
# the 2-core development CPU, most of it the PyTorch peers at batch 8). Results land in out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh convert
bash scripts/bench_setup_transformers4.sh /tmp/tf446  # transformers 4.46 for the paper's peers
mkdir -p out
# vtm-jax bench and the PyTorch peers side by side, three runs at batch 1, one at batch 8.
.venv/bin/python scripts/bench_side_by_side.py --runs 3 --batches 1 \
    --transformers4-python /tmp/tf446/bin/python --output out/side_by_side_b1
.venv/bin/python scripts/bench_side_by_side.py --runs 1 --batches 8 --iterations 2 \
    --peers-batched sdpa,paper --transformers4-python /tmp/tf446/bin/python \
    --output out/side_by_side_b8
.venv/bin/python scripts/bench_bf16_logits.py --rounds 3 --output out/bf16_logits.json
.venv/bin/python scripts/bench_attention.py | tee out/bench_attention.txt
.venv/bin/python scripts/bench_merge_step.py --output out/merge_step_cpu.json
