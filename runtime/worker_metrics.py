"""Every metric a worker exports, prefill and decode alike (`/metrics`, prefix `tandem_worker_`).

Torch-free: the engine's numbers come in through small Protocols (an `engine.stats.StepStats`
and an `engine.async_engine.EngineLoad` satisfy them), the role-specific events through plain
arguments. Every series carries the labels role, worker_id, model and gpu. Counters end in
`_total`, durations are histograms in seconds, sizes in bytes; nothing is averaged or rated
here (PromQL's rate() does that). docs/metrics.md lists them all.

Who calls what:
    scrape time       gauges, read from the engine's load snapshot (`load()`)
    engine thread     observe_step(), once per non-empty step (AsyncEngine's on_step)
    event loop        request_finished(), abort_rpc(), kv_*() from the role's metrics.py
prometheus_client's metrics are thread-safe, so the two threads need no lock of ours.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from runtime.gc_pauses import GcPauses

LABELS = ("role", "worker_id", "model", "gpu")

_STEP_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
    0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
    5.0, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_TRANSFER_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class StepStatsView(Protocol):
    """What the exporter reads of one engine step (engine/stats.py StepStats)."""

    @property
    def duration_s(self) -> float: ...
    @property
    def num_rows(self) -> int: ...
    @property
    def num_prefill_tokens(self) -> int: ...
    @property
    def num_decode_tokens(self) -> int: ...
    @property
    def num_preempted(self) -> int: ...
    @property
    def num_prefix_query_tokens(self) -> int: ...
    @property
    def num_prefix_hit_tokens(self) -> int: ...
    @property
    def queue_times_s(self) -> tuple[float, ...]: ...


class LoadView(Protocol):
    """The engine's load snapshot (engine/async_engine.py EngineLoad)."""

    @property
    def num_running(self) -> int: ...
    @property
    def num_waiting(self) -> int: ...
    @property
    def num_reserved(self) -> int: ...
    @property
    def num_blocks_total(self) -> int: ...
    @property
    def num_blocks_free(self) -> int: ...
    @property
    def num_blocks_cached(self) -> int: ...
    @property
    def num_blocks_used(self) -> int: ...


def outcome_of(error: BaseException, code: grpc.StatusCode | None) -> str:
    """The `outcome` label of an RPC handler that raised `error`, given `context.code()`:
    "cancelled" when the caller went away, else the status code the handler aborted with
    ("invalid_argument", "unavailable", ...), else "unknown" (what gRPC answers for an
    unhandled exception)."""
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "cancelled"
    return code.name.lower() if code is not None else "unknown"


@dataclass(frozen=True, slots=True)
class WorkerLabels:
    role: str  # "prefill" | "decode"
    worker_id: str
    model: str  # the model directory's name (the router's default served model name)
    gpu: str  # the engine's device: "cuda:0", ..., or "cpu"

    def values(self) -> tuple[str, str, str, str]:
        return (self.role, self.worker_id, self.model, self.gpu)


