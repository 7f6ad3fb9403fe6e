"""The SSE relay: one streamed request's worker messages -> `data:` chunks on the client's socket.

`EventStream` is the response: it sends the headers, then for each Event formats its chunk
(StreamFormatter: pre-rendered pieces, no pydantic) and awaits the ASGI send of those bytes,
then the usage chunk and [DONE]. Each chunk's segment of the router overhead (router/serving.py)
runs from its message's arrival to that send's return (the bytes are in the socket's buffer):
formatting, the send and the socket write all count. A client that reads slower than the stream
makes uvicorn's send wait for the socket to drain: that wait counts too.

Hot path, once per worker message: one async-generator hop (Frontend.events -> here) and one
send. Body chunks skip the app's send wrappers (Starlette's exception handlers and the status
counter in router/server.py look at `http.response.start` only, which still goes through them):
they go to the send the outermost app middleware got (`RAW_SEND_KEY` in the scope, set by
router/server.py's _Stamp).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from router.errors import RouterError
from router.responses import StreamFormatter, error_event
from router.serving import Event, Frontend, Plan

log = logging.getLogger(__name__)

RAW_SEND_KEY = "tandem.send"  # ASGI scope key: the send below the app's own wrappers


async def aclose(events: AsyncIterator[Event]) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


class EventStream(Response):
    """A streamed response that always watches for the client going away and always closes
    its events, so worker streams get cancelled. `on_close` runs last, whatever happened:
    events that never started (the client left first) run no `finally` of their own, and the
    request's admission slot must still be released. A Response only so that FastAPI passes
    it through: __init__ and __call__ are its own, and it runs no background task."""

    def __init__(
        self,
        frontend: Frontend,
        plan: Plan,
        formatter: StreamFormatter,
        first: Event,
        events: AsyncIterator[Event],
        on_close: Callable[[], None],
        headers: Mapping[str, str],
    ) -> None:
        self.frontend = frontend
        self.plan = plan
        self.formatter = formatter
        self.first = first
        self.events = events
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8")] + [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body_send: Send = scope.get(RAW_SEND_KEY, send)
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):
                        await self._stream(send, body_send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                while (await receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()
        finally:
            with contextlib.suppress(Exception), anyio.CancelScope(shield=True):
                await aclose(self.events)
            self.on_close()

    async def _stream(self, send: Send, body_send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        plan, formatter, timing = self.plan, self.formatter, self.plan.timing
        try:
            first = self.first
            data = formatter.start() + formatter.event(first)
            await body_send({"type": "http.response.body", "body": data, "more_body": True})
            timing.add_segment(first.received_s, first.received_cpu_s)
            async for event in self.events:
                data = formatter.event(event)
                if data:
                    await body_send({"type": "http.response.body", "body": data, "more_body": True})
                timing.add_segment(event.received_s, event.received_cpu_s)
            since_s, since_cpu_s = time.perf_counter(), time.thread_time()
            await body_send(
                {"type": "http.response.body", "body": formatter.end(), "more_body": True}
            )
            timing.add_segment(since_s, since_cpu_s)
        except RouterError as exc:
            log.warning("%s failed mid-stream: %s", plan.request_id, exc.message)
            await body_send(
                {"type": "http.response.body", "body": error_event(exc), "more_body": True}
            )
        finally:
            self.frontend.finish_timing(plan)
            await aclose(self.events)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
