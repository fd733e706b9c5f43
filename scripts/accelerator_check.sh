#!/usr/bin/env bash
# One command for a machine with a GPU or a TPU (about 5-10 minutes):
#  1. logit parity of every backbone, at r=0 and the paper's r, with each attention backend
#     that applies there, against plain float32 attention on the host CPU (tolerance per
#     backend and matmul precision: scripts/bench_accelerator.py);
#  2. ViViT-B/16x2 (32x224x224) at r=0 and r=300 with every backend that applies, batch 1 and 8;
#  3. the table for BENCHMARKS.md's GPU or TPU section, in out/accelerator/table.md.
# It has not been run by the sessions that wrote it (none had an accelerator); see BENCHMARKS.md.
#   bash scripts/accelerator_check.sh            # needs .venv with jax[cuda12] or jax[tpu]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=out/accelerator
mkdir -p "$out"
platform=$("$py" -c "import jax; print(jax.default_backend())")
case "$platform" in
    gpu) backends="jax_nn cudnn xla" ;;
    tpu) backends="pallas_tpu xla" ;;
    *) echo "no GPU or TPU here (JAX's default backend is $platform); nothing to check" >&2; exit 2 ;;
esac
echo "== parity against the CPU ($platform)"
parity_rc=0
"$py" scripts/bench_accelerator.py parity --output "$out/parity.json" || parity_rc=$?
echo "== ViViT-B r=0 / r=300, backends: $backends"
files=()
for backend in $backends; do
    for batch in 1 8; do
        f="$out/bench_${backend}_b${batch}.json"
        "$py" -m vtm_jax.cli bench --config=vivit_b_k400 \
            --config.bench.attention="$backend" --config.bench.batch_size="$batch" \
            --config.bench.iterations=5 --output="$f"
        files+=("$f")
    done
done
"$py" scripts/bench_accelerator.py table "${files[@]}" --output "$out/table.md"
echo "parity: $out/parity.json (exit $parity_rc); table: $out/table.md"
exit "$parity_rc"
