"""WorkerRegistry: what the router knows of each worker, and its own in-flight accounting.

Three sources per worker, each refreshed by a background task on the router's event loop:
Health (every health_interval_s), Load (every load_interval_s) and the KVEvents stream (the
set of block hashes in the worker's prefix cache). The router adds what no poll can tell in
time: the requests it dispatched (Ticket), updated at dispatch, first token and finish.

Pools change at run time (`router/admin.py`): `add` registers a worker or points a known one at
its new address (a restarted worker), `drain` stops routing to it and removes it once nothing
dispatched to it is in flight, `remove` drops it at once.

Everything here runs on one event loop thread; nothing is locked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import grpc

from proto import tandem_pb2 as pb
from router.client import WorkerClient
from router.config import Role, WorkerAddress
from router.policy import RouteDecision, WorkerSnapshot, prefix_overlap
from router.prefill_rate import PrefillMeter
from runtime.block_hash import hash_request_blocks
from runtime.tls import TlsFiles

log = logging.getLogger(__name__)

EVENTS_RETRY_S = 0.5  # after the KVEvents stream breaks
EVENTS_UNIMPLEMENTED_RETRY_S = 5.0
# A route decision is dispatched (Ticket) on the next turns of the event loop, not atomically
# with it: a drained worker is removed only after this long, so a decision taken just before
# the drain is counted in flight before the worker's counts are trusted to be final.
DRAIN_GRACE_S = 1.0
DRAIN_POLL_S = 0.1


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
    num_prefilling: int = 0  # choices whose prompt it computes and whose first token is not back
    inflight_prefill_tokens: int = 0
    inflight_kv_blocks: int = 0
    prefill_meter: PrefillMeter = field(default_factory=PrefillMeter)  # prompts it computes
    draining: bool = False  # deregistered: never routed to again, removed once idle
    metrics_address: str = ""  # from Health: where Prometheus scrapes it ("": not reported)

    @property
    def idle(self) -> bool:
        return self.num_inflight == 0 and self.num_prefilling == 0

    @property
    def healthy(self) -> bool:
        # a Load without block_size/max_model_len is a worker still starting: not routable
        return (
            not self.draining
            and self.ready
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
        tls: TlsFiles | None = None,
        clock: Callable[[], float] = time.monotonic,  # seconds; times the prefill meters
    ) -> None:
        self._addresses = tuple(workers)
        self._clock = clock
        self._tls = tls  # of the gRPC channels to the workers; None: plaintext
        self._rpc_timeout_s = rpc_timeout_s
        self._load_interval_s = load_interval_s
        self._health_interval_s = health_interval_s
        self._workers: dict[str, WorkerState] = {}  # filled by start()
        self._tasks: dict[str, list[asyncio.Task[None]]] = {}  # worker_id -> its refresh tasks
        self._drains: dict[str, asyncio.Task[None]] = {}
        self._closing: set[asyncio.Task[None]] = set()  # old channels of moved workers

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connect to every configured worker and start the refresh tasks (from the running
        event loop: grpc.aio channels bind to it). Until then the registry has no worker."""
        for worker in self._addresses:
            self.add(worker)

    async def stop(self) -> None:
        drains = list(self._drains.values())
        self._drains.clear()
        for task in drains:
            task.cancel()
        for task in drains:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for worker_id in list(self._workers):
            await self.remove(worker_id)

    # ------------------------------------------------------------ membership (admin API)

    def add(self, worker: WorkerAddress) -> bool:
        """Register `worker` (event loop thread), or point the worker of that id at its new
        address: a restarted worker keeps its id and its in-flight accounting, its prefix
        cache is forgotten until it reports again, and the channel to the old address is closed
        (cutting what still streams from there). Returns False when nothing changed.

        Raises WorkerConflict for a draining worker or one registered with another role."""
        state = self._workers.get(worker.worker_id)
        if state is not None:
            if state.worker.role is not worker.role:
                raise WorkerConflict(
                    f"worker {worker.worker_id} is registered as {state.worker.role.value}"
                )
            if state.draining:
                raise WorkerConflict(f"worker {worker.worker_id} is draining")
            if state.worker.address == worker.address:
                return False
            log.info("worker %s moved to %s", worker.worker_id, worker.address)
            self._stop_refresh(state)
            old_client = state.client
            task = asyncio.get_running_loop().create_task(old_client.close())
            self._background(task)
            state.worker = worker
            state.client = WorkerClient(worker, self._rpc_timeout_s, self._tls)
            state.ready = state.reachable = False
            state.load = None
            state.cached_hashes.clear()
        else:
            log.info("worker %s (%s) added at %s", worker.worker_id, worker.role.value,
                     worker.address)  # fmt: skip
            state = WorkerState(worker, WorkerClient(worker, self._rpc_timeout_s, self._tls))
            self._workers[worker.worker_id] = state
        self._tasks[worker.worker_id] = [
            asyncio.create_task(self._poll(state)),
            asyncio.create_task(self._follow_events(state)),
        ]
        return True

    def drain(self, worker_id: str) -> None:
        """Stop routing to the worker now; remove it once everything dispatched to it (as
        decode worker or as prefiller) is done. Idempotent. KeyError when unknown."""
        state = self._workers[worker_id]
        if state.draining:
            return
        log.info("worker %s draining (%d in flight)", worker_id, state.num_inflight)
        state.draining = True
        self._drains[worker_id] = asyncio.create_task(self._remove_when_idle(state))

    async def remove(self, worker_id: str) -> None:
        """Drop the worker now (KeyError when unknown). Its channel is closed, which cuts any
        request still streaming from it: `drain` is the way that loses nothing."""
        state = self._workers.pop(worker_id)
        drain = self._drains.pop(worker_id, None)
        if drain is not None and drain is not asyncio.current_task():
            drain.cancel()
        tasks = self._stop_refresh(state)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await state.client.close()
        log.info("worker %s removed", worker_id)

    async def _remove_when_idle(self, state: WorkerState) -> None:
        await asyncio.sleep(DRAIN_GRACE_S)
        while not state.idle:
            await asyncio.sleep(DRAIN_POLL_S)
        await self.remove(state.worker.worker_id)

    def _stop_refresh(self, state: WorkerState) -> list[asyncio.Task[None]]:
        tasks = self._tasks.pop(state.worker.worker_id, [])
        for task in tasks:
            task.cancel()
        return tasks

    def _background(self, task: asyncio.Task[None]) -> None:
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # ------------------------------------------------------------ reads

    def client(self, worker_id: str) -> WorkerClient:
        return self._workers[worker_id].client

    def get(self, worker_id: str) -> WorkerState | None:
        return self._workers.get(worker_id)

    def block_size(self, worker_id: str) -> int:
        return self._workers[worker_id].block_size

    def states(self) -> Iterable[WorkerState]:
        return self._workers.values()

    def snapshot(self) -> tuple[WorkerSnapshot, ...]:
        now = self._clock()
        return tuple(_snapshot(s, now) for s in self._workers.values())

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
        prefiller.num_prefilling += 1
        prefiller.inflight_prefill_tokens += ticket.prefill_tokens
        prefiller.prefill_meter.started(self._clock())
        self._set_context(ticket, num_prompt_tokens)
        return ticket

    def add_tokens(self, ticket: Ticket, num_new_tokens: int) -> None:
        """Tokens came back: the prompt is done (first call) and the context grew."""
        if ticket.finished:
            return
        if ticket.prefill_pending:
            self._end_prefill(ticket)
            ticket.prefiller.prefill_meter.completed(self._clock(), ticket.prefill_tokens)
        self._set_context(ticket, ticket.context_tokens + num_new_tokens)

    def finish(self, ticket: Ticket) -> None:
        """Release the ticket's charges; idempotent."""
        if ticket.finished:
            return
        if ticket.prefill_pending:
            self._end_prefill(ticket)
            ticket.prefiller.prefill_meter.dropped(self._clock())
        ticket.decode.inflight_kv_blocks -= ticket.kv_blocks
        ticket.decode.num_inflight -= 1
        ticket.finished = True

    def _end_prefill(self, ticket: Ticket) -> None:
        ticket.prefill_pending = False
        ticket.prefiller.num_prefilling -= 1
        ticket.prefiller.inflight_prefill_tokens -= ticket.prefill_tokens

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
                    state.metrics_address = reply.metrics_address
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


class WorkerConflict(Exception):
    """A registration that contradicts the registry (role change, or a draining worker)."""


def apply_kv_event(cached: set[int], event: pb.KVEvent) -> None:
    """Fold one KVEvent into a worker's set of cached block hashes."""
    if event.cleared:
        cached.clear()
    cached.difference_update(event.removed_block_hashes)
    cached.update(event.stored_block_hashes)


def _snapshot(s: WorkerState, now: float) -> WorkerSnapshot:
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
        max_num_seqs=load.max_num_seqs,
        num_inflight=s.num_inflight,
        inflight_prefill_tokens=s.inflight_prefill_tokens,
        inflight_kv_blocks=s.inflight_kv_blocks,
        num_prefilling=s.num_prefilling,
        prefill_cost=s.prefill_meter.cost(),
        prefill_progress_s=s.prefill_meter.progress_s(now),
    )
