"""Issue 5, acceptance 1, end to end: `tandem serve` on a local Ray cluster with 4 fake GPUs
(real router and prefill/decode workers, tiny model), driven the way an operator would:

- each worker process sees its own GPU (CUDA_VISIBLE_DEVICES as Ray assigned it);
- `tandem scale` up and down under a steady stream of requests loses none of them;
- `kill -9` of a worker process: the router routes around it at once, Ray restarts it, and it
  rejoins under its id at its new address;
- the planner reads the live router's metrics (dry run);
- `kill -9` of the router: Ray restarts it, and the controller gives it its workers and target.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.admin_client import AdminClient
from deploy.app import ServeConfig, router_spec, run_serve, worker_spec
from deploy.launcher import Launched
from deploy.placement import PoolPlacement
from deploy.planner import PlannerConfig, PlannerLoop, PlannerMetrics
from deploy.process import environ_of
from router.config import Role
from tests.deploy.serve_helpers import (
    CHAT,
    WORKER_ARGS,
    Stream,
    gpus_of,
    scale,
    wait_until,
    worker_pids,
    workers,
)

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
from deploy.ray_launcher import RayLauncher  # noqa: E402


@dataclass
class Served:
    url: str
    model_dir: Path
    stop: threading.Event
    thread: threading.Thread
    launched: list[Launched] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(ray_cluster: Any, tiny_chat_model_dir: Path) -> Iterator[Served]:
    config = ServeConfig(
        model_dir=tiny_chat_model_dir,
        mode="disagg",
        num_prefill=1,
        num_decode=1,
        port=free_port(),  # fixed: a restarted router comes back at the same URL
        worker_args=WORKER_ARGS,
        router_args=("--served-model-name", "tiny"),
        env={"UCX_NET_DEVICES": "lo"},
        start_timeout_s=180,
    )
    placement = PoolPlacement(num_gpus=1, num_cpus=0.5)
    launcher = RayLauncher(
        router_spec(config),
        lambda i, r: worker_spec(config, i, r),
        {Role.PREFILL: placement, Role.DECODE: placement},
        max_restarts=3,
    )
    ready = threading.Event()
    box: dict[str, Any] = {}

    def on_ready(url: str, launched: list[Launched]) -> None:
        box["url"], box["launched"] = url, launched
        ready.set()

    stop = threading.Event()
    thread = threading.Thread(
        target=lambda: box.setdefault("rc", run_serve(config, launcher, stop, on_ready)),
        daemon=True,
    )
    thread.start()
    try:
        assert ready.wait(240), f"tandem serve did not come up: {box}"
        yield Served(box["url"], tiny_chat_model_dir, stop, thread, box["launched"])
    finally:
        stop.set()
        thread.join(90)
    assert box.get("rc") == 0


def test_each_worker_process_sees_its_own_gpu(served: Served) -> None:
    gpus = gpus_of(served.model_dir)
    assert set(gpus) == {"prefill-0", "decode-0"}
    assert len(set(gpus.values())) == 2 and all(g.isdigit() for g in gpus.values()), gpus
    reply = httpx.post(f"{served.url}/v1/chat/completions", json=CHAT, timeout=60)
    assert reply.status_code == 200, reply.text
    assert "prefill=prefill-0" in reply.headers["x-tandem-route"]


def test_scale_up_and_down_under_load_loses_no_request(served: Served) -> None:
    with Stream(served.url) as stream:
        time.sleep(1)
        scale(served.url, 2, 2)
        gpus = gpus_of(served.model_dir)
        assert len(gpus) == 4 and len(set(gpus.values())) == 4, gpus  # 4 distinct fake GPUs
        n = len(stream.results)
        wait_until("traffic on the new workers", lambda: len(stream.results) >= n + 12)
        scale(served.url, 1, 1)
        n = len(stream.results)
        wait_until("traffic after the scale-down", lambda: len(stream.results) >= n + 6)
    assert not stream.failures(), stream.failures()[:5]
    routes = " ".join(route for _, route in stream.results)
    for worker_id in ("decode-0", "decode-1", "prefill-0", "prefill-1"):
        assert worker_id in routes  # every worker served some of the stream
    left = workers(served.url)
    assert len(left) == 2 and all(w["state"] == "ready" for w in left.values())
    wait_until("the drained processes' exit", lambda: len(worker_pids(served.model_dir)) == 2)


def test_kill_9_is_routed_around_and_restarted_by_ray(served: Served) -> None:
    scale(served.url, 1, 2)
    pids = worker_pids(served.model_dir)
    decoders = sorted(w for w in pids if w.startswith("decode-"))
    victim = decoders[-1]
    old_address = workers(served.url)[victim]["address"]
    old_gpu = gpus_of(served.model_dir)[victim]
    os.kill(pids[victim], signal.SIGKILL)
    wait_until("the router to see it down", lambda: workers(served.url)[victim]["state"] != "ready",
               timeout_s=5)  # fmt: skip
    # meanwhile: every request is served by the other decode worker
    for _ in range(6):
        r = httpx.post(f"{served.url}/v1/chat/completions", json=CHAT, timeout=60)
        assert r.status_code == 200, r.text
        assert f"decode={victim}" not in r.headers["x-tandem-route"]
    # Ray restarts the actor, which starts a new process; it rejoins under its id
    back = wait_until(
        "the restarted worker to rejoin",
        lambda: (
            (w := workers(served.url)[victim])["state"] == "ready" and w["address"] != old_address
        ),
    )
    assert back
    new_pid = worker_pids(served.model_dir)[victim]
    assert new_pid != pids[victim]
    assert environ_of(new_pid).get("CUDA_VISIBLE_DEVICES") == old_gpu

    def routed_to_victim() -> bool:
        r = httpx.post(f"{served.url}/v1/chat/completions", json=CHAT, timeout=60)
        assert r.status_code == 200, r.text
        return f"decode={victim}" in r.headers["x-tandem-route"]

    wait_until("a request on the restarted worker", routed_to_victim, timeout_s=30)


def test_the_planner_reads_the_live_router(served: Served) -> None:
    admin = AdminClient(served.url)
    config = PlannerConfig(slo_ttft_s=5.0, slo_itl_s=1.0, gpu_budget=4)
    lines: list[str] = []

    @dataclass
    class Sizing:
        num_prefill: int
        num_decode: int
        reason: str

    def recommend(rate: float, isl: float, osl: float, max_workers: int) -> Sizing:
        return Sizing(1, 2 if rate > 0 else 1, f"{rate:.2f} req/s")

    loop = PlannerLoop(admin, config, recommend, PlannerMetrics(config, True), dry_run=True,
                       out=lines.append)  # fmt: skip
    try:
        assert loop.step() is None
        for _ in range(4):
            r = httpx.post(f"{served.url}/v1/chat/completions", json=CHAT, timeout=60)
            assert r.status_code == 200
        decision = loop.step()
    finally:
        admin.close()
    assert decision is not None
    assert "req/s" in lines[-2] and "isl" in lines[-2] and lines[-1].startswith("  model: ")
    assert decision.state.osl == pytest.approx(8)
    status = httpx.get(f"{served.url}/admin/scale", timeout=10).json()
    assert status["target"]["prefill"] == 1 and status["target"]["decode"] == 2  # untouched


def test_a_restarted_router_gets_its_workers_and_target_back(served: Served) -> None:
    before = workers(served.url)
    (router_pid,) = router_pids(served.model_dir)
    os.kill(router_pid, signal.SIGKILL)

    def back() -> bool:
        try:
            status = httpx.get(f"{served.url}/admin/scale", timeout=2).json()
            listed = workers(served.url)
        except httpx.HTTPError:
            return False
        ready = all(w["state"] == "ready" for w in listed.values())
        return status["target"] is not None and set(listed) == set(before) and ready

    wait_until("the router restarted, its workers and target restored", back, timeout_s=90)
    status = httpx.get(f"{served.url}/admin/scale", timeout=10).json()
    assert (status["target"]["prefill"], status["target"]["decode"]) == (1, 2)
    assert router_pids(served.model_dir) != [router_pid]
    reply = httpx.post(f"{served.url}/v1/chat/completions", json=CHAT, timeout=60)
    assert reply.status_code == 200, reply.text


def router_pids(model_dir: Path) -> list[int]:
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0")]
        except OSError:
            continue
        if args[1:3] == ["-m", "router"] and str(model_dir) in args:
            pids.append(int(entry))
    return pids
