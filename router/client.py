"""gRPC clients for the workers: one channel per worker, every unary call with a deadline.

Create clients inside the running event loop (grpc.aio channels bind to it), close them on
shutdown. The router calls only Generate, Abort, Health, Load and KVEvents.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc
from router.config import Role, WorkerAddress
from runtime.grpc_server import GRPC_OPTIONS
from runtime.tls import TlsFiles, open_channel

_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    *GRPC_OPTIONS,
]


class WorkerClient:
    """Typed calls to one worker (either role); safe to share between requests."""

    def __init__(
        self, worker: WorkerAddress, rpc_timeout_s: float, tls: TlsFiles | None = None
    ) -> None:
        self.worker = worker
        self._rpc_timeout_s = rpc_timeout_s
        self._channel = open_channel(worker.address, tls, _CHANNEL_OPTIONS)
        stub: Any
        if worker.role is Role.DECODE:
            stub = tandem_pb2_grpc.DecodeWorkerStub(self._channel)
        else:
            stub = tandem_pb2_grpc.PrefillWorkerStub(self._channel)
        self._stub = stub

    def generate(self, request: pb.GenerateRequest, timeout_s: float) -> Any:
        """Start a Generate stream (decode workers only). Returns the grpc.aio call: iterate it
        for GenerateResponse messages, `cancel()` it to abort on the worker."""
        if self.worker.role is not Role.DECODE:
            raise TypeError(f"{self.worker.worker_id} is a prefill worker; it has no Generate")
        return self._stub.Generate(request, timeout=timeout_s)

    async def abort(self, request_id: str) -> bool:
        reply: pb.AbortResponse = await self._stub.Abort(
            pb.AbortRequest(request_id=request_id), timeout=self._rpc_timeout_s
        )
        return reply.found

    async def health(self) -> pb.HealthResponse:
        reply: pb.HealthResponse = await self._stub.Health(
            pb.HealthRequest(), timeout=self._rpc_timeout_s
        )
        return reply

    async def load(self) -> pb.WorkerLoad:
        reply: pb.WorkerLoad = await self._stub.Load(pb.LoadRequest(), timeout=self._rpc_timeout_s)
        return reply

    async def kv_events(self) -> AsyncIterator[pb.KVEvent]:
        """The worker's prefix-cache events until the stream breaks (raises AioRpcError)."""
        call = self._stub.KVEvents(pb.KVEventsRequest())
        try:
            async for event in call:
                yield event
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close(grace=None)
