"""End to end with real processes: decode (and prefill) workers and the router, over loopback.

Runs as soon as the workers exist (`decode_worker/__main__.py`; the disagg cases also need
`prefill_worker/__main__.py`). The model is a tiny random Llama with SmolLM2's tokenizer and
chat template: fast, gibberish output, but greedy output must equal the offline engine's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from deploy.local_cluster import ClusterConfig, LocalCluster
from tests.router.waits import wait_healthy

REPO = Path(__file__).resolve().parents[2]
HAVE_DECODE = (REPO / "decode_worker" / "__main__.py").exists()
HAVE_PREFILL = (REPO / "prefill_worker" / "__main__.py").exists()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not HAVE_DECODE, reason="decode_worker/__main__.py has not landed yet"),
]
WORKER_ARGS = ("--num-blocks", "512", "--max-model-len", "512", "--block-size", "16")
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
    "1, 2, 3, 4,",
]
MAX_TOKENS = 12

MODES = [
    pytest.param(("collocated", 0), id="collocated"),
    pytest.param(("auto", 1 if HAVE_PREFILL else 0), id="auto"),
    pytest.param(
        ("disagg", 1),
        id="disagg",
        marks=pytest.mark.skipif(
            not HAVE_PREFILL, reason="prefill_worker/__main__.py has not landed yet"
        ),
    ),
]


def start_cluster(
    model_dir: Path, mode: str, num_prefill: int, num_decode: int, *router_args: str
) -> LocalCluster:
    config = ClusterConfig(
        model_dir=model_dir,
        port=0,
        num_prefill=num_prefill,
        num_decode=num_decode,
        mode=mode,
        worker_args=WORKER_ARGS,
        # auto: prefill remotely whenever anything is uncached, so the remote path is exercised
        router_args=(
            "--served-model-name",
            "tiny",
            "--local-prefill-max-tokens",
            "0",
            *router_args,
        ),
        start_timeout_s=180,
    )
    return LocalCluster(config).start()


@pytest.fixture(scope="module", params=MODES)
def cluster(request: pytest.FixtureRequest, tiny_chat_model_dir: Path) -> Iterator[LocalCluster]:
    mode, num_prefill = request.param
    c = start_cluster(tiny_chat_model_dir, mode, num_prefill, 1)
    try:
        wait_healthy(c.url)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def offline(tiny_chat_model_dir: Path) -> Any:
    from engine import LLM

    return LLM(str(tiny_chat_model_dir), max_model_len=512, num_blocks=256)


def offline_texts(offline: Any, prompts: list[Any], max_tokens: int) -> list[str]:
    from engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [r.outputs[0].text for r in offline.generate(prompts, params)]


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    events = []
    lines = [line for line in response.text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert line.startswith("data: ")
        events.append(json.loads(line[len("data: ") :]))
    return events


def test_greedy_completions_equal_the_offline_engine(cluster: LocalCluster, offline: Any) -> None:
    expected = offline_texts(offline, PROMPTS, MAX_TOKENS)
    body = {"model": "tiny", "prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    response = httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    texts = [c["text"] for c in sorted(response.json()["choices"], key=lambda c: c["index"])]
    assert texts == expected
    route = response.headers["x-tandem-route"]
    assert f"mode={cluster.config.mode}" in route
    if cluster.config.mode == "disagg":
        assert "prefill=prefill-0" in route


def test_greedy_chat_and_token_prompts_equal_the_offline_engine(
    cluster: LocalCluster, offline: Any
) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = offline.tokenizer.encode_chat(messages)
    expected = offline_texts(offline, [ids], MAX_TOKENS)[0]
    chat = httpx.post(
        f"{cluster.url}/v1/chat/completions",
        json={"model": "tiny", "messages": messages, "max_completion_tokens": MAX_TOKENS,
              "temperature": 0, "ignore_eos": True},
        timeout=120,
    )  # fmt: skip
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == expected
    assert chat.json()["usage"]["prompt_tokens"] == len(ids)
    as_ids = httpx.post(
        f"{cluster.url}/v1/completions",
        json={"model": "tiny", "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0,
              "ignore_eos": True},
        timeout=120,
    )  # fmt: skip
    assert as_ids.json()["choices"][0]["text"] == expected


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streamed_chunks_concatenate_to_the_full_text(cluster: LocalCluster, endpoint: str) -> None:
    if endpoint == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}
    else:
        path, body = "/v1/completions", {"prompt": PROMPTS[1]}
    body = {**body, "model": "tiny", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    full = httpx.post(f"{cluster.url}{path}", json=body, timeout=120).json()
    streamed = httpx.post(
        f"{cluster.url}{path}",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
        timeout=120,
    )
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed)
    choices = [e["choices"][0] for e in events if e["choices"]]
    if endpoint == "chat":
        text = "".join(c["delta"].get("content") or "" for c in choices)
        assert choices[0]["delta"]["role"] == "assistant"
        assert text == full["choices"][0]["message"]["content"]
    else:
        text = "".join(c["text"] for c in choices)
        assert text == full["choices"][0]["text"]
    assert choices[-1]["finish_reason"] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"] == full["usage"]
    assert full["usage"]["completion_tokens"] == 20


def test_64_concurrent_streams_complete(cluster: LocalCluster) -> None:
    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, int]:
        body = {"model": "tiny", "prompt": f"{i} {PROMPTS[i % 4]}", "max_tokens": 8,
                "temperature": 0.8, "seed": i, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            finish, tokens, done = None, 0, False
            async for line in response.aiter_lines():
                if not line:
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                event = json.loads(line.removeprefix("data: "))
                if event["choices"] and event["choices"][0]["finish_reason"]:
                    finish = event["choices"][0]["finish_reason"]
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
            assert done
            return str(finish), tokens

    async def run() -> list[tuple[str, int]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=cluster.url, timeout=300, limits=limits) as client:
            return list(await asyncio.gather(*(one(client, i) for i in range(64))))

    assert asyncio.run(run()) == [("length", 8)] * 64


def test_openai_client_completions_and_chat(cluster: LocalCluster) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    completion = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    streamed = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5

    messages = [{"role": "user", "content": "Say hi"}]
    chat = client.chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=6, temperature=0,  # type: ignore[arg-type]
        logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert chat.usage is not None and chat.usage.completion_tokens == 6
    assert chat.choices[0].logprobs is not None and chat.choices[0].logprobs.content is not None
    assert len(chat.choices[0].logprobs.content) == 6
    assert all(len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=6, temperature=0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chat_chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chat_chunks[-1].usage is not None and chat_chunks[-1].usage.total_tokens > 6

    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", max_tokens=-1)
    assert info.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="not-this-one", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="word " * 600)  # longer than the context


def test_n_choices_with_seeds_are_indexed(cluster: LocalCluster) -> None:
    body = {"model": "tiny", "prompt": PROMPTS[:2], "n": 3, "max_tokens": 6, "seed": 7,
            "temperature": 1.0, "ignore_eos": True}  # fmt: skip
    first = httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=120).json()
    again = httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=120).json()
    assert [c["index"] for c in first["choices"]] == list(range(6))
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]
    assert first["usage"]["completion_tokens"] == 36


def test_client_disconnect_aborts_the_request_on_the_worker(cluster: LocalCluster) -> None:
    from proto import tandem_pb2 as pb
    from proto import tandem_pb2_grpc as pb_grpc

    decode = next(c for c in cluster.children if c.name.startswith("decode"))
    body = {"model": "tiny", "prompt": "Count:", "max_tokens": 400, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with (
        httpx.Client(base_url=cluster.url, timeout=60) as client,
        client.stream("POST", "/v1/completions", json=body) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # one token in, then hang up

    async def running() -> int:
        async with grpc.aio.insecure_channel(decode.address) as channel:
            load = await pb_grpc.DecodeWorkerStub(channel).Load(pb.LoadRequest(), timeout=5)
            return int(load.num_running + load.num_waiting)

    deadline = time.monotonic() + 10
    while asyncio.run(running()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert asyncio.run(running()) == 0
    metrics = httpx.get(f"{cluster.url}/metrics").text
    assert re.search(r'tandem_router_aborts_total\{cause="cut_short"\} [1-9]', metrics)
    assert re.search(r"tandem_router_worker_inflight_requests\{[^}]*decode[^}]*\} 0.0", metrics)


def test_router_overhead_is_exported(cluster: LocalCluster) -> None:
    """Streamed and not: each request observes its overhead once, in wall and CPU seconds; the
    CPU time of the same segments never exceeds their wall time, nor does dispatch the whole."""
    before = _overhead_sums(httpx.get(f"{cluster.url}/metrics").text)
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 4, "ignore_eos": True}
    assert httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=60).status_code == 200
    with httpx.stream(
        "POST", f"{cluster.url}/v1/completions", json={**body, "stream": True}, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.read().endswith(b"data: [DONE]\n\n")
    after = _overhead_sums(httpx.get(f"{cluster.url}/metrics").text)
    counts = {name: after[name][1] - before[name][1] for name in after}
    sums = {name: after[name][0] - before[name][0] for name in after}
    assert counts == {"overhead": 2, "overhead_cpu": 2, "dispatch": 2}, counts
    assert 0 < sums["overhead_cpu"] <= sums["overhead"]
    assert 0 < sums["dispatch"] < sums["overhead"]


def _overhead_sums(metrics: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of the router's overhead histograms."""
    out = {}
    for name in ("overhead", "overhead_cpu", "dispatch"):
        total = re.search(rf"tandem_router_{name}_seconds_sum (\S+)", metrics)
        count = re.search(rf"tandem_router_{name}_seconds_count (\S+)", metrics)
        assert total is not None and count is not None, name
        out[name] = (float(total.group(1)), float(count.group(1)))
    return out


