"""The role-split contract of KV transfer: handles, events, errors, KVSink and KVSource.

Push model. The decode side owns the destination blocks: it reserves them in its engine, calls
`KVSink.expect()` to open a lease on them and gets a `KVHandle`, which travels (over gRPC, as
plain fields) to the prefill side; `KVSource.send()` WRITEs the prompt's blocks into them. Both
sides learn outcomes from `poll()` events, never from callbacks, on the one thread that owns the
endpoint (neither class is thread-safe).

Sink events per expect(): exactly one of KVLanded (admit the request) or KVReleased (free the
blocks), and a KVLost first whenever the KV will not land. Source events per send(): exactly one
of SendDone or SendFailed, after which the source blocks may be freed.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from engine.kv_layout import KVLayout

# ---- errors -------------------------------------------------------------------------------


class KVTransferError(Exception):
    """Base of every error kv_transfer raises or reports in an event."""


class BackendUnavailable(KVTransferError):
    """The backend's Python package is not installed (see the `kv` extra in pyproject.toml)."""


class KVLayoutMismatch(KVTransferError):
    """The two pools do not share a byte layout; raw block copies would be garbage."""

    def __init__(self, differences: Sequence[str]) -> None:
        self.differences = tuple(differences)
        super().__init__("KV layouts differ: " + "; ".join(self.differences))


class HandshakeFailed(KVTransferError):
    """The control channel could not be set up (refused, wrong protocol or backend, timeout)."""


class TransferFailed(KVTransferError):
    """A transfer did not complete; the destination blocks hold nothing usable."""


class PeerLost(TransferFailed):
    """The other process is gone (its control connection dropped) before the transfer ended."""


class TransferAborted(TransferFailed):
    """The sink cancelled the transfer (lease expired or aborted) or refused a stale handle."""


# ---- the handle ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KVRankLease:
    """The lease one more rank of a tensor-parallel sink opened for the same transfer (same
    transfer_id and block ids: one block manager, on rank 0, allocates for every rank)."""

    sink_agent: str
    generation: int
    layout_hash: str
    sink_address: str


