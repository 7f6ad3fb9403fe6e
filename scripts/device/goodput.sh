#!/usr/bin/env bash
# Issue 8 on nvidia-h200-x2: goodput of disagg (1 prefill + 1 decode), collocated (2 workers,
# chunked prefill) and auto, back to back on the same two GPUs, Llama-3.1-8B shape, dummy
# weights, bf16. For each deployment: `tandem serve` (Ray launcher: one GPU per worker), wait
# for it, `python3 -m bench.goodput run` per workload, the router's and workers' metrics (KV
# transfer seconds), then SIGINT to `tandem serve` (it stops its router and workers) and wait
# until the GPUs are empty. Writes $OUT/summary.txt (tables) and $OUT/goodput.tar.gz (JSON,
# logs, metrics), refreshed after every deployment, so a run cut short still returns its part.
#
# Carry: .whl (gpu_core: ray + nixl, gpu_serve: fastapi/pydantic/uvicorn/protobuf). The model
# directory is built there: config from $MODEL_CONFIG + a word-level tokenizer of its vocab
# (scripts/device/dummy_model_dir.py). Knobs (environment):
#   DEPLOYS     "label:mode:prefill:decode ..."   (default: collocated, disagg, auto on 2 GPUs)
#   WORKLOADS   "3k150 8k1k multiturn" subset      (default 3k150)
#   RATES_<wl>  comma-separated req/s per workload (RATES_3k150, RATES_8k1k, RATES_multiturn);
#               RATES_<wl>_<label> for one deployment only (e.g. RATES_3k150_2p2d)
#   DURATION_S  arrival span per rate (12); MIN_REQUESTS (8)
#   (the summary's metrics are cumulative per deployment: a later workload's include the earlier's)
#   SERVE_ARGS  engine/launcher flags for every deployment
#   DEADLINE_S  whole-script budget (540): a deployment that cannot finish in time is skipped
#   MODE_MIN_S  seconds a deployment needs at least (start + one sweep) (150)
#   BENCH_ARGS  extra flags of bench.goodput run (SLOs)
#   PROBE_N     low-load probe: requests one at a time (24; 0: none), PROBE_ISL (3000), PROBE_OSL (16)
# Rehearsal on a CPU box: see docs/benchmarks.md "Goodput on two GPUs (issue 8)".
set -u
T0=$(date +%s)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
R=${WORKDIR:-/tmp/gp-run}/r; rm -rf "$R"; mkdir -p "$R"  # packed into $OUT (at most 8 files come back)
DEPLOYS=${DEPLOYS:-"collocated:collocated:0:2 disagg:disagg:1:1 auto:auto:1:1"}
WORKLOADS=${WORKLOADS-3k150}  # "" : the probe alone
DURATION_S=${DURATION_S:-12}; MIN_REQUESTS=${MIN_REQUESTS:-8}
DEADLINE_S=${DEADLINE_S:-540}; MODE_MIN_S=${MODE_MIN_S:-150}
MODEL_CONFIG=${MODEL_CONFIG:-engine/model_configs/llama-3.1-8b}
SERVE_ARGS=${SERVE_ARGS:-"--launcher ray --load-format dummy --dtype bfloat16 --kv-cache-gib 60 --max-model-len 10240"}
BENCH_ARGS=${BENCH_ARGS:-"--slo-ttft 1 --slo-itl 0.020 --slo-ttft-loose 2 --slo-itl-loose 0.050"}
: "${RATES_3k150:=1,4,6,8,10,12}" "${RATES_8k1k:=0.5,1,2,3,4,5}" "${RATES_multiturn:=2,4,8,12,16}"
PROBE_N=${PROBE_N:-24}; PROBE_ISL=${PROBE_ISL:-3000}; PROBE_OSL=${PROBE_OSL:-16}
PY=${PY:-python3}

if [ -d .whl ] && [ -z "${NO_BUNDLES:-}" ]; then
  mkdir -p /tmp/site
  for b in .whl/gpu_core_py312.tar.xz .whl/gpu_serve_py312.tar.xz; do tar -xJf "$b" -C /tmp/site; done
  export PYTHONPATH=$PWD:/tmp/site
fi
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 \
  HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false NIXL_LOG_LEVEL=WARN UCX_LOG_LEVEL=warn \
  PYTHONUNBUFFERED=1
# fail fast on a module the image and the bundles lack (every process imports its own at start)
$PY -c "import httptools, uvloop, fastapi, uvicorn, grpc, ray, nixl_cu13._api, router.__main__, \
prefill_worker.__main__, decode_worker.__main__" || exit 1
MODEL=/tmp/gp-model/$(basename "$MODEL_CONFIG")
$PY scripts/device/dummy_model_dir.py "$MODEL_CONFIG" "$MODEL" >/dev/null || exit 1
{ date -u; nvidia-smi -L 2>&1; nvidia-smi topo -m 2>&1; uptime; nproc; } >"$R/machine.txt"

elapsed() { echo $(( $(date +%s) - T0 )); }
pack() { tar -C "$(dirname "$R")" -czf "$OUT/goodput.tar.gz.tmp" r && mv "$OUT/goodput.tar.gz.tmp" "$OUT/goodput.tar.gz"; }
gpus_empty() {  # wait (<= 60 s) until no process holds GPU memory
  command -v nvidia-smi >/dev/null || return 0
  for _ in $(seq 60); do
    [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null)" ] && return 0
    sleep 1
  done
  echo "GPUs still held: $(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader)"
}

