#!/usr/bin/env bash
# On nvidia-h200-x2 (issue 3, acceptance 3): what moves a 3,000-token Llama-3.1-8B KV (188 x 2 MiB
# blocks) from cuda:0 to cuda:1 fastest through bench.kv_transfer (NIXL, UCX cuda_ipc): the link's
# own floor, then one bench run per configuration. Writes $OUT/sweep.log and $OUT/sweep.jsonl.
# Carry: .whl (core bundle: nixl). Extra bench flags for every run: KV_SWEEP_FLAGS.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export NIXL_LOG_LEVEL=WARN UCX_LOG_LEVEL=warn PYTHONUNBUFFERED=1
LOG=$OUT/sweep.log
{ nvidia-smi topo -m; nproc; } >"$LOG" 2>&1
echo "== floor (torch, one process)" >>"$LOG"
timeout 120 python3 scripts/device/nvlink_floor.py >>"$LOG" 2>&1
BASE="--backend nixl --device cuda --source-device cuda:0 --sink-device cuda:1 --layout llama-3.1-8b --json"
T20="--progress-interval-us 20"
run() {  # name, env assignments ("-" for none), bench flags
  local name=$1 envs=$2; shift 2
  echo "== $name  env: $envs  flags: $*" >>"$LOG"
  local e=(); [ "$envs" != "-" ] && read -ra e <<<"$envs"
  env "${e[@]}" timeout 150 python3 -m bench.kv_transfer $BASE ${KV_SWEEP_FLAGS:-} "$@" \
    >"$OUT/_one.json" 2>>"$LOG"
  python3 - "$name" "$envs" "$OUT/_one.json" >>"$OUT/sweep.jsonl" 2>>"$LOG" <<'PY'
import json, sys
r = json.load(open(sys.argv[3]))
for row in r["results"]:
    print(json.dumps({"name": sys.argv[1], "env": sys.argv[2], "tuning": r["nixl_tuning_overrides"],
                      "scatter": r["scatter"], **row}))
PY
  [ "$name" = accept ] && cp "$OUT/_one.json" "$OUT/accept.json"
}
# The first sweep (docs/benchmarks.md, "GPU: what moves the KV fastest") ran, with the defaults
# of then (no SGL, 0.2 ms tick) and --tokens 3000,8000 --repeat 10: base; tick20 ($T20);
# t2/t4/t8 ($T20 --nixl-threads N --nixl-split 16/16/8); t4-proto-v1 (UCX_PROTO_ENABLE=n);
# sgl (NIXL_UCX_SGL_ENABLE=1 $T20); runs8 ($T20 --block-runs 8); runs8-t4; contiguous
# ($T20 --block-runs 0). The second (defaults SGL + 20 us): accept; runs8; contiguous; no-sgl
# (--nixl-sgl 0); sgl-tick200; sgl-t4 (--nixl-threads 4 --nixl-split 16). Now (early claims,
# prepared descriptor lists): accept; prepped; late-claim; prepped-late; prepped-runs8;
# prepped-contig (--nixl-prepped 1, --claim late, --block-runs 8/0). Now (send() only posts, the
# `write` hint after the post; a transfer cut into NIXL WRITEs posted back to back): the acceptance
# run, 2/4/8 parts, and NIXL's thread pool with SGL + prepared lists (never measured together).
if [ -n "${KV_SWEEP_RUNS:-}" ]; then eval "$KV_SWEEP_RUNS"; else
A="--tokens 1000,3000,8000,32000 --repeat 10"
S="--tokens 3000,8000 --repeat 10"
run accept - $A
run parts2 - $A --nixl-parts 2
run parts4 - $A --nixl-parts 4
run parts8 - $S --nixl-parts 8
run t4 - $S --nixl-threads 4 --nixl-split 16
fi
echo "== summary (median latency ms, GiB/s; claim seen by the sink, post called/returned, source done: ms after send())" >>"$LOG"
python3 - "$OUT/sweep.jsonl" >>"$LOG" 2>&1 <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['name']:>14} {r['tokens']:>6} tok {r['descriptors']:>4} desc  "
          f"{r['latency_ms']['median']:6.2f} ms (min {r['latency_ms']['min']:.2f})  "
          f"{r['bandwidth_gib_s']['median']:6.1f} GiB/s  claim {r['claim_seen_ms_median']:.2f}  "
          f"early claim {r.get('claim_ms_median') or float('nan'):.2f}  "
          f"init {r['in_initialize_xfer_ms_median']:.2f} xfer {r['in_transfer_ms_median']:.2f}  "
          f"post {r['post_called_ms_median']:.2f}/"
          f"{r['post_returned_ms_median']:.2f}  done {r['source_done_ms_median']:.2f}  "
          f"ok={r['verified_byte_for_byte']}")
PY
rm -f "$OUT/_one.json"
tail -40 "$LOG"
