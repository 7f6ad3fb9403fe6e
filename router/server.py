"""The router's FastAPI app: OpenAI endpoints, health, metrics, errors in OpenAI's format.

`build_app(config, tokenizer)` wires everything; the lifespan connects to the workers.
Every bad input is a 400 with `{"error": {...}}` (validation happens before any worker is
needed), no healthy decode worker is a 503 with Retry-After, and a client that goes away
cancels its worker streams (and sends Abort).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.admin import add_admin_routes
from router.admission import Admission
from router.config import Role, RouterConfig
from router.errors import InvalidRequest, RouterError, ServiceUnavailable, error_body
from router.guard import Guard
from router.metrics import RouterMetrics, scrape_targets
from router.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from router.registry import WorkerRegistry
from router.responses import ChoiceOutput, StreamFormatter, full_response
from router.serving import TIMING_KEY, Event, Frontend, Plan, Timing
from router.sse import RAW_SEND_KEY, EventStream, aclose
from runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)
T = TypeVar("T")

ROUTE_HEADER = "x-tandem-route"
KNOWN_PATHS = frozenset(
    {
        "/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
        "/v1/metrics/targets",
    }
)  # fmt: skip
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key (--api-key)"},
    413: {"model": ErrorResponse, "description": "Request body over the size limit"},
    503: {
        "model": ErrorResponse,
        "description": "No healthy decode worker, or every one saturated; retry after Retry-After",
    },
}


class ClientDisconnected(Exception):
    pass


def build_app(config: RouterConfig, tokenizer: Tokenizer) -> FastAPI:
    registry = WorkerRegistry(
        (*config.decode_workers, *config.prefill_workers),
        rpc_timeout_s=config.rpc_timeout_s,
        load_interval_s=config.load_interval_s,
        health_interval_s=config.health_interval_s,
        tls=config.grpc_tls,
    )
    admission = Admission(config.admission)
    metrics = RouterMetrics(registry, config, admission)
    frontend = Frontend(config, tokenizer, registry, metrics, admission)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry.start()
        try:
            yield
        finally:
            await frontend.close()
            await registry.stop()

    app = FastAPI(
        title="Tandem router",
        summary="OpenAI-compatible front end of Tandem's prefill/decode pools",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.frontend = frontend
    # the guard runs inside the stamp, so its 401s and 413s are counted too
    app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.limits.max_body_bytes)
    app.add_middleware(_Stamp, metrics=metrics)
    _add_error_handlers(app)
    app.state.scale = add_admin_routes(app, registry, config.admin_key)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        plan = frontend.plan_completion(body, _timing(request))
        return await _respond(frontend, plan, request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        plan = frontend.plan_chat(body, _timing(request))
        return await _respond(frontend, plan, request)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        card = ModelCard(
            id=config.served_model_name,
            created=int(time.time()),
            max_model_len=config.max_model_len or registry.max_model_len(),
        )
        return ModelList(data=[card])

    @app.get("/health", responses={503: _ERRORS[503]})
    async def health() -> Response:
        if not registry.any_healthy(Role.DECODE):
            raise ServiceUnavailable("no healthy decode worker")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/metrics/targets")
    async def metrics_targets(request: Request) -> list[dict[str, object]]:
        """Prometheus http_sd: this router and every worker's /metrics (docs/metrics.md)."""
        host, port = request.scope["server"]  # the socket the scraper reached us on
        return scrape_targets(registry, f"{host}:{port}")

    return app


# ---------------------------------------------------------------- request handling


async def _respond(frontend: Frontend, plan: Plan, request: Request) -> Response:
    headers = {ROUTE_HEADER: plan.route_header(), "x-request-id": plan.request_id}
    events = frontend.events(plan)
    if not plan.stream:
        outputs = {c.index: ChoiceOutput() for c in plan.choices}
        try:
            await _until_disconnect(request, _collect(events, outputs, plan))
            since_s, since_cpu_s = time.perf_counter(), time.thread_time()
            body = full_response(plan, outputs, frontend.token_strings).model_dump_json()
            plan.timing.add_segment(since_s, since_cpu_s)
        finally:
            frontend.finish_timing(plan)
        return Response(body, media_type="application/json", headers=headers)
    # The first message is awaited before the headers go out, so a worker that fails at once
    # (unavailable, bad argument) is a proper HTTP status rather than an in-band error.
    try:
        first = await _until_disconnect(request, anext(events))
    except BaseException:
        frontend.finish_timing(plan)
        raise
    formatter = StreamFormatter(plan, frontend.token_strings)
    return EventStream(
        frontend, plan, formatter, first, events,
        on_close=lambda: frontend.finish_timing(plan),
        headers={**headers, "cache-control": "no-cache"},
    )  # fmt: skip


async def _collect(
    events: AsyncIterator[Event], outputs: dict[int, ChoiceOutput], plan: Plan
) -> None:
    try:
        async for event in events:
            outputs[event.choice.index].add(event.delta)
            plan.timing.add_segment(event.received_s, event.received_cpu_s)
    finally:
        await aclose(events)


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work` in this task; if the client disconnects first, cancel it and raise
    ClientDisconnected. `work` runs inline, not as a task of its own: a task would start only
    on the event loop's next turn, behind every other request's ready work, and the Generate
    call it issues (the end of dispatch) with it."""
    task = asyncio.current_task()
    assert task is not None
    watching = True  # cleared before returning: a late watcher callback then cancels nothing

    def on_disconnect(watcher: asyncio.Future[None]) -> None:
        if watching and not watcher.cancelled():
            task.cancel()

    watcher: asyncio.Future[None] = asyncio.ensure_future(_disconnected(request.receive))
    watcher.add_done_callback(on_disconnect)
    try:
        return await work
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():  # our own cancel: the client left
            task.uncancel()
            raise ClientDisconnected() from None
        raise
    finally:
        watching = False
        watcher.cancel()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _timing(request: Request) -> Timing:
    timing: Timing = request.scope[TIMING_KEY]  # set by the Guard once the body is whole
    return timing


class _Stamp:
    """Pure ASGI middleware: counts responses by endpoint and status, and leaves its own `send`
    in the scope for router/sse.py's body chunks (only `http.response.start` needs the wrappers
    inside). The arrival (the request's Timing) is stamped inside it, by the Guard."""

    def __init__(self, app: ASGIApp, metrics: RouterMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[RAW_SEND_KEY] = send
        path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted_send)


# ---------------------------------------------------------------- errors


def _add_error_handlers(app: FastAPI) -> None:
    def handle_router_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RouterError)
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers())

    def handle_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return handle_router_error(request, validation_error(exc))

    def handle_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(exc.detail), error_type), status_code=exc.status_code,
            headers=exc.headers,
        )  # fmt: skip

    def handle_disconnect(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # nobody reads it

    def handle_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        body = error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error")
        return JSONResponse(body, status_code=500)

    app.add_exception_handler(RouterError, handle_router_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_error)
    app.add_exception_handler(ClientDisconnected, handle_disconnect)
    app.add_exception_handler(Exception, handle_unexpected)


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    """pydantic's errors as one OpenAI error; param is the first offending field."""
    parts: list[str] = []
    params: list[str] = []
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        if error.get("type") == "json_invalid":
            return InvalidRequest(f"the request body is not valid JSON: {error.get('msg')}")
        field = ".".join(loc)
        params.append(field)
        parts.append(f"{field}: {error.get('msg')}" if field else str(error.get("msg")))
    param = params[0] if params else None
    return InvalidRequest("; ".join(parts) or "invalid request", param=param)
