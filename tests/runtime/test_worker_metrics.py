"""runtime/worker_metrics.py: StepStats and events become the right series; /metrics is served
on a free loopback port; docs/metrics.md lists every metric the router and workers export."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from runtime.worker_metrics import WorkerLabels, WorkerMetrics, outcome_of

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
LABELS = WorkerLabels("prefill", "prefill-0", "tiny", "cpu")


@dataclass(frozen=True)
class Load:
    num_running: int = 3
    num_waiting: int = 2
    num_reserved: int = 1
    num_blocks_total: int = 100
    num_blocks_free: int = 60
    num_blocks_cached: int = 15
    num_blocks_used: int = 40


@dataclass(frozen=True)
class Step:
    duration_s: float = 0.02
    num_rows: int = 3
    num_prefill_tokens: int = 40
    num_decode_tokens: int = 2
    num_preempted: int = 1
    num_prefix_query_tokens: int = 48
    num_prefix_hit_tokens: int = 16
    queue_times_s: tuple[float, ...] = (0.5, 0.01)


def samples(metrics: WorkerMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }


def get(metrics: WorkerMetrics, name: str, **extra: str) -> float:
    base = {"role": "prefill", "worker_id": "prefill-0", "model": "tiny", "gpu": "cpu"}
    return samples(metrics)[(name, frozenset({**base, **extra}.items()))]


def test_steps_and_events_become_series() -> None:
    m = WorkerMetrics(LABELS, load=Load)
    m.observe_step(Step())
    m.observe_step(Step(num_preempted=0, queue_times_s=()))  # no first scheduling: no lookups
    assert get(m, "tandem_worker_prefill_tokens_total") == 80
    assert get(m, "tandem_worker_decode_tokens_total") == 4
    assert get(m, "tandem_worker_preemptions_total") == 1
    assert get(m, "tandem_worker_prefix_cache_queries_total") == 48
    assert get(m, "tandem_worker_prefix_cache_hits_total") == 16
    assert get(m, "tandem_worker_request_queue_time_seconds_count") == 2
    assert get(m, "tandem_worker_request_queue_time_seconds_bucket", le="0.01") == 1
    assert get(m, "tandem_worker_step_duration_seconds_count") == 2
    assert get(m, "tandem_worker_batch_size_sum") == 6
    m.request_finished("ok", 0.3)
    m.request_finished("cancelled", 0.1)
    m.abort_rpc(found=True)
    m.kv_sent(4096, 0.002)
    m.kv_landed(8192, 0.2)
    m.kv_failed("PeerLost")
    assert get(m, "tandem_worker_requests_total", outcome="ok") == 1
    assert get(m, "tandem_worker_requests_total", outcome="cancelled") == 1
    assert get(m, "tandem_worker_request_duration_seconds_count") == 2
    assert get(m, "tandem_worker_abort_rpcs_total", found="true") == 1
    assert get(m, "tandem_worker_kv_transfer_bytes_total") == 4096 + 8192
    assert get(m, "tandem_worker_kv_transfer_seconds_count") == 1
    assert get(m, "tandem_worker_kv_wait_seconds_count") == 1
    assert get(m, "tandem_worker_kv_transfer_failures_total", reason="PeerLost") == 1


def test_gauges_are_read_from_the_load_at_scrape_time() -> None:
    loads = iter([Load(), Load(num_running=0, num_blocks_free=100, num_blocks_used=0)])
    m = WorkerMetrics(LABELS, load=lambda: next(loads))
    first = samples(m)
    key = frozenset(
        {"role": "prefill", "worker_id": "prefill-0", "model": "tiny", "gpu": "cpu"}.items()
    )
    assert first[("tandem_worker_requests_running", key)] == 3
    assert first[("tandem_worker_requests_waiting", key)] == 2
    assert first[("tandem_worker_requests_awaiting_kv", key)] == 1
    assert first[("tandem_worker_kv_blocks_used", key)] == 40
    assert first[("tandem_worker_kv_blocks_cached", key)] == 15
    assert first[("tandem_worker_kv_blocks_free", key)] == 45
    assert first[("tandem_worker_kv_blocks_capacity", key)] == 100
    second = samples(m)
    assert second[("tandem_worker_requests_running", key)] == 0
    assert second[("tandem_worker_kv_blocks_used", key)] == 0


def test_outcome_labels() -> None:
    assert outcome_of(asyncio.CancelledError(), None) == "cancelled"
    assert outcome_of(RuntimeError(), grpc.StatusCode.INVALID_ARGUMENT) == "invalid_argument"
    assert outcome_of(RuntimeError(), None) == "unknown"


def test_metrics_are_served_on_a_free_loopback_port() -> None:
    m = WorkerMetrics(LABELS, load=Load)
    server = m.serve("127.0.0.1", 0)
    try:
        host, port = server.address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        with urllib.request.urlopen(f"http://{server.address}/metrics", timeout=5) as response:
            text = response.read().decode()
        assert 'tandem_worker_kv_blocks_capacity{gpu="cpu"' in text
    finally:
        server.close()


def exported_families() -> set[str]:
    """Every metric family of the router and of a worker, as Prometheus names them."""
    from router.admission import Admission
    from router.config import RouterConfig
    from router.metrics import RouterMetrics
    from router.registry import WorkerRegistry

    config = RouterConfig(Path("."), "m", (), slo_ttft_s=1.0, slo_itl_s=0.1)
    workers = WorkerRegistry((), rpc_timeout_s=1, load_interval_s=1, health_interval_s=1)
    router = RouterMetrics(workers, config, Admission(config.admission))
    texts = [router.render(), WorkerMetrics(LABELS, Load).render()]
    names = set()
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            if family.name.endswith("_created"):
                continue
            names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_docs_list_every_metric_and_nothing_else() -> None:
    documented = set(re.findall(r"^\| `(tandem_[a-z0-9_]+)` \|", DOC.read_text(), re.M))
    exported = exported_families()
    assert sorted(exported - documented) == [], "exported but not in docs/metrics.md"
    assert sorted(documented - exported) == [], "in docs/metrics.md but not exported"


def test_naming_conventions() -> None:
    """Prefixed; counters end in _total and nothing else does; histograms are in seconds,
    tokens or requests (never milliseconds or averages)."""
    names = exported_families()
    assert all(n.startswith(("tandem_router_", "tandem_worker_")) for n in names)
    assert not [n for n in names if "_ms" in n or "avg" in n or "mean" in n]
    doc = DOC.read_text()
    for row in re.findall(r"^\| `(tandem_[a-z0-9_]+)` \| (\w+) \|", doc, re.M):
        name, kind = row
        assert name.endswith("_total") == (kind == "counter"), name
        if kind == "histogram":
            assert name.endswith(("_seconds", "_tokens", "_batch_size")), name
