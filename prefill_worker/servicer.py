"""PrefillWorker gRPC service: compute a prompt's KV, sample its first token, WRITE the KV
into the decode worker's reserved blocks, then free our copy. Only the prompt blocks from
KVDestination.first_kv_block on are written: the decode worker holds the ones before in its
own prefix cache (this worker still computes whatever its own, separate cache lacks).

Requests arrive on a decode worker's long-lived PrefillSession stream (prefill_worker/
session.py multiplexes; `prefill` here is the one per-request path): the request comes first
and goes to the engine at once; its KV destination comes later on the same stream, while the
prompt is computed (the decode worker reserves and leases its blocks meanwhile), and is needed
only for the write. The lease is claimed when the destination arrives (`destination`, run by
the session's reader), concurrently with the compute, so the write after prefill posts with no
round trip; fencing is unchanged (a lease lost meanwhile fails the send). A request that ends
without a send (bad input, engine error, cancelled by a PrefillCancel or by its session's end)
withdraws its claim if it made one (ShardedSource.cancel), so the decode side frees its blocks.

Block ownership: the request's blocks stay pinned in our engine after it finishes
(hold_kv_on_finish) until the send has ended one way or the other; `release_kv` once the send
is over (`_release_after_send`, a task: the reply does not wait for the engine's next step
boundary) is their one free path. If the request ends before the finish was seen (the
destination failed, it was cancelled), cancelling the compute task leaves the engine stream
early, and its abort frees them (Engine.abort also frees a finished request's held blocks).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine
from typing import Any

import grpc

from engine.async_engine import AsyncEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from kv_transfer.base import KVHandle, KVRankLease, SendFailed
from kv_transfer.sharded import ShardedSource
from prefill_worker.session import PrefillRefused, PrefillSession
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc
from runtime import worker_rpc
from runtime.wire import logprob_to_proto, sampling_kwargs


@dataclasses.dataclass(frozen=True)
class Destination:
    """The call's second message, converted; its claim was started the moment it arrived."""

    handle: KVHandle
    first_block: int  # the first prompt block to write (KVDestination.first_kv_block)
    claim: asyncio.Future[None]  # ShardedSource.prepare(handle); withdrawn unless sent
    arrived: float  # time.monotonic()


