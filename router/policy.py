"""Routing decisions: pure functions over worker snapshots, each returning its reason.

No I/O, no clocks, no gRPC or HTTP types: `router/registry.py` builds the snapshots and the
prompt's per-worker prefix overlap, `route()` decides, the server acts and puts
`RouteDecision.header_value()` in the `x-tandem-route` response header.

Cost (lower is better), in KV blocks of the worker's block_size, like Dynamo's KV router:

    prefill_blocks(w) = (queued_prefill_tokens(w) + uncached_tokens(w)) / block_size
    decode_blocks(w)  = held_blocks(w) + request_blocks
    decode worker that also prefills (collocated, auto):
                        prefill_weight * prefill_blocks + decode_blocks
    decode worker, disagg:  decode_blocks
    prefill worker:         prefill_weight * prefill_blocks

Where it departs from Dynamo (anchors.md 1.2), and why:
- queued_prefill_tokens counts only the *uncached* tokens of requests still prefilling (the
  router knew each one's overlap when it dispatched it) and drops a request the moment its first
  token is back, so a worker working through cache hits does not look busy.
- held_blocks is max(the worker's last report, the router's own count of its requests' context
  blocks); the router's count moves at dispatch time, so a burst between two Load polls spreads
  out instead of stampeding the worker that looked idle (dynamo #589).
- In disagg mode the two pools are costed on their own resource: prefill workers on prefill
  work (their KV is released after the hand-off), decode workers on KV held.
- A worker whose reported free blocks cannot hold the request is only used when none can.
- Exact ties rotate with the request sequence number instead of always taking the first worker,
  so single-turn traffic with no prefix reuse spreads evenly (dynamo #7836).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass

from router.config import Mode, PolicyConfig, Role


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    """One worker as the router sees it at decision time (built by the registry)."""

    worker_id: str
    address: str  # host:port of its gRPC server
    role: Role
    healthy: bool  # Health said ready and the latest Health/Load call succeeded
    block_size: int  # tokens per KV block
    max_model_len: int  # tokens, prompt + output
    num_blocks_total: int
    num_blocks_free: int  # last report: allocatable now (free + evictable cached)
    max_num_seqs: int = 0  # requests the worker's engine runs per step (its Load report)
    # The router's own accounting of requests it dispatched here; current at decision time.
    num_inflight: int = 0  # requests not finished
    inflight_prefill_tokens: int = 0  # uncached prompt tokens whose prefill is not done
    inflight_kv_blocks: int = 0  # KV blocks of those requests' contexts so far

    @property
    def held_blocks(self) -> int:
        return max(self.num_blocks_total - self.num_blocks_free, self.inflight_kv_blocks)


@dataclass(frozen=True, slots=True)
class RouteRequest:
    num_prompt_tokens: int
    # worker_id -> leading prompt blocks found in that worker's prefix cache (its block_size)
    overlap_blocks: Mapping[str, int]
    seq: int = 0  # a per-request counter; rotates exact ties


class RouteCause(enum.Enum):
    """Why the prompt is computed where it is: the `reason` label of the route-decision metric
    (the free-text `RouteDecision.reason` adds the numbers)."""

    DISAGG = "disagg"  # mode=disagg: always on a prefill worker
    COLLOCATED = "collocated"  # mode=collocated: always on the decode worker
    FEW_UNCACHED = "few_uncached"  # auto, local: uncached tokens <= local_prefill_max_tokens
    NO_PREFILL_WORKER = "no_prefill_worker"  # auto, local: no healthy prefill worker
    PREFILL_SATURATED = "prefill_saturated"  # auto, local: the best prefill worker is saturated
    MANY_UNCACHED = "many_uncached"  # auto, remote: uncached tokens > local_prefill_max_tokens


@dataclass(frozen=True, slots=True)
class RouteDecision:
    mode: Mode
    decode_worker_id: str
    decode_address: str
    prefill_worker_id: str | None  # None: the decode worker prefills (PrefillPlan.local)
    prefill_address: str | None
    overlap_blocks: int  # prompt blocks cached on the worker that prefills
    uncached_tokens: int  # prompt tokens that worker computes
    reason: str
    cause: RouteCause

    @property
    def remote_prefill(self) -> bool:
        return self.prefill_worker_id is not None

    def header_value(self) -> str:
        """The `x-tandem-route` header: `key=value` pairs separated by `; `."""
        prefill = self.prefill_worker_id if self.prefill_worker_id is not None else "local"
        return (
            f"mode={self.mode.value}; decode={self.decode_worker_id}; prefill={prefill}; "
            f"overlap_blocks={self.overlap_blocks}; uncached_tokens={self.uncached_tokens}; "
            f"reason={self.reason}"
        )


class Unroutable(Exception):
    """No worker can take the request now (the server answers 503)."""


def uncached_tokens(num_prompt_tokens: int, overlap_blocks: int, block_size: int) -> int:
    """Prompt tokens a worker must compute: at least one (the last prompt token always runs)."""
    return num_prompt_tokens - min(overlap_blocks * block_size, num_prompt_tokens - 1)


def prefill_cost(w: WorkerSnapshot, req: RouteRequest, weight: float) -> float:
    todo = w.inflight_prefill_tokens + uncached_tokens(
        req.num_prompt_tokens, req.overlap_blocks.get(w.worker_id, 0), w.block_size
    )
    return weight * todo / w.block_size


def decode_cost(w: WorkerSnapshot, req: RouteRequest) -> float:
    return w.held_blocks + math.ceil(req.num_prompt_tokens / w.block_size)


def route(
    req: RouteRequest, workers: Sequence[WorkerSnapshot], mode: Mode, config: PolicyConfig
) -> RouteDecision:
    """Pick the decode worker and where the prompt is computed; raises Unroutable."""
    decode = [
        w
        for w in workers
        if w.role is Role.DECODE and w.healthy and w.max_model_len > req.num_prompt_tokens
    ]
    if not decode:
        raise Unroutable("no healthy decode worker can hold the prompt")
    prefill = [
        w
        for w in workers
        if w.role is Role.PREFILL and w.healthy and w.max_model_len > req.num_prompt_tokens
    ]
    if mode is Mode.DISAGG:
        if not prefill:
            raise Unroutable("mode=disagg and no healthy prefill worker can take the prompt")
        d, d_why = _pick(decode, req, lambda w: decode_cost(w, req))
        p, p_why = _pick(prefill, req, lambda w: prefill_cost(w, req, config.prefill_weight))
        cause = RouteCause.DISAGG
        return _remote(mode, d, p, req, cause, f"decode {d_why}; prefill {p_why}")

    def local_cost(w: WorkerSnapshot) -> float:
        return prefill_cost(w, req, config.prefill_weight) + decode_cost(w, req)

    d, d_why = _pick(decode, req, local_cost)
    if mode is Mode.COLLOCATED:
        return _local(mode, d, req, RouteCause.COLLOCATED, f"collocated; decode {d_why}")
    local_todo = uncached_tokens(
        req.num_prompt_tokens, req.overlap_blocks.get(d.worker_id, 0), d.block_size
    )
    if local_todo <= config.local_prefill_max_tokens:
        why = f"uncached {local_todo} <= {config.local_prefill_max_tokens} tokens"
        return _local(mode, d, req, RouteCause.FEW_UNCACHED, f"{why}; decode {d_why}")
    if not prefill:
        why = f"no healthy prefill worker; decode {d_why}"
        return _local(mode, d, req, RouteCause.NO_PREFILL_WORKER, why)
    p, p_why = _pick(prefill, req, lambda w: prefill_cost(w, req, config.prefill_weight))
    if p.inflight_prefill_tokens >= config.prefill_saturated_tokens:
        why = (
            f"prefill pool saturated ({p.worker_id} has {p.inflight_prefill_tokens} "
            f">= {config.prefill_saturated_tokens} queued tokens)"
        )
        return _local(mode, d, req, RouteCause.PREFILL_SATURATED, f"{why}; decode {d_why}")
    why = f"uncached {local_todo} > {config.local_prefill_max_tokens} tokens"
    cause = RouteCause.MANY_UNCACHED
    return _remote(mode, d, p, req, cause, f"{why}; decode {d_why}; prefill {p_why}")


def _pick(
    candidates: Sequence[WorkerSnapshot],
    req: RouteRequest,
    cost: Callable[[WorkerSnapshot], float],
) -> tuple[WorkerSnapshot, str]:
    """argmin of cost among the workers that fit the request (all of them if none fits)."""
    fitting = [w for w in candidates if w.num_blocks_free * w.block_size >= req.num_prompt_tokens]
    pool = fitting or list(candidates)
    costs = [cost(w) for w in pool]
    n = len(pool)
    # exact ties: the earliest index at or after seq mod n (rotation, not always the first)
    best = min(range(n), key=lambda i: (costs[i], pool[i].num_inflight, (i - req.seq) % n))
    chosen = pool[best]
    others = ", ".join(
        f"{w.worker_id}={c:g}"
        for i, (w, c) in enumerate(zip(pool, costs, strict=True))
        if i != best
    )
    why = f"{chosen.worker_id} cost={costs[best]:g}"
    if others:
        why += f" (vs {others})"
    if not fitting:
        why += " (none has free blocks for the prompt)"
    return chosen, why


def _local(
    mode: Mode, d: WorkerSnapshot, req: RouteRequest, cause: RouteCause, reason: str
) -> RouteDecision:
    overlap = req.overlap_blocks.get(d.worker_id, 0)
    return RouteDecision(
        mode=mode,
        decode_worker_id=d.worker_id,
        decode_address=d.address,
        prefill_worker_id=None,
        prefill_address=None,
        overlap_blocks=overlap,
        uncached_tokens=uncached_tokens(req.num_prompt_tokens, overlap, d.block_size),
        reason=reason,
        cause=cause,
    )


def _remote(
    mode: Mode,
    d: WorkerSnapshot,
    p: WorkerSnapshot,
    req: RouteRequest,
    cause: RouteCause,
    reason: str,
) -> RouteDecision:
    overlap = req.overlap_blocks.get(p.worker_id, 0)
    return RouteDecision(
        mode=mode,
        decode_worker_id=d.worker_id,
        decode_address=d.address,
        prefill_worker_id=p.worker_id,
        prefill_address=p.address,
        overlap_blocks=overlap,
        uncached_tokens=uncached_tokens(req.num_prompt_tokens, overlap, p.block_size),
        reason=reason,
        cause=cause,
    )


def prefix_overlap(block_hashes: Sequence[int], cached: Container[int]) -> int:
    """Leading blocks of the prompt present in a worker's prefix cache (lookup stops at a miss)."""
    n = 0
    for h in block_hashes:
        if h not in cached:
            break
        n += 1
    return n
