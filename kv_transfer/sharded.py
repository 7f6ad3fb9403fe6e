"""KV hand-off for tensor-parallel workers: one transfer = one part per sink rank.

A TP worker's rank r holds kv heads [r*H/T, (r+1)*H/T) of every block, and the block ids are the
same on every rank (one block manager, on rank 0). So a transfer into a decode worker of TP T is
T parts, one per sink rank, each an ordinary transfer with its own lease, claim and fencing on
that rank's Sink (its own agent and pool shard), all on the same block ids. These classes join
the parts on rank 0's event loop, with the interface of SinkThread / SourceThread:

`ShardedSink` (decode, T ranks): expect() opens a lease on every rank and joins the handles
(KVHandle.more_ranks); the KV has landed when every rank's part landed (then, and only then, the
request is admitted); the first part lost makes the transfer lost and aborts the others; the
blocks are released once *every* rank says no write of its part can land any more (each rank's
own fence), so no rank's blocks are reused while a write may still reach them.

`ShardedSource` (prefill, S ranks) routes sink rank r's part to the endpoint holding its heads:
  - S == T: source rank r (its own pool shard, raw block copies, no staging);
  - S == 1 < T: a HeadSliceSource for (r, T) on this rank (staging gather, head_slice.py);
  - otherwise refused before anything is claimed (S > T would need the sink to merge heads from
    several sources into one block: not done; 1 < S < T: not done).
A send is done when every part is done; it has failed (SendFailed) when any part failed, and
is reported only once every part has ended, so the source blocks are never freed while a part
still reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kv_transfer.base import (
    KVHandle,
    KVLanded,
    KVLost,
    KVReleased,
    ReleaseReason,
    SendDone,
    SendFailed,
)
from kv_transfer.endpoint_thread import SinkThread, SourceThread


@dataclass(slots=True)
class _Joint:
    """One transfer on every rank: the leases being opened, then the joined outcome and each
    rank's outcome once known."""

    block_ids: tuple[int, ...]
    opening: asyncio.Future[KVHandle]  # expect() on every rank; registered before it runs
    parts: list[KVLanded | KVLost | None]
    outcome: asyncio.Future[KVLanded | KVLost] | None = None


class ShardedSink:
    """A TP decode worker's sink: `ranks[r]` runs rank r's endpoint (rank 0's own Sink, the
    others' RemoteEndpoints). Same async interface as SinkThread.

    Hazard (as in SinkThread): the caller may be cancelled while the leases are being opened;
    the transfer is open (is_open) from the moment expect() is called, so the caller's release
    path aborts and awaits it instead of freeing blocks that a rank is about to lease."""

    def __init__(self, ranks: Sequence[SinkThread]) -> None:
        self.ranks = list(ranks)
        self._joints: dict[str, _Joint] = {}  # loop only

    async def expect(self, transfer_id: str, block_ids: Sequence[int], lease_s: float) -> KVHandle:
        if transfer_id in self._joints:
            raise ValueError(f"transfer {transfer_id!r} is open")
        parts: list[KVLanded | KVLost | None] = [None] * len(self.ranks)
        opening = asyncio.ensure_future(self._open(transfer_id, block_ids, lease_s, parts))
        self._joints[transfer_id] = _Joint(tuple(block_ids), opening, parts)
        try:
            return await asyncio.shield(opening)
        except BaseException:
            if opening.done() and opening.exception() is not None:
                self._joints.pop(transfer_id, None)  # nothing is open on any rank
            raise

    async def _open(
        self,
        transfer_id: str,
        block_ids: Sequence[int],
        lease_s: float,
        parts: list[KVLanded | KVLost | None],
    ) -> KVHandle:
        results = await asyncio.gather(
            *(r.expect(transfer_id, block_ids, lease_s) for r in self.ranks),
            return_exceptions=True,
        )
        handles = [h for h in results if isinstance(h, KVHandle)]
        if len(handles) < len(self.ranks):
            # Some ranks opened a lease nobody will ever see: give those back (an unclaimed
            # lease is released at once) before the caller frees the blocks.
            for rank, h in zip(self.ranks, results, strict=True):
                if isinstance(h, KVHandle):
                    await rank.abort(transfer_id)
                    await rank.settled(transfer_id)
            error = next(e for e in results if isinstance(e, BaseException))
            raise error
        joint = self._joints[transfer_id]
        joint.outcome = asyncio.ensure_future(self._join(transfer_id, parts))
        return KVHandle.of_ranks(handles)

    async def _join(
        self, transfer_id: str, joint_parts: list[KVLanded | KVLost | None]
    ) -> KVLanded | KVLost:
        pending = {
            asyncio.ensure_future(rank.outcome(transfer_id)): i for i, rank in enumerate(self.ranks)
        }
        lost: KVLost | None = None
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for f in done:
                i = pending.pop(f)
                part = joint_parts[i] = f.result()
                if isinstance(part, KVLost) and lost is None:
                    lost = part  # the transfer will not land: the other parts give up too
                    for j in pending.values():
                        await self.ranks[j].abort(transfer_id)
        if lost is not None:
            return lost
        landed = [p for p in joint_parts if isinstance(p, KVLanded)]
        return KVLanded(
            transfer_id,
            landed[0].generation,
            landed[0].block_ids,
            sum(p.num_bytes for p in landed),
        )

    async def _opened(self, transfer_id: str) -> _Joint | None:
        """The transfer's joint once its leases are open on every rank; None (and forgotten)
        if opening them failed: then nothing is open anywhere."""
        joint = self._joints.get(transfer_id)
        if joint is None:
            return None
        try:
            await asyncio.shield(joint.opening)
        except Exception:
            self._joints.pop(transfer_id, None)
            return None
        return joint

    async def outcome(self, transfer_id: str) -> KVLanded | KVLost:
        """KVLanded once every rank's part landed; KVLost once one part is lost (and every
        other part has landed or is lost too); then wait for released()."""
        joint = self._joints[transfer_id]
        await asyncio.shield(joint.opening)
        assert joint.outcome is not None
        result = await asyncio.shield(joint.outcome)
        if isinstance(result, KVLanded):
            del self._joints[transfer_id]
        return result

    async def released(self, transfer_id: str) -> KVReleased:
        """Resolves once no write of any rank's part can land any more."""
        joint = self._joints[transfer_id]
        assert joint.outcome is not None
        lost = await asyncio.shield(joint.outcome)
        assert isinstance(lost, KVLost)
        for rank, part in zip(self.ranks, joint.parts, strict=True):
            if isinstance(part, KVLost):  # landed parts hold nothing open
                await rank.released(transfer_id)
        del self._joints[transfer_id]
        return KVReleased(transfer_id, lost.generation, joint.block_ids, lost.reason)

    async def settled(self, transfer_id: str) -> KVLanded | KVReleased:
        """After abort(): KVLanded (every part landed first) or the KVReleased behind every
        rank's fence (see SinkThread.settled); a transfer whose leases could not be opened
        settles at once (nothing is open on any rank)."""
        joint = self._joints.get(transfer_id)
        if joint is None or await self._opened(transfer_id) is None:
            reason = ReleaseReason.FAILED
            block_ids = joint.block_ids if joint is not None else ()
            return KVReleased(transfer_id, 0, block_ids, reason)
        result = await self.outcome(transfer_id)
        if isinstance(result, KVLanded):
            return result
        return await self.released(transfer_id)

    def is_open(self, transfer_id: str) -> bool:
        return transfer_id in self._joints

    async def abort(self, transfer_id: str) -> None:
        if await self._opened(transfer_id) is None:
            return  # no lease anywhere
        await asyncio.gather(*(r.abort(transfer_id) for r in self.ranks))

    def close(self) -> None:
        for rank in self.ranks:
            rank.close()


