"""The admin API: registration, drain (nothing in flight is cut), scale targets, the admin key.

No worker process: registered addresses are closed loopback ports, so every worker stays
not_ready; in-flight work is simulated with registry tickets.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from router.config import Mode, Role, RouterConfig
from router.policy import RouteCause, RouteDecision
from router.registry import WorkerRegistry
from router.server import build_app
from runtime.tokenizer import Tokenizer
from tests.router.test_validation import closed_port

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
RECONCILER = {**AUTH, "x-tandem-reconciler": "test"}


@pytest.fixture()
def client(smollm2_dir: Path) -> Iterator[TestClient]:
    config = RouterConfig(
        model_dir=smollm2_dir,
        served_model_name="smol",
        decode_workers=(),
        rpc_timeout_s=0.2,
        admin_key=KEY,
    )
    with TestClient(build_app(config, Tokenizer.from_dir(smollm2_dir))) as c:
        yield c


def registry(client: TestClient) -> WorkerRegistry:
    reg: WorkerRegistry = client.app.state.frontend.registry  # type: ignore[attr-defined]
    return reg


def register(client: TestClient, worker_id: str, role: str, port: int | None = None) -> int:
    body = {"worker_id": worker_id, "role": role, "address": f"127.0.0.1:{port or closed_port()}"}
    return client.post("/admin/workers", json=body, headers=AUTH).status_code


def workers(client: TestClient) -> dict[str, dict]:
    reply = client.get("/admin/workers", headers=AUTH)
    assert reply.status_code == 200, reply.text
    return {w["worker_id"]: w for w in reply.json()["workers"]}


def wait_gone(client: TestClient, worker_id: str, timeout_s: float = 5.0) -> float:
    start = time.monotonic()
    while worker_id in workers(client):
        assert time.monotonic() - start < timeout_s, f"{worker_id} still registered"
        time.sleep(0.05)
    return time.monotonic() - start


def test_the_admin_key_is_required(client: TestClient) -> None:
    assert client.get("/admin/workers").status_code == 401
    bad = client.get("/admin/workers", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401
    assert bad.json()["error"]["type"] == "authentication_error"
    assert client.get("/admin/scale", headers=AUTH).status_code == 200
    assert client.get("/health").status_code == 503  # the OpenAI side needs no key


def test_register_move_and_conflicts(client: TestClient) -> None:
    port = closed_port()
    assert register(client, "d0", "decode", port) == 201
    assert register(client, "d0", "decode", port) == 200  # idempotent
    assert register(client, "d0", "decode") == 200  # restarted elsewhere: moved
    assert register(client, "d0", "prefill") == 409  # a worker keeps its role
    assert register(client, "bad id!", "decode") == 400
    bad = {"worker_id": "p0", "role": "prefill", "address": "nowhere"}
    assert client.post("/admin/workers", json=bad, headers=AUTH).status_code == 400
    listed = workers(client)
    assert list(listed) == ["d0"]
    assert listed["d0"]["role"] == "decode"
    assert listed["d0"]["state"] == "not_ready"  # nothing listens there
    assert listed["d0"]["address"] != f"127.0.0.1:{port}"


def test_drain_waits_for_in_flight_work_then_removes(client: TestClient) -> None:
    register(client, "d0", "decode")
    register(client, "p0", "prefill")
    reg = registry(client)
    decision = RouteDecision(
        mode=Mode.DISAGG, decode_worker_id="d0", decode_address="unused:1",
        prefill_worker_id="p0", prefill_address="unused:2", overlap_blocks=0, uncached_tokens=32,
        reason="test", cause=RouteCause.DISAGG,
    )  # fmt: skip
    ticket = reg.begin("r1", decision, 32)
    assert client.delete("/admin/workers/d0", headers=AUTH).status_code == 202
    assert client.delete("/admin/workers/p0", headers=AUTH).status_code == 202
    assert register(client, "d0", "decode") == 409  # draining: no way back in
    time.sleep(1.5)  # past the drain grace: still there, the request is not done
    assert {w: s["state"] for w, s in workers(client).items()} == {
        "d0": "draining",
        "p0": "draining",
    }
    assert workers(client)["p0"]["prefilling"] == 1
    reg.add_tokens(ticket, 1)  # first token: the prefill worker is done with it
    wait_gone(client, "p0")
    assert "d0" in workers(client)
    reg.finish(ticket)
    wait_gone(client, "d0")
    assert client.delete("/admin/workers/d0", headers=AUTH).status_code == 404


def test_force_delete_removes_at_once(client: TestClient) -> None:
    register(client, "d0", "decode")
    reply = client.delete("/admin/workers/d0?force=true", headers=AUTH)
    assert reply.status_code == 200 and reply.json()["state"] == "removed"
    assert workers(client) == {}


def test_scale_target_needs_a_reconciler(client: TestClient) -> None:
    target = {"prefill": 2, "decode": 3, "reason": "test"}
    refused = client.put("/admin/scale", json=target, headers=AUTH)
    assert refused.status_code == 409
    assert "no launcher" in refused.json()["error"]["message"]
    status = client.get("/admin/scale", headers=RECONCILER).json()
    assert status["target"] is None and status["reconciler"] == "test"
    reply = client.put("/admin/scale", json=target, headers=AUTH)
    assert reply.status_code == 200, reply.text
    assert reply.json()["target"] == target and reply.json()["generation"] == 1
    assert client.put("/admin/scale", json=target, headers=AUTH).json()["generation"] == 1
    bad = client.put("/admin/scale", json={"prefill": -1, "decode": 1}, headers=AUTH)
    assert bad.status_code == 400
    register(client, "d0", "decode")
    pools = client.get("/admin/scale", headers=AUTH).json()["pools"]
    assert pools["decode"] == {"registered": 1, "ready": 0, "draining": 0}
    assert pools["prefill"] == {"registered": 0, "ready": 0, "draining": 0}
    assert Role.DECODE.value in pools
