"""Source: the prefill side of KV transfer over any SourceTransport (see base.KVSource).

A transfer goes queued (handshake pending) -> claimed (waiting for the sink's grant) -> granted
(may write; waiting for send()'s blocks) -> posted (the transport writes) -> SendDone /
SendFailed. The claim round trip is what makes one-sided writes safe: nothing is written before
the sink has checked the generation and the lease, and once an abort arrives the source acks
only after its write is over (never while it may still land). prepare() claims as soon as the
handle arrives (prefill starting), so the round trip overlaps compute and send() posts at once.
"""

from __future__ import annotations

import enum
import logging
import select
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.kv_cache import KVCache
from kv_transfer.base import (
    HandshakeFailed,
    KVHandle,
    KVLayoutMismatch,
    KVTransferError,
    PeerLost,
    SendDone,
    SendFailed,
    SourceEvent,
    TransferAborted,
    TransferFailed,
    check_layouts,
)
from kv_transfer.transport import SourceTransport
from kv_transfer.wire import (
    PROTOCOL_VERSION,
    Connection,
    ConnectionClosed,
    Message,
    connect,
    layout_from_wire,
    layout_to_wire,
    require,
)

log = logging.getLogger(__name__)


class _Stage(enum.Enum):
    QUEUED = "queued"  # the peer's handshake is not done yet
    CLAIMED = "claimed"  # claim sent, no grant yet
    GRANTED = "granted"  # the sink granted the claim; send() has not given the blocks yet
    POSTED = "posted"  # the transport may be writing


@dataclass(slots=True)
class _Send:
    handle: KVHandle
    dst: np.ndarray  # handle.block_ids as int64, built once (prepare() is off the hot path)
    src: np.ndarray | None = None  # set by send(); None while only prepared
    started: float = 0.0  # when send() was called
    stage: _Stage = _Stage.QUEUED
    op: object | None = None
    abort_reason: str | None = None  # the sink aborted while we were writing


@dataclass(slots=True)
class _Peer:
    address: str
    conn: Connection
    since: float
    agent: str | None = None  # set by the welcome
    layout_hash: str | None = None
    sends: dict[int, _Send] = field(default_factory=dict)  # by generation


