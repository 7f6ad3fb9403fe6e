"""KV hand-off into a tensor-parallel decode worker (issue 10, acceptance 2).

Phases, each worker a `python -m prefill_worker|decode_worker` process with its own
CUDA_VISIBLE_DEVICES (ranks of a TP worker are its children), driven over gRPC (no router):

  ref     prefill P0 (TP=1, prefill GPU 0) -> decode TP=1 (decode GPU 0): the reference tokens
  hetero  prefill P0..Pn-1 (TP=1, one per prefill GPU) -> decode TP=T (the T decode GPUs),
          requests spread round-robin over the prefill workers (head-sliced sends)
  equal   (--equal) prefill TP=T (the prefill GPUs) -> the same decode TP=T (rank to rank)

Each phase: the prompts one at a time (greedy, max_tokens new tokens: every prefill and decode
step holds that request alone, so the arithmetic is the same in every phase whatever the timing),
then the same prompts as one concurrent batch (whose steps' composition follows arrival times),
each pass's token ids compared with the reference's, then `--bw-requests` sequential prompts
of `--bw-tokens` tokens whose KV transfer time (the prefill worker's send() to SendDone,
reported per request) gives the bandwidth: the prompt's KV bytes (all heads) / that time. The
prefill workers' metrics (tandem_worker_kv_transfer_bytes_total / _seconds_sum) give the same
over the whole phase.
Prints a table and one JSON line ("tp_handoff {...}"). Processes are stopped by PID.
--tp-invariant-shards S and --no-prefix-caching reach every worker: bf16 text identical across TP
sizes needs the first (engine/tp_invariant.py); the second keeps a repeated prompt from being
prefilled as a short chunk over a cached prefix (other GEMM shapes: another rounding).

    python -m bench.tp_handoff --model DIR --prefill-gpus 0,1 --decode-gpus 2,3 \\
        --load-format dummy --dtype bfloat16 --out DIR [--equal]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Worker:
    name: str
    role: str
    proc: subprocess.Popen[str]
    log: Path
    address: str = ""
    ready: threading.Event = field(default_factory=threading.Event)


def start(name: str, role: str, args: list[str], gpus: str | None, out: Path) -> Worker:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    log = out / f"{name}.log"
    module = "prefill_worker" if role == "prefill" else "decode_worker"
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args, "--worker-id", name, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    w = Worker(name, role, proc, log)

    def read() -> None:
        assert proc.stdout is not None
        with log.open("w") as f:
            for line in proc.stdout:
                parts = line.split()
                if len(parts) == 3 and parts[0] == "READY" and not w.ready.is_set():
                    w.address = parts[2]
                    w.ready.set()
                f.write(line)
                f.flush()

    threading.Thread(target=read, daemon=True).start()
    return w


def wait_ready(workers: list[Worker], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for w in workers:
        while not w.ready.wait(0.5):
            if w.proc.poll() is not None:
                raise RuntimeError(f"{w.name} exited with {w.proc.returncode}; see {w.log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{w.name} not ready after {timeout_s} s; see {w.log}")


def stop(workers: list[Worker], timeout_s: float = 60.0) -> None:
    """SIGTERM each worker by PID (rank 0 stops its ranks), SIGKILL what is left."""
    for w in workers:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for w in workers:
        try:
            w.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()


@dataclass
class Result:
    tokens: list[int]
    kv_transfer_s: float
    prefill_s: float


async def generate(
    decode: Worker, prefills: list[Worker], prompts: list[list[int]], max_tokens: int,
    concurrent: bool, tag: str,
) -> list[Result]:  # fmt: skip
    async with grpc.aio.insecure_channel(decode.address) as channel:
        stub = pb_grpc.DecodeWorkerStub(channel)

        async def one(i: int, prompt: list[int]) -> Result:
            prefill = prefills[i % len(prefills)]
            req = pb.GenerateRequest(
                request_id=f"{tag}-{i}",
                prompt_token_ids=prompt,
                sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
            )
            req.prefill.remote.prefill_worker_id = prefill.name
            req.prefill.remote.prefill_address = prefill.address
            tokens: list[int] = []
            kv_s = prefill_s = 0.0
            async for msg in stub.Generate(req, timeout=600):
                if not tokens:
                    prefill_s = msg.prefill_s
                # on the first message after the KV landed (the first token goes out before it)
                kv_s = max(kv_s, msg.kv_transfer_s)
                tokens.extend(msg.token_ids)
            return Result(tokens, kv_s, prefill_s)

        if concurrent:
            return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
        return [await one(i, p) for i, p in enumerate(prompts)]


def scrape(w: Worker, names: tuple[str, ...]) -> dict[str, float]:
    """Sums of the worker's Prometheus series `names` (all label sets)."""

    async def health() -> str:
        async with grpc.aio.insecure_channel(w.address) as channel:
            stub: Any = (
                pb_grpc.DecodeWorkerStub if w.role == "decode" else pb_grpc.PrefillWorkerStub
            )(channel)
            reply = await stub.Health(pb.HealthRequest(), timeout=10)
            return str(reply.metrics_address)

    text = urllib.request.urlopen(f"http://{asyncio.run(health())}/metrics", timeout=10).read()
    out = {}
    for name in names:
        pattern = re.compile(rf"^{name}(?:{{[^}}]*}})? (\S+)$", re.M)
        out[name] = sum(float(v) for v in pattern.findall(text.decode()))
    return out