@pytest.mark.parametrize(
    ("mode", "num_prefill", "num_decode", "pool"),
    [("collocated", 0, 2, "decode"), ("disagg", 2, 1, "prefill")],
)
def test_shared_prefix_goes_to_the_worker_that_caches_it(
    tiny_chat_model_dir: Path, mode: str, num_prefill: int, num_decode: int, pool: str
) -> None:
    """Two workers in the pool that computes prompts: a request sharing a long prefix with an
    earlier one lands where that prefix is cached (seen through KV events), and only the suffix
    is computed there."""
    c = start_cluster(tiny_chat_model_dir, mode, num_prefill, num_decode)
    try:
        wait_healthy(c.url)
        prefix = list(range(1000, 1000 + 16 * 12))  # 12 full blocks
        body = {"model": "tiny", "max_tokens": 2, "temperature": 0}
        first = httpx.post(f"{c.url}/v1/completions", json={**body, "prompt": [*prefix, 5]})
        assert first.status_code == 200, first.text
        holder = re.search(rf"{pool}=(\S+);", first.headers["x-tandem-route"])
        assert holder is not None and holder.group(1).startswith(f"{pool}-")
        deadline = time.monotonic() + 5  # KV events reach the router asynchronously
        while time.monotonic() < deadline:
            second = httpx.post(f"{c.url}/v1/completions", json={**body, "prompt": [*prefix, 6, 7]})
            if "overlap_blocks=12" in second.headers["x-tandem-route"]:
                break
            time.sleep(0.2)
        route = second.headers["x-tandem-route"]
        assert f"{pool}={holder.group(1)};" in route and "overlap_blocks=12" in route
        # 192 of the 194 prompt tokens came from the holder's prefix cache
        assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 16 * 12
        if pool == "decode":
            metrics = httpx.get(f"{c.url}/metrics").text
            hits = re.search(
                rf'tandem_router_prefix_hit_blocks_total\{{worker_id="{holder.group(1)}"\}} (\S+)',
                metrics,
            )
            assert hits is not None and float(hits.group(1)) >= 12
    finally:
        c.stop()


