"""The controller against a real router app (FastAPI TestClient) and an in-memory launcher:
targets become started, registered, drained and stopped workers; a restarted worker is
registered at its new address; a dead one is replaced; a pool that cannot start gives up."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from deploy.admin_client import AdminClient
from deploy.controller import Controller, ControllerConfig, StartFailed
from deploy.launcher import Launched, Phase
from deploy.reconcile import Target
from router.config import Role, RouterConfig
from router.server import build_app
from runtime.tokenizer import Tokenizer
from tests.router.test_validation import closed_port


class FakeLauncher:
    """Workers are entries; the test decides when they run, move or die."""

    def __init__(self) -> None:
        self.workers: dict[str, Launched] = {}
        self.stopped: list[str] = []
        self.forgotten: list[str] = []

    def start_router(self) -> str:
        return "http://testserver"

    def router_url(self) -> str:
        return "http://testserver"

    def start(self, worker_id: str, role: Role, seq: int) -> None:
        self.workers[worker_id] = Launched(worker_id, role, seq, Phase.STARTING)

    def poll(self) -> list[Launched]:
        return list(self.workers.values())

    def stop(self, worker_id: str) -> None:
        del self.workers[worker_id]
        self.stopped.append(worker_id)

    def forget(self, worker_id: str) -> None:
        del self.workers[worker_id]
        self.forgotten.append(worker_id)

    def shutdown(self) -> None:
        self.workers.clear()

    # ---- what happens to the processes
    def run(self, *worker_ids: str) -> None:
        for worker_id in worker_ids:
            w = self.workers[worker_id]
            self.workers[worker_id] = replace(
                w, phase=Phase.RUNNING, address=f"127.0.0.1:{closed_port()}"
            )

    def die(self, worker_id: str) -> None:
        self.workers[worker_id] = replace(self.workers[worker_id], phase=Phase.DEAD, error="x")


@pytest.fixture()
def setup(smollm2_dir: Path) -> Iterator[tuple[Controller, FakeLauncher, AdminClient]]:
    config = RouterConfig(smollm2_dir, "smol", decode_workers=(), rpc_timeout_s=0.2)
    with TestClient(build_app(config, Tokenizer.from_dir(smollm2_dir))) as http:
        launcher = FakeLauncher()
        admin = AdminClient("http://testserver", http=http)
        controller = Controller(launcher, admin, ControllerConfig(interval_s=0.05))
        yield controller, launcher, admin


def registered(admin: AdminClient) -> dict[str, str]:
    return {w.worker_id: w.address for w in admin.workers()}


def test_targets_become_registered_workers_and_drained_ones_stop(
    setup: tuple[Controller, FakeLauncher, AdminClient],
) -> None:
    controller, launcher, admin = setup
    controller.set_target(Target(1, 1))
    controller.tick()
    assert set(launcher.workers) == {"prefill-0", "decode-0"}
    assert registered(admin) == {}  # not READY yet
    launcher.run("prefill-0", "decode-0")
    controller.tick()
    assert set(registered(admin)) == {"prefill-0", "decode-0"}

    admin.set_scale(2, 2, "test")  # as `tandem scale` does
    controller.tick()
    launcher.run("prefill-1", "decode-1")
    controller.tick()
    assert len(registered(admin)) == 4

    admin.set_scale(1, 1, "test")
    actions = controller.tick()
    assert sorted(actions.drain) == ["decode-1", "prefill-1"]  # nothing in flight: newest
    assert launcher.stopped == []  # not before the router let them go
    deadline = time.monotonic() + 10
    while len(launcher.stopped) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
        controller.tick()
    assert sorted(launcher.stopped) == ["decode-1", "prefill-1"]
    assert set(registered(admin)) == {"prefill-0", "decode-0"}
    assert not controller.tick()  # settled: nothing to do
    assert admin.scale_status().reconciler == "tandem-serve"


def test_restart_death_and_a_pool_that_cannot_start(
    setup: tuple[Controller, FakeLauncher, AdminClient],
) -> None:
    controller, launcher, admin = setup
    controller.set_target(Target(0, 1))
    controller.tick()
    launcher.run("decode-0")
    controller.tick()
    first = registered(admin)["decode-0"]

    launcher.run("decode-0")  # restarted by Ray: same id, new process, new port
    controller.tick()
    assert registered(admin)["decode-0"] not in (first, None)

    launcher.die("decode-0")  # restarts exhausted
    controller.tick()
    assert launcher.forgotten == ["decode-0"]
    assert "decode-0" not in registered(admin)
    assert set(launcher.workers) == {"decode-1"}  # replaced

    for worker_id in ("decode-1", "decode-2"):
        launcher.die(worker_id)  # never became ready
        controller.tick()
    launcher.die("decode-3")
    with pytest.raises(StartFailed, match="3 decode workers in a row"):
        controller.tick()
