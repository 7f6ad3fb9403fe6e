"""SinkLedger: the lease and fencing state of every open transfer of one sink. Pure: no I/O, no
clock (callers pass `now`, monotonic seconds), so every path is unit-testable.

    expect()            claim (granted)             KV lands
  ──────────▶ EXPECTED ──────────────────▶ GRANTED ──────────▶ KVLanded (caller owns blocks)
                 │                            │
                 │ expire / abort             │ expire / abort / peer lost / source failed
                 ▼                            ▼
     KVLost + KVReleased at once        KVLost, FENCING ─ source + transport quiet ─▶ KVReleased
     (nobody was allowed to write)      (a write may still land: quarantine)

"Source quiet" means no write of this (transfer, generation) is or will be in flight from the
claiming source: it acked an abort, reported its write failed, or died (its control connection
dropped; + `peer_loss_grace_s`). With a one-sided transport (NIXL WRITE) only the source can
know that, so the ledger waits for it. With a two-sided transport (ucx) the sink itself matches
every incoming message and sends a fenced transfer's data to scratch, so "transport quiet" (no
receive into the blocks still in flight) is enough.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from kv_transfer.base import KVLanded, KVLost, KVReleased, ReleaseReason, SinkEvent


class Phase(enum.Enum):
    EXPECTED = "expected"  # lease open, not claimed: no source may write
    GRANTED = "granted"  # claimed by `peer`: its write may be in flight
    FENCING = "fencing"  # lost after the grant: quarantined until no write can land


@dataclass(slots=True)
class Transfer:
    transfer_id: str
    generation: int
    block_ids: tuple[int, ...]
    deadline: float  # lease end, monotonic seconds
    phase: Phase = Phase.EXPECTED
    peer: str | None = None  # agent name of the source that claimed it
    # The claiming source announced its write is being posted: a one-sided transport must now
    # progress (receive the landing notification). A claim may come long before the write
    # (claimed when prefill starts), and the sink should sleep in between.
    writing: bool = False
    reason: ReleaseReason | None = None
    source_quiet_at: float | None = None  # from then on the source cannot write any more
    transport_quiet: bool = True  # no local receive into block_ids in flight

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)


class SinkLedger:
    def __init__(self, num_blocks: int, needs_source_ack: bool, peer_loss_grace_s: float) -> None:
        self.num_blocks = num_blocks
        self.needs_source_ack = needs_source_ack
        self.peer_loss_grace_s = peer_loss_grace_s
        self._by_id: dict[str, Transfer] = {}
        self._by_gen: dict[int, Transfer] = {}
        self._held: set[int] = set()  # blocks of every open transfer, fencing ones included
        self._next_generation = 1

    # ---- queries ----------------------------------------------------------------------------
    def get(self, generation: int) -> Transfer | None:
        return self._by_gen.get(generation)

    def find(self, transfer_id: str) -> Transfer | None:
        return self._by_id.get(transfer_id)

    @property
    def num_open(self) -> int:
        return len(self._by_id)

    @property
    def num_granted(self) -> int:
        return sum(t.phase is Phase.GRANTED for t in self._by_id.values())

    @property
    def num_claimed(self) -> int:
        """Granted or fencing: a source may be writing (one-sided transports need progress)."""
        return sum(t.phase is not Phase.EXPECTED for t in self._by_id.values())

    @property
    def num_writing(self) -> int:
        """Claimed transfers whose source said its write is being posted."""
        return sum(t.writing for t in self._by_id.values())

    def held_blocks(self) -> frozenset[int]:
        return frozenset(self._held)

    def next_wakeup(self, now: float) -> float | None:
        """Earliest future time at which expire() or release_ready() has work."""
        times = [t.deadline for t in self._by_id.values() if t.phase is not Phase.FENCING]
        times += [
            t.source_quiet_at
            for t in self._by_id.values()
            if t.source_quiet_at is not None and t.source_quiet_at > now
        ]
        return min(times, default=None)

    # ---- transitions ------------------------------------------------------------------------
    def expect(self, transfer_id: str, block_ids: Sequence[int], deadline: float) -> Transfer:
        if transfer_id in self._by_id:
            raise ValueError(f"transfer {transfer_id!r} is still open")
        ids = tuple(int(b) for b in block_ids)
        if not ids:
            raise ValueError("a transfer needs at least one block")
        if len(set(ids)) != len(ids):
            raise ValueError(f"transfer {transfer_id!r} repeats a block id")
        bad = [b for b in ids if not 0 <= b < self.num_blocks]
        if bad:
            raise ValueError(f"block ids {bad[:8]} outside the pool of {self.num_blocks}")
        busy = self._held.intersection(ids)
        if busy:
            raise ValueError(
                f"blocks {sorted(busy)[:8]} still belong to an open (maybe fencing) transfer"
            )
        transfer = Transfer(transfer_id, self._next_generation, ids, deadline)
        self._next_generation += 1
        self._by_id[transfer_id] = transfer
        self._by_gen[transfer.generation] = transfer
        self._held.update(ids)
        return transfer

    def claim(self, generation: int, peer: str, now: float) -> tuple[Transfer | None, str]:
        """Grant `peer` the right to write until the transfer lands or is lost (lease expiry,
        abort); returns (transfer, "") or (None, why not). A source may claim as soon as it has
        the handle, long before it writes: the grant is what fences, not the write's timing."""
        t = self._by_gen.get(generation)
        if t is None:
            return None, "unknown generation (expired, aborted, finished or never issued)"
        if t.phase is not Phase.EXPECTED:
            return None, f"transfer {t.transfer_id!r} is {t.phase.value}, not open for a claim"
        if now >= t.deadline:
            return None, f"lease of {t.transfer_id!r} expired"
        t.phase, t.peer = Phase.GRANTED, peer
        return t, ""

    def writing(self, generation: int, peer: str) -> None:
        """The grantee says it is posting its write (a hint for progress; fencing needs none)."""
        t = self._by_gen.get(generation)
        if t is not None and t.peer == peer and t.phase is not Phase.EXPECTED:
            t.writing = True

    def landed(self, generation: int, peer: str, num_bytes: int) -> list[SinkEvent]:
        """The transport says all of (generation)'s data is in place; only a granted transfer
        of that peer lands (a fenced one stays fenced: its KV was already given up)."""
        t = self._by_gen.get(generation)
        if t is None or t.phase is not Phase.GRANTED or t.peer != peer:
            return []
        self._close(t)
        return [KVLanded(t.transfer_id, t.generation, t.block_ids, num_bytes)]

    def lose(
        self, transfer_id: str, reason: ReleaseReason, detail: str, now: float
    ) -> tuple[list[SinkEvent], Transfer | None]:
        """Give the transfer up. Returns the events and, if a source holds a grant, the
        transfer whose source must be told to stop (then it is FENCING)."""
        t = self._by_id.get(transfer_id)
        if t is None or t.phase is Phase.FENCING:
            return [], None
        events: list[SinkEvent] = [KVLost(t.transfer_id, t.generation, reason, detail)]
        t.reason = reason
        if t.phase is Phase.EXPECTED:
            self._close(t)
            events.append(KVReleased(t.transfer_id, t.generation, t.block_ids, reason))
            return events, None
        t.phase = Phase.FENCING
        events += self.release_ready(now)
        return events, t

    def expire(self, now: float) -> tuple[list[SinkEvent], list[Transfer]]:
        events: list[SinkEvent] = []
        fenced: list[Transfer] = []
        for t in [t for t in self._by_id.values() if t.phase is not Phase.FENCING]:
            if now >= t.deadline:
                ev, f = self.lose(t.transfer_id, ReleaseReason.EXPIRED, "lease expired", now)
                events += ev
                fenced += [f] if f is not None else []
        return events, fenced

    def source_quiet(
        self, generation: int, peer: str, failed: str | None, now: float
    ) -> list[SinkEvent]:
        """The source acked an abort, or (failed) reported its write failed and is over."""
        t = self._by_gen.get(generation)
        if t is None or t.peer != peer or t.phase is Phase.EXPECTED:
            return []
        events: list[SinkEvent] = []
        if t.phase is Phase.GRANTED:
            events += self.lose(
                t.transfer_id, ReleaseReason.FAILED, failed or "source gave up", now
            )[0]
        t.source_quiet_at = now if t.source_quiet_at is None else min(t.source_quiet_at, now)
        return events + self.release_ready(now)

    def peer_lost(self, peer: str, now: float) -> list[SinkEvent]:
        """The source's control connection dropped: it is dead, so after the grace period none
        of its writes can land. Its unclaimed handles stay open (another source may use them)."""
        events: list[SinkEvent] = []
        for t in [t for t in self._by_id.values() if t.peer == peer]:
            if t.phase is Phase.GRANTED:
                detail = f"source {peer} disconnected mid-transfer"
                events += self.lose(t.transfer_id, ReleaseReason.PEER_LOST, detail, now)[0]
            if t.source_quiet_at is None:
                t.source_quiet_at = now + self.peer_loss_grace_s
        return events + self.release_ready(now)

    def set_transport_quiet(self, generation: int, quiet: bool) -> None:
        t = self._by_gen.get(generation)
        if t is not None:
            t.transport_quiet = quiet

    def release_ready(self, now: float) -> list[SinkEvent]:
        events: list[SinkEvent] = []
        for t in [t for t in self._by_id.values() if t.phase is Phase.FENCING]:
            source_done = t.source_quiet_at is not None and t.source_quiet_at <= now
            if t.transport_quiet and (source_done or not self.needs_source_ack):
                self._close(t)
                reason = t.reason or ReleaseReason.FAILED
                events.append(KVReleased(t.transfer_id, t.generation, t.block_ids, reason))
        return events

    def _close(self, t: Transfer) -> None:
        del self._by_id[t.transfer_id]
        del self._by_gen[t.generation]
        self._held.difference_update(t.block_ids)
