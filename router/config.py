"""RouterConfig: everything the router process is told, built once in `__main__` and frozen."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from pathlib import Path

from runtime.tls import TlsFiles


class Mode(enum.Enum):
    """Where a request's prompt is computed."""

    DISAGG = "disagg"  # always on a prefill worker; its KV is shipped to the decode worker
    COLLOCATED = "collocated"  # always on the decode worker itself (PrefillPlan.local)
    AUTO = "auto"  # per request: remote when the uncached prompt is long and P is within budget


class Role(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


_WORKER_ID = re.compile(r"[A-Za-z0-9_.:-]+")  # it goes into HTTP headers and metric labels


@dataclass(frozen=True, slots=True)
class WorkerAddress:
    worker_id: str
    address: str  # host:port of the worker's gRPC server
    role: Role

    def __post_init__(self) -> None:
        if not _WORKER_ID.fullmatch(self.worker_id):
            raise ValueError(f"worker id {self.worker_id!r} must match {_WORKER_ID.pattern}")
        host, colon, port = self.address.rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"worker address {self.address!r} must be host:port")


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Knobs of `router/policy.py`; units in the names."""

    # Weight of prefill work (blocks still to compute) against decode KV (blocks held), as in
    # Dynamo's `overlap_score_weight`-style cost; 1.0 counts a block to prefill like a block held.
    prefill_weight: float = 1.0
    # auto mode: prefill on the decode worker when at most this many prompt tokens are uncached
    # there and it runs no other request (a local prefill stretches its running requests' step).
    local_prefill_max_tokens: int = 256
    # auto mode, a prompt with more uncached tokens: it goes to the prefill worker while that
    # worker's estimated time to prefill it (its queued uncached tokens, then this prompt's, at
    # the throughput the router measured there) is at most this; past it, the decode worker
    # prefills it when its own estimate (its queue, its measured chunked-prefill rate) is
    # shorter. About half a TTFT target: the rest covers the estimate's error and the decode
    # worker's admission.
    prefill_budget_s: float = 0.5

    def __post_init__(self) -> None:
        if not self.prefill_weight >= 0.0:
            raise ValueError(f"prefill_weight must be >= 0, got {self.prefill_weight}")
        if self.local_prefill_max_tokens < 0:
            raise ValueError(
                f"local_prefill_max_tokens must be >= 0, got {self.local_prefill_max_tokens}"
            )
        if not self.prefill_budget_s > 0.0:
            raise ValueError(f"prefill_budget_s must be > 0, got {self.prefill_budget_s}")


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request may ask for; beyond it the router answers 400 (413 for the body)."""

    max_body_bytes: int = 8 << 20  # HTTP request body; a 128K-token prompt is ~1 MB of JSON
    # Prompt tokens per prompt; None: the context length (max_model_len - 1).
    max_prompt_tokens: int | None = None
    # Output tokens per choice (max_tokens / max_completion_tokens), also the default when the
    # request gives none; None: up to the context length.
    max_output_tokens: int | None = None
    max_choices: int = 256  # prompts x n in one request

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompt_tokens", "max_output_tokens", "max_choices"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    """When the router sheds load (router/admission.py); units in the names."""

    # Choices a decode worker may have in flight from this router before it counts as
    # saturated; None: twice the max_num_seqs the worker reports (one batch running, at most
    # one batch waiting in its engine queue).
    max_inflight_per_worker: int | None = None
    retry_after_s: int = 1  # the Retry-After of a 503 when every decode worker is saturated

    def __post_init__(self) -> None:
        if self.max_inflight_per_worker is not None and self.max_inflight_per_worker < 1:
            raise ValueError(
                f"max_inflight_per_worker must be >= 1, got {self.max_inflight_per_worker}"
            )
        if self.retry_after_s < 1:
            raise ValueError(f"retry_after_s must be >= 1, got {self.retry_after_s}")


@dataclass(frozen=True, slots=True)
class RouterConfig:
    model_dir: Path  # tokenizer and chat template are read from here
    served_model_name: str  # the only `model` value requests may name
    decode_workers: tuple[WorkerAddress, ...]
    prefill_workers: tuple[WorkerAddress, ...] = ()
    mode: Mode = Mode.AUTO
    host: str = "127.0.0.1"
    port: int = 8000
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    # Context length to validate prompts against before any worker has reported one;
    # None: the smallest max_model_len reported by a healthy decode worker.
    max_model_len: int | None = None
    request_timeout_s: float = 600.0  # whole request, router to last token; sent as deadline
    # How many times one choice may move to another decode worker when its worker is lost
    # mid-stream (router/migration.py); 0: never, the client gets the error.
    migration_limit: int = 3
    # Tokens per GenerateResponse of a streamed request (so per SSE chunk; the first token is
    # always sent alone): each message costs the router a wakeup and a send (docs/metrics.md,
    # router overhead). Non-streamed requests always ask for max_tokens: two messages in all.
    stream_interval: int = 1
    load_interval_s: float = 0.2  # how often each worker's Load is polled
    health_interval_s: float = 1.0
    rpc_timeout_s: float = 2.0  # Health, Load, Abort
    # `/admin/*` (worker registration, pool targets) needs `Authorization: Bearer <admin_key>`;
    # None: the admin API is open (the router binds loopback unless told otherwise).
    admin_key: str | None = field(default=None, repr=False)
    # `/v1/*` needs `Authorization: Bearer <api_key>`; None: open. /health and /metrics stay
    # open (probes and scrapers), as in vLLM.
    api_key: str | None = field(default=None, repr=False)
    limits: Limits = field(default_factory=Limits)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    # TLS of the router's gRPC channels to the workers; None: plaintext (loopback only).
    grpc_tls: TlsFiles | None = None
    # Goodput accounting (tandem_router_goodput_requests_total): a finished choice counts when
    # its TTFT <= slo_ttft_s and its mean inter-token latency <= slo_itl_s; None: not counted.
    slo_ttft_s: float | None = None
    slo_itl_s: float | None = None

    def __post_init__(self) -> None:
        ids = [w.worker_id for w in (*self.decode_workers, *self.prefill_workers)]
        if len(set(ids)) != len(ids):
            raise ValueError(f"worker ids must be unique, got {ids}")
        if any(w.role is not Role.DECODE for w in self.decode_workers):
            raise ValueError("decode_workers must all have role DECODE")
        if any(w.role is not Role.PREFILL for w in self.prefill_workers):
            raise ValueError("prefill_workers must all have role PREFILL")
        for key in (self.admin_key, self.api_key):
            if key is not None and not key:
                raise ValueError("an API or admin key must be non-empty (None: no key)")
        if not self.served_model_name:
            raise ValueError("served_model_name must be non-empty")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.migration_limit < 0:
            raise ValueError(f"migration_limit must be >= 0, got {self.migration_limit}")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")
        if (self.slo_ttft_s is None) != (self.slo_itl_s is None):
            raise ValueError("give both slo_ttft_s and slo_itl_s, or neither")
        for slo in (self.slo_ttft_s, self.slo_itl_s):
            if slo is not None and not slo > 0:
                raise ValueError(f"SLO targets must be > 0, got {slo}")
        for name in ("request_timeout_s", "load_interval_s", "health_interval_s", "rpc_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


def parse_workers(spec: str, role: Role) -> tuple[WorkerAddress, ...]:
    """`ID=host:port[,ID=host:port...]` -> addresses; raises ValueError on a malformed entry."""
    workers: list[WorkerAddress] = []
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        worker_id, sep, address = entry.partition("=")
        host, colon, port = address.rpartition(":")
        if not sep or not worker_id or not colon or not host or not port.isdigit():
            raise ValueError(f"bad worker {entry!r}: expected ID=host:port")
        workers.append(WorkerAddress(worker_id, address, role))
    return tuple(workers)
