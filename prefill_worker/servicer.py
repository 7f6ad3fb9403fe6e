"""PrefillWorker gRPC service: compute a prompt's KV, sample its first token, WRITE the KV
into the decode worker's reserved blocks, then free our copy. Only the prompt blocks from
PrefillRequest.first_kv_block on are written: the decode worker holds the ones before in its
own prefix cache (this worker still computes whatever its own, separate cache lacks).

The lease is claimed when the request arrives (ShardedSource.prepare), concurrently with the
compute, so the write after prefill posts with no round trip; fencing is unchanged (a lease
lost meanwhile fails the send). A request that ends without a send (bad input, engine error,
caller gone) withdraws its claim (ShardedSource.cancel), so the decode side frees its blocks.

Block ownership: the request's blocks stay pinned in our engine after it finishes
(hold_kv_on_finish) until the send has ended one way or the other; `release_kv` once the send
is over (`_release_after_send`, a task: the reply does not wait for the engine's next step
boundary) is their one free path. If the caller goes away before the finish was seen, the
engine stream's abort frees them (Engine.abort also frees a finished request's held blocks).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Coroutine
from typing import Any

import grpc

from engine.async_engine import AsyncEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from kv_transfer.base import KVHandle, KVRankLease, SendFailed
from kv_transfer.sharded import ShardedSource
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc
from runtime import worker_rpc
from runtime.wire import logprob_to_proto, sampling_kwargs


class PrefillServicer(worker_rpc.WorkerRpcs, pb_grpc.PrefillWorkerServicer):
    def __init__(
        self,
        identity: worker_rpc.WorkerIdentity,
        engine: AsyncEngine,
        source: ShardedSource,
    ) -> None:
        self.identity = identity
        self.engine = engine
        self.source = source
        # _release_after_send / _withdraw in progress
        self._releases: set[asyncio.Task[None]] = set()

    async def Prefill(
        self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> pb.PrefillResponse:
        rid = request.request_id
        try:
            params = SamplingParams(**sampling_kwargs(request.sampling))
            handle = _handle_from_proto(request.kv)
            first_block = int(request.first_kv_block)  # the one conversion of the field
            self.source.route(handle)  # a decode worker of a TP we cannot feed: refused now
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        # The first token only: stop strings and later limits are the decode worker's business.
        first_params = dataclasses.replace(
            params, max_tokens=1, min_tokens=min(params.min_tokens, 1), stop=()
        )
        start = time.monotonic()
        claim = asyncio.ensure_future(self.source.prepare(handle))  # overlaps the compute
        sending = holding = False
        try:
            last: RequestOutput | None = None
            try:
                async for out in self.engine.generate(
                    rid, list(request.prompt_token_ids), first_params, hold_kv_on_finish=True
                ):
                    last = out
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            assert last is not None and last.finished
            holding = True  # from here on our blocks are pinned until release_kv
            prefill_s = time.monotonic() - start
            # the decode worker holds prompt blocks 0..first-1 already (its prefix cache):
            # only blocks first.. are written, into handle.block_ids in order
            held = last.held_block_ids[first_block:]
            problem = None
            if not held or len(held) != len(handle.block_ids):
                problem = (
                    f"the KV handle has {len(handle.block_ids)} blocks from prompt block "
                    f"{first_block} on; the prompt has {len(last.held_block_ids)} blocks"
                )
            else:
                try:
                    if not claim.done():
                        await asyncio.shield(claim)
                    claim.result()
                except ValueError as e:  # this transfer is in flight already (a duplicate)
                    problem = str(e)
            if problem is not None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            sending = True  # no await between this and the send's start
            send = asyncio.ensure_future(self.source.send(handle, held))
        finally:
            if not sending:  # tasks: a cancelled caller must still free and give the claim back
                if holding:
                    self._background(self.engine.call(lambda engine: engine.release_kv(rid)))
                self._background(self._withdraw(claim, handle))
        try:
            result = await asyncio.shield(send)
        finally:
            # The held blocks are freed once the send has ended (SendDone / SendFailed: the
            # source reads them no more), also when the caller went away meanwhile. Never
            # awaited here: the release is an engine command, which runs only at the engine's
            # next step boundary (under load, up to a whole prefill chunk later), and the reply
            # (the decode worker's first token) must not wait for it.
            self._background(self._release_after_send(rid, send))
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

    async def _withdraw(self, claim: asyncio.Future[None], handle: KVHandle) -> None:
        """The request ends without a send: give our claim back (the sink frees the blocks)."""
        try:
            await claim
        except ValueError:
            return  # never ours: another request holds this transfer
        await self.source.cancel(handle)

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._releases.add(task)  # a task nobody references may be collected
        task.add_done_callback(self._releases.discard)


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
        more_ranks=tuple(
            KVRankLease(m.sink_agent, m.generation, m.layout_hash, m.sink_address)
            for m in msg.more_ranks
        ),
    )
