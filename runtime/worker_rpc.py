"""The RPCs both worker roles serve the same way (Health, Load, KVEvents), torch-free.

The engine side is seen through small Protocols so this module needs neither torch nor the
engine package: a worker passes its AsyncEngine, which satisfies them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from proto import tandem_pb2 as pb


class LoadSnapshot(Protocol):
    num_running: int
    num_waiting: int
    num_reserved: int
    num_blocks_total: int
    num_blocks_free: int
    num_blocks_cached: int
    num_blocks_used: int


class BlockCountsView(Protocol):
    num_free: int
    num_cached: int
    num_used: int
    num_total: int


class CacheEvent(Protocol):
    stored: tuple[int, ...]
    removed: tuple[int, ...]


class EngineView(Protocol):
    @property
    def load(self) -> LoadSnapshot: ...
    @property
    def error(self) -> BaseException | None: ...
    def subscribe_kv_events(self) -> asyncio.Queue[CacheEvent]: ...
    def unsubscribe_kv_events(self, sub: asyncio.Queue[CacheEvent]) -> None: ...
    async def cached_block_hashes(self) -> list[int]: ...
    async def abort_request(self, request_id: str) -> bool: ...
    async def audit_blocks(self) -> tuple[BlockCountsView, str, list[str]]: ...


@dataclass(frozen=True, slots=True)
class WorkerIdentity:
    worker_id: str
    role: str  # "prefill" | "decode"
    model: str
    block_size: int
    max_num_seqs: int
    max_model_len: int
    metrics_address: str = ""  # host:port of the worker's Prometheus /metrics; "": none


def health(identity: WorkerIdentity, engine: EngineView) -> pb.HealthResponse:
    return pb.HealthResponse(
        worker_id=identity.worker_id,
        role=identity.role,
        model=identity.model,
        ready=engine.error is None,
        metrics_address=identity.metrics_address,
    )


async def load(
    identity: WorkerIdentity, engine: EngineView, audit_blocks: bool = False
) -> pb.WorkerLoad:
    """The last step's snapshot; with audit_blocks, also a full block audit on the engine
    thread (its counts are of that moment, the snapshot's of the last step)."""
    snap = engine.load
    msg = pb.WorkerLoad(
        worker_id=identity.worker_id,
        role=identity.role,
        num_running=snap.num_running,
        num_waiting=snap.num_waiting,
        num_blocks_total=snap.num_blocks_total,
        num_blocks_free=snap.num_blocks_free,
        block_size=identity.block_size,
        max_num_seqs=identity.max_num_seqs,
        max_model_len=identity.max_model_len,
        num_blocks_cached=snap.num_blocks_cached,
        num_blocks_used=snap.num_blocks_used,
    )
    if audit_blocks:
        counts, error, holders = await engine.audit_blocks()
        msg.block_audit.CopyFrom(
            pb.BlockAudit(
                num_free=counts.num_free,
                num_cached=counts.num_cached,
                num_used=counts.num_used,
                num_total=counts.num_total,
                error=error,
                holders=holders,
            )
        )
    return msg


async def kv_events(engine: EngineView) -> AsyncIterator[pb.KVEvent]:
    """First message: the whole prefix cache (cleared=True, then stored); then the changes."""
    sub = engine.subscribe_kv_events()
    try:
        snapshot = await engine.cached_block_hashes()
        yield pb.KVEvent(cleared=True, stored_block_hashes=snapshot)
        while True:
            event = await sub.get()
            yield pb.KVEvent(stored_block_hashes=event.stored, removed_block_hashes=event.removed)
    finally:
        engine.unsubscribe_kv_events(sub)


class WorkerRpcs:
    """The RPCs both roles serve identically; a role's servicer inherits them next to its
    generated servicer base and sets `identity` and `engine`."""

    identity: WorkerIdentity
    engine: EngineView

    async def Abort(self, request: pb.AbortRequest, context: object) -> pb.AbortResponse:
        return pb.AbortResponse(found=await self.engine.abort_request(request.request_id))

    async def Health(self, request: pb.HealthRequest, context: object) -> pb.HealthResponse:
        return health(self.identity, self.engine)

    async def Load(self, request: pb.LoadRequest, context: object) -> pb.WorkerLoad:
        return await load(self.identity, self.engine, request.audit_blocks)

    async def KVEvents(
        self, request: pb.KVEventsRequest, context: object
    ) -> AsyncIterator[pb.KVEvent]:
        async for event in kv_events(self.engine):
            yield event
