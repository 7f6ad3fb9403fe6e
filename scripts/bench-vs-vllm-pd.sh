#!/usr/bin/env bash
# Issue 4 acceptance 4: Tandem 1P1D vs vLLM CPU P/D over NIXL + vllm-router, SmolLM2-135M fp32,
# 128 in / 64 out, concurrency 8 and 32, the same client (bench/serve.py), one system at a time,
# back to back. Run it inside a loopback-only namespace, from the repository root:
#
#   scripts/netns-run bash scripts/bench-vs-vllm-pd.sh [ORDER...]   # ORDER: tandem vllm ...
#
# Needs .venv (make venv) and the vLLM peer venv of ../shared/research/vllm-cpu-peer.md
# ($VLLM_VENV, default /work/vllm-peer, with vllm-router 0.1.17). Each system serves on both
# cores as its P/D mode is meant to: Tandem's prefill and decode worker one torch thread each,
# vLLM's producer and consumer one OpenMP thread each, bound to cores 0 and 1. Every round uses
# fresh seeds (cold prompts: nothing is in either prefix cache). Results: one JSON line per run
# in $RESULTS (default /tmp/pd-compare.jsonl) and a table at the end. Only processes this script
# started are stopped, by PID.
set -u
cd "$(dirname "$0")/.."
VLLM_VENV=${VLLM_VENV:-/work/vllm-peer}
RESULTS=${RESULTS:-/tmp/pd-compare.jsonl}
LOGS=${LOGS:-/tmp/pd-compare-logs}
MODEL=${MODEL:-$PWD/.cache/tandem/smollm2-135m-instruct}
NUM=${NUM:-64}
SEED=${SEED:-1000}
mkdir -p "$LOGS"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false UCX_NET_DEVICES=lo VLLM_HOST_IP=127.0.0.1 \
  VLLM_CPU_KVCACHE_SPACE=2 VLLM_NIXL_SIDE_CHANNEL_HOST=127.0.0.1 \
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled
PIDS=()
stop_all() {
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
  done
  PIDS=()
}
trap stop_all EXIT
start() {  # start NAME CMD...: in its own process group, logs under $LOGS
  local name=$1; shift
  setsid "$@" >"$LOGS/$name.log" 2>&1 &
  PIDS+=($!)
}
wait_ready() {  # wait_ready URL SECONDS: until a one-token completion succeeds (every worker up)
  local deadline=$((SECONDS + $2)) model
  until model=$(curl -sf "$1/v1/models" | .venv/bin/python -c \
      'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])' 2>/dev/null) &&
    curl -sf "$1/v1/completions" -H 'Content-Type: application/json' \
      -d "{\"model\": \"$model\", \"prompt\": \"Hi\", \"max_tokens\": 1}" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "not ready: $1"; return 1; }
    sleep 2
  done
}
measure() {  # measure SYSTEM URL
  for c in 8 32; do
    SEED=$((SEED + 1))
    local line
    line=$(PYTHONPATH=. .venv/bin/python -m bench.serve --url "$2" --isl 128 --osl 64 \
      --concurrency "$c" --num-requests "$NUM" --warmup-requests 4 --seed "$SEED" --json \
      | .venv/bin/python -c 'import json, sys; print(json.dumps(json.load(sys.stdin)))')
    echo "{\"system\": \"$1\", \"concurrency\": $c, \"seed\": $SEED, \"load\": \"$(cut -d' ' -f1-3 /proc/loadavg)\", \"at\": \"$(date -u +%T)\", \"result\": $line}" \
      | tee -a "$RESULTS"
  done
}
run_tandem() {
  start tandem .venv/bin/python -m deploy.cli serve --launcher local --port 8300 \
    --dtype float32 --model "$MODEL"
  wait_ready http://127.0.0.1:8300 300 && measure tandem http://127.0.0.1:8300
  stop_all
}
run_vllm() {
  local kv='"kv_connector":"NixlConnector","kv_buffer_device":"cpu"'
  VLLM_CPU_OMP_THREADS_BIND=0 VLLM_NIXL_SIDE_CHANNEL_PORT=5601 start vllm-prefill \
    "$VLLM_VENV/bin/vllm" serve "$MODEL" --host 127.0.0.1 --port 8101 --max-model-len 2048 \
    --dtype float32 --kv-transfer-config "{$kv,\"kv_role\":\"kv_producer\"}"
  VLLM_CPU_OMP_THREADS_BIND=1 VLLM_NIXL_SIDE_CHANNEL_PORT=5602 start vllm-decode \
    "$VLLM_VENV/bin/vllm" serve "$MODEL" --host 127.0.0.1 --port 8102 --max-model-len 2048 \
    --dtype float32 --kv-transfer-config "{$kv,\"kv_role\":\"kv_consumer\"}"
  wait_ready http://127.0.0.1:8101 400 && wait_ready http://127.0.0.1:8102 400 || { stop_all; return; }
  start vllm-router "$VLLM_VENV/bin/vllm-router" --host 127.0.0.1 --port 8500 \
    --vllm-pd-disaggregation --prefill http://127.0.0.1:8101 --decode http://127.0.0.1:8102 \
    --kv-connector nixl --policy round_robin
  wait_ready http://127.0.0.1:8500 60 && measure vllm http://127.0.0.1:8500
  stop_all
}
for system in ${*:-tandem vllm vllm tandem}; do
  "run_$system"
done
.venv/bin/python - "$RESULTS" <<'EOF'
import json, sys
print("| system | C | seed | out tok/s | TTFT p50 / p90 s | ITL p50 ms | TPOT p50 ms | load 1/5/15 | at |")
print("|---|---:|---:|---:|---|---:|---:|---|---|")
for line in open(sys.argv[1]):
    r = json.loads(line)
    s = r["result"]
    if not s["completed"]:
        print(f"| {r['system']} | {r['concurrency']} | {r['seed']} | failed: {s['errors'][:1]} |")
        continue
    print(f"| {r['system']} | {r['concurrency']} | {r['seed']} "
          f"| {s['output_token_throughput_tps']:.1f} "
          f"| {s['ttft_s']['p50']:.2f} / {s['ttft_s']['p90']:.2f} "
          f"| {s['itl_s']['p50'] * 1e3:.0f} | {s['tpot_s']['p50'] * 1e3:.0f} "
          f"| {r['load']} | {r['at']} |")
EOF
