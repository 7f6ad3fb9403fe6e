"""DecodeWorker gRPC service: streams a request's tokens, prefilling locally or receiving the
prompt's KV from a prefill worker (see the remote path in `_remote_prefill`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from engine.async_engine import AsyncEngine
from engine.engine import Engine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc
from runtime import worker_rpc
from runtime.wire import FINISH_REASONS, logprob_to_proto, sampling_kwargs


class DecodeServicer(pb_grpc.DecodeWorkerServicer):
    def __init__(self, identity: worker_rpc.WorkerIdentity, engine: AsyncEngine) -> None:
        self.identity = identity
        self.engine = engine

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            params = SamplingParams(**sampling_kwargs(request.sampling))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling: {e}")
        rid = request.request_id
        if not rid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty")
        where = request.prefill.WhichOneof("where")
        if where == "remote":
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, "remote prefill needs kv_transfer (issue 3)"
            )
        start = time.monotonic()
        outputs = self.engine.generate(rid, list(request.prompt_token_ids), params)
        num_tokens = 0
        try:
            async for out in outputs:
                msg = _to_proto(out)
                if num_tokens == 0:
                    msg.prefill_s = time.monotonic() - start
                num_tokens += len(out.new_token_ids)
                if out.finished:
                    msg.usage.completion_tokens = num_tokens
                yield msg
        except ValueError as e:  # the engine refused the request (prompt too long, bad ids...)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        def abort(engine: Engine) -> bool:
            found = request.request_id in engine.scheduler.requests
            engine.abort(request.request_id)
            return found

        return pb.AbortResponse(found=await self.engine.call(abort))

    async def Health(
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthResponse:
        return worker_rpc.health(self.identity, self.engine)

    async def Load(
        self, request: pb.LoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.WorkerLoad:
        return worker_rpc.load(self.identity, self.engine)

    async def KVEvents(
        self, request: pb.KVEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.KVEvent]:
        async for event in worker_rpc.kv_events(self.engine):
            yield event


def _to_proto(out: RequestOutput) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(
        request_id=out.request_id,
        token_ids=out.new_token_ids,
        text=out.text_delta,
        logprobs=[logprob_to_proto(lp.token_id, lp.logprob, lp.top) for lp in out.new_logprobs],
        finished=out.finished,
    )
    if out.finished:
        assert out.finish_reason is not None
        msg.finish_reason = FINISH_REASONS[out.finish_reason.value]
        if isinstance(out.stop_reason, str):
            msg.stop_string = out.stop_reason
        elif isinstance(out.stop_reason, int):
            msg.stop_token_id = out.stop_reason
        msg.usage.prompt_tokens = out.num_prompt_tokens
        msg.usage.cached_tokens = out.num_cached_tokens
    return msg
