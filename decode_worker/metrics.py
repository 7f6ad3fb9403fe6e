"""Every metric a decode worker exports: the shared set of runtime/worker_metrics.py, fed from
the engine's steps (AsyncEngine on_step), the Generate RPC's outcome and the KV sink's
KVLanded / KVLost. The two classes below wrap the servicer and the sink thread, so the
request path itself carries no metrics code; `__main__` wires them in place of the plain ones.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import grpc

from decode_worker.servicer import DecodeServicer
from engine.async_engine import AsyncEngine
from kv_transfer.base import KVHandle, KVLanded, KVLost, KVReleased, KVSink
from kv_transfer.endpoint_thread import SinkThread
from kv_transfer.sharded import ShardedSink
from proto import tandem_pb2 as pb
from runtime import worker_rpc
from runtime.tls import TlsFiles
from runtime.worker_metrics import WorkerMetrics, outcome_of

__all__ = ["MeteredDecodeServicer", "MeteredShardedSink", "MeteredSink"]

# outcome label of a finished Generate stream, by proto FinishReason
_FINISH_OUTCOMES = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}


class _LeaseMeter:
    """Mixin for a sink (SinkThread, ShardedSink): times each lease from expect() until its KV
    lands, and counts bytes and losses; the sink's own methods do the work (super())."""

    metrics: WorkerMetrics
    _opened_s: dict[str, float]  # transfer_id -> expect() time; loop only

    async def expect(self, transfer_id: str, block_ids: Sequence[int], lease_s: float) -> KVHandle:
        self._opened_s[transfer_id] = time.monotonic()
        try:
            return await super().expect(transfer_id, block_ids, lease_s)  # type: ignore[misc,no-any-return]
        except BaseException:
            self._opened_s.pop(transfer_id, None)
            raise

    async def outcome(self, transfer_id: str) -> KVLanded | KVLost:
        try:
            result: KVLanded | KVLost = await super().outcome(transfer_id)  # type: ignore[misc]
        finally:
            opened_s = self._opened_s.pop(transfer_id, None)
        if isinstance(result, KVLanded):
            wait_s = time.monotonic() - opened_s if opened_s is not None else 0.0
            self.metrics.kv_landed(result.num_bytes, wait_s)
        else:
            self.metrics.kv_failed(result.reason.value)
        return result

    async def released(self, transfer_id: str) -> KVReleased:
        self._opened_s.pop(transfer_id, None)  # given up before its outcome was read
        return await super().released(transfer_id)  # type: ignore[misc,no-any-return]


class MeteredSink(_LeaseMeter, SinkThread):
    """SinkThread metered by _LeaseMeter."""

    def __init__(
        self, sink: KVSink, loop: asyncio.AbstractEventLoop, metrics: WorkerMetrics
    ) -> None:
        self.metrics = metrics
        self._opened_s = {}
        super().__init__(sink, loop)


class MeteredShardedSink(_LeaseMeter, ShardedSink):
    """ShardedSink (a TP decode worker) metered as MeteredSink: one transfer of all ranks."""

    def __init__(self, ranks: Sequence[SinkThread], metrics: WorkerMetrics) -> None:
        self.metrics = metrics
        self._opened_s = {}
        super().__init__(ranks)


class MeteredDecodeServicer(DecodeServicer):
    """DecodeServicer that counts each Generate stream by outcome (its finish reason, counted
    before the last message leaves; cancelled; or the gRPC code it failed with) and each Abort
    RPC."""

    def __init__(
        self,
        identity: worker_rpc.WorkerIdentity,
        engine: AsyncEngine,
        sink: SinkThread | ShardedSink | None,
        metrics: WorkerMetrics,
        lease_s: float = 30.0,
        tls: TlsFiles | None = None,
    ) -> None:
        super().__init__(identity, engine, sink, lease_s=lease_s, tls=tls)
        self.metrics = metrics

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        start = time.monotonic()
        counted = False
        first = True
        try:
            async for msg in super().Generate(request, context):
                if first:
                    first = False
                    self.metrics.first_token(time.monotonic() - start)
                if msg.finished and not counted:
                    counted = True
                    outcome = _FINISH_OUTCOMES.get(msg.finish_reason, "unknown")
                    self.metrics.request_finished(outcome, time.monotonic() - start)
                yield msg
        except BaseException as e:
            if not counted:
                counted = True
                self.metrics.request_finished(
                    outcome_of(e, context.code()), time.monotonic() - start
                )
            raise
        if not counted:  # the engine stream ended without a finished message
            self.metrics.request_finished("unknown", time.monotonic() - start)

    def on_prefill_fallback(self, reason: str) -> None:
        self.metrics.prefill_fallback(reason)

    def on_kv_reuse(self, num_blocks: int) -> None:
        self.metrics.kv_reused(num_blocks)

    def on_remote_step(self, step: str, duration_s: float) -> None:
        self.metrics.remote_prefill_step(step, duration_s)

    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        reply = await super().Abort(request, context)
        self.metrics.abort_rpc(reply.found)
        return reply
