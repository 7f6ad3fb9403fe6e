"""Property-based fuzzing of the HTTP API (issue 9, acceptance 2): >= 2,000 generated requests
against a real router process and a real decode worker (tiny model), 0 answers >= 500.

hypothesis builds completions and chat bodies from every field of the API, each drawn from
plausible values, wrong types, huge and negative numbers, NaN and infinities, unicode (lone
surrogates included), nested junk and unknown fields; some bodies are not JSON at all
(truncated, binary, a JSON scalar, the wrong content type). Every answer must be < 500 and, when
it is an error, in OpenAI's error format; a 200 stream must not carry a server error event.
The router caps output at 4 tokens (`--max-output-tokens`), so valid requests stay cheap.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from deploy.local_cluster import ClusterConfig, LocalCluster
from tests.router.waits import wait_healthy

pytestmark = pytest.mark.slow  # worker + router start, then ~2,000 requests: ~60 s on 2 cores
NUM_REQUESTS = 2000
MODEL = "tiny"
VOCAB = 49152
LONE_SURROGATE = b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'
STATUSES: Counter[int] = Counter()  # every status the router answered, for the summary test


@pytest.fixture(scope="module")
def router_url(tiny_chat_model_dir: Path) -> Iterator[str]:
    config = ClusterConfig(
        model_dir=tiny_chat_model_dir,
        port=0,
        num_prefill=0,
        num_decode=1,
        mode="collocated",
        worker_args=("--num-blocks", "512", "--max-model-len", "128", "--max-num-seqs", "64"),
        router_args=(
            "--served-model-name",
            MODEL,
            "--max-output-tokens",
            "4",
            "--max-body-bytes",
            str(256 << 10),
        ),
        start_timeout_s=180,
    )
    cluster = LocalCluster(config).start()
    try:
        wait_healthy(cluster.url, timeout_s=60)
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def http(router_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=router_url, timeout=60) as client:
        yield client


# ---------------------------------------------------------------- strategies

texts = st.text(st.characters(codec=None), max_size=24)  # any code point, surrogates included
numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-3, 3),
)
leaves = st.one_of(st.none(), st.booleans(), numbers, texts)
junk = st.recursive(
    leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=4,
)  # fmt: skip


class Field:
    """One API field: its plausible values (some invalid: out of range, wrong model...), and
    `fuzzy`: those or, a third of the time, anything at all."""

    def __init__(self, *plausible: st.SearchStrategy[Any]) -> None:
        self.plausible = st.one_of(*plausible)
        self.fuzzy = st.one_of(self.plausible, self.plausible, junk)


def field(*plausible: st.SearchStrategy[Any]) -> Field:
    return Field(*plausible)


token_ids = st.lists(st.integers(-5, VOCAB + 5) | st.integers(0, 2000), min_size=0, max_size=12)
short_texts = st.text(max_size=30)
content_parts = st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": texts}),
    max_size=3,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "bogus"]) | junk},
        optional={"content": st.one_of(texts, content_parts, st.none(), junk), "name": texts},
    ),
    max_size=4,
)
SAMPLING = {
    "model": field(*[st.just(MODEL)] * 8, st.sampled_from(["", "gpt-4", "TINY"])),
    "n": field(st.integers(1, 3), st.integers(-2, 300)),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans() | junk})),
    "stop": field(texts, st.lists(texts, max_size=3)),
    "seed": field(st.integers(-(2**64), 2**64)),
    "temperature": field(st.floats(0, 2), st.just(0)),
    "top_p": field(st.floats(0, 1.5)),
    "top_k": field(st.integers(-3, 100)),
    "min_p": field(st.floats(-0.5, 1.5)),
    "presence_penalty": field(st.floats(-3, 3)),
    "frequency_penalty": field(st.floats(-3, 3)),
    "repetition_penalty": field(st.floats(-1, 3)),
    "logit_bias": field(st.dictionaries(st.integers(-5, VOCAB + 5).map(str) | texts, numbers)),
    "user": field(texts),
    "ignore_eos": field(st.booleans()),
    "min_tokens": field(st.integers(-2, 10)),
    "stop_token_ids": field(token_ids),
    "include_stop_str_in_output": field(st.booleans()),
    "skip_special_tokens": field(st.booleans()),
    "unknown_field": field(junk),
}
COMPLETION = {
    **SAMPLING,
    "prompt": field(
        short_texts, texts, token_ids, st.lists(token_ids, max_size=3), st.lists(texts, max_size=3)
    ),
    "max_tokens": field(st.integers(1, 4), st.integers(-(2**40), 2**40), st.none()),
    "logprobs": field(st.integers(-2, 25)),
    "echo": field(st.booleans()),
    "suffix": field(texts),
    "best_of": field(st.integers(-1, 4)),
}
CHAT = {
    **SAMPLING,
    "messages": field(messages),
    "max_completion_tokens": field(st.integers(1, 4), st.integers(-(2**40), 2**40)),
    "max_tokens": field(st.integers(1, 4), st.none()),
    "logprobs": field(st.booleans()),
    "top_logprobs": field(st.integers(-2, 25)),
    "tools": field(st.lists(st.dictionaries(texts, junk, max_size=2), max_size=2)),
    "tool_choice": field(st.sampled_from(["none", "auto"])),
    "response_format": field(st.fixed_dictionaries({"type": st.sampled_from(["text", "json"])})),
    "add_generation_prompt": field(st.booleans()),
    "chat_template_kwargs": field(st.dictionaries(texts, junk, max_size=3)),
}


def body(fields: dict[str, Field], required: tuple[str, ...]) -> st.SearchStrategy[Any]:
    """Bodies of two kinds: plausible values in a few fields (some valid), or any values in
    any fields (nearly all 400s). The valid bodies are drawn separately, below."""
    optional = sorted(k for k in fields if k not in required)
    plausible = st.tuples(
        st.fixed_dictionaries({k: fields[k].plausible for k in required}),
        st.lists(st.sampled_from(optional), max_size=3, unique=True).flatmap(
            lambda names: st.fixed_dictionaries({k: fields[k].plausible for k in names})
        ),
    ).map(lambda parts: {**parts[0], **parts[1]})
    fuzzy = st.fixed_dictionaries(
        {k: fields[k].fuzzy for k in required},
        optional={k: v.fuzzy for k, v in fields.items() if k not in required},
    )
    return plausible | fuzzy


VALID_SAMPLING = {
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.05, 1),
    "top_k": st.integers(0, 50),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stream": st.booleans(),
    "n": st.integers(1, 2),
    "stop": st.lists(st.text(min_size=1, max_size=4), max_size=2),
    "ignore_eos": st.booleans(),
    "user": texts,
}
valid_completion = st.fixed_dictionaries(
    {"model": st.just(MODEL),
     "prompt": st.text(min_size=1, max_size=30) | st.lists(st.integers(0, 2000), min_size=1,
                                                          max_size=12)},
    optional={"max_tokens": st.integers(1, 4), "logprobs": st.integers(0, 3), **VALID_SAMPLING},
)  # fmt: skip
valid_chat = st.fixed_dictionaries(
    {"model": st.just(MODEL),
     "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                                 "content": texts}), min_size=1, max_size=2)},
    optional={"max_completion_tokens": st.integers(1, 4), "logprobs": st.booleans(),
              **VALID_SAMPLING},
)  # fmt: skip
completions = st.tuples(
    st.just("/v1/completions"), valid_completion | body(COMPLETION, ("model", "prompt"))
)
chats = st.tuples(st.just("/v1/chat/completions"), valid_chat | body(CHAT, ("model", "messages")))
# (path, raw body bytes, content type)
as_json = st.one_of(completions, chats).map(
    lambda pb: (pb[0], json.dumps(pb[1]).encode(), "application/json")
)
not_json = st.tuples(
    st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
    st.one_of(
        st.binary(max_size=64),
        st.one_of(completions, chats).flatmap(  # a valid body cut short
            lambda pb: st.integers(0, max(len(json.dumps(pb[1])) - 1, 0)).map(
                lambda i: json.dumps(pb[1]).encode()[:i]
            )
        ),
        junk.map(lambda v: json.dumps(v).encode()),  # JSON, but not an object
    ),
    st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"]),
)
requests_ = st.one_of(as_json, as_json, as_json, not_json)


# ---------------------------------------------------------------- the property


def check(response: httpx.Response) -> None:
    STATUSES[response.status_code] += 1
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert error["type"] != "server_error", error
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert '"server_error"' not in response.text, response.text


@settings(
    max_examples=NUM_REQUESTS,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)  # fmt: skip
@given(request=requests_)
@example(request=("/v1/chat/completions", LONE_SURROGATE, "application/json"))  # found by it once
def test_no_request_gets_a_5xx(http: httpx.Client, request: tuple[str, bytes, str]) -> None:
    path, content, content_type = request
    check(http.post(path, content=content, headers={"content-type": content_type}))


def test_the_fuzzer_sent_enough_requests_and_some_were_served() -> None:
    total = sum(STATUSES.values())
    print(f"\nfuzz: {total} requests, statuses {dict(sorted(STATUSES.items()))}")
    assert total >= NUM_REQUESTS
    assert STATUSES[200] >= 50, "too few valid requests: the generator misses the happy path"
    assert all(status < 500 for status in STATUSES)
