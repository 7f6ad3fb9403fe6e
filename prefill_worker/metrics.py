"""Every metric a prefill worker exports: the shared set of runtime/worker_metrics.py, fed from
the engine's steps (AsyncEngine on_step), each remote prefill's outcome and the KV source's
SendDone / SendFailed (one per send, every rank's part included). The two classes below wrap
the servicer and the source, so the request path itself carries no metrics code; `__main__`
wires them in place of the plain ones.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import grpc

from engine.async_engine import AsyncEngine
from kv_transfer.base import KVHandle, SendDone, SendFailed
from kv_transfer.endpoint_thread import SourceThread
from kv_transfer.sharded import ShardedSource
from prefill_worker.servicer import Destination, PrefillServicer
from prefill_worker.session import PrefillRefused
from proto import tandem_pb2 as pb
from runtime import worker_rpc
from runtime.worker_metrics import WorkerMetrics, outcome_of

__all__ = ["MeteredPrefillServicer", "MeteredShardedSource"]


class MeteredShardedSource(ShardedSource):
    """ShardedSource metered as MeteredSource: one send's bytes (every part) and duration."""

    def __init__(
        self,
        ranks: Sequence[SourceThread],
        head_slices: Callable[[int, int], SourceThread],
        metrics: WorkerMetrics,
    ) -> None:
        self.metrics = metrics
        super().__init__(ranks, head_slices)

    async def send(self, handle: KVHandle, src_block_ids: Sequence[int]) -> SendDone | SendFailed:
        try:
            result = await super().send(handle, src_block_ids)
        except Exception as e:  # a malformed call (ValueError); the servicer fails the RPC
            self.metrics.kv_failed(type(e).__name__)
            raise
        if isinstance(result, SendDone):
            self.metrics.kv_sent(result.num_bytes, result.elapsed_s)
        else:
            self.metrics.kv_failed(type(result.error).__name__)
        return result


class MeteredPrefillServicer(PrefillServicer):
    """PrefillServicer that counts each remote prefill (one request of a PrefillSession) by
    outcome (ok, cancelled, or the status code it failed with) before its reply is queued, and
    each Abort RPC."""

    def __init__(
        self,
        identity: worker_rpc.WorkerIdentity,
        engine: AsyncEngine,
        source: ShardedSource,
        metrics: WorkerMetrics,
    ) -> None:
        super().__init__(identity, engine, source)
        self.metrics = metrics

    async def prefill(
        self,
        request: pb.PrefillRequest,
        destination: asyncio.Future[Destination],
        announce: Callable[[pb.PrefillFirstToken], None],
    ) -> pb.PrefillResponse:
        start = time.monotonic()
        outcome = "cancelled"
        try:
            reply = await super().prefill(request, destination, announce)
            outcome = "ok"
            return reply
        except BaseException as e:
            outcome = outcome_of(e, e.code if isinstance(e, PrefillRefused) else None)
            raise
        finally:
            self.metrics.request_finished(outcome, time.monotonic() - start)

    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        reply = await super().Abort(request, context)
        self.metrics.abort_rpc(reply.found)
        return reply