PORT=8100
for deploy in $DEPLOYS; do
  IFS=: read -r LABEL MODE NP ND <<<"$deploy"
  if [ $(( DEADLINE_S - $(elapsed) )) -lt "$MODE_MIN_S" ]; then
    echo "[$(elapsed)s] skip $LABEL: $(( DEADLINE_S - $(elapsed) )) s left" | tee -a "$R/skipped.txt"
    continue
  fi
  PORT=$((PORT + 1)); URL=http://127.0.0.1:$PORT
  # shellcheck disable=SC2086
  $PY -m deploy.cli serve --model "$MODEL" --port $PORT --prefill "$NP" --decode "$ND" \
    --mode "$MODE" $SERVE_ARGS >"$R/serve-$LABEL.log" 2>&1 &
  PID=$!
  echo "[$(elapsed)s] $LABEL: tandem serve --mode $MODE --prefill $NP --decode $ND (pid $PID)"
  for _ in $(seq 300); do
    grep -q "Tandem is serving" "$R/serve-$LABEL.log" && break
    kill -0 $PID 2>/dev/null || break
    [ $(( DEADLINE_S - $(elapsed) )) -lt 30 ] && break
    sleep 1
  done
  if grep -q "Tandem is serving" "$R/serve-$LABEL.log"; then
    echo "[$(elapsed)s] $LABEL serving"; grep -E "^  (prefill|decode)-" "$R/serve-$LABEL.log"
    if [ "$PROBE_N" -gt 0 ]; then
      # low load: one request at a time (TTFT with no queueing), metrics before and after so
      # that the differences split TTFT into its parts (prefill, KV transfer, the rest)
      timeout 20 $PY scripts/device/scrape_metrics.py "$URL" "$R/probe-$LABEL-before.txt"
      timeout 120 $PY -m bench.serve --url "$URL" --isl "$PROBE_ISL" --osl "$PROBE_OSL" \
        --num-requests "$PROBE_N" --concurrency 1 --warmup-requests 2 --seed 5 --json \
        >"$R/probe-$LABEL.json" 2>"$R/probe-$LABEL.log"
      echo "[$(elapsed)s] $LABEL probe rc=$?"
      timeout 20 $PY scripts/device/scrape_metrics.py "$URL" "$R/probe-$LABEL-after.txt"
    fi
    for wl in $WORKLOADS; do
      left=$(( DEADLINE_S - $(elapsed) - 25 ))
      [ $left -lt 40 ] && { echo "[$(elapsed)s] skip $LABEL/$wl: ${left}s left" | tee -a "$R/skipped.txt"; continue; }
      rates_var=RATES_${wl}_$LABEL  # a deployment's own rates, else the workload's
      [ -n "${!rates_var:-}" ] || rates_var=RATES_$wl
      # shellcheck disable=SC2086
      timeout -s INT $left $PY -m bench.goodput run --url "$URL" --workload "$wl" \
        --rates "${!rates_var}" --duration-s "$DURATION_S" --min-requests "$MIN_REQUESTS" \
        --label "$LABEL" --timeout-s 120 $BENCH_ARGS --out "$R/$LABEL-$wl.json" \
        >/dev/null 2>"$R/bench-$LABEL-$wl.log"
      echo "[$(elapsed)s] $LABEL/$wl rc=$?"; cat "$R/bench-$LABEL-$wl.log" | tail -n 12
      timeout 20 $PY scripts/device/scrape_metrics.py "$URL" "$R/metrics-$LABEL-$wl.txt" \
        || echo "metrics of $LABEL/$wl not scraped"
    done
  else
    echo "[$(elapsed)s] $LABEL did not start:"; tail -n 30 "$R/serve-$LABEL.log"
  fi
  kill -INT $PID 2>/dev/null
  for _ in $(seq 40); do kill -0 $PID 2>/dev/null || break; sleep 1; done
  kill -KILL $PID 2>/dev/null && echo "$LABEL: tandem serve killed after 40 s"
  wait $PID 2>/dev/null
  gpus_empty
  echo "[$(elapsed)s] $LABEL stopped"
  pack
done

{
  for wl in $WORKLOADS; do
    files=$(ls "$R"/*-"$wl".json 2>/dev/null)
    # shellcheck disable=SC2086
    [ -n "$files" ] && $PY -c "
import json, sys
from bench.goodput import format_table
print(format_table([json.load(open(p)) for p in sys.argv[1:]]))" $files
    echo
  done
  for f in "$R"/probe-*-after.txt; do
    [ -f "$f" ] || continue
    $PY scripts/device/ttft_parts.py "${f%-after.txt}-before.txt" "$f" "${f%-after.txt}.json"
  done
  for f in "$R"/metrics-*.txt; do
    [ -f "$f" ] || continue
    echo "$(basename "$f"):"
    grep -E "^tandem_worker_kv_transfer_(seconds|bytes)|^tandem_router_route_decisions_total|remote_prefill_fallbacks|^tandem_router_worker_prefill_tokens_per_second|^tandem_router_(cached_)?prompt_tokens_total|^tandem_router_prefix_(query|hit)_blocks_total" "$f" | sed 's/^/  /'
  done
} >"$OUT/summary.txt" 2>&1
pack
cat "$OUT/summary.txt"
echo "[$(elapsed)s] done"
