"""Remote prefills over long-lived PrefillSession streams (proto/tandem.proto): one stream per
prefill worker address, opened on the first remote prefill sent there and shared by every
later one (a call per prompt cost ~0.7 ms more per prompt: a new HTTP/2 stream each time).

Per session: one reader task dispatches the down messages (a first token, then a reply or an
error, by request id) to per-request futures; writes are serialized by a lock (grpc.aio allows
one write at a time per call; an uncontended lock costs no loop hop). A request is pending
from `open` until its reply or error arrived, or `RemotePrefill.close`, which sends a cancel
for a request still pending (the prefill worker stops its compute, or its KV send, and frees).
Each request has a deadline (the lease) over its writes and its answers.

Failures: a request's error fails that request only (RemotePrefillFailed, its code name as
the reason). The stream ending, either way, fails every request pending on it at once
(RemotePrefillFailed: the decode worker falls back to a local prefill) and retires the
session: the next request to that address opens a new one (the channel reconnects). A write
that outlasts the deadline (a hung peer) breaks the session the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any, TypeVar

import grpc

from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc
from runtime.grpc_server import GRPC_OPTIONS
from runtime.tls import TlsFiles, open_channel

log = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds a cancel's write may take before the peer counts as hung (the session breaks); the
# other writes have their request's deadline (its lease).
_CANCEL_WRITE_S = 10.0


class RemotePrefillFailed(RuntimeError):
    """The prompt's KV could not be obtained from the prefill worker."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # a metric label: no_sink, a gRPC code name, or a KVLost reason


class PrefillSessions:
    """One gRPC channel and one open session per prefill worker address, each opened on first
    use (TLS when the worker was given --grpc-tls-* files: the prefill workers serve with the
    same ones); a broken session is replaced on the next use."""

    def __init__(self, tls: TlsFiles | None = None) -> None:
        self._tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._sessions: dict[str, PrefillSession] = {}

    def session(self, address: str, worker_id: str) -> PrefillSession:
        session = self._sessions.get(address)
        if session is None or session.broken:
            if address not in self._channels:
                self._channels[address] = open_channel(address, self._tls, GRPC_OPTIONS)
            stub = pb_grpc.PrefillWorkerStub(self._channels[address])
            session = PrefillSession(stub.PrefillSession(), f"prefill worker {worker_id}")
            self._sessions[address] = session
        return session

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        for channel in self._channels.values():
            await channel.close()


