"""One PrefillSession stream (proto/tandem.proto): a decode worker's long-lived bidirectional
stream, carrying every remote prefill it sends this prefill worker. The session multiplexes;
the per-request work (compute, destination wait, claim, send, reply, and every free) is the
servicer's `prefill`, the same code for every request.

Tasks: one reader (the up messages, in order), one task per request, and the RPC handler
itself as the only writer (`run` yields the down messages that the request tasks queue:
grpc.aio allows one write at a time per call). A request answers its first token as soon as
it is sampled, then exactly one down message (its reply or its error) unless the stream ended
first. A destination or cancel for an id
the session does not hold (never sent, answered already) is answered with an error for that
id; the stream goes on. The stream ending, either way (half-close, the caller gone, the
connection lost), cancels every request task: each frees as a cancelled request does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Generic, Protocol, TypeVar

import grpc

from proto import tandem_pb2 as pb

log = logging.getLogger(__name__)

D = TypeVar("D")


class PrefillRefused(Exception):
    """One request's failure, answered with this status code; its session goes on."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Prefiller(Protocol[D]):
    def destination(self, msg: pb.KVDestination) -> D:
        """The destination converted, its claim started; ValueError: unusable."""
        ...

    async def prefill(
        self,
        request: pb.PrefillRequest,
        destination: asyncio.Future[D],
        announce: Callable[[pb.PrefillFirstToken], None],
    ) -> pb.PrefillResponse:
        """One request, its destination resolved by the session; `announce` its first token
        (at most once, before the reply); PrefillRefused: its error."""
        ...


@dataclasses.dataclass
class _Request(Generic[D]):
    task: asyncio.Task[None]
    destination: asyncio.Future[D]  # resolved by the reader (result, or ValueError)
    cancelled: bool = False  # by a PrefillCancel: answered CANCELLED


class PrefillSession(Generic[D]):
    def __init__(self, prefiller: Prefiller[D]) -> None:
        self._prefiller = prefiller
        # the down messages, in completion order; None: the reader ended (so does the stream)
        self._down: asyncio.Queue[pb.PrefillDown | None] = asyncio.Queue()
        self._requests: dict[str, _Request[D]] = {}  # in flight: started, not answered

    async def run(self, up: AsyncIterable[pb.PrefillUp]) -> AsyncIterator[pb.PrefillDown]:
        reader = asyncio.ensure_future(self._read(up))
        try:
            while (down := await self._down.get()) is not None:
                yield down
            await reader  # the stream's error, if it broke
        finally:
            reader.cancel()
            for request in list(self._requests.values()):
                request.task.cancel()  # each frees (PrefillServicer.prefill's finally)

    async def _read(self, up: AsyncIterable[pb.PrefillUp]) -> None:
        try:
            async for msg in up:
                part = msg.WhichOneof("part")
                if part == "request":
                    self._start(msg.request)
                elif part == "destination":
                    self._resolve(msg.destination)
                elif part == "cancel":
                    self._cancel(msg.cancel.request_id)
                else:
                    self._error("", grpc.StatusCode.INVALID_ARGUMENT, "an empty PrefillUp")
        finally:
            self._down.put_nowait(None)

    def _start(self, request: pb.PrefillRequest) -> None:
        rid = request.request_id
        if not rid or rid in self._requests:
            why = "is empty" if not rid else "is in flight on this session already"
            self._error(rid, grpc.StatusCode.INVALID_ARGUMENT, f"request_id {rid!r} {why}")
            return
        destination: asyncio.Future[D] = asyncio.get_running_loop().create_future()
        task = asyncio.get_running_loop().create_task(self._serve(rid, request, destination))
        self._requests[rid] = _Request(task, destination)

    def _resolve(self, msg: pb.PrefillDestination) -> None:
        request = self._requests.get(msg.request_id)
        if request is None or request.destination.done():
            self._error(
                msg.request_id,
                grpc.StatusCode.FAILED_PRECONDITION,
                "no request of this session awaits a destination under this id",
            )
            return
        try:
            # no await between the check above and this: the claim is made for a request
            # whose task will see it (and withdraw it unless sent)
            request.destination.set_result(self._prefiller.destination(msg.destination))
        except ValueError as e:  # the request fails with it (INVALID_ARGUMENT)
            request.destination.set_exception(e)

    def _cancel(self, rid: str) -> None:
        request = self._requests.get(rid)
        if request is None:
            self._error(rid, grpc.StatusCode.NOT_FOUND, "no request of this session has this id")
            return
        request.cancelled = True
        request.task.cancel()

    async def _serve(
        self, rid: str, request: pb.PrefillRequest, destination: asyncio.Future[D]
    ) -> None:
        try:
            reply = await self._prefiller.prefill(request, destination, self._announce)
        except PrefillRefused as e:
            self._error(rid, e.code, e.message)
        except asyncio.CancelledError:
            # by a PrefillCancel (answered), or the stream ended (nobody reads any more)
            if self._requests[rid].cancelled:
                self._error(rid, grpc.StatusCode.CANCELLED, "cancelled by the decode worker")
        except Exception as e:
            log.exception("%s: prefill failed", rid)
            self._error(rid, grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        else:
            self._down.put_nowait(pb.PrefillDown(reply=reply))
        finally:
            del self._requests[rid]  # a destination or cancel from now on: an unknown id

    def _announce(self, first: pb.PrefillFirstToken) -> None:
        if first.request_id in self._requests:  # not answered yet (nor cancelled)
            self._down.put_nowait(pb.PrefillDown(first=first))

    def _error(self, rid: str, code: grpc.StatusCode, message: str) -> None:
        error = pb.PrefillError(request_id=rid, code=code.name, message=message)
        self._down.put_nowait(pb.PrefillDown(error=error))
