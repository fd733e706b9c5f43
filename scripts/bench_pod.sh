#!/usr/bin/env bash
# Benchmark on every host of a Cloud TPU pod slice: one process per host, joined by
# jax.distributed (which reads the pod's topology itself); the batch is per chip and the table
# reports total and per-chip clips/s. Process 0 writes out/bench_pod.{json,md,png}.
#
#   bash scripts/bench_pod.sh TPU_NAME ZONE [extra vtm-jax bench arguments]
#
# It assumes this repository is checked out at ~/vtm-jax on every host, installed there with
# `pip install -e .` and jax's TPU wheels (`pip install "jax[tpu]"`).
set -euo pipefail
tpu="$1"; zone="$2"; shift 2
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/vtm-jax && python -m vtm_jax.cli bench --distributed \
   --config=vivit_b_k400 --config.bench.batch_size=8 \
   --config.bench.r_values='(100, 200, 300)' --output=out/bench_pod.json $*"
