"""Issue 9, acceptance 1: chaos. Real processes on loopback (router, 2 prefill and 2 decode
workers of a tiny random Llama with SmolLM2's tokenizer), disaggregated, with requests in flight
while decode and prefill workers are killed with SIGKILL and restarted (re-registered with the
router at their new address through /admin/workers).

Every request must end one of three ways: completed with the greedy text of a fault-free run
(migrated ones included) and the right usage; a clean error (an OpenAI error body with a status
other than 500, or an SSE error event followed by [DONE]); or aborted by the client on purpose.
None may hang (client-side timeout). Afterwards every worker, restarted ones included, audits
its KV blocks (Load with audit_blocks): free + cached + used == total, every used block has an
owner, and none is used once idle.

The counts are printed (run with -s to see them) and recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from deploy.local_cluster import ClusterConfig, LocalCluster
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

NUM_REQUESTS = int(os.environ.get("CHAOS_REQUESTS", "500"))
RATE = 10.0  # requests started per second (open loop)
CONCURRENCY = 32  # at most this many open at once
HELD_BACK = 50  # the last requests start only once every kill has happened
FAULTS_PER_POOL = 2  # kill -9 + restart, each worker of each pool once
ABORT_FRACTION = 0.2  # requests the client gives up on after a random delay
CLIENT_TIMEOUT_S = 90.0  # a request still open after this long counts as hung
NUM_BLOCKS = 256
WORKER_ARGS = ("--num-blocks", str(NUM_BLOCKS), "--max-model-len", "512", "--block-size", "16")


@dataclass(frozen=True, slots=True)
class Job:
    index: int
    prompt: list[int]
    max_tokens: int
    stream: bool
    abort_after_s: float | None  # the client disconnects after this long; None: never


def make_jobs(rng: random.Random) -> list[Job]:
    prefixes = [[rng.randrange(100, 40000) for _ in range(40)] for _ in range(4)]
    jobs = []
    for i in range(NUM_REQUESTS):
        tail = [rng.randrange(100, 40000) for _ in range(rng.randrange(3, 60))]
        prompt = (rng.choice(prefixes) + tail) if rng.random() < 0.5 else tail
        # short delays: many aborts land during a prefill or a KV transfer
        abort = rng.uniform(0.01, 0.5) if rng.random() < ABORT_FRACTION else None
        jobs.append(Job(i, prompt, rng.randrange(16, 96), rng.random() < 0.5, abort))
    return jobs


@pytest.fixture(scope="module")
def cluster(tiny_chat_model_dir: Path) -> Iterator[LocalCluster]:
    config = ClusterConfig(
        model_dir=tiny_chat_model_dir,
        port=0,
        num_prefill=2,
        num_decode=2,
        mode="disagg",
        worker_args=WORKER_ARGS,
        router_args=("--served-model-name", "tiny"),
        start_timeout_s=180,
    )
    c = LocalCluster(config).start()
    try:
        wait_all_ready(c.url, 4)
        yield c
    finally:
        c.stop()


def workers(url: str) -> list[dict[str, Any]]:
    reply = httpx.get(f"{url}/admin/workers", timeout=10)
    reply.raise_for_status()
    return list(reply.json()["workers"])


def wait_all_ready(url: str, count: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sum(w["state"] == "ready" for w in workers(url)) == count:
            return
        time.sleep(0.1)
    raise TimeoutError(f"not all {count} workers ready: {workers(url)}")


async def run_job(client: httpx.AsyncClient, job: Job) -> tuple[str, str, int | None]:
    """(outcome, text, completion_tokens): outcome is "completed", "error" (clean) or
    "unclean: ..." (a failure of the test)."""
    body: dict[str, Any] = {
        "model": "tiny", "prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": job.stream,
    }  # fmt: skip
    if not job.stream:
        reply = await client.post("/v1/completions", json=body)
        if reply.status_code == 200:
            data = reply.json()
            return "completed", data["choices"][0]["text"], data["usage"]["completion_tokens"]
        return _error_outcome(reply.status_code, reply.text), "", None
    body["stream_options"] = {"include_usage": True}
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            return _error_outcome(reply.status_code, (await reply.aread()).decode()), "", None
        text, usage, done, error = [], None, False, None
        async for line in reply.aiter_lines():
            if not line:
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                error = event["error"]
            elif event["choices"]:
                text.append(event["choices"][0]["text"])
            elif event.get("usage"):
                usage = event["usage"]["completion_tokens"]
        if not done:
            return "unclean: stream ended without [DONE]", "", None
        if error is not None:
            return ("error" if error.get("message") else f"unclean: {error}"), "", None
        return "completed", "".join(text), usage


def _error_outcome(status: int, text: str) -> str:
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return f"unclean: {status} {text[:200]}"
    if status >= 500 and status not in (502, 503, 504):
        return f"unclean: {status} {error}"
    return "error" if error.get("message") else f"unclean: {status} {text[:200]}"


async def pick_victim(url: str, kind: str, spare: str | None) -> str:
    """The worker of that kind with the most in flight now (waits up to 3 s for any); not
    `spare` (the one killed last: both of a pool get their turn)."""
    key = "inflight" if kind == "decode" else "prefilling"
    best: dict[str, Any] | None = None
    for _ in range(30):
        pool = [
            w
            for w in await asyncio.to_thread(workers, url)
            if w["role"] == kind and w["worker_id"] != spare
        ]
        best = max(pool, key=lambda w: w[key])
        if best[key] > 0:
            break
        await asyncio.sleep(0.1)
    assert best is not None
    return str(best["worker_id"])


@dataclass(slots=True)
class Chaos:
    started: int = 0  # requests started
    kills: int = 0
    fallbacks: float = 0.0  # remote prefills computed on a decode worker, counted before kills
    log: list[str] = field(default_factory=list)
    all_killed: asyncio.Event = field(default_factory=asyncio.Event)

    def note(self, what: str) -> None:
        self.log.append(f"{what} after {self.started} requests")


async def fault_track(cluster: LocalCluster, chaos: Chaos, kind: str, first_after: int) -> None:
    """Kill a worker of `kind` once `first_after` requests started, restart it, wait until the
    router routes to it again, then do the same to the other worker of the pool."""
    while chaos.started < first_after:
        await asyncio.sleep(0.05)
    spare: str | None = None
    for _ in range(FAULTS_PER_POOL):
        counted: dict[str, float] = {}
        if kind == "decode":  # its counters die with it: read them before the pick, so the kill
            # follows the pick at once (a scrape in between let the victim's streams finish)
            for child in cluster.children:
                if child.name.startswith("decode") and child.name != spare:
                    counted[child.name] = await asyncio.to_thread(prefill_fallbacks, child.address)
        victim = await pick_victim(cluster.url, kind, spare)
        await asyncio.to_thread(cluster.kill, victim)
        chaos.fallbacks += counted.get(victim, 0.0)
        chaos.note(f"killed {victim}")
        chaos.kills += 1
        if chaos.kills == 2 * FAULTS_PER_POOL:
            chaos.all_killed.set()
        began = time.monotonic()
        await asyncio.to_thread(cluster.restart, victim)
        await asyncio.to_thread(wait_all_ready, cluster.url, 4)
        chaos.note(f"{victim} back in {time.monotonic() - began:.1f} s")
        spare = victim


Result = tuple[Job, str, str, int | None]  # job, outcome, text, completion_tokens


async def drive(cluster: LocalCluster, jobs: list[Job]) -> tuple[list[Result], Chaos]:
    """Open loop at RATE requests/s (at most CONCURRENCY open); the last requests wait until
    every kill has happened, so each fault meets traffic however slow the machine is."""
    chaos = Chaos()
    results: list[Result] = []
    gate = asyncio.Semaphore(CONCURRENCY)
    timeout = httpx.Timeout(CLIENT_TIMEOUT_S)
    limits = httpx.Limits(max_connections=CONCURRENCY * 2)
    async with httpx.AsyncClient(base_url=cluster.url, timeout=timeout, limits=limits) as client:

        async def one(job: Job) -> None:
            async with gate:
                try:
                    limit = job.abort_after_s if job.abort_after_s is not None else CLIENT_TIMEOUT_S
                    outcome, text, usage = await asyncio.wait_for(run_job(client, job), limit)
                except TimeoutError:
                    outcome, text, usage = ("aborted" if job.abort_after_s else "hung"), "", None
                except httpx.HTTPError as exc:
                    outcome, text, usage = f"unclean: {type(exc).__name__} {exc}", "", None
                results.append((job, outcome, text, usage))

        tracks = [
            asyncio.create_task(fault_track(cluster, chaos, "decode", 30)),
            asyncio.create_task(fault_track(cluster, chaos, "prefill", 60)),
        ]
        tasks = []
        for job in jobs:
            if job.index == len(jobs) - HELD_BACK:
                await chaos.all_killed.wait()
            tasks.append(asyncio.create_task(one(job)))
            chaos.started += 1
            await asyncio.sleep(1 / RATE)
        await asyncio.gather(*tasks)
        await asyncio.gather(*tracks)
    return results, chaos


def audit(address: str, role: str) -> pb.WorkerLoad:
    async def call() -> pb.WorkerLoad:
        async with grpc.aio.insecure_channel(address) as channel:
            stub: Any = (
                pb_grpc.DecodeWorkerStub(channel)
                if role == "decode"
                else pb_grpc.PrefillWorkerStub(channel)
            )
            load: pb.WorkerLoad = await stub.Load(pb.LoadRequest(audit_blocks=True), timeout=10)
            return load

    return asyncio.run(call())


def prefill_fallbacks(address: str) -> float:
    text = httpx.get(f"http://{load_metrics_address(address)}/metrics", timeout=10).text
    return metric(text, "tandem_worker_remote_prefill_fallbacks_total")


def load_metrics_address(address: str) -> str:
    async def call() -> str:
        async with grpc.aio.insecure_channel(address) as channel:
            health = await pb_grpc.DecodeWorkerStub(channel).Health(pb.HealthRequest(), timeout=10)
            return str(health.metrics_address)

    return asyncio.run(call())


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_chaos(cluster: LocalCluster, tiny_chat_model_dir: Path) -> None:
    from engine import LLM, SamplingParams

    jobs = make_jobs(random.Random(2026))
    offline = LLM(str(tiny_chat_model_dir), max_model_len=512, num_blocks=2048)
    params = [
        SamplingParams(max_tokens=j.max_tokens, temperature=0.0, ignore_eos=True) for j in jobs
    ]
    expected = [r.outputs[0].text for r in offline.generate([j.prompt for j in jobs], params)]

    began = time.monotonic()
    results, chaos = asyncio.run(drive(cluster, jobs))
    elapsed_s = time.monotonic() - began

    counts: Counter[str] = Counter()
    failures: list[str] = []
    for job, outcome, text, usage in results:
        if outcome.startswith("unclean") or outcome == "hung":
            failures.append(f"#{job.index} {outcome}")
        elif outcome == "completed":
            if text != expected[job.index]:
                failures.append(f"#{job.index}: {text!r} != {expected[job.index]!r}")
            elif usage is not None and usage != job.max_tokens:
                failures.append(f"#{job.index}: usage {usage} != {job.max_tokens}")
        counts["hung" if outcome == "hung" else outcome.split(":")[0]] += 1

    router_metrics = httpx.get(f"{cluster.url}/metrics", timeout=10).text
    migrated = metric(router_metrics, "tandem_router_migrations_total", outcome="migrated")
    fallbacks = chaos.fallbacks
    # every worker (restarted ones too) goes idle with balanced, owned blocks
    leaks: list[str] = []
    for child in cluster.children:
        if child.name == "router":
            continue
        role = "prefill" if child.name.startswith("prefill") else "decode"
        deadline = time.monotonic() + 40  # a quarantined reservation waits for its fence
        while True:
            load = audit(child.address, role)
            a = load.block_audit
            idle = a.num_used == 0 and load.num_running == 0 and load.num_waiting == 0
            if (idle and not a.error) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if role == "decode":
            fallbacks += prefill_fallbacks(child.address)
        if a.error or not idle or a.num_free + a.num_cached + a.num_used != a.num_total:
            leaks.append(f"{child.name}: {a} running={load.num_running}".replace("\n", " "))
    summary = {
        "requests": len(results), **counts, "migrated": migrated,
        "prefill_fallbacks": fallbacks, "elapsed_s": round(elapsed_s, 1),
        "faults": chaos.log,
    }  # fmt: skip
    print("CHAOS", json.dumps(summary))
    assert len(results) == NUM_REQUESTS
    assert not failures, failures[:20]
    assert not leaks, leaks
    assert chaos.kills == 2 * FAULTS_PER_POOL, chaos.log
    assert counts["completed"] > NUM_REQUESTS * 0.8, summary
    assert migrated >= 1, summary  # a decode worker died mid-stream and its streams moved on
    assert not re.search(r'tandem_router_requests_total\{[^}]*status="500"', router_metrics)