class Source:
    def __init__(
        self,
        kv: KVCache,
        transport: SourceTransport,
        *,
        agent_name: str,
        backend: str,
        handshake_timeout_s: float = 10.0,
    ) -> None:
        self.layout = kv.layout
        self.backend = backend
        self._agent_name = agent_name
        self._transport = transport
        self._handshake_timeout_s = handshake_timeout_s
        self._peers: dict[str, _Peer] = {}  # by sink address
        # Writes that failed or lost their peer but may still run: (op, sink address, gen),
        # released once the transport says they stopped; only then is the sink told `failed`.
        self._zombies: list[tuple[object, str, int]] = []
        self._failures: dict[str, KVTransferError] = {}  # why a sink address was dropped
        self._events: list[SourceEvent] = []
        # Prepared transfers that failed before send(): (sink address, generation) -> why.
        self._doomed: dict[tuple[str, int], KVTransferError] = {}

    @property
    def agent_name(self) -> str:
        return self._agent_name

    # ---- the caller's side --------------------------------------------------------------------
    def connect(self, sink_address: str, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            peer = self._peers.get(sink_address)
            if peer is None:
                peer = self._open(sink_address)  # raises if nothing listens
            if peer.agent is not None:
                return
            if time.monotonic() >= deadline:
                raise HandshakeFailed(f"no answer from sink {sink_address} in {timeout_s} s")
            self._service()
            if sink_address not in self._peers:
                raise self._failures.pop(sink_address, PeerLost(f"sink {sink_address} gone"))
            self._wait(deadline, None)

    def prepare(self, handle: KVHandle) -> None:
        """Claim the transfer now (handshake first if needed) so that send() needs no round
        trip. Outcomes wait for send() (its one event) or are dropped by cancel(); a grant holds
        until the lease ends, and a lease lost meanwhile fails the later send()."""
        self._add(handle, None)

    def send(self, handle: KVHandle, src_block_ids: Sequence[int]) -> None:
        # On the critical path (after prefill): numpy, one sort for all three checks.
        src = np.asarray(src_block_ids, dtype=np.int64)
        if src.ndim != 1 or len(src) != len(handle.block_ids) or not len(src):
            raise ValueError(f"{len(src)} source blocks for {len(handle.block_ids)} slots")
        ordered = np.sort(src)
        if ordered[0] < 0 or ordered[-1] >= self.layout.num_blocks:
            raise ValueError(f"source block ids outside the pool of {self.layout.num_blocks}")
        if not np.all(ordered[1:] != ordered[:-1]):
            raise ValueError("send() needs distinct source block ids")
        key = (handle.sink_address, handle.generation)
        if key in self._doomed:  # prepared, then lost before send(): report it now
            error = self._doomed.pop(key)
            self._events.append(SendFailed(handle.transfer_id, handle.generation, error))
            return
        peer = self._peers.get(handle.sink_address)
        s = peer.sends.get(handle.generation) if peer is not None else None
        if s is None or (s.handle is not handle and s.handle != handle):
            self._add(handle, src)  # claims; posts on the grant
            return
        if s.src is not None:
            raise ValueError(
                f"transfer {handle.transfer_id!r} gen {handle.generation} is in flight"
            )
        s.src, s.started = src, time.monotonic()
        if peer is not None and s.stage is _Stage.GRANTED:
            self._post(peer, s)

    def cancel(self, handle: KVHandle) -> None:
        """Drop a prepared transfer that will not be sent (prefill failed); the sink is told so
        and frees its blocks. Raises ValueError once send() was called for it."""
        key = (handle.sink_address, handle.generation)
        if self._doomed.pop(key, None) is not None:
            return
        peer = self._peers.get(handle.sink_address)
        s = peer.sends.get(handle.generation) if peer is not None else None
        if peer is None or s is None:
            return
        if s.src is not None:
            raise ValueError(f"transfer {handle.transfer_id!r} was sent; it cannot be cancelled")
        del peer.sends[handle.generation]
        if s.stage is _Stage.GRANTED:  # (CLAIMED: the grant, when it comes, is answered so)
            msg = {"op": "failed", "tid": handle.transfer_id, "gen": handle.generation}
            self._send_quietly(peer, {**msg, "reason": "cancelled by the source"})

    def _add(self, handle: KVHandle, src: np.ndarray | None) -> None:
        """Register a transfer with its peer (connect if new) and claim it when possible."""
        peer = self._peers.get(handle.sink_address)
        if peer is not None and handle.generation in peer.sends:
            raise ValueError(
                f"transfer {handle.transfer_id!r} gen {handle.generation} is in flight"
            )
        s = _Send(handle, np.asarray(handle.block_ids, dtype=np.int64), src, time.monotonic())
        if peer is None:
            try:
                peer = self._open(handle.sink_address)
            except KVTransferError as e:
                self._fail(handle.sink_address, s, e)
                return
        peer.sends[handle.generation] = s
        if peer.agent is not None:
            try:
                self._claim(peer, s)
            except ConnectionClosed as e:
                self._lose_peer(peer, PeerLost(f"sink {peer.address} lost: {e}"))

    def _fail(self, address: str, s: _Send, error: KVTransferError) -> None:
        """The transfer is over without success: its one SendFailed, or, if send() has not
        been called yet, kept for send() to report (cancel() forgets it)."""
        h = s.handle
        if s.src is None:
            self._doomed[(address, h.generation)] = error
        else:
            self._events.append(SendFailed(h.transfer_id, h.generation, error))

    def poll(self, timeout_s: float = 0.0, wakeup_fd: int | None = None) -> list[SourceEvent]:
        deadline = time.monotonic() + timeout_s
        while True:
            self._service()
            if self._events or time.monotonic() >= deadline:
                break
            if self._wait(deadline, wakeup_fd):
                self._service()
                break
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        for peer in list(self._peers.values()):
            self._lose_peer(peer, PeerLost("source closed"))
        self._events.clear()
        for op, _, _ in self._zombies:
            self._transport.release(op)
        self._zombies.clear()
        self._transport.close()

    # ---- peers ----------------------------------------------------------------------------------
    def _open(self, address: str) -> _Peer:
        conn = connect(address, self._handshake_timeout_s)
        hello = {
            "op": "hello",
            "v": PROTOCOL_VERSION,
            "backend": self.backend,
            "agent": self._agent_name,
            "layout": layout_to_wire(self.layout),
            "transport": self._transport.describe(),
        }
        try:
            conn.send(hello)
        except ConnectionClosed as e:
            conn.close()
            raise PeerLost(f"sink {address} dropped the connection: {e}") from e
        peer = _Peer(address, conn, time.monotonic())
        self._peers[address] = peer
        self._failures.pop(address, None)
        return peer

    def _lose_peer(self, peer: _Peer, error: KVTransferError) -> None:
        """Fail every send of the peer and forget it; a posted write that may still run is
        kept as a zombie and released once the transport says it stopped."""
        peer.conn.close()
        self._peers.pop(peer.address, None)
        self._failures[peer.address] = error
        for gen, s in peer.sends.items():
            if s.op is not None and not self._transport.release(s.op):
                self._zombies.append((s.op, peer.address, gen))
            self._fail(peer.address, s, error)
        peer.sends.clear()
        if peer.agent is not None:
            self._transport.remove_peer(peer.agent)

    def _welcome(self, peer: _Peer, msg: Message) -> None:
        agent = require(msg, "agent", str)
        sink_layout = layout_from_wire(msg.get("layout"))
        check_layouts(self.layout, sink_layout)
        self._transport.add_peer(agent, require(msg, "transport", dict))
        peer.agent, peer.layout_hash = agent, sink_layout.compatibility_hash()
        for s in list(peer.sends.values()):
            self._claim(peer, s)

    def _claim(self, peer: _Peer, s: _Send) -> None:
        h = s.handle
        problem: KVTransferError | None = None
        if h.layout_hash != peer.layout_hash:
            problem = KVLayoutMismatch([f"layout_hash: {h.layout_hash} != {peer.layout_hash}"])
        elif h.sink_agent != peer.agent:
            problem = TransferAborted(f"handle is for agent {h.sink_agent}, sink is {peer.agent}")
        if problem is not None:
            del peer.sends[h.generation]
            self._fail(peer.address, s, problem)
            return
        peer.conn.send({"op": "claim", "tid": h.transfer_id, "gen": h.generation})
        s.stage = _Stage.CLAIMED

    # ---- one round ------------------------------------------------------------------------------
    def _service(self) -> None:
        now = time.monotonic()
        for peer in list(self._peers.values()):
            try:
                peer.conn.flush()
                for msg in peer.conn.receive():
                    if self._peers.get(peer.address) is not peer:
                        break  # lost while handling an earlier message
                    self._handle(peer, msg)
                if peer.agent is None and now - peer.since > self._handshake_timeout_s:
                    raise HandshakeFailed(f"no welcome from {peer.address}")
            except ConnectionClosed as e:
                self._lose_peer(peer, PeerLost(f"sink {peer.address} lost: {e}"))
            except KVTransferError as e:
                self._lose_peer(peer, e)
        for peer in list(self._peers.values()):
            self._check_posted(peer)
        self._bury_zombies()

    def _bury_zombies(self) -> None:
        zombies, self._zombies = self._zombies, []
        for op, address, gen in zombies:
            if not self._transport.release(op):
                self._zombies.append((op, address, gen))
                continue
            peer = self._peers.get(address)
            if peer is not None:  # same connection still up: the write is over now
                self._send_quietly(peer, {"op": "failed", "gen": gen, "reason": "write stopped"})

    def _wait(self, deadline: float, wakeup_fd: int | None) -> bool:
        """Sleep until something to do; True if wakeup_fd became readable."""
        posted = sum(
            s.stage is _Stage.POSTED for p in self._peers.values() for s in p.sends.values()
        )
        fds, tick = self._transport.wait_spec(posted + len(self._zombies))
        timeout = max(0.0, deadline - time.monotonic())
        if tick is not None:
            timeout = min(timeout, tick)
        conns = [p.conn for p in self._peers.values()]
        writers = [c.fileno() for c in conns if c.wants_write]
        readers = [*(c.fileno() for c in conns), *fds]
        if wakeup_fd is not None:
            readers.append(wakeup_fd)
        ready = select.select(readers, writers, [], timeout)[0]
        return wakeup_fd is not None and wakeup_fd in ready

    def _handle(self, peer: _Peer, msg: Message) -> None:
        op = msg["op"]
        if op == "welcome" and peer.agent is None:
            self._welcome(peer, msg)
            return
        if op == "refuse":
            differences = msg.get("differences") or []
            if msg.get("kind") == "layout" and differences:
                raise KVLayoutMismatch([str(d) for d in differences])
            raise HandshakeFailed(f"sink {peer.address} refused: {msg.get('reason')}")
        gen = require(msg, "gen", int)
        s = peer.sends.get(gen)
        if op == "grant":
            if s is None or s.stage is not _Stage.CLAIMED:  # we gave up on it: say so
                peer.conn.send(
                    {"op": "failed", "tid": msg.get("tid"), "gen": gen, "reason": "gone"}
                )
            elif s.src is None:  # prepared: send() posts
                s.stage = _Stage.GRANTED
            else:
                self._post(peer, s)
        elif op == "deny":
            if s is not None:
                self._finish(
                    peer, s, TransferAborted(f"sink refused the claim: {msg.get('reason')}")
                )
        elif op == "abort":
            if s is not None and s.stage is _Stage.POSTED:
                s.abort_reason = str(msg.get("reason"))  # ack once the write is over
                return
            if any(z[1:] == (peer.address, gen) for z in self._zombies):
                return  # its write may still run: _bury_zombies says `failed` once it stopped
            if s is not None:
                self._finish(peer, s, TransferAborted(f"sink aborted: {msg.get('reason')}"))
            peer.conn.send({"op": "ack", "tid": msg.get("tid"), "gen": gen})
        else:
            raise ConnectionClosed(f"unexpected message {op!r}")

    def _post(self, peer: _Peer, s: _Send) -> None:
        assert peer.agent is not None and s.src is not None
        h = s.handle
        try:
            s.op = self._transport.post(peer.agent, h.generation, s.src, s.dst)
        except TransferFailed as e:
            self._fail_posted(peer, s, e)
            return
        s.stage = _Stage.POSTED
        # Only now the one-way `write` hint (it starts the NIXL sink's progress ticks), so the
        # post does not wait for it. No landing is missed: a completion notification that
        # arrives first waits in the sink's NIXL agent until the hint makes the sink progress,
        # and a landing needs only the grant (SinkLedger.landed), never the hint.
        self._send_quietly(peer, {"op": "write", "tid": h.transfer_id, "gen": h.generation})

    def _check_posted(self, peer: _Peer) -> None:
        for s in [s for s in peer.sends.values() if s.stage is _Stage.POSTED]:
            if self._peers.get(peer.address) is not peer:
                return  # lost while we were at it: its sends are failed already
            try:
                if not self._transport.check(s.op):
                    continue
            except TransferFailed as e:
                self._fail_posted(peer, s, e)
                continue
            self._transport.release(s.op)
            if s.abort_reason is None:
                self._finish(peer, s, None)
            else:  # the bytes went out but the sink had already given the transfer up
                self._finish(peer, s, TransferAborted(f"sink aborted: {s.abort_reason}"))
                self._send_quietly(peer, {"op": "ack", "gen": s.handle.generation})

    def _fail_posted(self, peer: _Peer, s: _Send, error: TransferFailed) -> None:
        gen = s.handle.generation
        self._finish(peer, s, error)
        if s.op is not None and not self._transport.release(s.op):
            self._zombies.append((s.op, peer.address, gen))  # `failed` once it has stopped
            return
        self._send_quietly(peer, {"op": "failed", "gen": gen, "reason": str(error)})

    def _finish(self, peer: _Peer, s: _Send, error: KVTransferError | None) -> None:
        h = s.handle
        del peer.sends[h.generation]
        if error is None:
            elapsed = time.monotonic() - s.started
            num_bytes = len(s.dst) * self.layout.block_bytes
            self._events.append(SendDone(h.transfer_id, h.generation, num_bytes, elapsed))
        else:
            self._fail(peer.address, s, error)

    def _send_quietly(self, peer: _Peer, msg: Message) -> None:
        try:
            peer.conn.send(msg)
        except ConnectionClosed as e:
            self._lose_peer(peer, PeerLost(f"sink {peer.address} lost: {e}"))
