"""Every metric the router exports (`/metrics`, Prometheus text), prefix `tandem_router_`, and
the scrape targets of the whole cluster (`/v1/metrics/targets`, Prometheus http_sd).

Latencies are histograms in seconds; counters end in `_total`; nothing is averaged here.
Each RouterMetrics owns its CollectorRegistry, so several apps (tests) never collide.
docs/metrics.md lists every metric of the router and the workers.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router.admission import Admission
from router.config import Role, RouterConfig
from router.registry import WorkerRegistry
from runtime.gc_pauses import GcPauses

_OVERHEAD_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075,
    0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25,
)  # fmt: skip
_LATENCY_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
_ITL_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 1.0, 2.5,
)  # fmt: skip
_TOKEN_BUCKETS = (
    1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072,
)  # fmt: skip


class RouterMetrics:
    def __init__(self, workers: WorkerRegistry, config: RouterConfig, admission: Admission) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        info = Gauge(
            "tandem_router_info", "Always 1; the served model and the routing mode as labels",
            ["model", "mode"], registry=r,
        )  # fmt: skip
        info.labels(config.served_model_name, config.mode.value).set(1)
        self.gc = GcPauses("tandem_router", r, {})  # installed by router/__main__.py
        self.requests = Counter(
            "tandem_router_requests", "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"], registry=r,
        )  # fmt: skip
        self.overhead_s = Histogram(
            "tandem_router_overhead_seconds",
            "Wall time the router works on a request outside awaiting its workers: arrival to "
            "its Generate call, plus each worker message from its read to its bytes on the "
            "client's socket (docs/metrics.md)",
            buckets=_OVERHEAD_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.overhead_cpu_s = Histogram(
            "tandem_router_overhead_cpu_seconds",
            "The event-loop thread's CPU time over the same segments as "
            "tandem_router_overhead_seconds (wall minus CPU: runnable but descheduled)",
            buckets=_OVERHEAD_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.dispatch_s = Histogram(
            "tandem_router_dispatch_seconds",
            "Request arrival to its Generate call (parse, validate, tokenize, route); part of "
            "the overhead, including any wait for the router's event loop",
            buckets=_OVERHEAD_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.ttft_s = Histogram(
            "tandem_router_time_to_first_token_seconds",
            "Request arrival to the first token received from the decode worker",
            buckets=_LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.itl_s = Histogram(
            "tandem_router_inter_token_latency_seconds",
            "Time between consecutive token messages of a choice, per token",
            buckets=_ITL_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.tpot_s = Histogram(
            "tandem_router_time_per_output_token_seconds",
            "Mean inter-token latency of each finished choice of two or more tokens (TPOT: "
            "what an ITL SLO is judged on, as in DistServe and vllm bench serve --goodput)",
            buckets=_ITL_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.e2e_s = Histogram(
            "tandem_router_e2e_request_latency_seconds", "Request arrival to the last token",
            buckets=_LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "tandem_router_prompt_tokens", "Prompt tokens of finished choices", registry=r
        )
        self.cached_prompt_tokens = Counter(
            "tandem_router_cached_prompt_tokens",
            "Prompt tokens the workers served from a prefix cache", registry=r,
        )  # fmt: skip
        self.generation_tokens = Counter(
            "tandem_router_generation_tokens", "Tokens generated", registry=r
        )
        self.request_prompt_tokens = Histogram(
            "tandem_router_request_prompt_tokens",
            "Prompt tokens per finished choice (the planner's ISL: _sum / _count)",
            buckets=_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.request_generation_tokens = Histogram(
            "tandem_router_request_generation_tokens",
            "Generated tokens per finished choice (the planner's OSL: _sum / _count)",
            buckets=_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.routes = Counter(
            "tandem_router_route_decisions",
            "Routing decisions, by mode, where the prompt was computed (local: on the decode "
            "worker, remote: on a prefill worker) and why",
            ["mode", "prefill", "reason"], registry=r,
        )  # fmt: skip
        self.prefix_query_blocks = Counter(
            "tandem_router_prefix_query_blocks",
            "Full prompt blocks looked up in the chosen prefilling worker's prefix cache",
            ["worker_id"], registry=r,
        )  # fmt: skip
        self.prefix_hit_blocks = Counter(
            "tandem_router_prefix_hit_blocks",
            "Of those, blocks found cached (prefix hits predicted from KV events)",
            ["worker_id"], registry=r,
        )  # fmt: skip
        self.aborts = Counter(
            "tandem_router_aborts", "Choices aborted on a worker, by cause", ["cause"],
            registry=r,
        )  # fmt: skip
        self.migrations = Counter(
            "tandem_router_migrations",
            "Choices whose decode worker was lost mid-stream, by outcome: migrated (went on on "
            "another decode worker), limit (--migration-limit reached), unroutable (no decode "
            "worker to go on on)",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.finished = Counter(
            "tandem_router_finished_choices", "Finished choices by finish reason", ["reason"],
            registry=r,
        )  # fmt: skip
        self.admitted = Counter(
            "tandem_router_admitted_requests",
            "Requests admitted: validated and routed to decode workers below their in-flight "
            "limit", registry=r,
        )  # fmt: skip
        self.shed = Counter(
            "tandem_router_shed_requests",
            "Valid requests refused with 503 + Retry-After, by reason (saturated: every healthy "
            "decode worker at its in-flight limit)", ["reason"], registry=r,
        )  # fmt: skip
        self._slo: tuple[float, float] | None = None  # (ttft, itl) seconds
        self.goodput = Counter(
            "tandem_router_goodput_requests",
            "Finished choices within both SLOs (their TTFT <= --slo-ttft and TPOT <= --slo-itl); "
            "stays 0 unless the router is given both",
            registry=r,
        )
        slo = Gauge(
            "tandem_router_slo_seconds", "The SLO targets the router counts goodput against",
            ["slo"], registry=r,
        )  # fmt: skip
        if config.slo_ttft_s is not None and config.slo_itl_s is not None:
            self._slo = (config.slo_ttft_s, config.slo_itl_s)
            slo.labels("ttft").set(config.slo_ttft_s)
            slo.labels("itl").set(config.slo_itl_s)
        r.register(_WorkerCollector(workers, admission))

    def observe_choice(self, ttft_s: float, gaps_s: list[float]) -> None:
        """A finished choice: its TPOT, and whether it met the SLOs (goodput)."""
        tpot_s = sum(gaps_s) / len(gaps_s) if gaps_s else 0.0
        if gaps_s:
            self.tpot_s.observe(tpot_s)
        if self._slo is not None and ttft_s <= self._slo[0] and tpot_s <= self._slo[1]:
            self.goodput.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _WorkerCollector(Collector):
    """Per-worker gauges, read from the registry at scrape time."""

    def __init__(self, workers: WorkerRegistry, admission: Admission) -> None:
        self._workers = workers
        self._admission = admission

    def collect(self) -> Iterator[Metric]:
        labels = ["worker_id", "role"]
        healthy = GaugeMetricFamily(
            "tandem_router_worker_healthy", "1 when the worker is routable", labels=labels
        )
        inflight = GaugeMetricFamily(
            "tandem_router_worker_inflight_requests",
            "Choices this router has in flight on the worker (as its decode worker)",
            labels=labels,
        )
        prefill = GaugeMetricFamily(
            "tandem_router_worker_queued_prefill_tokens",
            "Uncached prompt tokens dispatched to the worker whose first token is not back",
            labels=labels,
        )
        rate = GaugeMetricFamily(
            "tandem_router_worker_prefill_tokens_per_second",
            "Prefill throughput the router measured on the worker from its own dispatch and "
            "first-token times: the per-token term of auto's estimates (0: not measured yet)",
            labels=labels,
        )
        per_prompt = GaugeMetricFamily(
            "tandem_router_worker_prefill_overhead_seconds",
            "Per-prompt term of the prefill time model the router measured on the worker (RPCs, "
            "the first token's hops, first step; 0: not measured, or one prompt length only)",
            labels=labels,
        )
        free = GaugeMetricFamily(
            "tandem_router_worker_kv_blocks_free", "Last reported free KV blocks", labels=labels
        )
        cached = GaugeMetricFamily(
            "tandem_router_worker_prefix_cache_blocks",
            "Block hashes the router believes the worker caches (from KV events)",
            labels=labels,
        )
        prefilling = GaugeMetricFamily(
            "tandem_router_worker_prefilling_requests",
            "Choices whose prompt the worker computes and whose first token is not back (the "
            "pool's prefill queue as the router sees it)",
            labels=labels,
        )
        admitted = GaugeMetricFamily(
            "tandem_router_worker_admitted_choices",
            "Choices admitted to the decode worker whose responses have not ended (what "
            "admission control counts against the limit)", labels=labels,
        )  # fmt: skip
        limit = GaugeMetricFamily(
            "tandem_router_worker_admission_limit_choices",
            "Admitted choices at which the decode worker counts as saturated", labels=labels,
        )  # fmt: skip
        waiting = GaugeMetricFamily(
            "tandem_router_worker_waiting_requests",
            "Requests waiting in the worker's engine queue (last Load report): the queue depth",
            labels=labels,
        )  # fmt: skip
        held = self._admission.held()
        for s in self._workers.states():
            values = [s.worker.worker_id, s.worker.role.value]
            load = s.load
            waiting.add_metric(values, load.num_waiting if load is not None else 0)
            if s.worker.role is Role.DECODE:
                admitted.add_metric(values, held.get(s.worker.worker_id, 0))
                max_num_seqs = load.max_num_seqs if load is not None else 0
                limit.add_metric(values, self._admission.limit(max_num_seqs))
            healthy.add_metric(values, 1.0 if s.healthy else 0.0)
            inflight.add_metric(values, s.num_inflight)
            prefill.add_metric(values, s.inflight_prefill_tokens)
            cost = s.prefill_meter.cost()
            rate.add_metric(values, cost.tokens_per_s if cost is not None else 0.0)
            per_prompt.add_metric(values, cost.per_prompt_s if cost is not None else 0.0)
            free.add_metric(values, s.load.num_blocks_free if s.load is not None else 0)
            cached.add_metric(values, len(s.cached_hashes))
            prefilling.add_metric(values, s.num_prefilling)
        yield from (healthy, inflight, prefill, rate, per_prompt, free, cached, prefilling)
        yield from (admitted, limit, waiting)

    def describe(self) -> Iterator[Metric]:
        return iter(())


def scrape_targets(workers: WorkerRegistry, router_address: str) -> list[dict[str, object]]:
    """Prometheus http_sd target groups: this router, then every registered worker that reported
    a metrics address in its Health reply. Target labels are named `tandem_*` so they never
    collide with the series' own `role` / `worker_id` labels."""
    groups: list[dict[str, object]] = [
        {"targets": [router_address], "labels": {"tandem_pool": "router"}}
    ]
    for s in workers.states():
        if s.metrics_address:
            labels = {"tandem_pool": s.worker.role.value, "tandem_worker": s.worker.worker_id}
            groups.append({"targets": [s.metrics_address], "labels": labels})
    return groups
