#!/usr/bin/env bash
# On nvidia-h200-x4 (issue 10, acceptance 2): two prefill workers with TP=1 (GPUs 0 and 1) feed
# one decode worker with TP=2 (GPUs 2 and 3; each rank its own NIXL agent over its kv heads),
# greedy tokens compared with a TP=1 1P1D run (prefill GPU 0 -> decode GPU 2), then TP=2 prefill
# (GPUs 0,1) -> the same TP=2 decode (rank to rank); KV transfer bandwidth per request and from
# the prefill workers' metrics. bench/tp_handoff.py does the work and stops its processes by PID.
#
# usage (repo root): [PREFILL_GPUS=0,1 DECODE_GPUS=2,3] scripts/device/tp-handoff-x4.sh [CONFIG...]
#   (PREFILL_GPUS=0,1 DECODE_GPUS=0,1 runs the same processes on the two GPUs of nvidia-h200-x2,
#   each GPU holding a prefill worker and a decode rank)
#   CONFIG: llama8b2l-bf16 (the 8B shape cut to 2 layers: a quick check; SmolLM2's 3 kv heads do
#   not split over 2 ranks) | llama8b-bf16 | llama8b-fp32 (default: all three) | llama8b-bf16-inv
#   (every worker in the TP-invariant mode, S=2, no prefix caching: bf16 text must match too) |
#   custom (the args in $TP_HANDOFF_ARGS: the CPU rehearsal)
#   carry: .whl/gpu_core_py312.tar.xz (ray, nixl, ucx), .whl/gpu_serve_py312.tar.xz (protobuf
#   for the stubs), .devmodel (scripts/device/stage-model.sh: SmolLM2 config + tokenizer)
# $OUT (at most 8 files come back): summary.txt (tables), results.jsonl (one JSON line per
# config), topo.txt, <config>-logs.txt (worker log tails, only for a config that failed).
# bf16 greedy text may differ between TP=1 and TP=2 on dummy weights in the default mode
# (docs/benchmarks.md, issue 7 acceptance 5: near-flat logits, all-reduce rounding); fp32 and the
# TP-invariant mode must be identical.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p /tmp/site
[ -f /tmp/site/.unpacked ] || for b in .whl/gpu_core_py312.tar.xz .whl/gpu_serve_py312.tar.xz; do
  [ -f "$b" ] && tar -xJf "$b" -C /tmp/site
done
touch /tmp/site/.unpacked
export PYTHONPATH=$PWD:/tmp/site
PY=${PYTHON:-python3}
mkdir -p /tmp/model && tar -xJf .devmodel/smollm2-135m-instruct.tar.xz -C /tmp/model
SMOL=/tmp/model/smollm2-135m-instruct
L8=/tmp/model/llama-3.1-8b  # the 8B shape with SmolLM2's tokenizer (token ids only matter)
L8Q=/tmp/model/llama-3.1-8b-2l
for d in "$L8" "$L8Q"; do
  mkdir -p "$d" && cp "$SMOL/tokenizer.json" "$SMOL/tokenizer_config.json" "$d/"
done
cp engine/model_configs/llama-3.1-8b/config.json "$L8/"
"$PY" -c "import json,sys; c=json.load(open(sys.argv[1])); c['num_hidden_layers']=2; \
json.dump(c, open(sys.argv[2], 'w'))" "$L8/config.json" "$L8Q/config.json"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false NIXL_LOG_LEVEL=WARN UCX_LOG_LEVEL=warn \
  UCX_NET_DEVICES=lo PYTHONUNBUFFERED=1
nvidia-smi topo -m >"$OUT/topo.txt" 2>&1
CONFIGS=${*:-llama8b2l-bf16 llama8b-bf16 llama8b-fp32}
for c in $CONFIGS; do
  case $c in
    llama8b2l-bf16) args=(--model "$L8Q" --dtype bfloat16 --kv-cache-gib 4) ;;
    llama8b-bf16) args=(--model "$L8" --dtype bfloat16 --kv-cache-gib 16) ;;
    llama8b-fp32) args=(--model "$L8" --dtype float32 --kv-cache-gib 16) ;;
    llama8b-bf16-inv) args=(--model "$L8" --dtype bfloat16 --kv-cache-gib 16 \
      --tp-invariant-shards 2 --no-prefix-caching) ;;
    custom) read -r -a args <<<"${TP_HANDOFF_ARGS:-}" ;;
    *) echo "unknown config $c"; continue ;;
  esac
  echo "== $c $(date -u +%T)" | tee -a "$OUT/summary.txt"
  timeout "${TP_HANDOFF_TIMEOUT:-420}" "$PY" -m bench.tp_handoff --prefill-gpus "${PREFILL_GPUS:-0,1}" \
    --decode-gpus "${DECODE_GPUS:-2,3}" \
    --load-format dummy --max-model-len 4096 --equal "${args[@]}" --out "/tmp/tp/$c" \
    >"/tmp/tp-$c.txt" 2>&1
  rc=$?
  grep -v '^tp_handoff ' "/tmp/tp-$c.txt" | tail -n 12 | tee -a "$OUT/summary.txt"
  grep '^tp_handoff ' "/tmp/tp-$c.txt" | sed "s/^tp_handoff /{\"config\": \"$c\", \"result\": /; s/\$/}/" \
    >>"$OUT/results.jsonl"
  echo "exit $rc $(date -u +%T)" | tee -a "$OUT/summary.txt"
  if [ $rc -ne 0 ]; then
    for f in /tmp/tp/$c/*.log; do echo "--- $f"; tail -n 40 "$f"; done >"$OUT/$c-logs.txt" 2>&1
  fi
done
