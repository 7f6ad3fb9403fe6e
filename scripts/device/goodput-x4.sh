#!/usr/bin/env bash
# Issue 10, acceptance 1 on nvidia-h200-x4: `tandem serve --prefill 2 --decode 2` on Ray (one GPU
# per worker) against 1 prefill + 1 decode on the same machine, back to back, Llama-3.1-8B
# shape, dummy weights, bf16, the 3K/150 workload; goal: 2P2D goodput >= 1.8x 1P1D's. It is
# scripts/device/goodput.sh with these deployments and rates (1P1D's strict knee on
# nvidia-h200-x2 was 10-12 req/s, docs/benchmarks.md), so its knobs apply (DEADLINE_S ...).
#
# device call (repo root; carry .whl/gpu_core_py312.tar.xz and .whl/gpu_serve_py312.tar.xz,
# kind nvidia-h200-x4, timeout_s 420; ~5 min of machine time):
#   DEADLINE_S=400 bash scripts/device/goodput-x4.sh 2>&1 | tee $OUT/console.txt
# returns $OUT/summary.txt and $OUT/goodput.tar.gz; then, here:
#   tar -xzf goodput.tar.gz && python -m bench.goodput plot r/2p2d-3k150.json r/1p1d-3k150.json \
#     --out docs/plots/goodput-3k150-h200x4.png
set -u
export DEPLOYS=${DEPLOYS:-"2p2d:disagg:2:2 1p1d:disagg:1:1"}
export WORKLOADS=${WORKLOADS-3k150}
export RATES_3k150_1p1d=${RATES_3k150_1p1d:-"4,8,10,12,14"}
export RATES_3k150_2p2d=${RATES_3k150_2p2d:-"8,16,20,24,28"}
export DURATION_S=${DURATION_S:-10} MODE_MIN_S=${MODE_MIN_S:-110} PROBE_N=${PROBE_N:-12}
export DEADLINE_S=${DEADLINE_S:-400}
exec bash "$(dirname "$0")/goodput.sh"
