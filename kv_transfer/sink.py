"""Sink: the decode side of KV transfer over any SinkTransport (see base.KVSink for the contract).

One thread (the decode worker's loop) calls everything. poll() accepts sources, answers their
hello/claim/ack messages, advances the transport, runs the lease clock and returns events. It
sleeps in select() on the control sockets (and the transport's fds), waking for the next lease
deadline and, only while a granted write may be in flight, every transport tick.
"""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Sequence

from engine.kv_cache import KVCache
from kv_transfer.base import (
    KVHandle,
    KVLayoutMismatch,
    ReleaseReason,
    SinkEvent,
    check_layouts,
)
from kv_transfer.ledger import SinkLedger, Transfer
from kv_transfer.transport import SinkTransport
from kv_transfer.wire import (
    PROTOCOL_VERSION,
    Connection,
    ConnectionClosed,
    HandshakeFailed,
    Message,
    layout_from_wire,
    layout_to_wire,
    listen,
    require,
)

log = logging.getLogger(__name__)


class Sink:
    def __init__(
        self,
        kv: KVCache,
        transport: SinkTransport,
        *,
        agent_name: str,
        backend: str,
        host: str = "127.0.0.1",
        port: int = 0,
        peer_loss_grace_s: float = 0.05,
    ) -> None:
        """peer_loss_grace_s: after a claiming source's connection drops, how long its blocks
        stay quarantined (a write the dead process posted may still be in the NIC/DMA queue)."""
        self.layout = kv.layout
        self.backend = backend
        self._agent_name = agent_name
        self._transport = transport
        self._ledger = SinkLedger(kv.layout.num_blocks, transport.one_sided, peer_loss_grace_s)
        self._listener = listen(host, port)
        self._address = f"{host}:{self._listener.getsockname()[1]}"
        self._fresh: list[Connection] = []  # connected, no hello yet
        self._peers: dict[str, Connection] = {}  # source agent name -> its connection
        self._events: list[SinkEvent] = []

    @property
    def agent_name(self) -> str:
        return self._agent_name

    @property
    def address(self) -> str:
        return self._address

    @property
    def num_open(self) -> int:
        """Transfers that still hold blocks (expected, granted or fencing)."""
        return self._ledger.num_open

    # ---- the caller's side --------------------------------------------------------------------
    def expect(self, transfer_id: str, block_ids: Sequence[int], lease_s: float) -> KVHandle:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        t = self._ledger.expect(transfer_id, block_ids, time.monotonic() + lease_s)
        return KVHandle(
            transfer_id=transfer_id,
            sink_agent=self._agent_name,
            block_ids=t.block_ids,
            generation=t.generation,
            layout_hash=self.layout.compatibility_hash(),
            sink_address=self._address,
        )

    def abort(self, transfer_id: str) -> None:
        events, fenced = self._ledger.lose(
            transfer_id, ReleaseReason.ABORTED, "aborted by the sink", time.monotonic()
        )
        self._events += events
        if fenced is not None:
            self._tell_abort(fenced)

    def poll(self, timeout_s: float = 0.0, wakeup_fd: int | None = None) -> list[SinkEvent]:
        deadline = time.monotonic() + timeout_s
        while True:
            self._service()
            now = time.monotonic()
            if self._events or now >= deadline:
                break
            if self._wait(deadline, now, wakeup_fd):
                self._service()
                break
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        for conn in [*self._fresh, *self._peers.values()]:
            conn.close()
        self._fresh.clear()
        self._peers.clear()
        self._listener.close()
        self._transport.close()

    # ---- one round ----------------------------------------------------------------------------
    def _service(self) -> None:
        self._accept()
        for conn in list(self._fresh):
            self._read(conn, None)
        for agent, conn in list(self._peers.items()):
            self._read(conn, agent)
        now = time.monotonic()
        # Landing before the lease clock: data that made it in time is not thrown away.
        for arrival in self._transport.progress(self._ledger):
            if arrival.error is None:
                self._events += self._ledger.landed(
                    arrival.generation, arrival.agent, arrival.num_bytes
                )
                continue
            t = self._ledger.get(arrival.generation)
            if t is not None:
                events, fenced = self._ledger.lose(
                    t.transfer_id, ReleaseReason.FAILED, arrival.error, now
                )
                self._events += events
                if fenced is not None:
                    self._tell_abort(fenced)
        expired, to_abort = self._ledger.expire(now)
        self._events += expired
        for t in to_abort:
            self._tell_abort(t)
        self._events += self._ledger.release_ready(now)

    def _wait(self, deadline: float, now: float, wakeup_fd: int | None) -> bool:
        """Sleep until something to do; True if wakeup_fd became readable."""
        fds, tick = self._transport.wait_spec(self._ledger)
        wake = min(deadline, self._ledger.next_wakeup(now) or deadline)
        timeout = max(0.0, wake - now)
        if tick is not None:
            timeout = min(timeout, tick)
        conns = [*self._fresh, *self._peers.values()]
        writers = [c for c in conns if c.wants_write]
        readers = [self._listener.fileno(), *(c.fileno() for c in conns), *fds]
        if wakeup_fd is not None:
            readers.append(wakeup_fd)
        ready = select.select(readers, [c.fileno() for c in writers], [], timeout)[0]
        return wakeup_fd is not None and wakeup_fd in ready

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            self._fresh.append(Connection(sock))

    def _read(self, conn: Connection, agent: str | None) -> None:
        try:
            conn.flush()
            for msg in conn.receive():
                if agent is None:
                    agent = self._hello(conn, msg)
                    if agent is None:
                        return
                else:
                    self._handle(conn, agent, msg)
        except ConnectionClosed as e:
            self._drop(conn, agent, str(e))

    def _drop(self, conn: Connection, agent: str | None, why: str) -> None:
        conn.close()
        if agent is None:
            if conn in self._fresh:
                self._fresh.remove(conn)
            return
        if self._peers.get(agent) is conn:
            del self._peers[agent]
            log.warning("kv source %s lost: %s", agent, why)
            self._events += self._ledger.peer_lost(agent, time.monotonic())
            self._transport.peer_gone(agent)

    # ---- messages -----------------------------------------------------------------------------
    def _hello(self, conn: Connection, msg: Message) -> str | None:
        """Admit a source, or refuse it with the reason; returns its agent name if admitted."""
        self._fresh.remove(conn)
        if msg["op"] != "hello":
            raise ConnectionClosed(f"expected hello, got {msg['op']!r}")
        agent = require(msg, "agent", str)
        refusal: Message | None = None
        try:
            if msg.get("v") != PROTOCOL_VERSION:
                raise HandshakeFailed(f"protocol {msg.get('v')!r}, sink speaks {PROTOCOL_VERSION}")
            if msg.get("backend") != self.backend:
                raise HandshakeFailed(f"backend {msg.get('backend')!r}, sink uses {self.backend!r}")
            check_layouts(self.layout, layout_from_wire(msg.get("layout")))
        except KVLayoutMismatch as e:
            refusal = {"op": "refuse", "kind": "layout", "reason": str(e)}
            refusal["differences"] = [f"{d} (sink != source)" for d in e.differences]
        except HandshakeFailed as e:
            refusal = {"op": "refuse", "kind": "handshake", "reason": str(e), "differences": []}
        if refusal is not None:
            log.warning("refused kv source %s: %s", agent, refusal["reason"])
            conn.send(refusal)
            conn.close()
            return None
        old = self._peers.get(agent)
        if old is not None:  # the same process reconnected: its old connection is dead
            self._drop(old, agent, "replaced by a new connection")
        self._peers[agent] = conn
        conn.send(
            {
                "op": "welcome",
                "agent": self._agent_name,
                "layout": layout_to_wire(self.layout),
                "transport": self._transport.describe(),
            }
        )
        return agent

    def _handle(self, conn: Connection, agent: str, msg: Message) -> None:
        op, now = msg["op"], time.monotonic()
        generation = require(msg, "gen", int)
        if op == "claim":
            t, why = self._ledger.claim(generation, agent, now)
            if t is not None and t.transfer_id != msg.get("tid"):
                t, why = None, "transfer id does not match the generation"
            reply = {"op": "grant"} if t is not None else {"op": "deny", "reason": why}
            conn.send({**reply, "tid": msg.get("tid"), "gen": generation})
        elif op == "write":
            self._ledger.writing(generation, agent)
        elif op == "ack":
            self._events += self._ledger.source_quiet(generation, agent, None, now)
        elif op == "failed":
            reason = f"source write failed: {msg.get('reason')}"
            self._events += self._ledger.source_quiet(generation, agent, reason, now)
        else:
            raise ConnectionClosed(f"unexpected message {op!r}")

    def _tell_abort(self, t: Transfer) -> None:
        conn = self._peers.get(t.peer or "")
        if conn is None:
            return  # already gone: peer_lost() has set the quarantine end
        reason = t.reason.value if t.reason is not None else "aborted"
        try:
            conn.send({"op": "abort", "tid": t.transfer_id, "gen": t.generation, "reason": reason})
        except ConnectionClosed as e:
            self._drop(conn, t.peer, str(e))
