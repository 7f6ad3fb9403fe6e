"""DecodeWorker gRPC service: streams a request's tokens, prefilling locally or receiving the
prompt's KV from a prefill worker (the remote path in `_remote_prefill`).

Block ownership on the remote path: blocks are reserved in the engine, leased to the sink
(`expect`), and end in exactly one of two places: `admit_prefilled` once the KV landed (the
request owns them), or `cancel_kv_reservation` after the sink's KVReleased says no write of
the transfer can land any more (fencing). Nothing else frees them.

The remote prefill goes over the decode worker's long-lived session with that prefill worker
(decode_worker/prefill_session.py): its request is sent (the prefill worker starts computing)
before the reservation, whose KV destination follows on the same stream; a request that is not
admitted is cancelled by a message, which stops the prefill worker's compute and frees its side.

Failures: a remote prefill that fails (the prefill worker died, mid-prefill or mid-transfer, or
its KV did not land) is computed here instead: the reservation goes back behind the fence as
above and the stream goes on from a local prefill (logged, counted by `on_prefill_fallback`).
A migrated request (`resume_output_token_ids`, router/migration.py) always prefills here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import grpc

from decode_worker.prefill_session import PrefillSessions, RemotePrefill, RemotePrefillFailed
from engine.async_engine import AsyncEngine
from engine.block_manager import OutOfBlocks
from engine.kv_reservation import KVReservation
from engine.outputs import RequestOutput
from engine.plan import TokenLogprob
from engine.sampling_params import SamplingParams
from kv_transfer.base import KVHandle, KVLost
from kv_transfer.endpoint_thread import SinkThread
from kv_transfer.sharded import ShardedSink
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc
from runtime import worker_rpc
from runtime.tls import TlsFiles
from runtime.wire import FINISH_REASONS, logprob_to_proto, sampling_kwargs

log = logging.getLogger(__name__)


class DecodeServicer(worker_rpc.WorkerRpcs, pb_grpc.DecodeWorkerServicer):
    def __init__(
        self,
        identity: worker_rpc.WorkerIdentity,
        engine: AsyncEngine,
        sink: SinkThread | ShardedSink | None,
        lease_s: float = 30.0,
        tls: TlsFiles | None = None,
    ) -> None:
        self.identity = identity
        self.engine = engine
        self.sink = sink
        self.lease_s = lease_s  # how long reserved blocks wait for the prefill worker's KV
        self.prefill_sessions = PrefillSessions(tls)
        # _release_after_fence / hash_awaiting_prompt in progress
        self._releases: set[asyncio.Task[None]] = set()

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
        prompt = list(request.prompt_token_ids)
        resumed = list(request.resume_output_token_ids)  # a migrated request's output so far
        remote = request.prefill.WhichOneof("where") == "remote"
        if resumed and remote:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "a resumed request needs a local prefill plan"
            )
        start = time.monotonic()
        report = _RemoteReport()  # what a remote prefill reported, as it came
        kv_reported = False  # report.transfer_s went out (on the first message after it)
        try:
            outputs: AsyncIterator[RequestOutput]
            if remote:
                outputs = self._remote_outputs(request, prompt, params, report)
            else:
                outputs = self.engine.generate(rid, prompt, params, resume_output_token_ids=resumed)
            num_tokens = len(resumed)  # usage counts the whole output, before and after a move
            first = True
            interval = request.output_interval
            held: list[RequestOutput] = []  # outputs not sent yet (output_interval > 1)
            held_tokens = 0
            async with contextlib.aclosing(outputs):  # its free path runs when we stop early
                async for out in outputs:
                    held.append(out)
                    held_tokens += len(out.new_token_ids)
                    if not (first or out.finished or held_tokens >= interval):
                        continue
                    msg = _to_proto(held)
                    held, held_tokens = [], 0
                    if first:
                        first = False
                        msg.prefill_s = time.monotonic() - start
                    if report.transfer_s is not None and not kv_reported:
                        kv_reported = True
                        msg.kv_transfer_s = report.transfer_s
                    num_tokens += len(msg.token_ids)
                    if out.finished:
                        msg.usage.completion_tokens = num_tokens
                        if report.cached_tokens is not None:
                            # the longer of the two prefix hits (this worker's, which skipped
                            # the transfer, already in the message; the prefill worker's,
                            # which skipped the compute): prompt tokens found in either cache
                            msg.usage.cached_tokens = max(
                                msg.usage.cached_tokens, report.cached_tokens
                            )
                        # a resumed request may hit its own earlier output in the cache
                        msg.usage.cached_tokens = min(msg.usage.cached_tokens, len(prompt))
                    yield msg
        except ValueError as e:  # the engine refused the request (prompt too long, bad ids...)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except OutOfBlocks as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))

    def on_prefill_fallback(self, reason: str) -> None:
        """Hook: a remote prefill failed and the prompt is computed here (metrics wrap it)."""

    def on_kv_reuse(self, num_blocks: int) -> None:
        """Hook: a remote prefill's reservation reused num_blocks prompt blocks of this
        worker's prefix cache, which are not transferred (metrics wrap it)."""

    def on_remote_step(self, step: str, duration_s: float) -> None:
        """Hook: one step of a remote prefill took duration_s seconds (metrics wrap it). The
        first token's path, in order: first_token (request sent -> the prefill worker's first
        token here), first_output (one engine command: its output is ready and streamed); then
        the KV's: kv_send (first token -> reply: the transfer), destination_wait (reported by
        the prefill worker), outcome, admit. reserve and lease overlap first_token."""

    async def _remote_outputs(
        self,
        request: pb.GenerateRequest,
        prompt: list[int],
        params: SamplingParams,
        report: _RemoteReport,
    ) -> AsyncIterator[RequestOutput]:
        """A request's outputs when a prefill worker computes its prompt: the first token as
        soon as the prefill worker sampled it (its KV still on the way), then, once the KV
        landed in blocks reserved here, the rest (`report` is filled as they come).

        The request goes first on the session with what the compute needs; the reservation
        and the sink's lease run meanwhile and their KV destination follows it, needed by the
        prefill worker only once its compute is done: reserve and lease are off the critical
        path unless they outlast the compute.

        A remote prefill that fails before the first token is computed here from the start;
        one that fails after it (the KV did not land) goes on from a local prefill of prompt +
        first token (resume_output_token_ids, as a migrated request): never a token twice.
        """
        rid = request.request_id
        remote = request.prefill.remote
        clock = _StepClock(self.on_remote_step)
        # Engine and sink commands run on their own threads even if this coroutine is
        # cancelled (the client went away) while it waits for them: the reservation and the
        # lease are tracked as futures and shielded, so the release below sees whatever
        # actually happened, never less.
        reservation: asyncio.Future[KVReservation] | None = None
        # Closed below unless the request was admitted: a request still pending is cancelled,
        # which makes the prefill worker stop its compute (or its send) and free its side.
        prefill: RemotePrefill | None = None
        admitted = False

        def give_up(failure: RemotePrefillFailed | None) -> None:
            """The one end of a request not admitted: the prefill worker's side cancelled, the
            reservation released behind the fence (in the background)."""
            nonlocal prefill, reservation
            if failure is not None:
                # logged and counted (on_prefill_fallback), never silent
                log.warning("%s: %s; prefilling on this decode worker instead", rid, failure)
                self.on_prefill_fallback(failure.reason)
            if prefill is not None:
                prefill.close()  # a no-op once its reply came
            if reservation is not None:
                self._background(self._release_after_fence(rid, reservation))
            prefill = reservation = None

        try:
            try:
                if self.sink is None:
                    raise RemotePrefillFailed(
                        "this decode worker has no KV sink (started without one)", "no_sink"
                    )
                sink = self.sink
                # One engine command validates, builds the request and reserves its blocks
                # (each command waits for the engine's step boundary: under load, a decode
                # step per command).
                reservation = asyncio.ensure_future(
                    self.engine.call(lambda e: e.reserve_kv(rid, prompt, params))
                )
                prefill = self.prefill_sessions.session(
                    remote.prefill_address, remote.prefill_worker_id
                ).open(rid, self.lease_s)
                opening = pb.PrefillRequest(
                    request_id=rid,
                    prompt_token_ids=prompt,
                    sampling=request.sampling,
                    deadline_unix_s=request.deadline_unix_s,
                )
                await prefill.send(pb.PrefillUp(request=opening))
                reserved = await asyncio.shield(reservation)
                reserved_at = clock.span("reserve", clock.start)
                # queued behind the reservation, run by the engine thread while the lease and
                # the remote prefill go on: the prompt's block hashes past the first miss, so
                # that admission need not
                self._background(self.engine.call(lambda e: e.hash_awaiting_prompt(rid)))
                # only the blocks our prefix cache lacks are leased and written (the hits are
                # ours, read only: no remote write may touch them)
                handle = await asyncio.shield(
                    sink.expect(rid, reserved.write_block_ids, self.lease_s)
                )
                clock.span("lease", reserved_at)
                destination = pb.PrefillDestination(
                    request_id=rid,
                    destination=pb.KVDestination(
                        kv=_handle_to_proto(handle), first_kv_block=reserved.num_hit_blocks
                    ),
                )
                await prefill.send(pb.PrefillUp(destination=destination))
                sampled = await prefill.first()
                clock.lap("first_token")
            except RemotePrefillFailed as e:
                # Nothing was streamed yet: computing the prompt here instead loses only time.
                give_up(e)
                outputs = self.engine.generate(rid, prompt, params)
            else:
                first_logprob = None
                if sampled.HasField("logprob"):
                    lp = sampled.logprob
                    top = tuple(zip(lp.top_token_ids, lp.top_logprobs, strict=True))
                    first_logprob = TokenLogprob(lp.token_id, lp.logprob, top)
                report.cached_tokens = sampled.cached_tokens
                first = await self.engine.first_token(rid, sampled.token_id, first_logprob)
                clock.lap("first_output")
                yield first
                if first.finished:
                    return  # never admitted: the finally gives the reservation back
                try:
                    reply = await prefill.reply()
                    clock.lap("kv_send")
                    clock.report("destination_wait", reply.destination_wait_s)
                    outcome = await sink.outcome(rid)
                    clock.lap("outcome")
                    if isinstance(outcome, KVLost):
                        raise RemotePrefillFailed(
                            f"KV did not land: {outcome.reason.value}: {outcome.detail}",
                            f"kv_{outcome.reason.value}",
                        )
                    outputs = await self.engine.admit_prefilled(rid)
                    admitted = True
                    clock.lap("admit")
                except RemotePrefillFailed as e:
                    give_up(e)
                    report.cached_tokens = None  # computed here again: our own hits only
                    outputs = self.engine.generate(
                        rid, prompt, params, resume_output_token_ids=first.new_token_ids
                    )
                else:
                    report.transfer_s = reply.kv_transfer_s
                    self.on_kv_reuse(reserved.num_hit_blocks)
            # the engine's stream, closed when we are (its abort frees the request)
            async with contextlib.aclosing(outputs):
                async for out in outputs:
                    yield out
        finally:
            if not admitted:
                give_up(None)
            elif prefill is not None:
                prefill.close()  # a no-op: its reply came

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._releases.add(task)  # a task nobody references may be collected
        task.add_done_callback(self._releases.discard)

    async def _release_after_fence(
        self, rid: str, reservation: asyncio.Future[KVReservation]
    ) -> None:
        """Give a reservation back once no write of its transfer can land any more.

        Runs after the engine made (or refused) the reservation and the sink opened (or
        refused) the lease. An open transfer is aborted and awaited: it ends either landed
        (it beat the abort) or released behind the fence (KVReleased); only then are the blocks
        freed. Admission may have taken the reservation meanwhile (the caller was cancelled
        while admitting: AsyncEngine aborts that request), so none may be left to free. The
        prefix-cache hits of the reservation were never leased: nothing writes them, and the
        same cancel_kv_reservation drops their references."""
        assert self.sink is not None
        try:
            await reservation
        except Exception:  # never reserved (OutOfBlocks...): nothing to release
            return
        if self.sink.is_open(rid):
            await self.sink.abort(rid)
            await self.sink.settled(rid)
        await self.engine.call(lambda e: e.cancel_kv_reservation(rid))


