"""RouterConfig: everything the router process is told, built once in `__main__` and frozen."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from pathlib import Path


class Mode(enum.Enum):
    """Where a request's prompt is computed."""

    DISAGG = "disagg"  # always on a prefill worker; its KV is shipped to the decode worker
    COLLOCATED = "collocated"  # always on the decode worker itself (PrefillPlan.local)
    AUTO = "auto"  # per request: remote only when the uncached prompt is long and P has room


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
    # auto mode: prefill on the decode worker when at most this many prompt tokens are uncached.
    local_prefill_max_tokens: int = 256
    # auto mode: a prefill worker is saturated when the uncached prompt tokens the router has
    # queued on it (dispatched, first token not yet back) exceed this.
    prefill_saturated_tokens: int = 16384

    def __post_init__(self) -> None:
        if not self.prefill_weight >= 0.0:
            raise ValueError(f"prefill_weight must be >= 0, got {self.prefill_weight}")
        if self.local_prefill_max_tokens < 0:
            raise ValueError(
                f"local_prefill_max_tokens must be >= 0, got {self.local_prefill_max_tokens}"
            )
        if self.prefill_saturated_tokens < 1:
            raise ValueError(
                f"prefill_saturated_tokens must be >= 1, got {self.prefill_saturated_tokens}"
            )


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
    load_interval_s: float = 0.2  # how often each worker's Load is polled
    health_interval_s: float = 1.0
    rpc_timeout_s: float = 2.0  # Health, Load, Abort
    # `/admin/*` (worker registration, pool targets) needs `Authorization: Bearer <admin_key>`;
    # None: the admin API is open (the router binds loopback unless told otherwise).
    admin_key: str | None = field(default=None, repr=False)
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
        if not self.served_model_name:
            raise ValueError("served_model_name must be non-empty")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
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