def test_bench_serve_runs_against_the_router(cluster: LocalCluster) -> None:
    from bench.serve import BenchConfig, run

    config = BenchConfig(
        url=cluster.url, model=None, isl=32, osl=6, num_requests=8, concurrency=4, rate=None,
        slo_ttft_s=60.0, slo_itl_s=60.0,
    )  # fmt: skip
    summary = asyncio.run(run(config))
    assert summary["model"] == "tiny"
    assert summary["completed"] == 8 and summary["failed"] == 0
    assert summary["prompt_len_mismatches"] == 0 and summary["output_len_mismatches"] == 0
    assert summary["slo_attainment"] == 1.0
    assert summary["ttft_s"]["p50"] > 0 and summary["itl_s"]["p50"] > 0
    overhead = summary["router_overhead"]  # diffed from the router's /metrics around the run
    assert overhead["overhead"]["count"] == overhead["overhead_cpu"]["count"] == 8
    assert 0 < overhead["overhead_cpu"]["p50"] <= overhead["overhead"]["p99"]
    whole = asyncio.run(run(dataclasses.replace(config, stream=False)))
    assert whole["completed"] == 8 and whole["output_len_mismatches"] == 0
    assert whole["router_overhead"]["overhead"]["count"] == 8


def test_stream_interval_groups_tokens_per_chunk(tiny_chat_model_dir: Path) -> None:
    """--stream-interval 4: the first token alone, then chunks of 4 tokens, the same text as
    the non-streamed response (whose tokens come back in two worker messages)."""
    c = start_cluster(tiny_chat_model_dir, "collocated", 0, 1, "--stream-interval", "4")
    try:
        wait_healthy(c.url)
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0,
                "ignore_eos": True, "logprobs": 0}  # fmt: skip
        full = httpx.post(f"{c.url}/v1/completions", json=body, timeout=120).json()
        streamed = httpx.post(f"{c.url}/v1/completions", json={**body, "stream": True}, timeout=120)
        choices = [e["choices"][0] for e in sse_events(streamed) if e["choices"]]
        assert [len(ch["logprobs"]["tokens"]) for ch in choices] == [1, 4, 4, 1]
        assert "".join(ch["text"] for ch in choices) == full["choices"][0]["text"]
        assert len(full["choices"][0]["logprobs"]["tokens"]) == 10
    finally:
        c.stop()


