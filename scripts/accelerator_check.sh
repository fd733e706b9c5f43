#!/usr/bin/env bash
# The accelerator check: one command for a machine with a GPU or a TPU, under 8 minutes.
#  1. ViViT-B/16x2 (32x224x224) at r=0 and the paper's r=300, batch 8 and 32, float32 and
#     bfloat16, every attention backend of the platform (GPU: xla, cudnn, blockwise;
#     TPU: xla, pallas_tpu, blockwise): clips/s, speedup over r=0, its share of the FLOP-limit
#     speedup, peak memory, logit difference against float32 XLA attention;
#  2. logit parity of every backbone (2 layers, the paper's r, float32 matmuls) with each
#     backend against float32 attention on the host CPU;
#  3. OUT/table.json and OUT/table.md (the rows for BENCHMARKS.md), rewritten after each step.
# A time guard (--budget-s, 420 s) skips what would overrun and records it; `timeout` stops
# the process 40 s after the budget whatever happens, leaving the tables of the steps done.
#   bash scripts/accelerator_check.sh              # needs .venv with jax[cuda12] or jax[tpu]
#   bash scripts/accelerator_check.sh --smoke      # the same code on the CPU, tiny model, ~1 min
# Options: --out DIR (default out/accelerator, or out/accelerator_smoke with --smoke),
# --budget-s S. Exit status: 0 no failure (the time guard's skips are marked in the table),
# 1 a parity failure or an error row, 2 no accelerator (or a bad option).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
smoke=0
out=""
budget=""
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) smoke=1 ;;
        --out) out=${2:?--out needs a folder}; shift ;;
        --budget-s) budget=${2:?--budget-s needs seconds}; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "unknown option $1 (valid: --smoke, --out DIR, --budget-s S)" >&2; exit 2 ;;
    esac
    shift
done
args=(check --out "${out:-out/accelerator}")
limit=460  # the default budget, 420 s, plus 40
if [ "$smoke" = 1 ]; then
    export JAX_PLATFORMS=cpu  # the smoke run is the CPU's, even on a machine with a GPU
    args=(check --smoke --out "${out:-out/accelerator_smoke}")
    limit=300
fi
if [ -n "$budget" ]; then
    args+=(--budget-s "$budget")
    limit=$(awk -v b="$budget" 'BEGIN { printf "%d", b + 40 }')
fi
rc=0
timeout -k 10 "$limit" "$py" scripts/bench_accelerator.py "${args[@]}" || rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "stopped after $limit s; the table holds the steps done" >&2
fi
exit "$rc"
