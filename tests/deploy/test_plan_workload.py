"""`tandem plan --from-prometheus`: the workload read from a Prometheus server's query API or
straight from a router's /metrics text (two scrapes), against fakes on loopback."""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from deploy.capacity import Workload
from deploy.plan import (
    PLANNER_METRICS,
    NoTraffic,
    promql,
    router_counts,
    workload_from_counts,
    workload_from_prometheus,
    workload_from_router,
)
from tests.deploy.test_capacity import DOC

Handler = Callable[[str], tuple[int, str, bytes]]  # path -> (status, content type, body)


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], str]]:
    servers: list[HTTPServer] = []

    def start(handle: Handler) -> str:
        class H(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, ctype, body = handle(self.path)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        server = HTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def router_text(requests: list[tuple[int, int]]) -> str:
    """/metrics text with the router's two token histograms after `requests` (ISL, OSL)."""
    registry = CollectorRegistry()
    prompt = Histogram("tandem_router_request_prompt_tokens", "", registry=registry)
    generation = Histogram("tandem_router_request_generation_tokens", "", registry=registry)
    for isl, osl in requests:
        prompt.observe(isl)
        generation.observe(osl)
    return generate_latest(registry).decode()


def test_router_counts_and_deltas() -> None:
    before = router_counts(router_text([(100, 10)]))
    after = router_counts(router_text([(100, 10), (300, 20), (500, 60)]))
    assert set(before) == set(PLANNER_METRICS)
    w = workload_from_counts(before, after, window_s=4.0)
    assert w == Workload(rate_rps=0.5, isl=400, osl=40)
    with pytest.raises(NoTraffic):
        workload_from_counts(before, before, window_s=4.0)
    with pytest.raises(ValueError, match="not a Tandem router"):
        router_counts("# nothing here\n")


def test_workload_from_a_routers_metrics_url(serve: Callable[[Handler], str]) -> None:
    scrapes = iter([router_text([(100, 10)]), router_text([(100, 10), (200, 30), (300, 50)])])
    url = serve(lambda path: (200, "text/plain", next(scrapes).encode())) + "/metrics"
    w = workload_from_router(url, window_s=0.2)
    assert w.isl == 250 and w.osl == 40
    assert 2 / 0.5 < w.rate_rps <= 2 / 0.2  # two requests over a bit more than the window


def test_workload_from_prometheus(serve: Callable[[Handler], str]) -> None:
    answers = {"rate": "12.5", "prompt": "2048", "generation": "256"}
    asked: list[str] = []

    def handle(path: str) -> tuple[int, str, bytes]:
        query = urllib.parse.parse_qs(urllib.parse.urlparse(path).query)["query"][0]
        asked.append(query)
        key = "rate" if "/" not in query else "prompt" if "prompt" in query else "generation"
        result = [{"metric": {}, "value": [1.0, answers[key]]}]
        body = {"status": "success", "data": {"resultType": "vector", "result": result}}
        return 200, "application/json", json.dumps(body).encode()

    url = serve(handle)
    assert workload_from_prometheus(url, window_s=120) == Workload(12.5, 2048, 256)
    assert asked == list(promql(120).values())
    assert all("[120s]" in q for q in asked)


def test_no_traffic_in_prometheus_is_an_error(serve: Callable[[Handler], str]) -> None:
    empty = {"status": "success", "data": {"resultType": "vector", "result": []}}
    url = serve(lambda path: (200, "application/json", json.dumps(empty).encode()))
    with pytest.raises(NoTraffic):
        workload_from_prometheus(url, window_s=60)


def test_tandem_plan_from_prometheus_with_an_override(
    serve: Callable[[Handler], str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import re

    from deploy.cli import main

    block = re.search(r"```json\n(.*?)```", DOC.read_text(), re.S)
    assert block is not None
    profile = tmp_path / "example.json"
    profile.write_text(block.group(1))

    def handle(path: str) -> tuple[int, str, bytes]:
        query = urllib.parse.parse_qs(urllib.parse.urlparse(path).query)["query"][0]
        value = "5" if "/" not in query else "3000" if "prompt" in query else "150"
        result = [{"metric": {}, "value": [1.0, value]}]
        body = {"status": "success", "data": {"resultType": "vector", "result": result}}
        return 200, "application/json", json.dumps(body).encode()

    url = serve(handle)
    argv = ["plan", "--profile", str(profile), "--slo-ttft", "0.5", "--slo-itl", "0.02",
            "--from-prometheus", url, "--rate", "10", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["workload"] == {"rate_rps": 10.0, "isl": 3000.0, "osl": 150.0}
    assert out["source"].startswith("Prometheus")
    rec = out["recommendation"]
    assert (rec["num_prefill"], rec["num_decode"]) == (2, 3)
    assert main(["plan", "--profile", str(profile), "--slo-ttft", "1", "--slo-itl", "1"]) == 2
