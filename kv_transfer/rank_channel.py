"""The rank channel: rank 0 of a tensor-parallel worker drives the KV endpoint of each other rank.

Each rank of a TP worker runs its own KV endpoint (a Sink or a Source with its own NIXL agent)
over its own pool shard, so KV bytes never cross ranks. Rank 0 alone talks to the router and to
the other role's workers, so it commands rank r's endpoint over one TCP connection on loopback
(wire.Connection, msgpack): the endpoint's methods as calls with a reply, its events one-way.

    rank 0 -> r   {op: call, id, method, args}    expect | abort | prepare | cancel | send
    r -> rank 0   {op: reply, id, result} | {op: error, id, kind, reason}
    r -> rank 0   {op: events, events: [...]}     whatever the endpoint's poll() returned

`RemoteEndpoint` (rank 0) implements KVSink and KVSource over that connection, so that a
SinkThread / SourceThread runs it like a local endpoint; `serve_rank` (rank r) runs the real
endpoint and the connection on one thread. Calls block their (endpoint) thread for one loopback
round trip (~0.1-0.3 ms); events wake the rank-0 thread through the socket.

Hazard: the TP worker is one failure unit (its collectives cannot go on without a rank). A lost
connection means a lost rank (or a lost rank 0): `on_lost` is called once with the reason (the
worker exits; its peers see a dropped control connection and fence as for any dead process),
and serve_rank closes its endpoint and returns.
"""

from __future__ import annotations

import itertools
import logging
import select
import time
from collections.abc import Callable, Sequence
from typing import Any

from kv_transfer import base
from kv_transfer.base import (
    KVHandle,
    KVLanded,
    KVLost,
    KVReleased,
    KVSink,
    KVSource,
    KVTransferError,
    ReleaseReason,
    SendDone,
    SendFailed,
)
from kv_transfer.wire import Connection, ConnectionClosed, Message

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 30.0  # a rank that does not answer a call in this long is lost
Event = KVLanded | KVLost | KVReleased | SendDone | SendFailed

# errors that cross the channel by class name (anything else arrives as KVTransferError)
_ERRORS: dict[str, type[KVTransferError]] = {
    cls.__name__: cls
    for cls in vars(base).values()
    if isinstance(cls, type) and issubclass(cls, KVTransferError)
}


def event_to_wire(e: Event) -> Message:
    if isinstance(e, KVLanded):
        return {"kind": "landed", "tid": e.transfer_id, "gen": e.generation,
                "blocks": list(e.block_ids), "bytes": e.num_bytes}  # fmt: skip
    if isinstance(e, KVLost):
        return {"kind": "lost", "tid": e.transfer_id, "gen": e.generation,
                "reason": e.reason.value, "detail": e.detail}  # fmt: skip
    if isinstance(e, KVReleased):
        return {"kind": "released", "tid": e.transfer_id, "gen": e.generation,
                "blocks": list(e.block_ids), "reason": e.reason.value}  # fmt: skip
    if isinstance(e, SendDone):
        return {"kind": "done", "tid": e.transfer_id, "gen": e.generation,
                "bytes": e.num_bytes, "elapsed": e.elapsed_s}  # fmt: skip
    return {"kind": "failed", "tid": e.transfer_id, "gen": e.generation,
            "error": type(e.error).__name__, "reason": str(e.error)}  # fmt: skip


def event_from_wire(m: Message) -> Event:
    kind, tid, gen = m["kind"], str(m["tid"]), int(m["gen"])
    if kind == "landed":
        return KVLanded(tid, gen, tuple(m["blocks"]), int(m["bytes"]))
    if kind == "lost":
        return KVLost(tid, gen, ReleaseReason(m["reason"]), str(m["detail"]))
    if kind == "released":
        return KVReleased(tid, gen, tuple(m["blocks"]), ReleaseReason(m["reason"]))
    if kind == "done":
        return SendDone(tid, gen, int(m["bytes"]), float(m["elapsed"]))
    if kind == "failed":
        error = _error(str(m["error"]), str(m["reason"]))
        if not isinstance(error, KVTransferError):
            error = KVTransferError(str(error))
        return SendFailed(tid, gen, error)
    raise ConnectionClosed(f"unknown event kind {kind!r}")


def _error(kind: str, reason: str) -> Exception:
    if kind == "ValueError":
        return ValueError(reason)
    cls = _ERRORS.get(kind, KVTransferError)
    if cls is base.KVLayoutMismatch:
        return base.KVLayoutMismatch([reason])
    return cls(reason)