class ShardedSource:
    """A prefill worker's source for sinks of any TP (see the module docstring). `ranks[s]`
    runs source rank s's endpoint over its own pool shard (rank 0's own Source, the others'
    RemoteEndpoints); `head_slices(r, T)` builds this rank's HeadSliceSource thread for sink
    rank r of T (only called when this worker has TP 1). Same async interface as SourceThread."""

    def __init__(
        self,
        ranks: Sequence[SourceThread],
        head_slices: Callable[[int, int], SourceThread],
    ) -> None:
        self.ranks = list(ranks)
        self._make_slice = head_slices
        self._slices: dict[tuple[int, int], SourceThread] = {}  # (sink rank, sink TP)

    def route(self, handle: KVHandle) -> list[tuple[SourceThread, KVHandle]]:
        """(endpoint, one-rank handle) for each sink rank; raises ValueError for a pairing of
        TP sizes this worker cannot serve, before anything is claimed."""
        sink_tp, source_tp = handle.sink_tp, len(self.ranks)
        if sink_tp == source_tp:
            return [(self.ranks[r], handle.rank(r)) for r in range(sink_tp)]
        if source_tp == 1:
            parts = []
            for r in range(sink_tp):
                key = (r, sink_tp)
                if key not in self._slices:
                    self._slices[key] = self._make_slice(r, sink_tp)
                parts.append((self._slices[key], handle.rank(r)))
            return parts
        raise ValueError(
            f"a prefill worker with tensor_parallel_size={source_tp} cannot feed a decode worker "
            f"with tensor_parallel_size={sink_tp}: the prefill side's TP must be 1 or equal to "
            "the decode side's (merging several ranks' heads into one block is not done)"
        )

    async def prepare(self, handle: KVHandle) -> None:
        parts = self.route(handle)
        results = await asyncio.gather(*(ep.prepare(h) for ep, h in parts), return_exceptions=True)
        errors = [e for e in results if isinstance(e, BaseException)]
        if errors:  # a duplicate on some rank: give back the claims this call made
            for (ep, h), res in zip(parts, results, strict=True):
                if not isinstance(res, BaseException):
                    with contextlib.suppress(ValueError):
                        await ep.cancel(h)
            raise errors[0]

    async def cancel(self, handle: KVHandle) -> None:
        results = await asyncio.gather(
            *(ep.cancel(h) for ep, h in self.route(handle)), return_exceptions=True
        )
        errors = [e for e in results if isinstance(e, BaseException)]
        if errors:
            raise errors[0]

    async def send(self, handle: KVHandle, src_block_ids: Sequence[int]) -> SendDone | SendFailed:
        parts = self.route(handle)
        if len(parts) == 1:  # TP 1 -> TP 1: the plain path, no joining
            ep, h = parts[0]
            return await ep.send(h, src_block_ids)
        results = await asyncio.gather(
            *(ep.send(h, src_block_ids) for ep, h in parts), return_exceptions=True
        )
        for r in results:  # a malformed call: the same on every part
            if isinstance(r, BaseException):
                raise r
        failed = [r for r in results if isinstance(r, SendFailed)]
        if failed:
            return SendFailed(handle.transfer_id, handle.generation, failed[0].error)
        done = [r for r in results if isinstance(r, SendDone)]
        return SendDone(
            handle.transfer_id,
            handle.generation,
            sum(d.num_bytes for d in done),
            max(d.elapsed_s for d in done),  # the parts run concurrently
        )

    def close(self) -> None:
        for ep in [*self.ranks, *self._slices.values()]:
            ep.close()
