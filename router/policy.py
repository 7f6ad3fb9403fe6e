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

auto (conditional disaggregation) decides in time, not tokens: a prompt with few uncached
tokens on its decode worker is prefilled there when that worker runs nothing else (Dynamo's
isl_bounding idea, narrowed: a local prefill stretches one step of every request the decode
worker runs, a remote one costs them nothing; measured on two H200s, multi-turn at 32 req/s
met 89 % of the ITL SLO with short prompts local on a busy decode worker and 100 % with them
remote); any other prompt goes to the prefill worker while that worker's estimated time for
it fits `prefill_budget_s`, and past it to the decode worker when the decode worker would be
done sooner. Estimates are queued
uncached tokens over the prefill throughput the router measured on each worker from its own
dispatch and first-token times (router/prefill_rate.py), so a pool of long prompts spills at a
queue of a few prompts and a pool of short ones at many; Dynamo's original rule counted queued
requests, its current `prefill_load` policy a busy threshold.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass

from router.config import Mode, PolicyConfig, Role
from router.prefill_rate import PrefillCost


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
    num_prefilling: int = 0  # prompts it computes whose first token is not back
    # Prefill time model the router measured on this worker (router/prefill_rate.py): per
    # prompt and per uncached token, overheads included; None: none of them completed yet.
    prefill_cost: PrefillCost | None = None
    prefill_progress_s: float = 0.0  # seconds of its queued prefill work already done

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
    # auto, local: uncached tokens <= local_prefill_max_tokens and the decode worker runs
    # no other request of this router
    FEW_UNCACHED = "few_uncached"
    # auto, remote: few uncached tokens, but the decode worker runs requests whose next step a
    # local prefill would stretch, and the prefill worker is within budget (or idle, unmeasured)
    DECODE_BUSY = "decode_busy"
    NO_PREFILL_WORKER = "no_prefill_worker"  # auto, local: no healthy prefill worker
    # auto, local: the prefill worker's estimated time for the prompt is over prefill_budget_s
    # and the decode worker's own estimate is shorter
    PREFILL_SATURATED = "prefill_saturated"
    # auto, remote: uncached tokens > local_prefill_max_tokens and the prefill worker's estimate
    # is within prefill_budget_s (or not measured yet)
    MANY_UNCACHED = "many_uncached"
    # auto, remote: the prefill worker is over budget, but prefilling on the decode worker would
    # take no less time (its own queue, its chunked-prefill rate)
    LOCAL_NOT_SOONER = "local_not_sooner"


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


def prefill_time_s(w: WorkerSnapshot, tokens: int, cost: PrefillCost) -> float:
    """Estimated seconds until `w` has prefilled one more prompt of `tokens` uncached tokens
    after its queue: the queued prompts and their uncached tokens less the part already
    worked on, then this one, by `cost`."""
    queued_s = cost.seconds(w.num_prefilling, w.inflight_prefill_tokens)
    return max(0.0, queued_s - w.prefill_progress_s) + cost.seconds(1, tokens)


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
    few = local_todo <= config.local_prefill_max_tokens
    if few and d.num_inflight == 0:
        why = (
            f"uncached {local_todo} <= {config.local_prefill_max_tokens} tokens, {d.worker_id} idle"
        )
        return _local(mode, d, req, RouteCause.FEW_UNCACHED, f"{why}; decode {d_why}")
    if not prefill:
        why = f"no healthy prefill worker; decode {d_why}"
        return _local(mode, d, req, RouteCause.NO_PREFILL_WORKER, why)
    p, p_why = _pick(prefill, req, lambda w: prefill_cost(w, req, config.prefill_weight))
    cause, why = _auto_where(d, p, req, local_todo, config)
    if cause is RouteCause.PREFILL_SATURATED:
        return _local(mode, d, req, cause, f"{why}; decode {d_why}")
    return _remote(mode, d, p, req, cause, f"{why}; decode {d_why}; prefill {p_why}")


def _auto_where(
    d: WorkerSnapshot, p: WorkerSnapshot, req: RouteRequest, local_todo: int, config: PolicyConfig
) -> tuple[RouteCause, str]:
    """auto, a long uncached prompt or a short one for a busy decode worker: remote while the
    prefill worker's estimated time for it fits prefill_budget_s; past it, local when the
    decode worker would be done sooner.

    Both estimates are measured rates (router/prefill_rate.py) over queued work. Remote costs
    the prefill GPU and a KV transfer but keeps prompt chunks out of the decode batch (ITL);
    local shares the decode GPU's steps with its running requests. Spilling only past the
    budget keeps the decode batch free of chunks until the prefill queue would cost TTFT."""
    remote_todo = uncached_tokens(
        req.num_prompt_tokens, req.overlap_blocks.get(p.worker_id, 0), p.block_size
    )
    max_local = config.local_prefill_max_tokens
    if local_todo > max_local:
        cause, many = RouteCause.MANY_UNCACHED, f"uncached {local_todo} > {max_local} tokens"
    else:
        busy = f"{d.worker_id} runs {d.num_inflight} requests"
        cause, many = RouteCause.DECODE_BUSY, f"uncached {local_todo} <= {max_local} tokens, {busy}"
    p_cost = p.prefill_cost
    if p_cost is None:
        return cause, f"{many}; {p.worker_id} prefill rate not measured yet"
    # An idle prefill worker is never bypassed: the prompt costs the decode batch nothing there,
    # and it is how a rate measured under other conditions gets measured again.
    if p.inflight_prefill_tokens == 0:
        return cause, f"{many}; {p.worker_id} idle"
    remote_s = prefill_time_s(p, remote_todo, p_cost)
    remote = f"{p.worker_id} est {remote_s:.3f} s at {p_cost}"
    if remote_s <= config.prefill_budget_s:
        return cause, f"{many}; {remote} <= {config.prefill_budget_s:g} s"
    # A decode worker whose own model does not cover this prompt (none yet, too few prefills,
    # or fitted on much shorter prompts: router/prefill_rate.py) is assumed as fast as the
    # prefill worker (same model); its local prefills measure its own rate, decode batch
    # included.
    measured = d.prefill_cost
    if measured is not None and measured.covers(local_todo):
        d_cost, d_cost_why = measured, "measured"
    else:
        d_cost, d_cost_why = p_cost, f"assumed {p.worker_id}'s"
    local_s = prefill_time_s(d, local_todo, d_cost)
    local = f"local est {local_s:.3f} s at {d_cost} ({d_cost_why})"
    over = f"{remote} > {config.prefill_budget_s:g} s"
    if local_s < remote_s:
        return RouteCause.PREFILL_SATURATED, f"prefill pool saturated: {over}; {local}"
    return RouteCause.LOCAL_NOT_SOONER, f"{many}; {over}; {local} not sooner"


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
