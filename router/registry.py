"""WorkerRegistry: what the router knows of each worker, and its own in-flight accounting.

Three sources per worker, each refreshed by a background task on the router's event loop:
Health (every health_interval_s), Load (every load_interval_s) and the KVEvents stream (the
set of block hashes in the worker's prefix cache). The router adds what no poll can tell in
time: the requests it dispatched (Ticket), updated at dispatch, first token and finish.

Everything here runs on one event loop thread; nothing is locked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import grpc

from proto import tandem_pb2 as pb
from router.client import WorkerClient
from router.config import Role, WorkerAddress
from router.policy import RouteDecision, WorkerSnapshot, prefix_overlap
from runtime.block_hash import hash_request_blocks

log = logging.getLogger(__name__)

EVENTS_RETRY_S = 0.5  # after the KVEvents stream breaks
EVENTS_UNIMPLEMENTED_RETRY_S = 5.0


@dataclass(slots=True)
class WorkerState:
    """Mutable, owned by the registry; read through `snapshot()`."""

    worker: WorkerAddress
    client: WorkerClient
    ready: bool = False  # the last Health reply said ready
    reachable: bool = False  # the last Health or Load call succeeded
    load: pb.WorkerLoad | None = None  # the last Load reply
    cached_hashes: set[int] = field(default_factory=set)  # from KVEvents
    num_inflight: int = 0
    inflight_prefill_tokens: int = 0
    inflight_kv_blocks: int = 0

    @property
    def healthy(self) -> bool:
        # a Load without block_size/max_model_len is a worker still starting: not routable
        return (
            self.ready
            and self.reachable
            and self.load is not None
            and self.load.block_size > 0
            and self.load.max_model_len > 0
        )

    @property
    def block_size(self) -> int:
        return max(self.load.block_size, 1) if self.load is not None else 1


@dataclass(slots=True)
class Ticket:
    """One dispatched choice, as counted against its workers until `finish`."""

    request_id: str
    decode: WorkerState
    prefiller: WorkerState  # the decode worker itself when the prefill is local
    prefill_tokens: int  # uncached prompt tokens charged to the prefiller until the first token
    context_tokens: int  # prompt + output so far, charged to the decode worker as blocks
    kv_blocks: int = 0
    prefill_pending: bool = True
    finished: bool = False


class WorkerRegistry:
    def __init__(
        self,
        workers: Sequence[WorkerAddress],
        *,
        rpc_timeout_s: float,
        load_interval_s: float,
        health_interval_s: float,
    ) -> None:
        self._addresses = tuple(workers)
        self._rpc_timeout_s = rpc_timeout_s
        self._load_interval_s = load_interval_s
        self._health_interval_s = health_interval_s
        self._workers: dict[str, WorkerState] = {}  # filled by start()
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connect to every worker and start the refresh tasks (from the running event loop:
        grpc.aio channels bind to it). Until then the registry has no worker."""
        for worker in self._addresses:
            state = WorkerState(worker, WorkerClient(worker, self._rpc_timeout_s))
            self._workers[worker.worker_id] = state
            self._tasks.append(asyncio.create_task(self._poll(state)))
            self._tasks.append(asyncio.create_task(self._follow_events(state)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for state in self._workers.values():
            await state.client.close()
        self._workers.clear()

    # ------------------------------------------------------------ reads

    def client(self, worker_id: str) -> WorkerClient:
        return self._workers[worker_id].client

    def block_size(self, worker_id: str) -> int:
        return self._workers[worker_id].block_size

    def states(self) -> Iterable[WorkerState]:
        return self._workers.values()

    def snapshot(self) -> tuple[WorkerSnapshot, ...]:
        return tuple(_snapshot(s) for s in self._workers.values())

    def any_healthy(self, role: Role) -> bool:
        return any(s.healthy for s in self._workers.values() if s.worker.role is role)

    def max_model_len(self) -> int | None:
        """The smallest context length among healthy decode workers (None: none reported)."""
        lens = [
            s.load.max_model_len
            for s in self._workers.values()
            if s.worker.role is Role.DECODE and s.healthy and s.load is not None
        ]
        return min(lens) if lens else None

    def overlaps(self, prompt_ids: Sequence[int]) -> dict[str, int]:
        """worker_id -> leading prompt blocks in its prefix cache (healthy workers with a cache).

        Hashes are computed once per distinct block_size."""
        by_block_size: dict[int, list[int]] = {}
        result: dict[str, int] = {}
        for s in self._workers.values():
            if not (s.healthy and s.cached_hashes):
                continue
            block_size = s.block_size
            hashes = by_block_size.get(block_size)
            if hashes is None:
                hashes = by_block_size[block_size] = hash_request_blocks(prompt_ids, block_size)
            result[s.worker.worker_id] = prefix_overlap(hashes, s.cached_hashes)
        return result

    def mark_unreachable(self, worker_id: str, why: str) -> None:
        """A call to the worker just failed as UNAVAILABLE: stop routing to it until its next
        successful poll (at most load_interval_s away) instead of after it."""
        self._set_reachable(self._workers[worker_id], False, why)

    # ------------------------------------------------------------ in-flight accounting

    def begin(self, request_id: str, decision: RouteDecision, num_prompt_tokens: int) -> Ticket:
        decode = self._workers[decision.decode_worker_id]
        prefiller = self._workers[decision.prefill_worker_id or decision.decode_worker_id]
        ticket = Ticket(request_id, decode, prefiller, decision.uncached_tokens, num_prompt_tokens)
        decode.num_inflight += 1
        prefiller.inflight_prefill_tokens += ticket.prefill_tokens
        self._set_context(ticket, num_prompt_tokens)
        return ticket

    def add_tokens(self, ticket: Ticket, num_new_tokens: int) -> None:
        """Tokens came back: the prompt is done (first call) and the context grew."""
        if ticket.finished:
            return
        if ticket.prefill_pending:
            ticket.prefill_pending = False
            ticket.prefiller.inflight_prefill_tokens -= ticket.prefill_tokens
        self._set_context(ticket, ticket.context_tokens + num_new_tokens)

    def finish(self, ticket: Ticket) -> None:
        """Release the ticket's charges; idempotent."""
        if ticket.finished:
            return
        if ticket.prefill_pending:
            ticket.prefill_pending = False
            ticket.prefiller.inflight_prefill_tokens -= ticket.prefill_tokens
        ticket.decode.inflight_kv_blocks -= ticket.kv_blocks
        ticket.decode.num_inflight -= 1
        ticket.finished = True

    def _set_context(self, ticket: Ticket, context_tokens: int) -> None:
        blocks = math.ceil(context_tokens / ticket.decode.block_size)
        ticket.decode.inflight_kv_blocks += blocks - ticket.kv_blocks
        ticket.kv_blocks = blocks
        ticket.context_tokens = context_tokens

    # ------------------------------------------------------------ refresh tasks

    async def _poll(self, state: WorkerState) -> None:
        loop = asyncio.get_running_loop()
        next_health = 0.0
        while True:
            try:
                if loop.time() >= next_health:
                    reply = await state.client.health()
                    next_health = loop.time() + self._health_interval_s
                    self._set_ready(state, reply.ready)
                state.load = await state.client.load()
                self._set_reachable(state, True)
            except grpc.aio.AioRpcError as exc:
                self._set_reachable(state, False, f"{exc.code().name}: {exc.details()}")
                next_health = 0.0  # ask Health again as soon as it answers
            await asyncio.sleep(self._load_interval_s)

    async def _follow_events(self, state: WorkerState) -> None:
        while True:
            try:
                async for event in state.client.kv_events():
                    apply_kv_event(state.cached_hashes, event)
                retry_s = EVENTS_RETRY_S
            except grpc.aio.AioRpcError as exc:
                unimplemented = exc.code() is grpc.StatusCode.UNIMPLEMENTED
                retry_s = EVENTS_UNIMPLEMENTED_RETRY_S if unimplemented else EVENTS_RETRY_S
            # The stream broke: what the worker caches from now on is unknown until it
            # resends; assume nothing rather than route to stale hits.
            state.cached_hashes.clear()
            await asyncio.sleep(retry_s)

    def _set_ready(self, state: WorkerState, ready: bool) -> None:
        if ready != state.ready:
            log.info("worker %s ready=%s", state.worker.worker_id, ready)
        state.ready = ready

    def _set_reachable(self, state: WorkerState, reachable: bool, why: str = "") -> None:
        if reachable != state.reachable:
            log.info("worker %s reachable=%s %s", state.worker.worker_id, reachable, why)
        state.reachable = reachable


def apply_kv_event(cached: set[int], event: pb.KVEvent) -> None:
    """Fold one KVEvent into a worker's set of cached block hashes."""
    if event.cleared:
        cached.clear()
    cached.difference_update(event.removed_block_hashes)
    cached.update(event.stored_block_hashes)


def _snapshot(s: WorkerState) -> WorkerSnapshot:
    load = s.load if s.load is not None else pb.WorkerLoad()
    return WorkerSnapshot(
        worker_id=s.worker.worker_id,
        address=s.worker.address,
        role=s.worker.role,
        healthy=s.healthy,
        block_size=s.block_size,
        max_model_len=load.max_model_len,
        num_blocks_total=load.num_blocks_total,
        num_blocks_free=load.num_blocks_free,
        num_inflight=s.num_inflight,
        inflight_prefill_tokens=s.inflight_prefill_tokens,
        inflight_kv_blocks=s.inflight_kv_blocks,
    )
