"""Overload (issue 9, acceptance 3): a router and a real decode worker (tiny model), offered 3x
their capacity for a bounded time. The router sheds with 503 + Retry-After, the requests it
admits keep their inter-token latency within 2x of an unloaded one, its memory stays bounded,
and a request right after the load drops is served.

Capacity is made explicit: the worker runs at most SLOTS requests per step (--max-num-seqs)
and the router admits at most SLOTS per worker (--max-inflight-per-worker), so the throughput
capacity is what SLOTS closed-loop clients complete per second, measured here first. Arrivals are
Poisson (open loop) at 3x that rate for LOAD_S seconds. ITL is each stream's mean inter-token
latency; "unloaded" is one stream alone.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from fastapi.testclient import TestClient

from deploy.local_cluster import ClusterConfig, LocalCluster
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc
from router.config import Mode, Role, RouterConfig, WorkerAddress
from router.server import build_app
from runtime.tokenizer import Tokenizer
from tests.router.waits import wait_healthy

pytestmark = pytest.mark.slow  # ~60 s: two processes, then LOAD_S of overload
SLOTS = 2
MAX_TOKENS = 24
LOAD_S = 15.0
CAPACITY_S = 4.0
OVERLOAD = 3.0


@pytest.fixture(scope="module")
def cluster(tiny_chat_model_dir: Path) -> Iterator[LocalCluster]:
    config = ClusterConfig(
        model_dir=tiny_chat_model_dir,
        port=0,
        num_prefill=0,
        num_decode=1,
        mode="collocated",
        worker_args=(
            "--num-blocks",
            "512",
            "--max-model-len",
            "256",
            "--max-num-seqs",
            str(SLOTS),
        ),
        router_args=("--served-model-name", "tiny", "--max-inflight-per-worker", str(SLOTS)),
        start_timeout_s=180,
    )
    c = LocalCluster(config).start()
    try:
        wait_healthy(c.url, timeout_s=60)
        yield c
    finally:
        c.stop()


@dataclass
class Outcome:
    status: int
    decode_s: float | None = None  # first to last token message
    gaps: int = 0  # token messages - 1
    duration_s: float = 0.0
    retry_after: str | None = None
    code: str | None = None
    finish: str | None = None


async def one(client: httpx.AsyncClient, i: int) -> Outcome:
    body = {"model": "tiny", "prompt": f"{i} once upon a time", "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
    start = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return Outcome(
                response.status_code,
                retry_after=response.headers.get("retry-after"),
                code=response.json()["error"]["code"],
            )
        stamps: list[float] = []  # one per token message (its text may be empty)
        finish = None
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line.removeprefix("data: "))
                assert "error" not in event, event
                if event["choices"]:
                    stamps.append(time.perf_counter())
                    finish = event["choices"][0]["finish_reason"] or finish
    decode_s = stamps[-1] - stamps[0] if len(stamps) > 1 else None
    return Outcome(200, decode_s, len(stamps) - 1, time.perf_counter() - start, finish=finish)


@dataclass
class Run:
    unloaded: list[Outcome]
    at_capacity: list[Outcome]
    loaded: list[Outcome]
    after: Outcome  # the first request after the load dropped
    capacity: float  # requests/s
    rate: float  # offered, requests/s
    rss_mb: tuple[float, float, float]  # router: before, peak during, after the overload
    metrics: str  # the router's /metrics afterwards


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    assert match is not None
    return int(match.group(1)) / 1024


def itl_s(outcomes: list[Outcome]) -> float:
    """Mean inter-token latency over the streams, pooled: total first-to-last token time over
    total gaps. Pooled because on a starved CPU a whole stream is sometimes delivered in one
    burst (its own mean would be ~0); the decode time it hides shows up in the others."""
    timed = [o for o in outcomes if o.decode_s is not None]
    return sum(o.decode_s or 0.0 for o in timed) / sum(o.gaps for o in timed)


def test_overload_sheds_keeps_itl_bounded_memory_and_recovers(cluster: LocalCluster) -> None:
    router_pid = next(c.proc.pid for c in cluster.children if c.name == "router")

    async def run() -> Run:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        async with httpx.AsyncClient(base_url=cluster.url, timeout=60, limits=limits) as client:
            for i in range(2):  # warm up the worker's step shapes
                await one(client, i)
            unloaded = [await one(client, 100 + i) for i in range(10)]
            # capacity: SLOTS closed-loop clients, back to back, for CAPACITY_S
            at_capacity: list[Outcome] = []
            t_cap = time.perf_counter() + CAPACITY_S

            async def closed_loop(k: int) -> None:
                while time.perf_counter() < t_cap:
                    at_capacity.append(await one(client, 200 + 100 * k + len(at_capacity)))

            start = time.perf_counter()
            await asyncio.gather(*(closed_loop(k) for k in range(SLOTS)))
            capacity = len(at_capacity) / (time.perf_counter() - start)  # requests/s
            assert all(o.status == 200 for o in [*unloaded, *at_capacity])
            rate = OVERLOAD * capacity  # requests per second offered
            rss_before = rss_mb(router_pid)
            rss_peak = rss_before

            rng = random.Random(0)
            tasks: list[asyncio.Task[Outcome]] = []
            t_end = time.perf_counter() + LOAD_S
            next_rss = 0.0
            while (now := time.perf_counter()) < t_end:
                tasks.append(asyncio.create_task(one(client, 1000 + len(tasks))))
                if now >= next_rss:
                    rss_peak, next_rss = max(rss_peak, rss_mb(router_pid)), now + 0.5
                await asyncio.sleep(rng.expovariate(rate))
            loaded = await asyncio.gather(*tasks)
            # the load has dropped: the very next request is served
            after = await one(client, 99999)
            rss_after = rss_mb(router_pid)
            metrics = (await client.get("/metrics")).text
        return Run(
            unloaded, at_capacity, loaded, after, capacity, rate,
            (rss_before, rss_peak, rss_after), metrics,
        )  # fmt: skip

    r = asyncio.run(run())
    loaded = r.loaded
    statuses = Counter(o.status for o in loaded)
    admitted = [o for o in loaded if o.status == 200]
    shed = [o for o in loaded if o.status == 503]
    itl_unloaded = itl_s(r.unloaded)
    itl_capacity = itl_s(r.at_capacity)
    itl_loaded = itl_s(admitted)
    rss_before, rss_peak, rss_after = r.rss_mb
    print(
        f"\noverload: offered {r.rate:.1f} req/s ({OVERLOAD}x the {r.capacity:.1f} req/s "
        f"of {SLOTS} slots) for {LOAD_S} s: {len(loaded)} requests (achieved "
        f"{len(loaded) / LOAD_S:.1f} req/s), statuses "
        f"{dict(statuses)}, shed {len(shed) / len(loaded):.0%}; mean ITL alone "
        f"{itl_unloaded * 1e3:.2f} ms, at capacity {itl_capacity * 1e3:.2f} ms, admitted under "
        f"overload {itl_loaded * 1e3:.2f} ms; router RSS {rss_before:.0f} -> peak "
        f"{rss_peak:.0f} -> after {rss_after:.0f} MB; served {len(admitted) / LOAD_S:.1f} req/s "
        f"under overload"
    )
    assert set(statuses) <= {200, 503}, statuses
    assert len(shed) / len(loaded) >= 0.25, "3x capacity offered, but little was shed"
    assert all(o.retry_after is not None and int(o.retry_after) >= 1 for o in shed)
    assert all(o.code == "overloaded" for o in shed)
    assert all(o.finish == "length" for o in admitted), "an admitted stream was cut short"
    assert itl_loaded <= 2 * itl_unloaded, (itl_loaded, itl_unloaded)
    assert rss_peak - rss_before < 100, "router memory grew under overload"
    assert r.after.status == 200, "not served right after the load dropped"
    metrics = r.metrics
    assert re.search(r"^tandem_router_worker_admitted_choices\{.*\} 0\.0$", metrics, re.M)
    shed_total = re.search(r'^tandem_router_shed_requests_total\{reason="saturated"\} (\S+)$',
                           metrics, re.M)  # fmt: skip
    assert shed_total is not None and float(shed_total.group(1)) == len(shed)


def test_request_timeout_is_a_clean_504_and_aborts_on_the_worker(
    cluster: LocalCluster, tiny_chat_model_dir: Path
) -> None:
    """A router with a short --request-timeout-s in front of the same worker: a request that
    runs longer ends with 504 `timeout` (an in-band error event when streaming) and the worker
    is left with nothing running."""
    worker = next(c.address for c in cluster.children if c.name != "router")
    config = RouterConfig(
        model_dir=tiny_chat_model_dir,
        served_model_name="tiny",
        decode_workers=(WorkerAddress("decode-0", worker, Role.DECODE),),
        mode=Mode.COLLOCATED,
        request_timeout_s=0.1,  # 240 tokens take >= 0.25 s even on an idle box
    )
    body = {"model": "tiny", "prompt": "a long story", "max_tokens": 240, "ignore_eos": True}
    with TestClient(build_app(config, Tokenizer.from_dir(tiny_chat_model_dir))) as client:
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        full = client.post("/v1/completions", json=body)
        assert full.status_code == 504, full.text
        assert full.json()["error"]["type"] == "timeout"
        streamed = client.post("/v1/completions", json={**body, "stream": True})
        assert streamed.status_code == 200
        assert '"type": "timeout"' in streamed.text or '"type":"timeout"' in streamed.text

    async def running() -> int:
        async with grpc.aio.insecure_channel(worker) as channel:
            load = await pb_grpc.DecodeWorkerStub(channel).Load(pb.LoadRequest(), timeout=5)
            return int(load.num_running + load.num_waiting)

    deadline = time.monotonic() + 10
    while asyncio.run(running()):
        assert time.monotonic() < deadline, "the timed-out requests still run on the worker"
        time.sleep(0.1)