def test_dead_decode_worker_means_503_with_retry_after(tiny_chat_model_dir: Path) -> None:
    from deploy.local_cluster import stop_children

    c = start_cluster(tiny_chat_model_dir, "collocated", 0, 1)
    try:
        wait_healthy(c.url)
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
        assert httpx.post(f"{c.url}/v1/completions", json=body, timeout=60).status_code == 200
        decode = next(child for child in c.children if child.name.startswith("decode"))
        stop_children([decode])
        c.children.remove(decode)
        deadline = time.monotonic() + 10
        while httpx.get(f"{c.url}/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        health = httpx.get(f"{c.url}/health")
        assert health.status_code == 503 and "retry-after" in health.headers
        for stream in (False, True):
            response = httpx.post(
                f"{c.url}/v1/completions", json={**body, "stream": stream}, timeout=60
            )
            assert response.status_code == 503, response.text
            assert response.json()["error"]["type"] == "service_unavailable"
            assert int(response.headers["retry-after"]) >= 1
    finally:
        c.stop()


def test_stop_strings_and_text_part_content(cluster: LocalCluster) -> None:
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    text = httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=60).json()
    full = text["choices"][0]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip()
    cut = httpx.post(f"{cluster.url}/v1/completions", json={**body, "stop": [stop]}, timeout=60)
    choice = cut.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert choice["text"] == full[: full.index(stop)]

    chat = {"model": "tiny", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    plain = [{"role": "user", "content": "Hello there"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    a, b = (
        httpx.post(f"{cluster.url}/v1/chat/completions", json={**chat, "messages": m}, timeout=60)
        for m in (plain, parts)
    )
    assert a.json()["choices"][0]["message"] == b.json()["choices"][0]["message"]
