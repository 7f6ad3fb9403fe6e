"""ucx backend: two-sided tagged messages over ucxx (the maintained successor of ucx-py, whose
Python API exposes no one-sided RMA). One message per paired run, tagged (generation, offset):
offset is the index in the handle's block_ids of the run's first block, so a message says which
blocks it fills and the claim needs to know nothing of the source's runs (it may come before the
source has its blocks).

Fencing is natural here: the sink posts no receive in advance. It probes for arrived messages
and receives one into the pool only while its transfer is GRANTED; a message of an expired,
aborted or unknown transfer goes into scratch memory and is dropped. So once a fenced transfer
has no receive in flight, no byte of it can reach the pool, with no ack needed from the source.

Endpoints are created with error handling on, so a dead peer fails the requests instead of
aborting this process (without it UCX calls abort() when a CMA read hits a dead pid). On one
host that restricts UCX to tcp: ~1 GiB/s against NIXL's ~5 GiB/s over CMA.

Waiting is event-driven: UCX's blocking progress mode gives an epoll fd, armed before select().
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine.kv_cache import KVCache
from kv_transfer.base import BackendUnavailable, HandshakeFailed, PeerLost, TransferFailed
from kv_transfer.ledger import Phase, SinkLedger
from kv_transfer.sink import Sink
from kv_transfer.source import Source
from kv_transfer.transport import Arrival, block_bytes_view, paired_runs

try:
    import ucxx._lib.libucxx as ucx
    from ucxx._lib.arr import Array
except ImportError as e:  # the registry turns this into a clear message
    raise BackendUnavailable(
        "the 'ucx' KV transfer backend needs ucxx-cu13: pip install -e '.[kv]'"
    ) from e

NAME = "ucx"
_OFFSET_BITS = 20  # tag = generation << 20 | offset of the message's first block in the handle
_SAFETY_TICK_S = 0.005  # progress at least this often while requests run (a missed wakeup)


def _tag(generation: int, offset: int) -> Any:
    return ucx.UCXXTag((generation << _OFFSET_BITS) | offset)


def _array(t: torch.Tensor) -> Any:
    return Array(t if t.is_cuda else t.numpy())


def _worker() -> tuple[Any, Any]:
    context = ucx.UCXContext(feature_flags=(ucx.Feature.TAG, ucx.Feature.WAKEUP))
    worker = ucx.UCXWorker(context)
    worker.init_blocking_progress_mode()
    return context, worker


def _arm(worker: Any) -> list[int]:
    """Progress until UCX agrees to sleep; then its epoll fd wakes us for the next event."""
    for _ in range(64):
        if worker.arm():
            return [worker.epoll_file_descriptor]
        worker.progress()
    return []  # busy: the caller's tick brings us back


def _failed(request: Any) -> str | None:
    try:
        request.check_error()
    except Exception as e:  # ucxx raises its own UCXError subclasses
        return f"{type(e).__name__}: {e}"
    return None


@dataclass(slots=True)
class _Inbound:
    """Receives into the pool for one granted transfer."""

    covered: bytearray  # per block of the handle: 1 once a matched message fills it
    num_received: int = 0  # blocks matched so far
    running: list[Any] = field(default_factory=list)  # receive requests into the pool
    num_bytes: int = 0
    error: str | None = None


class UcxSinkTransport:
    one_sided = False

    def __init__(self, kv: KVCache) -> None:
        self._context, self._worker = _worker()
        self._blocks = block_bytes_view(kv.pool)  # [num_blocks, block_bytes] uint8
        self._block_bytes = kv.layout.block_bytes
        self._inbound: dict[int, _Inbound] = {}  # by generation
        self._scratch: list[tuple[Any, np.ndarray]] = []  # receives of fenced data, discarded

    def describe(self) -> dict[str, Any]:
        return {"address": self._worker.address.tobytes()}

    def progress(self, ledger: SinkLedger) -> list[Arrival]:
        self._worker.progress()
        self._match(ledger)
        self._scratch = [(r, buf) for r, buf in self._scratch if not r.completed]
        arrivals = []
        for generation, inbound in list(self._inbound.items()):
            for request in [r for r in inbound.running if r.completed]:
                inbound.running.remove(request)
                inbound.error = inbound.error or _failed(request)
            t = ledger.get(generation)
            ledger.set_transport_quiet(generation, not inbound.running)
            if inbound.running:
                continue
            if t is None or t.phase is not Phase.GRANTED:
                del self._inbound[generation]
            elif inbound.error is not None:
                del self._inbound[generation]
                arrivals.append(Arrival(generation, t.peer or "", 0, inbound.error))
            elif inbound.num_received == t.num_blocks:
                del self._inbound[generation]
                arrivals.append(Arrival(generation, t.peer or "", inbound.num_bytes))
        return arrivals

    def _match(self, ledger: SinkLedger) -> None:
        while True:
            probe = self._worker.tag_probe(ucx.UCXXTag(0), ucx.UCXXTagMask(0), remove=True)
            if not probe.matched:
                return
            tag = int(probe.sender_tag.value)
            generation, offset = tag >> _OFFSET_BITS, tag & ((1 << _OFFSET_BITS) - 1)
            t = ledger.get(generation)
            view = None
            if t is not None and t.phase is Phase.GRANTED:
                inbound = self._inbound.get(generation)
                if inbound is None:
                    inbound = self._inbound[generation] = _Inbound(bytearray(t.num_blocks))
                n, rest = divmod(probe.length, self._block_bytes)
                ids = t.block_ids[offset : offset + n]
                if rest or n == 0 or len(ids) != n:
                    inbound.error = f"{probe.length} bytes at block {offset} do not fit"
                elif ids[-1] - ids[0] != n - 1 or any(inbound.covered[offset : offset + n]):
                    inbound.error = f"blocks {offset}..{offset + n} repeated or not contiguous"
                else:
                    view = self._blocks[ids[0] : ids[0] + n]
                    inbound.covered[offset : offset + n] = b"\x01" * n
                    inbound.num_received += n
                    inbound.num_bytes += probe.length
                    inbound.running.append(self._worker.tag_recv_with_handle(_array(view), probe))
                    ledger.set_transport_quiet(generation, False)
            if view is None:  # fenced, unknown or malformed: receive and drop
                buf = np.empty(max(probe.length, 1), dtype=np.uint8)
                self._scratch.append((self._worker.tag_recv_with_handle(Array(buf), probe), buf))

    def wait_spec(self, ledger: SinkLedger) -> tuple[list[int], float | None]:
        busy = ledger.num_claimed or self._scratch
        return _arm(self._worker), _SAFETY_TICK_S if busy else None

    def peer_gone(self, agent: str) -> None:
        pass  # its in-flight receives fail on their own (error handling is on)

    def close(self) -> None:
        self._worker.cancel_inflight_requests()


@dataclass(slots=True)
class _Outbound:
    requests: list[Any]
    views: list[torch.Tensor]  # keep the source memory referenced while it is read


class UcxSourceTransport:
    def __init__(self, kv: KVCache) -> None:
        self._context, self._worker = _worker()
        self._blocks = block_bytes_view(kv.pool)
        self._endpoints: dict[str, Any] = {}
        self._dead: list[Any] = []

    def describe(self) -> dict[str, Any]:
        return {}

    def add_peer(self, agent: str, info: dict[str, Any]) -> None:
        try:
            address = ucx.UCXAddress.create_from_buffer(bytes(info["address"]))
            endpoint = ucx.UCXEndpoint.create_from_worker_address(self._worker, address, True)
        except (KeyError, TypeError, ucx.UCXError) as e:
            raise HandshakeFailed(f"unusable UCX address from {agent}: {e}") from e
        self._endpoints[agent] = endpoint

    def remove_peer(self, agent: str) -> None:
        endpoint = self._endpoints.pop(agent, None)
        if endpoint is None:
            return
        if endpoint.alive:
            endpoint.close()  # cancels its in-flight sends
        else:
            # ucxx 0.52 segfaults closing (or destroying) an endpoint that UCX already failed:
            # keep it referenced; its requests have completed with errors anyway.
            self._dead.append(endpoint)

    def post(self, agent: str, generation: int, src: np.ndarray, dst: np.ndarray) -> _Outbound:
        endpoint = self._endpoints[agent]
        runs = paired_runs(src.tolist(), dst.tolist())
        views, offsets, offset = [], [], 0
        for s, _, n in runs:
            views.append(self._blocks[s : s + n])
            offsets.append(offset)
            offset += n
        try:
            requests = [
                endpoint.tag_send(_array(v), _tag(generation, o))
                for v, o in zip(views, offsets, strict=True)
            ]
        except ucx.UCXError as e:
            raise TransferFailed(f"UCX refused the send to {agent}: {e}") from e
        return _Outbound(requests, views)

    def check(self, op: object) -> bool:
        assert isinstance(op, _Outbound)
        self._worker.progress()
        if not all(r.completed for r in op.requests):
            return False
        errors = [e for e in (_failed(r) for r in op.requests) if e is not None]
        if errors:
            lost = any("Canceled" in e or "Connection" in e or "Unreachable" in e for e in errors)
            raise (PeerLost if lost else TransferFailed)(f"UCX send failed: {errors[0]}")
        return True

    def release(self, op: object) -> bool:
        assert isinstance(op, _Outbound)
        self._worker.progress()
        return all(r.completed for r in op.requests)

    def wait_spec(self, num_in_flight: int) -> tuple[list[int], float | None]:
        return _arm(self._worker), _SAFETY_TICK_S if num_in_flight else None

    def close(self) -> None:
        for agent in list(self._endpoints):
            self.remove_peer(agent)
        self._worker.cancel_inflight_requests()


def make_sink(
    kv: KVCache,
    *,
    agent_name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    peer_loss_grace_s: float = 0.05,
) -> Sink:
    return Sink(
        kv,
        UcxSinkTransport(kv),
        agent_name=agent_name or f"kv-sink-{uuid.uuid4().hex[:12]}",
        backend=NAME,
        host=host,
        port=port,
        peer_loss_grace_s=peer_loss_grace_s,
    )


def make_source(
    kv: KVCache, *, agent_name: str | None = None, handshake_timeout_s: float = 10.0
) -> Source:
    return Source(
        kv,
        UcxSourceTransport(kv),
        agent_name=agent_name or f"kv-source-{uuid.uuid4().hex[:12]}",
        backend=NAME,
        handshake_timeout_s=handshake_timeout_s,
    )