KV_SERIES = (
    "tandem_worker_kv_transfer_bytes_total",
    "tandem_worker_kv_transfer_seconds_sum",
    "tandem_worker_kv_transfer_seconds_count",
)
FALLBACKS = ("tandem_worker_remote_prefill_fallbacks_total",)


def block_bytes(model_dir: Path, dtype: str, block_size: int) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return cfg["num_hidden_layers"] * 2 * block_size * kv_heads * head_dim * DTYPE_BYTES[dtype]


def run_phase(
    name: str, decode: Worker, prefills: list[Worker], ns: argparse.Namespace,
    prompts: list[list[int]], bw_prompts: list[list[int]], reference: dict[str, Any] | None,
) -> dict[str, Any]:  # fmt: skip
    before = [scrape(p, KV_SERIES) for p in prefills]
    fallbacks0 = scrape(decode, FALLBACKS)[FALLBACKS[0]]
    alone = asyncio.run(generate(decode, prefills, prompts, ns.max_tokens, False, f"{name}-seq"))
    t0 = time.monotonic()
    results = asyncio.run(generate(decode, prefills, prompts, ns.max_tokens, True, name))
    batch_s = time.monotonic() - t0
    bw = asyncio.run(generate(decode, prefills, bw_prompts, 1, False, f"{name}-bw"))
    after = [scrape(p, KV_SERIES) for p in prefills]
    d = {k: sum(a[k] - b[k] for a, b in zip(after, before, strict=True)) for k in KV_SERIES}
    bb = block_bytes(Path(ns.model), ns.dtype, ns.block_size)
    kv_bytes = -(-ns.bw_tokens // ns.block_size) * bb
    rates = [kv_bytes / r.kv_transfer_s / 1e9 for r in bw if r.kv_transfer_s > 0]
    tokens = [r.tokens for r in results]
    tokens_alone = [r.tokens for r in alone]
    out: dict[str, Any] = {
        "phase": name,
        "decode": decode.name,
        "prefill": [p.name for p in prefills],
        "batch_s": round(batch_s, 3),
        "tokens": tokens,
        "tokens_alone": tokens_alone,
        "fallbacks": scrape(decode, FALLBACKS)[FALLBACKS[0]] - fallbacks0,
        "metrics_kv_bytes": d[KV_SERIES[0]],
        "metrics_kv_seconds": d[KV_SERIES[1]],
        "metrics_kv_transfers": d[KV_SERIES[2]],
        "metrics_gbps": d[KV_SERIES[0]] / d[KV_SERIES[1]] / 1e9 if d[KV_SERIES[1]] else None,
        "bw_prompt_bytes": kv_bytes,
        "bw_transfer_ms": [round(r.kv_transfer_s * 1e3, 3) for r in bw],
        "bw_gbps_median": statistics.median(rates) if rates else None,
    }
    if reference is not None:
        for key, suffix in (("tokens", ""), ("tokens_alone", "_alone")):
            same = [a == b for a, b in zip(out[key], reference[key], strict=True)]
            out[f"identical{suffix}"] = f"{sum(same)}/{len(same)}"
            out[f"first_difference{suffix}"] = [
                next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
                for a, b in zip(out[key], reference[key], strict=True)
            ]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--prefill-gpus", default="0,1", help="one TP=1 prefill worker per GPU")
    p.add_argument("--decode-gpus", default="2,3", help="the decode worker's ranks (TP = count)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--kv-cache-gib", type=float, default=8.0)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=32, help="also bounds CUDA graph buckets")
    p.add_argument("--num-threads", type=int, default=None, help="CPU rehearsal: torch threads")
    p.add_argument("--prompt-lens", default="3000,1500,700,300,100,40,17,5")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--bw-tokens", type=int, default=3000)
    p.add_argument("--bw-requests", type=int, default=6)
    p.add_argument("--equal", action="store_true", help="also TP=T prefill -> TP=T decode")
    p.add_argument("--tp-invariant-shards", type=int, default=None, help="every worker's")
    p.add_argument("--no-prefix-caching", action="store_true", help="every worker's")
    p.add_argument("--start-timeout-s", type=float, default=300.0)
    p.add_argument("--out", default="tp_handoff_out")
    ns = p.parse_args()
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = ns.device.startswith("cuda")
    pgpus, dgpus = ns.prefill_gpus.split(","), ns.decode_gpus.split(",")
    tp = len(dgpus)
    common = [
        "--model", ns.model, "--device", ns.device, "--dtype", ns.dtype,
        "--load-format", ns.load_format, "--kv-cache-gib", str(ns.kv_cache_gib),
        "--block-size", str(ns.block_size), "--max-model-len", str(ns.max_model_len),
        "--max-num-seqs", str(ns.max_num_seqs),
    ]  # fmt: skip
    if ns.num_threads is not None:
        common += ["--num-threads", str(ns.num_threads)]
    if ns.tp_invariant_shards is not None:
        common += ["--tp-invariant-shards", str(ns.tp_invariant_shards)]
    if ns.no_prefix_caching:
        common.append("--no-prefix-caching")
    rng = random.Random(7)
    prompts = [
        [rng.randrange(100, 40000) for _ in range(int(n))] for n in ns.prompt_lens.split(",")
    ]

    def bw_prompts() -> list[list[int]]:  # fresh ids each phase: no prefix-cache hit
        return [
            [rng.randrange(100, 40000) for _ in range(ns.bw_tokens)] for _ in range(ns.bw_requests)
        ]

    started: list[Worker] = []

    def launch(name: str, role: str, gpus: list[str], size: int = 1) -> Worker:
        args = [*common, "--tensor-parallel-size", str(size)]
        w = start(name, role, args, ",".join(gpus) if gpu else None, out)
        started.append(w)
        return w

    phases = []
    try:
        t0 = time.monotonic()
        p1s = [launch(f"prefill-{i}", "prefill", [g]) for i, g in enumerate(pgpus)]
        ref_decode = launch("decode-tp1", "decode", dgpus[:1])
        wait_ready([*p1s, ref_decode], ns.start_timeout_s)
        print(f"ref workers ready in {time.monotonic() - t0:.1f} s", flush=True)
        ref = run_phase("ref", ref_decode, p1s[:1], ns, prompts, bw_prompts(), None)
        phases.append(ref)
        stop([ref_decode])
        t0 = time.monotonic()
        decode = launch(f"decode-tp{tp}", "decode", dgpus, tp)
        wait_ready([decode], ns.start_timeout_s)
        print(f"TP={tp} decode ready in {time.monotonic() - t0:.1f} s", flush=True)
        phases.append(run_phase("hetero", decode, p1s, ns, prompts, bw_prompts(), ref))
        if ns.equal:
            stop(p1s)
            t0 = time.monotonic()
            ptp = launch(f"prefill-tp{tp}", "prefill", pgpus[:tp], tp)
            wait_ready([ptp], ns.start_timeout_s)
            print(f"TP={tp} prefill ready in {time.monotonic() - t0:.1f} s", flush=True)
            phases.append(run_phase("equal", decode, [ptp], ns, prompts, bw_prompts(), ref))
    finally:
        stop(started)

    print(f"\n{ns.model} {ns.dtype}, prompts {ns.prompt_lens} x {ns.max_tokens} greedy tokens, "
          f"tp_invariant_shards {ns.tp_invariant_shards}")  # fmt: skip
    print("| phase | prefill -> decode | greedy vs ref: alone, batch | fallbacks | KV GB/s (per "
          f"request, {ns.bw_tokens} tok, median) | KV GB/s (metrics) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for ph in phases:
        gbps = ph["bw_gbps_median"]
        mgbps = ph["metrics_gbps"]
        print(
            f"| {ph['phase']} | {'+'.join(ph['prefill'])} -> {ph['decode']} | "
            f"{ph.get('identical_alone', 'ref')}, {ph.get('identical', 'ref')} | "
            f"{ph['fallbacks']:.0f} | "
            f"{gbps and f'{gbps:.2f}'} ({ph['bw_transfer_ms']} ms) | {mgbps and f'{mgbps:.2f}'} |"
        )
    summary = {
        "model": ns.model, "dtype": ns.dtype, "decode_tp": tp,
        "tp_invariant_shards": ns.tp_invariant_shards, "prefix_caching": not ns.no_prefix_caching,
        "phases": phases,
    }  # fmt: skip
    (out / f"tp_handoff_{Path(ns.model).name}_{ns.dtype}.json").write_text(json.dumps(summary))
    brief = [{k: v for k, v in ph.items() if not k.startswith("tokens")} for ph in phases]
    print("tp_handoff " + json.dumps({**summary, "phases": brief}))


if __name__ == "__main__":
    main()