class WorkerMetrics:
    """One per worker process; owns its CollectorRegistry (several in one test never collide)."""

    def __init__(self, labels: WorkerLabels, load: Callable[[], LoadView]) -> None:
        self.labels = labels
        self.registry = CollectorRegistry(auto_describe=True)
        r, base = self.registry, list(LABELS)
        v = labels.values()

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, base, registry=r).labels(*v)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, base, buckets=buckets, registry=r).labels(*v)

        # installed by runtime/grpc_server.py once the worker serves
        self.gc = GcPauses("tandem_worker", r, dict(zip(LABELS, v, strict=True)))
        self.prefill_tokens = counter(
            "tandem_worker_prefill_tokens",
            "Prompt tokens computed (prefix-cache hits excluded, recompute after preemption "
            "included); rate() is prefill tokens/s",
        )
        self.decode_tokens = counter(
            "tandem_worker_decode_tokens",
            "Tokens computed in decode rows (one per running request per step); rate() is "
            "decode tokens/s",
        )
        self.preemptions = counter(
            "tandem_worker_preemptions", "Requests preempted (KV dropped, recomputed later)"
        )
        self.prefix_queries = counter(
            "tandem_worker_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache (once per request, when first scheduled)",
        )
        self.prefix_hits = counter(
            "tandem_worker_prefix_cache_hits", "Of those, tokens served from the prefix cache"
        )
        self.step_s = histogram(
            "tandem_worker_step_duration_seconds",
            "Engine step: schedule, forward, sample, bookkeeping; _sum is busy time",
            _STEP_BUCKETS_S,
        )
        self.batch_size = histogram(
            "tandem_worker_batch_size", "Requests (rows) in one engine step", _BATCH_BUCKETS
        )
        self.queue_s = histogram(
            "tandem_worker_request_queue_time_seconds",
            "Engine arrival to first scheduled, for requests whose prompt this worker computes",
            _LATENCY_BUCKETS_S,
        )
        self.request_s = histogram(
            "tandem_worker_request_duration_seconds",
            "Decode: a Generate RPC; prefill: one request of a PrefillSession (compute, then KV "
            "transfer); start to end, whatever the outcome",
            _LATENCY_BUCKETS_S,
        )
        self.ttft_s = histogram(
            "tandem_worker_time_to_first_token_seconds",
            "Decode: Generate RPC start to its first message handed to gRPC (the prompt computed "
            "here or remotely, KV landed, admitted): the worker's part of the router's TTFT",
            _LATENCY_BUCKETS_S,
        )
        self.kv_bytes = counter(
            "tandem_worker_kv_transfer_bytes",
            "KV bytes written to decode workers (prefill) or landed from prefill workers (decode)",
        )
        self.kv_reused_blocks = counter(
            "tandem_worker_kv_reused_blocks",
            "Decode: prompt blocks of remote prefills found in this worker's own prefix cache, "
            "hence neither leased nor transferred (admitted requests only)",
        )
        self.kv_transfer_s = histogram(
            "tandem_worker_kv_transfer_seconds",
            "Prefill: one request's KV write, send to completion (incl. the claim round trip)",
            _TRANSFER_BUCKETS_S,
        )
        self.kv_wait_s = histogram(
            "tandem_worker_kv_wait_seconds",
            "Decode: blocks reserved for a remote prefill until its KV landed (remote queue "
            "+ prefill + transfer)",
            _LATENCY_BUCKETS_S,
        )
        self._requests = Counter(
            "tandem_worker_requests",
            "Requests ended, by outcome: stop/length/abort (decode finish reasons), ok "
            "(prefill), cancelled (the caller went away), or the gRPC error code",
            [*base, "outcome"], registry=r,
        )  # fmt: skip
        self._aborts = Counter(
            "tandem_worker_abort_rpcs",
            "Abort RPCs received, by whether the request was still in the engine",
            [*base, "found"], registry=r,
        )  # fmt: skip
        self._kv_failures = Counter(
            "tandem_worker_kv_transfer_failures",
            "KV transfers that failed, by reason (prefill: the SendFailed error; decode: the "
            "KVLost reason)",
            [*base, "reason"], registry=r,
        )  # fmt: skip
        self._prefill_fallbacks = Counter(
            "tandem_worker_remote_prefill_fallbacks",
            "Decode: remote prefills that failed (prefill worker lost, KV not landed) and were "
            "computed on this decode worker instead, by reason",
            [*base, "reason"], registry=r,
        )  # fmt: skip
        self._remote_steps = Histogram(
            "tandem_worker_remote_prefill_step_seconds",
            "Decode: the steps of a remote prefill on this worker, by step. The first token's "
            "path, in order: first_token (request sent -> the prefill worker's first token "
            "here), first_output (one engine command; then it is streamed). The KV's, after "
            "it: kv_send (first token -> reply: the KV written), destination_wait (the "
            "prefill worker's computed KV waiting for the destination, as it reports), outcome "
            "(the sink's verdict after the reply), admit (one engine command; the request "
            "decodes from the next step). Overlapping first_token: reserve (request sent -> "
            "blocks reserved: one engine command), lease (the sink's; then the destination is "
            "sent)",
            [*base, "step"], buckets=_TRANSFER_BUCKETS_S, registry=r,
        )  # fmt: skip
        r.register(_LoadCollector(labels, load))

    # ---- engine thread ----------------------------------------------------------------------
    def observe_step(self, stats: StepStatsView) -> None:
        self.step_s.observe(stats.duration_s)
        self.batch_size.observe(stats.num_rows)
        self.prefill_tokens.inc(stats.num_prefill_tokens)
        self.decode_tokens.inc(stats.num_decode_tokens)
        if stats.num_preempted:
            self.preemptions.inc(stats.num_preempted)
        if stats.queue_times_s:
            self.prefix_queries.inc(stats.num_prefix_query_tokens)
            self.prefix_hits.inc(stats.num_prefix_hit_tokens)
            for queue_s in stats.queue_times_s:
                self.queue_s.observe(queue_s)

    # ---- event loop -------------------------------------------------------------------------
    def request_finished(self, outcome: str, duration_s: float) -> None:
        self._requests.labels(*self.labels.values(), outcome).inc()
        self.request_s.observe(duration_s)

    def first_token(self, duration_s: float) -> None:
        self.ttft_s.observe(duration_s)

    def abort_rpc(self, found: bool) -> None:
        self._aborts.labels(*self.labels.values(), "true" if found else "false").inc()

    def kv_sent(self, num_bytes: int, duration_s: float) -> None:
        self.kv_bytes.inc(num_bytes)
        self.kv_transfer_s.observe(duration_s)

    def kv_landed(self, num_bytes: int, wait_s: float) -> None:
        self.kv_bytes.inc(num_bytes)
        self.kv_wait_s.observe(wait_s)

    def kv_reused(self, num_blocks: int) -> None:
        self.kv_reused_blocks.inc(num_blocks)

    def remote_prefill_step(self, step: str, duration_s: float) -> None:
        self._remote_steps.labels(*self.labels.values(), step).observe(duration_s)

    def prefill_fallback(self, reason: str) -> None:
        self._prefill_fallbacks.labels(*self.labels.values(), reason).inc()

    def kv_failed(self, reason: str) -> None:
        self._kv_failures.labels(*self.labels.values(), reason).inc()

    # ---- exposition -------------------------------------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serve /metrics on host:port (0: any free port) from a daemon thread."""
        httpd, _thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(f"{host}:{httpd.server_port}", httpd.shutdown, httpd.server_close)


