"""PrefillWorker gRPC service: compute a prompt's KV, sample its first token, WRITE the KV
into the decode worker's reserved blocks, then free our copy.

Block ownership: the request's blocks stay pinned in our engine after it finishes
(hold_kv_on_finish) until the send has ended one way or the other; `release_kv` once the send
is over (at once, or from `_release_after_send` when the caller went away first) is their one
free path. If the caller goes away before the finish was seen, the engine stream's abort frees
them (Engine.abort also frees a finished request's held blocks).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

import grpc

from engine.async_engine import AsyncEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from kv_transfer.base import KVHandle, SendFailed
from kv_transfer.endpoint_thread import SourceThread
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc
from runtime import worker_rpc
from runtime.wire import logprob_to_proto, sampling_kwargs


class PrefillServicer(worker_rpc.WorkerRpcs, pb_grpc.PrefillWorkerServicer):
    def __init__(
        self, identity: worker_rpc.WorkerIdentity, engine: AsyncEngine, source: SourceThread
    ) -> None:
        self.identity = identity
        self.engine = engine
        self.source = source
        self._releases: set[asyncio.Task[None]] = set()  # _release_after_send in progress

    async def Prefill(
        self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> pb.PrefillResponse:
        rid = request.request_id
        try:
            params = SamplingParams(**sampling_kwargs(request.sampling))
            handle = _handle_from_proto(request.kv)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        # The first token only: stop strings and later limits are the decode worker's business.
        first_params = dataclasses.replace(
            params, max_tokens=1, min_tokens=min(params.min_tokens, 1), stop=()
        )
        start = time.monotonic()
        last: RequestOutput | None = None
        try:
            async for out in self.engine.generate(
                rid, list(request.prompt_token_ids), first_params, hold_kv_on_finish=True
            ):
                last = out
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        assert last is not None and last.finished
        prefill_s = time.monotonic() - start
        held = last.held_block_ids
        if len(held) != len(handle.block_ids):
            await self.engine.call(lambda engine: engine.release_kv(rid))
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the KV handle has {len(handle.block_ids)} blocks; the prompt needs {len(held)}",
            )
        send = asyncio.ensure_future(self.source.send(handle, held))
        try:
            result = await asyncio.shield(send)
        finally:
            # the held blocks are freed once the send has ended (SendDone / SendFailed: the
            # source reads them no more), also when the caller went away meanwhile
            if send.done():
                await self.engine.call(lambda engine: engine.release_kv(rid))
            else:
                task = asyncio.get_running_loop().create_task(self._release_after_send(rid, send))
                self._releases.add(task)  # a task nobody references may be collected
                task.add_done_callback(self._releases.discard)
        if isinstance(result, SendFailed):
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {result.error}")
        response = pb.PrefillResponse(
            request_id=rid,
            first_token_id=last.new_token_ids[0],
            cached_tokens=last.num_cached_tokens,
            prefill_s=prefill_s,
            kv_transfer_s=result.elapsed_s,
        )
        if last.new_logprobs:
            lp = last.new_logprobs[0]
            response.first_logprob.CopyFrom(logprob_to_proto(lp.token_id, lp.logprob, lp.top))
        return response

    async def _release_after_send(self, rid: str, send: asyncio.Future[object]) -> None:
        with contextlib.suppress(Exception):
            await send
        await self.engine.call(lambda engine: engine.release_kv(rid))


def _handle_from_proto(msg: pb.KVHandle) -> KVHandle:
    if not msg.transfer_id or not msg.sink_address or not msg.block_ids:
        raise ValueError("the request carries no usable KV handle")
    return KVHandle(
        transfer_id=msg.transfer_id,
        sink_agent=msg.sink_agent,
        block_ids=tuple(msg.block_ids),
        generation=msg.generation,
        layout_hash=msg.layout_hash,
        sink_address=msg.sink_address,
    )
