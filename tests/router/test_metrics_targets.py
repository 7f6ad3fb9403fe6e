"""`/v1/metrics/targets`: Prometheus http_sd groups for the router and every worker that reported
a metrics address in Health; and the router's info gauge."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from router.config import Mode, Role, RouterConfig, WorkerAddress
from router.server import build_app
from runtime.tokenizer import Tokenizer
from tests.router.test_validation import closed_port


@pytest.fixture(scope="module")
def client(smollm2_dir: Path) -> Iterator[TestClient]:
    config = RouterConfig(
        model_dir=smollm2_dir,
        served_model_name="smol",
        decode_workers=(WorkerAddress("d0", f"127.0.0.1:{closed_port()}", Role.DECODE),),
        prefill_workers=(WorkerAddress("p0", f"127.0.0.1:{closed_port()}", Role.PREFILL),),
        mode=Mode.DISAGG,
        rpc_timeout_s=0.5,
    )
    with TestClient(build_app(config, Tokenizer.from_dir(smollm2_dir))) as c:
        yield c


def test_targets_list_the_router_and_reporting_workers(client: TestClient) -> None:
    groups = client.get("/v1/metrics/targets").json()
    assert groups == [{"targets": ["testserver:80"], "labels": {"tandem_pool": "router"}}]
    registry = client.app.state.frontend.registry  # type: ignore[attr-defined]
    states = {s.worker.worker_id: s for s in registry.states()}
    states["p0"].metrics_address = "127.0.0.1:9101"  # as a Health reply would set it
    groups = client.get("/v1/metrics/targets").json()
    assert groups[1:] == [
        {
            "targets": ["127.0.0.1:9101"],
            "labels": {"tandem_pool": "prefill", "tandem_worker": "p0"},
        }
    ]


def test_info_gauge_names_model_and_mode(client: TestClient) -> None:
    text = client.get("/metrics").text
    assert 'tandem_router_info{mode="disagg",model="smol"} 1.0' in text
    assert "# TYPE tandem_router_request_prompt_tokens histogram" in text