@dataclass(frozen=True, slots=True)
class MetricsServer:
    address: str  # host:port, the bound port when 0 was asked for
    _shutdown: Callable[[], None]
    _close: Callable[[], None]

    def close(self) -> None:
        self._shutdown()
        self._close()


class _LoadCollector(Collector):
    """Gauges read from the engine's load snapshot at scrape time."""

    def __init__(self, labels: WorkerLabels, load: Callable[[], LoadView]) -> None:
        self._values = list(labels.values())
        self._load = load

    def collect(self) -> Iterator[Metric]:
        snap = self._load()
        gauges = (
            ("tandem_worker_requests_running", "Requests holding KV and scheduled every step",
             snap.num_running),
            ("tandem_worker_requests_waiting", "Requests queued for their (re)computation",
             snap.num_waiting),
            ("tandem_worker_requests_awaiting_kv",
             "Decode: requests whose blocks are reserved for a remote prefill's KV",
             snap.num_reserved),
            ("tandem_worker_kv_blocks_used", "KV blocks held by requests (running, reserved, "
             "or pinned for a hand-off)", snap.num_blocks_used),
            ("tandem_worker_kv_blocks_cached", "KV blocks nobody holds that keep prefix-cache "
             "KV (evictable)", snap.num_blocks_cached),
            ("tandem_worker_kv_blocks_free", "KV blocks nobody holds, without cached KV; "
             "free + cached + used == capacity", snap.num_blocks_free - snap.num_blocks_cached),
            ("tandem_worker_kv_blocks_capacity", "KV blocks in the pool", snap.num_blocks_total),
        )  # fmt: skip
        for name, doc, value in gauges:
            gauge = GaugeMetricFamily(name, doc, labels=list(LABELS))
            gauge.add_metric(self._values, value)
            yield gauge

    def describe(self) -> Iterator[Metric]:
        return iter(())
