"""The HTTP edge's guards, run before any route: the API key of `/v1/*` and the body size limit.

A pure ASGI middleware, so a request is refused before its body is read or parsed: a client
without the key gets 401 whatever it sends, a body over `max_body_bytes` gets 413 (by its
Content-Length at once, or as soon as a chunked body passes the limit, so the router never
holds more than the limit of one request's body: it is read here, whole, before the app runs).
Both answers are in OpenAI's error format.
`/admin/*` checks its own key (router/admin.py); `/health` and `/metrics` stay open.

The guard also stamps the request's arrival (its Timing, in the scope under TIMING_KEY) once
the body is whole: the router overhead starts there. Before that moment the router can do
nothing for the request but wait for the client's bytes (httpx, for one, writes the head and
the body in two writes; uvicorn starts the app on the head), and the loop meanwhile runs other
requests' work, which must not count as this request's (docs/metrics.md).
"""

from __future__ import annotations

import hmac
import json
import re

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.errors import InvalidRequest, PayloadTooLarge, RouterError, Unauthorized
from router.serving import TIMING_KEY, Timing

API_PREFIX = "/v1/"


def bearer_matches(authorization: bytes, key: str) -> bool:
    """The raw `Authorization` header is `Bearer <key>` (the key UTF-8 encoded), compared in
    constant time."""
    scheme, _, token = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode("utf-8"))


class Guard:
    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope["headers"]}
        key = self.api_key if scope["path"].startswith(API_PREFIX) else None
        if key is not None and not bearer_matches(headers.get(b"authorization", b""), key):
            refusal = Unauthorized("this API needs `Authorization: Bearer <api key>`")
            await _refuse(refusal, scope, receive, send)
            return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await _refuse(self._too_large(), scope, receive, send)
            return
        body = await self._read_body(receive)
        if body is None:
            await _refuse(self._too_large(), scope, receive, send)
            return
        if body["type"] == "http.request" and _has_lone_surrogate(body["body"]):
            error = InvalidRequest(
                "the body has a lone UTF-16 surrogate escape (\\ud800-\\udfff without its "
                "pair): not Unicode text"
            )
            await _refuse(error, scope, receive, send)
            return
        scope[TIMING_KEY] = Timing.now()  # arrival: from here to the Generate call, no await
        await self.app(scope, _replay(body, receive), send)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"the request body is larger than {self.max_body_bytes} bytes")

    async def _read_body(self, receive: Receive) -> Message | None:
        """The whole body as one message, or None once it passes the limit (a chunked body
        has no Content-Length to check first)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                return message
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(body: bytes) -> bool:
    """JSON may spell a lone surrogate (`"\\ud800"`); json.loads keeps it in the str, and
    it breaks every consumer downstream (tokenizer, protobuf, the UTF-8 of our own error
    messages). Checked only when the escape appears at all (emoji pairs merge into one code
    point, so they pass); a body that is not JSON is left to the app's own 400."""
    if not _SURROGATE_ESCAPE.search(body):
        return False
    try:
        value = json.loads(body)
    except ValueError:
        return False
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


_SURROGATE = re.compile("[\ud800-\udfff]")


def _replay(first: Message, receive: Receive) -> Receive:
    """`receive` that hands out `first`, then defers to the real one (disconnects)."""
    pending: list[Message] = [first]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay


async def _refuse(error: RouterError, scope: Scope, receive: Receive, send: Send) -> None:
    response = JSONResponse(error.body(), status_code=error.status_code, headers=error.headers())
    await response(scope, receive, send)
