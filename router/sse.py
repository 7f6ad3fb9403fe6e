"""The SSE relay: one streamed request's worker messages -> `data:` chunks on the client's socket.

`relay` formats each Event and yields its bytes to `EventStream`, which hands them to the ASGI
send; the yield returns only once that send has returned (the bytes are in the socket's buffer),
so each chunk's segment of the router overhead (router/serving.py) runs from its message's arrival
to there: formatting, the ASGI send chain and the socket write all count. A client that reads
slower than the stream makes uvicorn's send wait for the socket to drain: that wait counts too.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from router.errors import RouterError
from router.responses import StreamFormatter, error_event
from router.serving import Event, Frontend, Plan

log = logging.getLogger(__name__)


async def relay(
    frontend: Frontend,
    plan: Plan,
    formatter: StreamFormatter,
    first: Event,
    events: AsyncIterator[Event],
) -> AsyncIterator[bytes]:
    """The SSE body: `first` (already received) and the rest of `events`, then usage/[DONE]."""
    timing = plan.timing
    try:
        yield formatter.start() + formatter.event(first)
        timing.add_segment(first.received_s, first.received_cpu_s)
        async for event in events:
            data = formatter.event(event)
            if data:
                yield data
            timing.add_segment(event.received_s, event.received_cpu_s)
        since_s, since_cpu_s = time.perf_counter(), time.thread_time()
        yield formatter.end()
        timing.add_segment(since_s, since_cpu_s)
    except RouterError as exc:
        log.warning("%s failed mid-stream: %s", plan.request_id, exc.message)
        yield error_event(exc)
    finally:
        frontend.finish_timing(plan)
        await aclose(events)


async def aclose(events: AsyncIterator[Event]) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


class EventStream(StreamingResponse):
    """A StreamingResponse that always watches for the client going away (Starlette only does
    for ASGI < 2.4) and always closes its body iterator, so worker streams get cancelled.
    `on_close` runs last, whatever happened: a body iterator that never started (the client
    left first) runs no `finally` of its own, and the request's admission slot must still be
    released."""

    def __init__(
        self, content: AsyncIterator[bytes], on_close: Callable[[], None], **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            iterator = self.body_iterator
            if hasattr(iterator, "aclose"):
                with contextlib.suppress(Exception), anyio.CancelScope(shield=True):
                    await iterator.aclose()
            self.on_close()
