"""Run a KVSink or KVSource on its own thread and await its outcomes from asyncio.

Sinks and sources are single-threaded and poll-driven. A worker's gRPC handlers live on an
asyncio loop and its engine on another thread, so each endpoint gets this thread: commands
(expect, abort, prepare, send, cancel) are queued to it and run between polls; events resolve
per-transfer futures on the event loop. A command also writes a byte into a pipe that the poll
selects on, so it runs at once (a send() after prefill is on the request's critical path), not
at the next poll timeout; an idle endpoint sleeps in select() and costs nothing measurable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from kv_transfer.base import (
    KVHandle,
    KVLanded,
    KVLost,
    KVReleased,
    KVSink,
    KVSource,
    SendDone,
    SendFailed,
)

POLL_S = 0.05  # idle poll timeout; commands wake the thread through the pipe at once
T = TypeVar("T")
E = TypeVar("E", KVSink, KVSource)


class _EndpointThread(Generic[E]):
    def __init__(self, endpoint: E, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self.endpoint: E = endpoint
        self.loop = loop
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()  # one byte per queued command (or more: coalesced)
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with contextlib.suppress(BlockingIOError):  # drained before the queue: no lost wake
                while os.read(self._wake_r, 4096):
                    pass
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                if command is None:
                    self.endpoint.close()
                    return
                command()
            self._dispatch(self.endpoint.poll(timeout_s=POLL_S, wakeup_fd=self._wake_r))

    def _dispatch(self, events: Sequence[object]) -> None:
        raise NotImplementedError

    async def _call(self, fn: Callable[[], T]) -> T:
        future: asyncio.Future[T] = self.loop.create_future()

        def command() -> None:
            try:
                result = fn()
            except Exception as e:
                self.loop.call_soon_threadsafe(_resolve_error, future, e)
            else:
                self.loop.call_soon_threadsafe(_resolve, future, result)

        self._put(command)
        return await future

    def _put(self, command: Callable[[], None] | None) -> None:
        self._commands.put(command)
        with contextlib.suppress(BlockingIOError):  # pipe full: it is readable anyway
            os.write(self._wake_w, b"\0")

    def close(self) -> None:
        self._put(None)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            os.close(self._wake_r)
            os.close(self._wake_w)


class SinkThread(_EndpointThread[KVSink]):
    """Decode side. Per expect(): `outcome()` gives KVLanded or KVLost, `released()` the
    KVReleased that follows a KVLost (then, and only then, the blocks may be freed)."""

    def __init__(self, sink: KVSink, loop: asyncio.AbstractEventLoop) -> None:
        self._outcomes: dict[str, asyncio.Future[KVLanded | KVLost]] = {}  # loop only
        self._releases: dict[str, asyncio.Future[KVReleased]] = {}  # loop only
        super().__init__(sink, loop, "kv-sink")

    async def expect(self, transfer_id: str, block_ids: Sequence[int], lease_s: float) -> KVHandle:
        self._outcomes[transfer_id] = self.loop.create_future()
        self._releases[transfer_id] = self.loop.create_future()
        try:
            return await self._call(lambda: self.endpoint.expect(transfer_id, block_ids, lease_s))
        except BaseException:
            self._outcomes.pop(transfer_id, None)
            self._releases.pop(transfer_id, None)
            raise

    async def outcome(self, transfer_id: str) -> KVLanded | KVLost:
        """KVLanded (the caller owns the blocks again) or KVLost (wait for released())."""
        result = await asyncio.shield(self._outcomes[transfer_id])
        del self._outcomes[transfer_id]
        if isinstance(result, KVLanded):
            del self._releases[transfer_id]  # no KVReleased follows a landing
        return result

    async def released(self, transfer_id: str) -> KVReleased:
        """Resolves once no write of the transfer can land: then, and only then, free."""
        result = await asyncio.shield(self._releases[transfer_id])
        del self._releases[transfer_id]
        self._outcomes.pop(transfer_id, None)
        return result

    async def settled(self, transfer_id: str) -> KVLanded | KVReleased:
        """After abort(): resolves once no write of the transfer can land any more, with
        KVLanded (it landed before the abort took: the caller owns the blocks again) or the
        KVReleased behind the fence. Consumes what outcome()/released() would."""
        if transfer_id in self._outcomes:
            result = await self.outcome(transfer_id)
            if isinstance(result, KVLanded):
                return result
        return await self.released(transfer_id)

    def is_open(self, transfer_id: str) -> bool:
        return transfer_id in self._releases or transfer_id in self._outcomes

    async def abort(self, transfer_id: str) -> None:
        await self._call(lambda: self.endpoint.abort(transfer_id))

    def _dispatch(self, events: Sequence[object]) -> None:
        if events:
            self.loop.call_soon_threadsafe(self._on_events, list(events))

    def _on_events(self, events: list[object]) -> None:
        # futures stay in the dicts until outcome()/released() consume them
        for event in events:
            if isinstance(event, KVLanded | KVLost):
                future = self._outcomes.get(event.transfer_id)
                if future is not None and not future.done():
                    future.set_result(event)
            elif isinstance(event, KVReleased):
                release = self._releases.get(event.transfer_id)
                if release is not None and not release.done():
                    release.set_result(event)


class SourceThread(_EndpointThread[KVSource]):
    """Prefill side: `send()` resolves with the transfer's SendDone or SendFailed."""

    def __init__(self, source: KVSource, loop: asyncio.AbstractEventLoop) -> None:
        self._sends: dict[tuple[str, int], asyncio.Future[SendDone | SendFailed]] = {}
        super().__init__(source, loop, "kv-source")

    async def prepare(self, handle: KVHandle) -> None:
        """Claim now (see KVSource.prepare); call it when prefill starts, then send() or
        cancel(). Raises ValueError as KVSource.prepare does."""
        await self._call(lambda: self.endpoint.prepare(handle))

    async def cancel(self, handle: KVHandle) -> None:
        await self._call(lambda: self.endpoint.cancel(handle))

    async def send(self, handle: KVHandle, src_block_ids: Sequence[int]) -> SendDone | SendFailed:
        key = (handle.transfer_id, handle.generation)
        future = self._sends[key] = self.loop.create_future()
        try:
            await self._call(lambda: self.endpoint.send(handle, src_block_ids))
            return await future
        finally:
            self._sends.pop(key, None)

    def _dispatch(self, events: Sequence[object]) -> None:
        if events:
            self.loop.call_soon_threadsafe(self._on_events, list(events))

    def _on_events(self, events: list[object]) -> None:
        for event in events:
            if isinstance(event, SendDone | SendFailed):
                future = self._sends.get((event.transfer_id, event.generation))
                if future is not None and not future.done():
                    future.set_result(event)


def _resolve(future: asyncio.Future[T], result: T) -> None:
    if not future.done():
        future.set_result(result)


def _resolve_error(future: asyncio.Future[T], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