@dataclass(frozen=True, slots=True)
class KVHandle:
    """All a source needs to write one request's KV into a sink. Field names match
    proto/tandem.proto `KVHandle`; `to_wire`/`from_wire` give plain types (msgpack-able).

    A tensor-parallel sink of T ranks leases the same blocks on each rank (each holds its own
    kv heads): the top-level fields are rank 0's lease, `more_ranks` ranks 1..T-1 in order;
    `rank(r)` is the plain one-rank handle a rank's sink issued."""

    transfer_id: str  # chosen by the decode side, unique among its open transfers
    sink_agent: str  # the sink's agent name (NIXL agent / UCX worker), for logs and checks
    block_ids: tuple[int, ...]  # destination block ids in the sink's pool, in token order
    generation: int  # fencing token: the sink accepts a claim only for the current generation
    layout_hash: str  # KVLayout.compatibility_hash() of the sink's pool
    sink_address: str  # "host:port" of the sink's control channel
    more_ranks: tuple[KVRankLease, ...] = ()  # a TP sink's ranks 1..T-1

    @property
    def sink_tp(self) -> int:
        """Tensor-parallel size of the sink (1 + len(more_ranks))."""
        return 1 + len(self.more_ranks)

    def rank(self, r: int) -> KVHandle:
        """The one-rank handle of sink rank r (r = 0: this handle without more_ranks)."""
        if not 0 <= r < self.sink_tp:
            raise ValueError(f"sink rank {r} of a sink with {self.sink_tp} ranks")
        if r == 0:
            return dataclasses.replace(self, more_ranks=())
        lease = self.more_ranks[r - 1]
        return KVHandle(
            self.transfer_id,
            lease.sink_agent,
            self.block_ids,
            lease.generation,
            lease.layout_hash,
            lease.sink_address,
        )

    @classmethod
    def of_ranks(cls, handles: Sequence[KVHandle]) -> KVHandle:
        """Join one-rank handles (rank order) of the same transfer into one TP handle."""
        first = handles[0]
        for h in handles[1:]:
            if h.transfer_id != first.transfer_id or h.block_ids != first.block_ids:
                raise ValueError("rank handles of different transfers or block ids")
        more = tuple(
            KVRankLease(h.sink_agent, h.generation, h.layout_hash, h.sink_address)
            for h in handles[1:]
        )
        return dataclasses.replace(first, more_ranks=more)

    def to_wire(self) -> dict[str, object]:
        return {
            "transfer_id": self.transfer_id,
            "sink_agent": self.sink_agent,
            "block_ids": list(self.block_ids),
            "generation": self.generation,
            "layout_hash": self.layout_hash,
            "sink_address": self.sink_address,
            "more_ranks": [
                [m.sink_agent, m.generation, m.layout_hash, m.sink_address] for m in self.more_ranks
            ],
        }

    @classmethod
    def from_wire(cls, fields: dict[str, object]) -> KVHandle:
        """Inverse of to_wire; raises ValueError on a missing or mistyped field."""
        try:
            block_ids = fields["block_ids"]
            generation = fields["generation"]
            if not isinstance(block_ids, list | tuple) or not isinstance(generation, int):
                raise TypeError
            texts = [
                fields[k] for k in ("transfer_id", "sink_agent", "layout_hash", "sink_address")
            ]
            if not all(isinstance(t, str) for t in texts):
                raise TypeError
            more = fields.get("more_ranks", [])
            if not isinstance(more, list | tuple):
                raise TypeError
            leases = []
            for m in more:
                agent, gen, layout_hash, address = m
                if not (isinstance(gen, int) and isinstance(agent, str)):
                    raise TypeError
                leases.append(KVRankLease(agent, gen, str(layout_hash), str(address)))
            return cls(
                transfer_id=str(fields["transfer_id"]),
                sink_agent=str(fields["sink_agent"]),
                block_ids=tuple(int(b) for b in block_ids),
                generation=generation,
                layout_hash=str(fields["layout_hash"]),
                sink_address=str(fields["sink_address"]),
                more_ranks=tuple(leases),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a KVHandle: {fields!r}") from e


# ---- events -------------------------------------------------------------------------------


class ReleaseReason(enum.Enum):
    EXPIRED = "expired"  # the lease ran out before the KV landed
    ABORTED = "aborted"  # KVSink.abort() was called
    PEER_LOST = "peer_lost"  # the source that claimed the transfer went away
    FAILED = "failed"  # the source reported a failed write, or sent malformed data


@dataclass(frozen=True, slots=True)
class KVLanded:
    """Sink: every byte of the transfer is in `block_ids`; the caller admits the request and
    owns the blocks again (engine.admit_prefilled)."""

    transfer_id: str
    generation: int
    block_ids: tuple[int, ...]
    num_bytes: int


@dataclass(frozen=True, slots=True)
class KVLost:
    """Sink: the KV will not land (fail the request now). The blocks stay quarantined until the
    KVReleased of the same transfer: a late write may still hit them."""

    transfer_id: str
    generation: int
    reason: ReleaseReason
    detail: str


@dataclass(frozen=True, slots=True)
class KVReleased:
    """Sink: no write of this transfer can land any more; the caller frees the blocks
    (engine.cancel_kv_reservation). Emitted exactly once, after KVLost."""

    transfer_id: str
    generation: int
    block_ids: tuple[int, ...]
    reason: ReleaseReason


@dataclass(frozen=True, slots=True)
class SendDone:
    """Source: the blocks were written and the source no longer reads them (release_kv)."""

    transfer_id: str
    generation: int
    num_bytes: int
    elapsed_s: float  # send() to local completion


@dataclass(frozen=True, slots=True)
class SendFailed:
    """Source: the transfer ended without success; the source no longer reads its blocks."""

    transfer_id: str
    generation: int
    error: KVTransferError


SinkEvent = KVLanded | KVLost | KVReleased
SourceEvent = SendDone | SendFailed


# ---- the two roles ------------------------------------------------------------------------


class KVSink(Protocol):
    """Decode side: receives KV into blocks the caller reserved. One thread calls everything."""

    @property
    def agent_name(self) -> str: ...

    @property
    def address(self) -> str:
        """ "host:port" of the control channel that sources connect to."""
        ...

    def expect(self, transfer_id: str, block_ids: Sequence[int], lease_s: float) -> KVHandle:
        """Open a lease: `block_ids` (reserved by the caller, who still owns them) may be written
        by one source until the KV lands or `lease_s` runs out. Raises ValueError for an open
        transfer_id, a block outside the pool or a block another open transfer still holds."""
        ...

    def abort(self, transfer_id: str) -> None:
        """Give up on a transfer (client went away). Events follow from poll(); a transfer that
        is unknown or already finished is ignored."""
        ...

    def poll(self, timeout_s: float = 0.0, wakeup_fd: int | None = None) -> list[SinkEvent]:
        """Run the control channel, the transport and the lease clock; return events as soon as
        there are any, or [] after `timeout_s`, or once `wakeup_fd` (the caller's; it drains
        it) is readable. Sleeps in select(), never spins."""
        ...

    def close(self) -> None: ...


class KVSource(Protocol):
    """Prefill side: writes its blocks into a sink's reserved blocks. One thread calls all."""

    @property
    def agent_name(self) -> str: ...

    def connect(self, sink_address: str, timeout_s: float = 10.0) -> None:
        """Handshake with a sink now (send() does it lazily). Raises KVLayoutMismatch,
        HandshakeFailed or PeerLost."""
        ...

    def prepare(self, handle: KVHandle) -> None:
        """Claim the transfer now, while the KV is still being computed, so that send() posts
        without a round trip. The grant lasts until the lease ends: a lease lost meanwhile
        fails the later send() (its one SendFailed); a transfer that will not be sent must be
        cancel()ed. Raises ValueError for a transfer already in flight."""
        ...

    def cancel(self, handle: KVHandle) -> None:
        """Give up a prepared transfer before send(): the sink frees its blocks. No event.
        Raises ValueError once send() was called."""
        ...

    def send(self, handle: KVHandle, src_block_ids: Sequence[int]) -> None:
        """Start writing `src_block_ids` (same count as handle.block_ids, pairwise) into the
        sink. The source blocks must not change until this transfer's SendDone/SendFailed.
        Raises ValueError for a malformed call; every other outcome is an event."""
        ...

    def poll(self, timeout_s: float = 0.0, wakeup_fd: int | None = None) -> list[SourceEvent]:
        """Drive handshakes, claims and transfers; return events as soon as there are any, or
        once `wakeup_fd` is readable (see KVSink.poll)."""
        ...

    def close(self) -> None: ...


def check_layouts(mine: KVLayout, theirs: KVLayout) -> None:
    """Raise KVLayoutMismatch naming every field that differs (num_blocks may differ)."""
    differences = mine.differences(theirs)
    if differences:
        raise KVLayoutMismatch(differences)