class PrefillSession:
    def __init__(self, call: grpc.aio.StreamStreamCall[pb.PrefillUp, pb.PrefillDown], peer: str):
        self._call = call
        self._peer = peer  # for messages: "prefill worker <id>"
        self._pending: dict[str, _Pending] = {}  # requests whose reply or error is to come
        self._write_lock = asyncio.Lock()
        self._failure: RemotePrefillFailed | None = None  # set once: the stream has ended
        self._cancels: set[asyncio.Task[None]] = set()  # PrefillCancel writes in flight
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @property
    def broken(self) -> bool:
        return self._failure is not None

    def open(self, rid: str, lease_s: float) -> RemotePrefill:
        """Registers rid (nothing is sent yet); the caller must `close` what this returns."""
        if self._failure is not None:
            raise self._failure
        if rid in self._pending:
            raise RemotePrefillFailed(f"{rid} is pending on this session already", "protocol")
        loop = asyncio.get_running_loop()
        pending = self._pending[rid] = _Pending(loop.create_future(), loop.create_future())
        return RemotePrefill(self, rid, pending, loop.time() + lease_s)

    @property
    def peer(self) -> str:
        return self._peer

    async def write(self, msg: pb.PrefillUp, deadline: float) -> None:
        """One up message, after those already written. RemotePrefillFailed: the deadline
        (loop.time()) passed while waiting for the lock (this request only), or during the
        write, or the session broke (both: every request pending on it fails alike)."""
        try:
            async with asyncio.timeout_at(deadline):
                await self._write_lock.acquire()
        except TimeoutError:
            raise RemotePrefillFailed(
                f"{self._peer}: waited past the lease to write", "deadline_exceeded"
            ) from None
        try:
            async with asyncio.timeout_at(deadline):
                await self._call.write(msg)
            return
        except TimeoutError:
            # A write waits for the stream to start (the connection's handshake: the first
            # write of a session) and for flow control (the peer stopped reading): either way
            # the peer is hung, and the write's state unknown: the stream is unusable.
            self._call.cancel()
            failure = RemotePrefillFailed(
                f"{self._peer}: a session write did not complete in time", "deadline_exceeded"
            )
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            # the call has ended: its status (seen by the reader, at once) says why
            await asyncio.wait({self._reader}, timeout=1.0)
            failure = self._failure or RemotePrefillFailed(f"{self._peer}: write failed", "unknown")
        finally:
            self._write_lock.release()
        self._fail(failure)
        raise self._failure or failure

    def cancel(self, rid: str) -> None:
        """Forgets rid; a PrefillCancel goes out (in the background) if it was pending."""
        pending = self._pending.pop(rid, None)
        if pending is None or self._failure is not None:
            return  # answered already, or the stream is gone (so is the prefill side's task)
        pending.first.cancel()
        pending.reply.cancel()
        deadline = asyncio.get_running_loop().time() + _CANCEL_WRITE_S
        task = asyncio.get_running_loop().create_task(self._send_cancel(rid, deadline))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _send_cancel(self, rid: str, deadline: float) -> None:
        with contextlib.suppress(RemotePrefillFailed):  # a broken stream cancels them all
            await self.write(pb.PrefillUp(cancel=pb.PrefillCancel(request_id=rid)), deadline)

    async def _read(self) -> None:
        failure = RemotePrefillFailed(f"{self._peer} ended the session", "session_ended")
        try:
            async for down in self._call:
                part = down.WhichOneof("part")
                if part == "first":
                    pending = self._pending.get(down.first.request_id)
                    if pending is not None and not pending.first.done():
                        pending.first.set_result(down.first)
                    continue
                rid = down.reply.request_id if part == "reply" else down.error.request_id
                pending = self._pending.pop(rid, None)
                # None: answered after its cancel or deadline (or an error for a cancel that
                # came too late): nobody waits for it any more
                if pending is None:
                    continue
                # its reply is unset: a reply is set (or failed, or cancelled) only as the
                # request leaves _pending (here, cancel, _fail)
                if part == "reply" and pending.first.done():
                    pending.reply.set_result(down.reply)
                elif part == "reply":
                    pending.fail(
                        RemotePrefillFailed(
                            f"{self._peer}: a reply before its first token", "protocol"
                        )
                    )
                else:
                    pending.fail(
                        RemotePrefillFailed(
                            f"{self._peer} failed: {down.error.code}: {down.error.message}",
                            down.error.code.lower() or "unknown",
                        )
                    )
        except grpc.aio.AioRpcError as e:
            failure = RemotePrefillFailed(
                f"{self._peer} failed: {e.code().name}: {e.details()}", e.code().name.lower()
            )
        except asyncio.CancelledError:
            failure = RemotePrefillFailed(f"{self._peer}: session closed", "cancelled")
            raise
        except Exception as e:  # a malformed message: the stream is not to be trusted
            self._call.cancel()
            failure = RemotePrefillFailed(f"{self._peer}: session broke: {e!r}", "protocol")
        finally:
            self._fail(failure)

    def _fail(self, failure: RemotePrefillFailed) -> None:
        """The stream has ended: every pending request fails with `failure` (once)."""
        if self._failure is not None:
            return
        self._failure = failure
        if self._pending:
            log.warning("%s; %d pending remote prefills fail", failure, len(self._pending))
        else:
            log.info("%s", failure)
        pending, self._pending = self._pending, {}
        for request in pending.values():
            request.fail(failure)

    async def close(self) -> None:
        self._call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@dataclasses.dataclass(frozen=True)
class _Pending:
    """One request's answers: its first token, then its reply; an error or the stream's end
    fails whichever has not come."""

    first: asyncio.Future[pb.PrefillFirstToken]
    reply: asyncio.Future[pb.PrefillResponse]

    def fail(self, failure: RemotePrefillFailed) -> None:
        for answer in (self.first, self.reply):
            if not answer.done():
                answer.set_exception(failure)
                answer.add_done_callback(_consume)  # its waiter may be gone (cancelled)


class RemotePrefill:
    """One request on a session, from `PrefillSession.open` to `close` (always: in a finally);
    each step fails with RemotePrefillFailed, which means no reply will come."""

    def __init__(
        self, session: PrefillSession, rid: str, pending: _Pending, deadline: float
    ) -> None:
        self._session = session
        self._rid = rid
        self._pending = pending
        self._deadline = deadline  # loop.time(): the lease, over writes and answers

    async def send(self, msg: pb.PrefillUp) -> None:
        if self._pending.reply.done():  # failed already (an error came, or the stream ended)
            await self._pending.reply  # raises it
        await self._session.write(msg, self._deadline)

    async def first(self) -> pb.PrefillFirstToken:
        """The first token, sampled by the prefill worker (its KV is being sent)."""
        return await self._answer(self._pending.first, "first token")

    async def reply(self) -> pb.PrefillResponse:
        """The reply: the KV was written."""
        return await self._answer(self._pending.reply, "reply")

    async def _answer(self, answer: asyncio.Future[T], what: str) -> T:
        try:
            async with asyncio.timeout_at(self._deadline):
                # shielded: a timeout or a cancelled caller leaves it to close()
                return await asyncio.shield(answer)
        except TimeoutError:
            raise RemotePrefillFailed(
                f"{self._session.peer}: no {what} within the lease", "deadline_exceeded"
            ) from None

    def close(self) -> None:
        """Ends the request here; a PrefillCancel goes out if its answer is still to come."""
        self._session.cancel(self._rid)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