class RemoteEndpoint:
    """Rank 0's stand-in for rank r's Sink or Source (KVSink and KVSource: whichever methods
    the far side's endpoint has). Single-threaded like the endpoints it stands for."""

    def __init__(self, conn: Connection, rank: int, agent_name: str, address: str,
                 on_lost: Callable[[str], None]) -> None:  # fmt: skip
        self._conn = conn
        self.rank = rank
        self._agent_name = agent_name
        self._address = address  # the far sink's control channel ("" for a source)
        self._on_lost = on_lost
        self._lost: str | None = None
        self._ids = itertools.count()
        self._events: list[Event] = []

    @property
    def agent_name(self) -> str:
        return self._agent_name

    @property
    def address(self) -> str:
        return self._address

    # ---- KVSink -------------------------------------------------------------------------------
    def expect(self, transfer_id: str, block_ids: Sequence[int], lease_s: float) -> KVHandle:
        wire = self._call("expect", [transfer_id, list(block_ids), lease_s])
        return KVHandle.from_wire(wire)

    def abort(self, transfer_id: str) -> None:
        self._call("abort", [transfer_id])

    # ---- KVSource -----------------------------------------------------------------------------
    def connect(self, sink_address: str, timeout_s: float = 10.0) -> None:
        self._call("connect", [sink_address, timeout_s], timeout_s + CALL_TIMEOUT_S)

    def prepare(self, handle: KVHandle) -> None:
        self._call("prepare", [handle.to_wire()])

    def cancel(self, handle: KVHandle) -> None:
        self._call("cancel", [handle.to_wire()])

    def send(self, handle: KVHandle, src_block_ids: Sequence[int]) -> None:
        self._call("send", [handle.to_wire(), [int(b) for b in src_block_ids]])

    # ---- both ---------------------------------------------------------------------------------
    def poll(self, timeout_s: float = 0.0, wakeup_fd: int | None = None) -> list[Any]:
        deadline = time.monotonic() + timeout_s
        while not self._events and self._lost is None:
            self._read()
            left = deadline - time.monotonic()
            if self._events or self._lost is not None or left <= 0:
                break
            readers = [self._conn.fileno()] + ([wakeup_fd] if wakeup_fd is not None else [])
            ready = select.select(readers, [], [], left)[0]
            if wakeup_fd is not None and wakeup_fd in ready:
                self._read()
                break
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        self._conn.close()

    # ---- the channel --------------------------------------------------------------------------
    def _call(self, method: str, args: list[Any], timeout_s: float = CALL_TIMEOUT_S) -> Any:
        if self._lost is not None:
            raise KVTransferError(f"rank {self.rank} is lost: {self._lost}")
        call_id = next(self._ids)
        try:
            self._conn.send({"op": "call", "id": call_id, "method": method, "args": args})
            deadline = time.monotonic() + timeout_s
            while True:
                reply = None
                for msg in self._conn.receive():  # every message: events after the reply too
                    reply = self._take(msg, call_id) or reply
                if reply is not None:
                    if reply["op"] == "error":
                        raise _error(str(reply["kind"]), str(reply["reason"]))
                    return reply.get("result")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConnectionClosed(f"no reply to {method} in {timeout_s} s")
                select.select([self._conn.fileno()], [], [], left)
        except ConnectionClosed as e:
            self._lose(str(e))
            raise KVTransferError(f"rank {self.rank} is lost: {e}") from e

    def _take(self, msg: Message, call_id: int) -> Message | None:
        """Keep events; return msg if it is the reply to call_id."""
        if msg["op"] == "events":
            self._events += [event_from_wire(m) for m in msg["events"]]
            return None
        if msg["op"] in ("reply", "error") and msg.get("id") == call_id:
            return msg
        raise ConnectionClosed(f"unexpected message on the rank channel: {msg!r:.200}")

    def _read(self) -> None:
        try:
            self._conn.flush()
            for msg in self._conn.receive():
                self._take(msg, -1)
        except ConnectionClosed as e:
            self._lose(str(e))

    def _lose(self, why: str) -> None:
        if self._lost is None:
            self._lost = why
            log.error("tensor-parallel rank %d lost: %s", self.rank, why)
            self._on_lost(why)


def serve_rank(endpoint: KVSink | KVSource, conn: Connection, poll_s: float = 0.05) -> None:
    """Rank r: run `endpoint` for rank 0 until the connection drops, then close the endpoint."""
    try:
        while True:
            events = endpoint.poll(timeout_s=poll_s, wakeup_fd=conn.fileno())
            if events:
                conn.send({"op": "events", "events": [event_to_wire(e) for e in events]})
            conn.flush()
            for msg in conn.receive():
                conn.send(_serve_call(endpoint, msg))
    except ConnectionClosed as e:
        log.info("rank channel closed (%s): closing the KV endpoint", e)
    finally:
        endpoint.close()
        conn.close()


def _serve_call(endpoint: Any, msg: Message) -> Message:
    if msg.get("op") != "call":
        raise ConnectionClosed(f"expected a call, got {msg!r:.200}")
    call_id, method, args = msg["id"], str(msg["method"]), list(msg["args"])
    try:
        if method in ("prepare", "cancel", "send"):
            args[0] = KVHandle.from_wire(args[0])
        if method not in ("expect", "abort", "connect", "prepare", "cancel", "send"):
            raise ValueError(f"unknown rank channel method {method!r}")
        result = getattr(endpoint, method)(*args)
        if isinstance(result, KVHandle):
            result = result.to_wire()
        return {"op": "reply", "id": call_id, "result": result}
    except (ValueError, KVTransferError) as e:
        return {"op": "error", "id": call_id, "kind": type(e).__name__, "reason": str(e)}
