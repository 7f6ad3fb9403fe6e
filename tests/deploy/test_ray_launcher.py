"""RayLauncher on a local Ray cluster with 4 fake GPUs, with stand-in worker processes (no
torch, so this is quick): distinct GPUs as CUDA_VISIBLE_DEVICES in each worker process, a
fifth GPU worker waits for a GPU, kill -9 of a worker process is restarted by Ray, a stopped
worker frees its GPU, tensor-parallel workers get 2-GPU bundles, a worker that cannot start is
DEAD with its reason, and a killed actor takes its process with it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from deploy.launcher import Launched, Phase
from deploy.placement import PoolPlacement, Strategy
from deploy.process import ProcessSpec, environ_of
from router.config import Role

ray = pytest.importorskip("ray")
from deploy.ray_launcher import RayLauncher, RemoteProcessActor  # noqa: E402

P, D = Role.PREFILL, Role.DECODE
FAILING = "decode-fails"


def fake_spec(worker_id: str, role: Role) -> ProcessSpec:
    extra = ("--fail",) if worker_id == FAILING else ()
    return ProcessSpec(
        name=worker_id,
        module="tests.deploy.fake_worker",
        args=("--worker-id", worker_id, *extra),
        ready_timeout_s=60,
    )


def launcher(num_gpus: int, strategy: Strategy = Strategy.PACK) -> RayLauncher:
    placement = PoolPlacement(num_gpus=num_gpus, num_cpus=0.5, strategy=strategy)
    return RayLauncher(fake_spec("router", D), fake_spec, {P: placement, D: placement},
                       max_restarts=2)  # fmt: skip


def wait_for(
    launcher: RayLauncher, done: Callable[[dict[str, Launched]], bool], timeout_s: float = 60
) -> dict[str, Launched]:
    deadline = time.monotonic() + timeout_s
    while True:
        launched = {w.worker_id: w for w in launcher.poll()}
        if done(launched):
            return launched
        assert time.monotonic() < deadline, f"timed out; last: {launched}"
        time.sleep(0.2)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_gpus_restarts_and_release(ray_cluster: Any) -> None:
    lau = launcher(num_gpus=1)
    pids: list[int] = []
    try:
        roles = [P, D, D, P]
        ids = [f"{r.value}-{i}" for i, r in enumerate(roles)]
        for i, (worker_id, role) in enumerate(zip(ids, roles, strict=True)):
            lau.start(worker_id, role, i)
        launched = wait_for(lau, lambda ws: all(w.phase is Phase.RUNNING for w in ws.values()))
        gpus = {w.worker_id: w.gpu_ids for w in launched.values()}
        assert all(len(g) == 1 for g in gpus.values()), gpus
        assert sorted(g[0] for g in gpus.values()) == ["0", "1", "2", "3"]
        for w in launched.values():
            assert w.pid is not None
            pids.append(w.pid)
            # what the worker process itself sees: the GPU Ray gave its actor
            assert environ_of(w.pid)["CUDA_VISIBLE_DEVICES"] == w.gpu_ids[0]

        lau.start("decode-4", D, 4)  # no GPU left: it waits
        time.sleep(2)
        assert {w.worker_id: w.phase for w in lau.poll()}["decode-4"] is Phase.STARTING

        victim = launched["decode-1"]
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        back = wait_for(lau, lambda ws: ws["decode-1"].pid != victim.pid
                        and ws["decode-1"].phase is Phase.RUNNING)  # fmt: skip
        again = back["decode-1"]
        assert again.restarts == 1 and again.address != victim.address
        assert again.gpu_ids == victim.gpu_ids  # its placement group kept the GPU
        assert again.pid is not None
        pids.append(again.pid)

        lau.stop("prefill-0")
        freed = gpus["prefill-0"]
        after = wait_for(lau, lambda ws: "prefill-0" not in ws
                         and ws["decode-4"].phase is Phase.RUNNING)  # fmt: skip
        assert after["decode-4"].gpu_ids == freed
        assert not alive(launched["prefill-0"].pid or 0)
        pids.append(after["decode-4"].pid or 0)

        lau.start("decode-5", D, 5)  # waits for a GPU; a stop while it waits is immediate
        time.sleep(1)
        lau.stop("decode-5")
        wait_for(lau, lambda ws: "decode-5" not in ws, timeout_s=5)
    finally:
        lau.shutdown()
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in pids if alive(pid)]


def test_tensor_parallel_workers_get_multi_gpu_bundles(ray_cluster: Any) -> None:
    lau = launcher(num_gpus=2, strategy=Strategy.SPREAD)
    try:
        lau.start("prefill-0", P, 0)
        wait_for(lau, lambda ws: ws["prefill-0"].phase is Phase.RUNNING)
        lau.start("decode-0", D, 1)  # spread: hinted to the node with fewest (the only one)
        ws = wait_for(lau, lambda ws: all(w.phase is Phase.RUNNING for w in ws.values()))
        gpus = [g for w in ws.values() for g in w.gpu_ids]
        assert all(len(w.gpu_ids) == 2 for w in ws.values())
        assert sorted(gpus) == ["0", "1", "2", "3"]
        for w in ws.values():
            assert environ_of(w.pid or 0)["CUDA_VISIBLE_DEVICES"] == ",".join(w.gpu_ids)
    finally:
        lau.shutdown()


def test_cpu_workers_ask_for_no_gpu_and_a_failed_start_is_dead(ray_cluster: Any) -> None:
    lau = launcher(num_gpus=0)
    try:
        lau.start("decode-0", D, 0)
        lau.start(FAILING, D, 1)
        ws = wait_for(lau, lambda ws: ws["decode-0"].phase is Phase.RUNNING
                      and ws[FAILING].phase is Phase.DEAD)  # fmt: skip
        assert ws["decode-0"].gpu_ids == ()
        assert "exited with 3" in ws[FAILING].error
        lau.forget(FAILING)
        assert FAILING not in {w.worker_id for w in lau.poll()}
    finally:
        lau.shutdown()


def test_the_router_actor_and_a_killed_actor_takes_its_process_along(ray_cluster: Any) -> None:
    lau = launcher(num_gpus=0)
    try:
        url = lau.start_router()
        assert url.startswith("http://127.0.0.1:")
    finally:
        lau.shutdown()
    actor = RemoteProcessActor.options(num_cpus=0, max_restarts=1, max_task_retries=-1).remote(
        fake_spec("x", D)
    )
    try:
        first = ray.get(actor.info.remote(), timeout=60)
        os.kill(first.owner_pid, signal.SIGKILL)  # the actor, not its process
        deadline = time.monotonic() + 10
        while alive(first.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(first.pid)  # PR_SET_PDEATHSIG (deploy/child.py)
        second = ray.get(actor.info.remote(), timeout=60)  # restarted by Ray
        assert second.pid != first.pid and alive(second.pid)
    finally:
        ray.get(actor.stop.remote(5.0), timeout=30)
        ray.kill(actor, no_restart=True)
