"""Every bad request is a 400 with OpenAI's error body, decided before any worker is needed.

The app's only decode worker points at a closed loopback port, so a valid request gets 503
(with Retry-After) and nothing can reach a worker by accident.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from router.config import Role, RouterConfig, WorkerAddress
from router.server import build_app
from runtime.tokenizer import Tokenizer

MODEL = "smol"
MAX_MODEL_LEN = 64


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def client(smollm2_dir: Path) -> Iterator[TestClient]:
    config = RouterConfig(
        model_dir=smollm2_dir,
        served_model_name=MODEL,
        decode_workers=(WorkerAddress("d0", f"127.0.0.1:{closed_port()}", Role.DECODE),),
        max_model_len=MAX_MODEL_LEN,
        rpc_timeout_s=0.5,
    )
    with TestClient(build_app(config, Tokenizer.from_dir(smollm2_dir))) as c:
        yield c


def assert_openai_error(response: Any, status: int, param: str | None = "__any__") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param != "__any__":
        assert error["param"] == param, error
    return dict(error)


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": MODEL, "prompt": "hi"}

BAD_COMPLETIONS = [
    ({"prompt": 5}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": [10**6]}, "prompt"),
    ({"prompt": [1.5]}, "prompt"),
    ({"prompt": "word " * 100}, "prompt"),  # longer than the context
    ({"prompt": list(range(MAX_MODEL_LEN))}, "prompt"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": MAX_MODEL_LEN}, "max_tokens"),  # prompt + output > context
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 2}, "top_p"),
    ({"top_k": -5}, "top_k"),
    ({"min_p": -0.1}, "min_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"n": 0}, "n"),
    ({"n": -1}, "n"),
    ({"n": "two"}, "n"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"stop": 5}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"seed": "x"}, "seed"),
    ({"seed": 2**70}, "seed"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"1": 200}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"stream": "maybe"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ({"echo": True}, "echo"),
    ({"best_of": 3}, "best_of"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_COMPLETIONS)
def test_bad_completion_is_400(client: TestClient, fields: dict[str, Any], param: str) -> None:
    response = client.post("/v1/completions", json={**COMPLETION, **fields})
    error = assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].split(".")[0] == param


BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages"),
    ({"messages": [{"role": "user", "content": "word " * 100}]}, "messages"),
    ({"max_completion_tokens": -3}, "max_completion_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": MAX_MODEL_LEN}, "max_completion_tokens"),
    ({"logprobs": "yes please"}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"temperature": -2}, "temperature"),
    ({"n": 1000}, "n"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "param"), BAD_CHATS)
def test_bad_chat_is_400(client: TestClient, fields: dict[str, Any], param: str) -> None:
    response = client.post("/v1/chat/completions", json={**CHAT, **fields})
    error = assert_openai_error(response, 400)
    assert error["param"] is not None and error["param"].split(".")[0] == param


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_unknown_model_is_400_model_not_found(client: TestClient, path: str) -> None:
    body = {**(COMPLETION if "chat" not in path else CHAT), "model": "gpt-17"}
    error = assert_openai_error(client.post(path, json=body), 400, param="model")
    assert error["code"] == "model_not_found"
    assert "gpt-17" in error["message"]


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"[1, 2]", b'"a string"', b'{"model": "smol", "prompt": "hi",}'],
)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_malformed_body_is_400(client: TestClient, path: str, content: bytes) -> None:
    response = client.post(path, content=content, headers={"content-type": "application/json"})
    assert_openai_error(response, 400)


def test_missing_fields_are_400(client: TestClient) -> None:
    assert_openai_error(client.post("/v1/completions", json={"model": MODEL}), 400, "prompt")
    assert_openai_error(client.post("/v1/completions", json={"prompt": "x"}), 400, "model")
    assert_openai_error(client.post("/v1/chat/completions", json={"model": MODEL}), 400)


def test_valid_request_without_a_healthy_worker_is_503(client: TestClient) -> None:
    for path, body in [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)]:
        for stream in (False, True):
            response = client.post(path, json={**body, "stream": stream})
            error = assert_openai_error(response, 503)
            assert error["type"] == "service_unavailable"
            assert int(response.headers["retry-after"]) >= 1


def test_health_is_503_until_a_decode_worker_is_healthy(client: TestClient) -> None:
    response = client.get("/health")
    assert_openai_error(response, 503)
    assert "retry-after" in response.headers


def test_models_lists_the_served_name(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]
    assert body["data"][0]["max_model_len"] == MAX_MODEL_LEN


def test_unknown_path_and_method_use_the_error_format(client: TestClient) -> None:
    assert_openai_error(client.get("/v1/nothing"), 404)
    assert_openai_error(client.get("/v1/completions"), 405)


def test_openapi_schema_documents_the_api(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"):
        assert path in schema["paths"], path
    post = schema["paths"]["/v1/chat/completions"]["post"]
    assert "requestBody" in post and "400" in post["responses"]
    assert "ChatCompletionRequest" in schema["components"]["schemas"]


def test_metrics_are_prometheus_text_with_the_tandem_prefix(client: TestClient) -> None:
    client.post("/v1/completions", json={**COMPLETION, "max_tokens": -1})
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'tandem_router_requests_total{endpoint="/v1/completions",status="400"}' in text
    assert "tandem_router_overhead_seconds_bucket" in text
    assert 'tandem_router_worker_healthy{role="decode",worker_id="d0"} 0.0' in text
    names = {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")
    }
    assert names and all(n.startswith("tandem_") for n in names), names
