"""AsyncEngine: an Engine on its own thread, driven from an asyncio event loop.

The engine is single-threaded. Every call into it (add, abort, reserve, admit, release) is a
command queued to the engine thread and run between steps; outputs come back to the event
loop through per-request asyncio queues. When nothing is running the thread sleeps on the
command queue (no busy loop).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from engine.block_manager import BlockCounts
from engine.engine import Engine
from engine.outputs import RequestOutput
from engine.plan import TokenLogprob
from engine.sampling_params import SamplingParams
from engine.stats import StepStats

T = TypeVar("T")


class EngineDead(RuntimeError):
    """The engine thread crashed; every pending and future request fails with this."""


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """Snapshot published by the engine thread after every step (read without locking)."""

    num_running: int
    num_waiting: int
    num_reserved: int
    num_blocks_total: int
    num_blocks_free: int  # allocatable now: free + cached
    num_blocks_cached: int  # of those, holding prefix-cache KV (evictable)
    num_blocks_used: int


@dataclass(frozen=True, slots=True)
class KVCacheEvent:
    stored: tuple[int, ...]
    removed: tuple[int, ...]


class AsyncEngine:
    def __init__(
        self,
        engine: Engine,
        loop: asyncio.AbstractEventLoop,
        on_step: Callable[[StepStats], None] | None = None,
    ) -> None:
        """on_step: called on the engine thread after every non-empty step, before its
        outputs reach the event loop (a metrics exporter; it must be thread-safe and quick)."""
        self.engine = engine
        self.loop = loop
        self._on_step = on_step
        self._commands: queue.SimpleQueue[Callable[[Engine], None] | None] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}  # loop only
        self._kv_subscribers: set[asyncio.Queue[KVCacheEvent]] = set()  # loop only
        self.error: BaseException | None = None
        self.load = self._snapshot()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    # ---- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                block = not self.engine.has_unfinished()
                while True:
                    try:
                        command = self._commands.get(block=block)
                    except queue.Empty:
                        break
                    if command is None:
                        return
                    command(self.engine)
                    block = False
                outputs = self.engine.step()
                self.load = self._snapshot()
                stats = self.engine.last_step_stats
                if stats is not None and self._on_step is not None:
                    self._on_step(stats)
                stored, removed = self.engine.block_manager.drain_events()
                if outputs or stored or removed:
                    event = KVCacheEvent(tuple(stored), tuple(removed))
                    self.loop.call_soon_threadsafe(self._dispatch, outputs, event)
        except BaseException as e:  # the one fail-fast handler: fail every stream, stay dead
            self.error = e
            self.loop.call_soon_threadsafe(self._fail_all, e)

    def _snapshot(self) -> EngineLoad:
        s = self.engine.scheduler
        counts = self.engine.block_manager.counts()
        return EngineLoad(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            num_reserved=len(s.reserved),
            num_blocks_total=counts.num_total,
            num_blocks_free=counts.num_free + counts.num_cached,
            num_blocks_cached=counts.num_cached,
            num_blocks_used=counts.num_used,
        )

    # ---- the event loop side ------------------------------------------------------------------
    def _dispatch(self, outputs: list[RequestOutput], event: KVCacheEvent) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)
        if event.stored or event.removed:
            for sub in self._kv_subscribers:
                sub.put_nowait(event)

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.put_nowait(error)

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run fn(engine) on the engine thread between steps; returns or raises its result."""
        if self.error is not None:
            raise EngineDead(f"engine thread died: {self.error!r}") from self.error
        future: asyncio.Future[T] = self.loop.create_future()

        def command(engine: Engine) -> None:
            try:
                result = fn(engine)
            except Exception as e:
                self.loop.call_soon_threadsafe(_set_exception, future, e)
            else:
                self.loop.call_soon_threadsafe(_set_result, future, result)

        self._commands.put(command)
        return await future

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        hold_kv_on_finish: bool = False,
        resume_output_token_ids: Sequence[int] = (),
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the iterator early aborts the request.
        resume_output_token_ids: see Engine.add_request (a migrated request)."""

        def add(engine: Engine) -> None:
            engine.add_request(
                request_id,
                prompt_token_ids,
                params,
                hold_kv_on_finish=hold_kv_on_finish,
                resume_output_token_ids=resume_output_token_ids,
            )

        async for out in self._stream(request_id, add):
            yield out

    async def first_token(
        self,
        request_id: str,
        first_token_id: int,
        first_logprob: TokenLogprob | None = None,
    ) -> RequestOutput:
        """Decode role: the output of the prefill side's first token (Engine.first_token),
        while the KV may still be on its way. Returned, not streamed: no step can output for
        the request before admit_prefilled, so nothing can overtake it."""
        return await self.call(
            lambda engine: engine.first_token(request_id, first_token_id, first_logprob)
        )

    async def admit_prefilled(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """Decode role: admit a request whose prompt KV is in the blocks Engine.reserve_kv
        gave and whose first token was given (eagerly: when this returns the request owns
        the blocks) and return its output stream, from its second token on."""
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        # registered before the admission: its steps' outputs may reach the loop before the
        # command's result does
        stream = self._streams[request_id] = asyncio.Queue()
        try:
            await self.call(lambda engine: engine.admit_prefilled(request_id))
        except BaseException as e:
            self._streams.pop(request_id, None)
            if not isinstance(e, Exception) and self.error is None:
                # cancelled while the admission was queued: it still runs, so abort behind it
                self._commands.put(lambda engine: engine.abort(request_id))
            raise
        return self._drain(request_id, stream)

    async def _stream(
        self, request_id: str, add: Callable[[Engine], None]
    ) -> AsyncIterator[RequestOutput]:
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = self._streams[request_id] = asyncio.Queue()
        try:
            await self.call(add)
        except BaseException as e:
            self._streams.pop(request_id, None)
            if not isinstance(e, Exception) and self.error is None:
                # cancelled while the add was queued: it still runs, so abort right behind it
                # (commands run in order, both before the next step)
                self._commands.put(lambda engine: engine.abort(request_id))
            raise
        async for out in self._drain(request_id, stream):
            yield out

    async def _drain(
        self, request_id: str, stream: asyncio.Queue[RequestOutput | BaseException]
    ) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise EngineDead(f"engine thread died: {item!r}") from item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished and self.error is None:
                self._commands.put(lambda engine: engine.abort(request_id))

    async def abort_request(self, request_id: str) -> bool:
        """Abort a queued or running request; False when it is unknown (finished already)."""

        def abort(engine: Engine) -> bool:
            found = request_id in engine.scheduler.requests
            engine.abort(request_id)
            return found

        return await self.call(abort)

    async def audit_blocks(self) -> tuple[BlockCounts, str, list[str]]:
        """Engine.audit_blocks on the engine thread, between steps."""
        return await self.call(lambda engine: engine.audit_blocks())

    def subscribe_kv_events(self) -> asyncio.Queue[KVCacheEvent]:
        sub: asyncio.Queue[KVCacheEvent] = asyncio.Queue()
        self._kv_subscribers.add(sub)
        return sub

    def unsubscribe_kv_events(self, sub: asyncio.Queue[KVCacheEvent]) -> None:
        self._kv_subscribers.discard(sub)

    async def cached_block_hashes(self) -> list[int]:
        """Every hash in the prefix cache now (the snapshot a new KV-event subscriber needs)."""
        return await self.call(lambda e: e.block_manager.cached_hashes())

    def shutdown(self) -> None:
        self._commands.put(None)
        self._thread.join(timeout=30)


def _set_result(future: asyncio.Future[T], result: T) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[T], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
