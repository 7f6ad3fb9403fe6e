#!/usr/bin/env bash
# On nvidia-h200-x4 (issue 10, acceptance 2): two prefill workers with TP=1 (GPUs 0 and 1) feed
# one decode worker with TP=2 (GPUs 2 and 3; each rank its own NIXL agent over its kv heads),
# greedy tokens compared with a TP=1 1P1D run (prefill GPU 0 -> decode GPU 2), then TP=2 prefill
# (GPUs 0,1) -> the same TP=2 decode (rank to rank); KV transfer bandwidth per request and from
# the prefill workers' metrics. bench/tp_handoff.py does the work; it stops its processes by PID.
#
# usage (repo root): scripts/device/tp-handoff-x4.sh [CONFIG...]
#   CONFIG: smollm2-bf16 | llama8b-bf16 | llama8b-fp32 (default: all three, ~6-9 min)
#   carry: .whl/gpu_core_py312.tar.xz (ray + nixl + ucx), .whl/gpu_serve_py312.tar.xz (protobuf
#   for the stubs), .devmodel (scripts/device/stage-model.sh: SmolLM2 config + tokenizer).
# Writes $OUT/<config>.txt (table + JSON line), $OUT/<config>/ (worker logs, JSON with tokens),
# $OUT/topo.txt. bf16 greedy text may differ between TP=1 and TP=2 on dummy weights (docs/
# benchmarks.md, issue 7 acceptance 5: flat logits, all-reduce rounding); fp32 must be identical.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p /tmp/site
for b in .whl/gpu_core_py312.tar.xz .whl/gpu_serve_py312.tar.xz; do tar -xJf "$b" -C /tmp/site; done
export PYTHONPATH=$PWD:/tmp/site
mkdir -p /tmp/model && tar -xJf .devmodel/smollm2-135m-instruct.tar.xz -C /tmp/model
SMOL=/tmp/model/smollm2-135m-instruct
L8=/tmp/model/llama-3.1-8b  # the 8B shape with SmolLM2's tokenizer (token ids only matter)
mkdir -p "$L8" && cp engine/model_configs/llama-3.1-8b/config.json "$L8/" \
  && cp "$SMOL/tokenizer.json" "$SMOL/tokenizer_config.json" "$L8/"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false NIXL_LOG_LEVEL=WARN UCX_LOG_LEVEL=warn \
  UCX_NET_DEVICES=lo PYTHONUNBUFFERED=1
nvidia-smi topo -m >"$OUT/topo.txt" 2>&1
CONFIGS=${*:-smollm2-bf16 llama8b-bf16 llama8b-fp32}
for c in $CONFIGS; do
  case $c in
    smollm2-bf16) args=(--model "$SMOL" --dtype bfloat16 --kv-cache-gib 4) ;;
    llama8b-bf16) args=(--model "$L8" --dtype bfloat16 --kv-cache-gib 16) ;;
    llama8b-fp32) args=(--model "$L8" --dtype float32 --kv-cache-gib 16) ;;
    *) echo "unknown config $c"; continue ;;
  esac
  echo "== $c $(date -u +%T)"
  timeout 400 python3 -m bench.tp_handoff "${args[@]}" --prefill-gpus 0,1 --decode-gpus 2,3 \
    --load-format dummy --max-model-len 4096 --equal --out "$OUT/$c" >"$OUT/$c.txt" 2>&1
  echo "exit $?"
  grep -v '^tp_handoff ' "$OUT/$c.txt" | tail -n 12
done
