#!/usr/bin/env bash
# TP-invariant numerics on one nvidia-h200-x4 start (issue 7 acceptance 5, issue 10 acceptance 2).
# The x4 kind is 4 H200s of one host, like nvidia-h200-x2's 2, so bench.gpu_tp's TP=2 vs TP=1 runs
# on two of its GPUs as it would on the x2 kind:
#   1. bench.gpu_tp in bf16, TP=1 then TP=2, the TP-invariant mode (S=2) on GPUs 0,1 and the default
#      mode on GPUs 2,3 side by side (separate GPUs; the host has 64 cores): greedy ids and the
#      batch-1 decode step at 1K context in both modes;
#   2. scripts/device/tp-handoff-x4.sh llama8b-bf16-inv: TP=1 x 2 prefill -> TP=2 decode and TP=2 ->
#      TP=2 against TP=1 1P1D, every worker invariant; KV transfer bandwidth.
# usage (repo root, carry .whl/gpu_core_py312.tar.xz .whl/gpu_serve_py312.tar.xz .devmodel):
#   scripts/device/tp-invariant-x4.sh
# $OUT (<= 8 files): gpu_tp_invariant.txt, gpu_tp_default.txt, plus tp-handoff-x4.sh's summary.txt,
# results.jsonl, topo.txt, tokens.json (the handoff's full token ids) and a failed config's logs.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1
date -u +"gpu_tp start %T"
(CUDA_VISIBLE_DEVICES=0,1 timeout "${GPU_TP_TIMEOUT:-140}" "$PY" -m bench.gpu_tp --dtypes bfloat16 \
  --tp-invariant-shards 2 >"$OUT/gpu_tp_invariant.txt" 2>&1; echo "exit $?" >>"$OUT/gpu_tp_invariant.txt") &
(CUDA_VISIBLE_DEVICES=2,3 timeout "${GPU_TP_TIMEOUT:-140}" "$PY" -m bench.gpu_tp --dtypes bfloat16 \
  >"$OUT/gpu_tp_default.txt" 2>&1; echo "exit $?" >>"$OUT/gpu_tp_default.txt") &
wait
date -u +"gpu_tp end %T"
for f in gpu_tp_invariant gpu_tp_default; do
  echo "== $f"; grep -E "greedy identical|^exit|Error|error" "$OUT/$f.txt" | tail -n 6
done
TP_HANDOFF_TIMEOUT=${TP_HANDOFF_TIMEOUT:-200} bash scripts/device/tp-handoff-x4.sh llama8b-bf16-inv
cp /tmp/tp/llama8b-bf16-inv/tp_handoff_*.json "$OUT/tokens.json" 2>/dev/null
date -u +"end %T"