@dataclasses.dataclass(frozen=True)
class _Computed:
    last: RequestOutput  # finished; its blocks are held (hold_kv_on_finish) until release_kv
    done: float  # time.monotonic()


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

    async def PrefillSession(
        self, up: AsyncIterable[pb.PrefillUp], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PrefillDown]:
        """A decode worker's long-lived stream: every request on it runs `prefill`."""
        async for down in PrefillSession(self).run(up):
            yield down

    def destination(self, msg: pb.KVDestination) -> Destination:
        """A request's destination, converted; its lease is claimed at once (the claim
        overlaps the compute). ValueError: unusable (the request fails INVALID_ARGUMENT)."""
        handle = _handle_from_proto(msg.kv)
        self.source.route(handle)  # a decode worker of a TP we cannot feed: refused now
        claim = asyncio.ensure_future(self.source.prepare(handle))
        return Destination(handle, int(msg.first_kv_block), claim, time.monotonic())

    async def prefill(
        self,
        request: pb.PrefillRequest,
        destination: asyncio.Future[Destination],
        announce: Callable[[pb.PrefillFirstToken], None],
    ) -> pb.PrefillResponse:
        """One remote prefill: compute at once, `announce` the first token the moment it is
        sampled (the destination and the send come after: the decode worker streams it on
        meanwhile), meet the destination (resolved by the session when it arrives), send,
        reply. PrefillRefused: the request's error; cancelled (a PrefillCancel, the session
        ended): frees the same way."""
        rid = request.request_id
        try:
            params = SamplingParams(**sampling_kwargs(request.sampling))
        except ValueError as e:
            raise PrefillRefused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        # The first token only: stop strings and later limits are the decode worker's business.
        first_params = dataclasses.replace(
            params, max_tokens=1, min_tokens=min(params.min_tokens, 1), stop=()
        )
        start = time.monotonic()
        compute = asyncio.ensure_future(
            self._compute(rid, list(request.prompt_token_ids), first_params)
        )

        def sampled(done: asyncio.Future[_Computed]) -> None:
            if not done.cancelled() and done.exception() is None:
                announce(_first_token(rid, done.result().last))

        compute.add_done_callback(sampled)
        sending = False
        try:
            # Both at once; a failed destination (bad handle) stops the compute at once
            # (finally), and a failed compute the wait for the destination.
            await asyncio.wait({compute, destination}, return_when=asyncio.FIRST_EXCEPTION)
            for part in (destination, compute):
                if part.done() and isinstance(part.exception(), ValueError):
                    raise PrefillRefused(grpc.StatusCode.INVALID_ARGUMENT, str(part.exception()))
            work, dest = compute.result(), destination.result()  # any other error: raised
            last, computed_at = work.last, work.done
            handle, first_block = dest.handle, dest.first_block
            prefill_s = computed_at - start
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
                    if not dest.claim.done():
                        await asyncio.shield(dest.claim)
                    dest.claim.result()
                except ValueError as e:  # this transfer is in flight already (a duplicate)
                    problem = str(e)
            if problem is not None:
                raise PrefillRefused(grpc.StatusCode.INVALID_ARGUMENT, problem)
            sending = True  # no await between this and the send's start
            send = asyncio.ensure_future(self.source.send(handle, held))
        finally:
            if not sending:  # tasks: a cancelled request must still free and give the claim back
                self._end_without_send(rid, compute, destination)
        try:
            result = await asyncio.shield(send)
        finally:
            # The held blocks are freed once the send has ended (SendDone / SendFailed: the
            # source reads them no more), also when the request was cancelled meanwhile. Never
            # awaited here: the release is an engine command, which runs only at the engine's
            # next step boundary (under load, up to a whole prefill chunk later), and the reply
            # (the decode worker's first token) must not wait for it.
            self._background(self._release_after_send(rid, send))
        if isinstance(result, SendFailed):
            raise PrefillRefused(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {result.error}")
        return pb.PrefillResponse(
            request_id=rid,
            prefill_s=prefill_s,
            kv_transfer_s=result.elapsed_s,
            destination_wait_s=max(0.0, dest.arrived - computed_at),
        )

    async def _compute(self, rid: str, prompt: list[int], params: SamplingParams) -> _Computed:
        """The prompt's KV and first token. Done (not cancelled, no error) <=> the finished
        output was seen <=> its blocks are held: the finish and the task's end fall in one loop
        step, so a cancel lands before the finish (the stream's abort frees) or not at all."""
        last: RequestOutput | None = None
        async for out in self.engine.generate(rid, prompt, params, hold_kv_on_finish=True):
            last = out
        assert last is not None and last.finished
        return _Computed(last, time.monotonic())

    def _end_without_send(
        self,
        rid: str,
        compute: asyncio.Future[_Computed],
        destination: asyncio.Future[Destination],
    ) -> None:
        """The one free path of a call that sends nothing: the compute is stopped (the engine
        stream's abort frees) or, if it finished, its held blocks released; a claim made is
        withdrawn (the sink frees the decode side's blocks)."""
        if not compute.done():
            compute.cancel()
        elif not compute.cancelled() and compute.exception() is None:
            self._background(self.engine.call(lambda engine: engine.release_kv(rid)))
        if not destination.done():
            destination.cancel()  # a destination arriving later is refused (the session)
        elif not destination.cancelled() and destination.exception() is None:
            dest = destination.result()
            self._background(self._withdraw(dest.claim, dest.handle))
        for part in (compute, destination):  # retrieved here: no "never retrieved" warnings
            part.add_done_callback(_consume)

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


def _first_token(rid: str, last: RequestOutput) -> pb.PrefillFirstToken:
    msg = pb.PrefillFirstToken(
        request_id=rid, token_id=last.new_token_ids[0], cached_tokens=last.num_cached_tokens
    )
    if last.new_logprobs:
        lp = last.new_logprobs[0]
        msg.logprob.CopyFrom(logprob_to_proto(lp.token_id, lp.logprob, lp.top))
    return msg


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


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
