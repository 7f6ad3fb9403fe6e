"""KV bytes shipped per turn of multi-turn conversations in disagg (one prefill + one decode
worker, started here as processes; CPU or GPU).

Turn k+1's prompt is turn k's prompt + the answer the decode worker generated for it + new user
tokens, as a chat client's would be (token ids, greedy). Every turn is a remote prefill: the
decode worker's Generate with a remote plan, the router's path in disagg mode. After each turn
the decode worker's Prometheus series give the KV bytes that landed
(tandem_worker_kv_transfer_bytes_total) and the prompt blocks it took from its own prefix cache
(tandem_worker_kv_reused_blocks_total; 0 where the series does not exist, before it did).

Runs against whichever source tree it is imported from (the workers are that tree's), so the
same file measures an older commit too (docs/benchmarks.md gives the commands).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import time
import urllib.request
from dataclasses import asdict, dataclass

import grpc

from deploy.local_cluster import Child, spawn, stop_children, wait_ready
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc

BYTES = "tandem_worker_kv_transfer_bytes_total"
REUSED = "tandem_worker_kv_reused_blocks_total"


@dataclass(frozen=True, slots=True)
class Turn:
    conversation: int
    turn: int
    prompt_tokens: int
    kv_bytes: int  # landed on the decode worker for this turn
    reused_blocks: int  # prompt blocks the decode worker had in its own prefix cache
    cached_tokens: int  # usage.cached_tokens of the response
    kv_transfer_s: float  # the prefill worker's KV write, as the response reports it


def _metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


async def _scrape(decode: Child) -> str:
    async with grpc.aio.insecure_channel(decode.address) as channel:
        health = await pb_grpc.DecodeWorkerStub(channel).Health(pb.HealthRequest(), timeout=10)
    url = f"http://{health.metrics_address}/metrics"
    return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())


async def _turn(
    decode: Child, prefill: Child, rid: str, prompt: list[int], osl: int
) -> tuple[list[int], pb.Usage, float]:
    req = pb.GenerateRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling=pb.SamplingParams(max_tokens=osl, temperature=0.0, ignore_eos=True),
    )
    req.prefill.remote.prefill_worker_id = prefill.name
    req.prefill.remote.prefill_address = prefill.address
    tokens: list[int] = []
    usage, kv_transfer_s = pb.Usage(), 0.0
    async with grpc.aio.insecure_channel(decode.address) as channel:
        async for msg in pb_grpc.DecodeWorkerStub(channel).Generate(req, timeout=600):
            # on the first message after the KV landed (the first token goes out before it)
            kv_transfer_s = max(kv_transfer_s, msg.kv_transfer_s)
            tokens.extend(msg.token_ids)
            if msg.finished:
                usage = msg.usage
    return tokens, usage, kv_transfer_s


async def run(ns: argparse.Namespace, prefill: Child, decode: Child) -> list[Turn]:
    turns: list[Turn] = []
    text = await _scrape(decode)
    for c in range(ns.conversations):
        rng = random.Random(f"multiturn_kv/{ns.seed}/{c}")
        prompt = rng.choices(range(1000, 10000), k=ns.isl)
        for t in range(ns.turns):
            before = text
            answer, usage, kv_s = await _turn(decode, prefill, f"c{c}-t{t}", prompt, ns.osl)
            text = await _scrape(decode)
            turns.append(
                Turn(
                    c,
                    t,
                    len(prompt),
                    int(_metric(text, BYTES) - _metric(before, BYTES)),
                    int(_metric(text, REUSED) - _metric(before, REUSED)),
                    usage.cached_tokens,
                    kv_s,
                )
            )
            prompt = prompt + answer + rng.choices(range(1000, 10000), k=ns.user_tokens)
    return turns


def main() -> None:
    p = argparse.ArgumentParser(prog="bench.multiturn_kv", description=__doc__)
    p.add_argument("--model", default=None, help="model dir (default: SmolLM2-135M-Instruct)")
    p.add_argument("--conversations", type=int, default=2)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--isl", type=int, default=512, help="first turn's prompt tokens")
    p.add_argument("--osl", type=int, default=32, help="answer tokens per turn")
    p.add_argument("--user-tokens", type=int, default=64, help="new user tokens per later turn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker-args", default="--num-blocks 512 --max-model-len 2048")
    p.add_argument("--out", default=None, help="write the turns as JSON here")
    ns = p.parse_args()
    model = ns.model
    if model is None:
        from engine.default_model import default_cache_dir, ensure_default_model

        model = str(ensure_default_model(default_cache_dir()))
    args = ["--model", model, "--port", "0", *ns.worker_args.split()]
    children = [
        spawn("prefill-0", "prefill_worker", [*args, "--worker-id", "prefill-0"]),
        spawn("decode-0", "decode_worker", [*args, "--worker-id", "decode-0"]),
    ]
    started = time.monotonic()
    try:
        for child in children:
            wait_ready(child, 300)
        turns = asyncio.run(run(ns, *children))
    finally:
        stop_children(children)
    print(f"{len(turns)} turns in {time.monotonic() - started:.1f} s (incl. start-up)")
    print("| turn | prompt tokens | KV MB landed | blocks reused on decode | cached_tokens |")
    print("|---:|---:|---:|---:|---:|")
    for t in range(ns.turns):
        rows = [r for r in turns if r.turn == t]
        mb = sum(r.kv_bytes for r in rows) / len(rows) / 1e6
        print(
            f"| {t + 1} | {sum(r.prompt_tokens for r in rows) / len(rows):.0f} | {mb:.2f} | "
            f"{sum(r.reused_blocks for r in rows) / len(rows):.1f} | "
            f"{sum(r.cached_tokens for r in rows) / len(rows):.0f} |"
        )
    total = sum(r.kv_bytes for r in turns) / 1e6
    print(f"total KV bytes landed: {total:.2f} MB over {len(turns)} turns")
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump([asdict(r) for r in turns], f, indent=1)


if __name__ == "__main__":
    main()
