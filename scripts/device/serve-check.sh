#!/usr/bin/env bash
# On nvidia-h200-x2 (issue 5, acceptance 3): `tandem serve` on an embedded Ray cluster, one
# prefill and one decode worker, each placed by Ray on its own GPU; KV goes prefill -> decode
# over NIXL (UCX cuda_ipc over NVLink); chat requests answered. Writes $OUT/serve.log and
# $OUT/serve-check.txt. Carry: .whl (core + serve bundles), .devmodel (scripts/device/stage-model.sh).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p /tmp/model && tar -xJf .devmodel/smollm2-135m-instruct.tar.xz -C /tmp/model
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 \
  HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false NIXL_LOG_LEVEL=WARN UCX_LOG_LEVEL=warn \
  PYTHONUNBUFFERED=1
# UCX prints the protocol it picks for each new operation: shows the WRITE going over cuda_ipc.
export UCX_PROTO_INFO=y
MODEL=/tmp/model/smollm2-135m-instruct
python3 -m deploy.cli serve --model "$MODEL" --load-format dummy --port 8000 --prefill 1 \
  --decode 1 --mode disagg --launcher ray >"$OUT/serve.log" 2>&1 &
PID=$!
for _ in $(seq 240); do
  grep -q "Tandem is serving" "$OUT/serve.log" && break
  kill -0 $PID 2>/dev/null || break
  sleep 1
done
{
  echo "\$ python3 -m deploy.cli serve --model $MODEL --load-format dummy --port 8000 --prefill 1 --decode 1 --mode disagg --launcher ray"
  grep -E "Tandem is serving|gpus [0-9]|READY|placed|CUDA_VISIBLE" "$OUT/serve.log" | head -20
  echo
  timeout 240 python3 scripts/device/serve-check.py http://127.0.0.1:8000 smollm2-135m-instruct
  echo
  echo "UCX's protocol choice for the KV WRITE (the workers' UCX_PROTO_INFO tables):"
  sed 's/\x1b\[[0-9;]*m//g' "$OUT/serve.log" | grep -B3 "cuda_ipc/cuda" | cut -c1-170 | head -12
} >"$OUT/serve-check.txt" 2>&1
kill -INT $PID 2>/dev/null
for _ in $(seq 30); do kill -0 $PID 2>/dev/null || break; sleep 1; done
kill -KILL $PID 2>/dev/null
cat "$OUT/serve-check.txt"