@dataclasses.dataclass
class _RemoteReport:
    """What the prefill worker reported on a remote prefill, filled by _remote_outputs: its
    cache hits with the first token, the KV write time once the KV landed and was admitted."""

    cached_tokens: int | None = None  # prompt tokens the prefill worker had cached
    transfer_s: float | None = None  # the prefill worker's KV write (PrefillResponse)


class _StepClock:
    """Times the steps of one request (monotonic seconds) and reports each: `lap` a step of
    the critical path (since the previous lap, or the start), `span` one that overlaps it."""

    def __init__(self, report: Callable[[str, float], None]) -> None:
        self._report = report
        self.start = self._last = time.monotonic()

    def lap(self, step: str) -> None:
        self._last = self.span(step, self._last)

    def span(self, step: str, since: float) -> float:
        """Reports the step as the time from `since` to now; returns now."""
        now = time.monotonic()
        self._report(step, now - since)
        return now

    def report(self, step: str, duration_s: float) -> None:
        self._report(step, duration_s)


def _to_proto(outs: list[RequestOutput]) -> pb.GenerateResponse:
    """One message for consecutive outputs of one request (one per engine step, in order);
    only the last may be finished."""
    out = outs[-1]
    if len(outs) == 1:
        token_ids, text, logprobs = out.new_token_ids, out.text_delta, out.new_logprobs
    else:
        token_ids = tuple(t for o in outs for t in o.new_token_ids)
        text = "".join(o.text_delta for o in outs)
        logprobs = tuple(lp for o in outs for lp in o.new_logprobs)
    msg = pb.GenerateResponse(
        request_id=out.request_id,
        token_ids=token_ids,
        text=text,
        logprobs=[logprob_to_proto(lp.token_id, lp.logprob, lp.top) for lp in logprobs],
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


def _handle_to_proto(handle: KVHandle) -> pb.KVHandle:
    return pb.KVHandle(
        transfer_id=handle.transfer_id,
        sink_agent=handle.sink_agent,
        block_ids=handle.block_ids,
        generation=handle.generation,
        layout_hash=handle.layout_hash,
        sink_address=handle.sink_address,
        more_ranks=[
            pb.KVRankLease(
                sink_agent=m.sink_agent,
                generation=m.generation,
                layout_hash=m.layout_hash,
                sink_address=m.sink_address,
            )
            for m in handle.more_ranks
        ],
    )
