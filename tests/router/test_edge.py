"""The router's HTTP edge: API key and admin key, body size limit, admission decisions.

The app's only decode worker points at a closed loopback port (as in test_validation.py): what
is checked here is decided before any worker is needed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from router import convert
from router.admission import Admission, Slot
from router.config import AdmissionConfig, Limits, Role, RouterConfig, WorkerAddress
from router.errors import Overloaded
from router.guard import Guard
from router.policy import WorkerSnapshot
from router.protocol import CompletionRequest
from router.server import build_app
from router.serving import TIMING_KEY, Timing
from runtime.tokenizer import Tokenizer
from tests.router.test_validation import assert_openai_error, closed_port

MODEL = "smol"
API_KEY = "sk-test-ünï"  # non-ASCII on purpose: compared as bytes
ADMIN_KEY = "admin-secret"
MAX_BODY = 4096


@pytest.fixture(scope="module")
def client(smollm2_dir: Path) -> Iterator[TestClient]:
    config = RouterConfig(
        model_dir=smollm2_dir,
        served_model_name=MODEL,
        decode_workers=(WorkerAddress("d0", f"127.0.0.1:{closed_port()}", Role.DECODE),),
        max_model_len=64,
        rpc_timeout_s=0.5,
        api_key=API_KEY,
        admin_key=ADMIN_KEY,
        limits=Limits(max_body_bytes=MAX_BODY, max_output_tokens=8, max_choices=4),
    )
    with TestClient(build_app(config, Tokenizer.from_dir(smollm2_dir))) as c:
        yield c


def auth(key: str) -> dict[bytes, bytes]:
    return {b"authorization": f"Bearer {key}".encode()}  # bytes: httpx would refuse non-ASCII


BODY = {"model": MODEL, "prompt": "hi", "max_tokens": 4}


@pytest.mark.parametrize(
    "headers",
    [{}, auth("wrong"), auth(ADMIN_KEY), {"Authorization": API_KEY}, {"Authorization": "Bearer"},
     {"Authorization": "Basic " + API_KEY}, {"Authorization": b"Bearer \xff\xfe"}],
)  # fmt: skip
def test_v1_needs_the_api_key(client: TestClient, headers: dict[str | bytes, str | bytes]) -> None:
    raw = {
        k if isinstance(k, bytes) else k.encode(): v if isinstance(v, bytes) else v.encode()
        for k, v in headers.items()
    }
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions"), ("GET", "/v1/nowhere")]:  # fmt: skip
        response = client.request(method, path, json=BODY, headers=raw)
        error = assert_openai_error(response, 401)
        assert error["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"


def test_the_api_key_opens_v1_and_not_admin(client: TestClient) -> None:
    key = auth(API_KEY)
    assert client.get("/v1/models", headers=key).status_code == 200
    # past the key: validation, then no healthy worker
    assert_openai_error(client.post("/v1/completions", json={**BODY, "n": 0}, headers=key), 400)
    assert_openai_error(client.post("/v1/completions", json=BODY, headers=key), 503)
    assert_openai_error(client.get("/admin/workers", headers=key), 401)
    assert client.get("/admin/workers", headers=auth(ADMIN_KEY)).status_code == 200


def test_probes_and_metrics_stay_open(client: TestClient) -> None:
    assert client.get("/metrics").status_code == 200
    assert client.get("/health").status_code == 503  # open, but no healthy worker


def test_body_over_the_limit_is_413(client: TestClient) -> None:
    key = auth(API_KEY)
    big = {**BODY, "prompt": "x" * MAX_BODY}
    error = assert_openai_error(client.post("/v1/completions", json=big, headers=key), 413)
    assert error["type"] == "invalid_request_error"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it is read
        yield b'{"model": "smol", "prompt": "'
        for _ in range(MAX_BODY // 512 + 1):
            yield b"x" * 512
        yield b'"}'

    streamed = client.post(
        "/v1/completions", content=chunks(), headers={**key, b"content-type": b"application/json"}
    )
    assert_openai_error(streamed, 413)
    # without the key the body is never read: 401 first
    assert_openai_error(client.post("/v1/completions", json=big), 401)


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"max_tokens": 9}, "max_tokens"), ({"prompt": ["a", "b"], "n": 3}, "n"),
     ({"prompt": "hi", "n": 5}, "n")],
)  # fmt: skip
def test_limits_are_400(client: TestClient, fields: dict[str, object], param: str) -> None:
    key = auth(API_KEY)
    response = client.post("/v1/completions", json={**BODY, **fields}, headers=key)
    assert assert_openai_error(response, 400)["param"] == param


def test_the_default_max_tokens_is_lowered_to_the_limit_not_refused() -> None:
    limits = Limits(max_output_tokens=8)
    implicit = CompletionRequest.model_validate({"model": MODEL, "prompt": "hi"})
    assert implicit.max_tokens == 16 and convert.completion_max_tokens(implicit, limits) == 8
    explicit = CompletionRequest.model_validate({"model": MODEL, "prompt": "hi", "max_tokens": 16})
    assert convert.completion_max_tokens(explicit, limits) == 16  # refused later (400)
    assert convert.completion_max_tokens(implicit, Limits()) == 16


def test_chat_template_kwargs_cannot_replace_the_template(client: TestClient) -> None:
    key = auth(API_KEY)
    cases: list[dict[str, object]] = [
        {"chat_template": "{{ 7 * 7 }}"}, {"add_generation_prompt": False}, {"messages": []},
        {"self": 1},
    ]  # fmt: skip
    for kwargs in cases:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                "chat_template_kwargs": kwargs}  # fmt: skip
        response = client.post("/v1/chat/completions", json=body, headers=key)
        assert assert_openai_error(response, 400)["param"] == "chat_template_kwargs"


# ---------------------------------------------------------------- admission decisions


def decode(worker_id: str, healthy: bool = True, max_num_seqs: int = 2) -> WorkerSnapshot:
    return WorkerSnapshot(
        worker_id=worker_id, address="127.0.0.1:1", role=Role.DECODE, healthy=healthy,
        block_size=16, max_model_len=256, num_blocks_total=64, num_blocks_free=64,
        max_num_seqs=max_num_seqs,
    )  # fmt: skip


def test_saturated_workers_are_hidden_and_all_saturated_is_overloaded() -> None:
    admission = Admission(AdmissionConfig(retry_after_s=3))  # limit: 2 x max_num_seqs = 4
    workers = [decode("a"), decode("b"), decode("sick", healthy=False)]
    first, second = Slot(), Slot()
    admission.charge(first, "a", 4)
    assert [w.worker_id for w in admission.open_workers(workers)] == ["b", "sick"]
    admission.charge(second, "b", 3)
    admission.open_workers(workers)  # b has room for one more
    admission.charge(second, "b", 1)
    with pytest.raises(Overloaded) as info:
        admission.open_workers(workers)
    assert info.value.status_code == 503 and info.value.headers() == {"Retry-After": "3"}
    assert admission.release(first) and not admission.release(first)  # idempotent
    assert [w.worker_id for w in admission.open_workers(workers)] == ["a", "sick"]
    admission.release(second)
    assert dict(admission.held()) == {}


def test_no_healthy_worker_is_not_overload_and_the_limit_can_be_set() -> None:
    admission = Admission(AdmissionConfig(max_inflight_per_worker=1))
    assert admission.open_workers([decode("sick", healthy=False)])  # routing says 503 itself
    slot = Slot()
    admission.charge(slot, "a", 1)
    with pytest.raises(Overloaded):
        admission.open_workers([decode("a", max_num_seqs=100)])


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "smol", "prompt": "\\ud800"}',
        b'{"model": "\\udfff", "prompt": "hi"}',
        b'{"model": "smol", "prompt": "hi", "stop": ["a\\ud83d"]}',
        b'{"model": "smol", "messages": [{"role": "user", "content": "x\\udc00y"}]}',
        b'{"model": "smol", "prompt": "hi", "logit_bias": {"\\ud800": 1}}',
    ],
)
def test_a_lone_surrogate_anywhere_is_400(client: TestClient, body: bytes) -> None:
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    headers = {**auth(API_KEY), b"content-type": b"application/json"}
    error = assert_openai_error(client.post(path, content=body, headers=headers), 400)
    assert "surrogate" in error["message"]


def test_surrogate_pairs_and_escaped_backslashes_pass(client: TestClient) -> None:
    headers = {**auth(API_KEY), b"content-type": b"application/json"}
    for prompt in (b'"\\ud83d\\ude00"', b'"\\\\ud800"'):  # an emoji; the text \ud800
        body = b'{"model": "smol", "max_tokens": 1, "prompt": ' + prompt + b"}"
        assert_openai_error(client.post("/v1/completions", content=body, headers=headers), 503)


def test_arrival_is_stamped_once_the_body_is_whole() -> None:
    """A client that sends its body late (httpx writes head and body apart) is waited for
    before the router overhead starts: the Timing the app sees is stamped after the last
    chunk, and the app gets the whole body in one message."""
    seen: dict[str, object] = {}

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        assert callable(receive)
        seen["timing"] = scope[TIMING_KEY]
        seen["body"] = await receive()

    chunks = [
        {"type": "http.request", "body": b'{"a":', "more_body": True},
        {"type": "http.request", "body": b" 1}", "more_body": False},
    ]

    async def receive() -> dict[str, object]:
        if len(chunks) == 1:
            await asyncio.sleep(0.05)  # the body's second write comes late
        return chunks.pop(0)

    async def send(message: object) -> None:
        raise AssertionError(f"nothing is refused here: {message}")

    scope = {"type": "http", "path": "/v1/completions", "headers": [(b"content-length", b"9")]}
    start_s = time.perf_counter()
    asyncio.run(Guard(app, api_key=None, max_body_bytes=MAX_BODY)(scope, receive, send))
    timing = seen["timing"]
    assert isinstance(timing, Timing)
    assert timing.arrival_s - start_s >= 0.05
    assert seen["body"] == {"type": "http.request", "body": b'{"a": 1}', "more_body": False}
