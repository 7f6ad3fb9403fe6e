"""router/responses.py: SSE chunks (hand-assembled on the hot path) match the pydantic models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proto import tandem_pb2 as pb
from router.admission import Slot
from router.config import Mode
from router.convert import Delta, FinishReason, TokenLogprob, Usage
from router.logprobs import TokenStrings
from router.policy import RouteCause, RouteDecision
from router.protocol import ChatCompletionChunk, CompletionResponse
from router.responses import DONE, ChoiceOutput, StreamFormatter, full_response, usage_info
from router.serving import Choice, Endpoint, Event, Plan, Timing
from runtime.tokenizer import Tokenizer

DECISION = RouteDecision(Mode.AUTO, "d0", "a:1", None, None, 0, 3, "test", RouteCause.FEW_UNCACHED)


def make_plan(endpoint: Endpoint, n: int = 1, logprobs: bool = False, usage: bool = True) -> Plan:
    choices = tuple(
        Choice(i, 0, f"r-{i}", [1, 2, 3], pb.SamplingParams(), DECISION) for i in range(n)
    )
    return Plan(endpoint, 'id-"x"', 123, 'm"odel', choices, (3,), True, usage, logprobs,
                Timing(0.0, 0.0), Slot())  # fmt: skip


def parse(data: bytes) -> list[dict[str, Any]]:
    events = [e for e in data.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [json.loads(e[6:]) for e in events if e != "data: [DONE]"]


@pytest.fixture(scope="module")
def strings(smollm2_dir: Path) -> TokenStrings:
    return TokenStrings(Tokenizer.from_dir(smollm2_dir))


DELTAS = [
    Delta((42,), 'he said "hi" ', (TokenLogprob(42, -0.5, ((42, -0.5), (7, -1.0))),), None,
          None, None),
    Delta((43,), "", (TokenLogprob(43, -0.25, ((43, -0.25),)),), None, None, None),
    Delta((44,), "東京\n", (TokenLogprob(44, -1.5, ((9, -0.1),)),), FinishReason.STOP, "END",
          Usage(3, 3, 1)),
]  # fmt: skip


@pytest.mark.parametrize("logprobs", [False, True])
def test_completion_chunks_validate(strings: TokenStrings, logprobs: bool) -> None:
    plan = make_plan(Endpoint.COMPLETIONS, logprobs=logprobs)
    fmt = StreamFormatter(plan, strings)
    assert fmt.start() == b""
    chunks = [fmt.event(Event(plan.choices[0], d, 0.0, 0.0)) for d in DELTAS]
    assert (chunks[1] == b"") is not logprobs  # an empty text delta is only sent for logprobs
    end = fmt.end()
    assert end.endswith(DONE)
    events = parse(b"".join(chunks) + end)
    models = [CompletionResponse.model_validate(e) for e in events]
    assert all(m.id == 'id-"x"' and m.model == 'm"odel' for m in models)
    assert "".join(c.text for m in models for c in m.choices) == 'he said "hi" 東京\n'
    last = models[-2].choices[0]
    assert (last.finish_reason, last.stop_reason) == ("stop", "END")
    assert models[-1].choices == [] and models[-1].usage is not None
    assert models[-1].usage.completion_tokens == 3 and models[-1].usage.prompt_tokens == 3
    if logprobs:
        first = models[0].choices[0].logprobs
        assert first is not None and first.token_logprobs == [-0.5]
        assert models[-2].choices[0].logprobs.text_offset == [len('he said "hi" ')]  # type: ignore[union-attr]


def test_chat_chunks_validate(strings: TokenStrings) -> None:
    plan = make_plan(Endpoint.CHAT, n=2, logprobs=True, usage=False)
    fmt = StreamFormatter(plan, strings)
    data = fmt.start()
    for choice in plan.choices:
        for d in DELTAS:
            data += fmt.event(Event(choice, d, 0.0, 0.0))
    data += fmt.end()
    events = parse(data)
    models = [ChatCompletionChunk.model_validate(e) for e in events]
    assert [m.choices[0].delta.role for m in models[:2]] == ["assistant", "assistant"]
    for index in (0, 1):
        text = "".join(
            m.choices[0].delta.content or "" for m in models if m.choices[0].index == index
        )
        assert text == 'he said "hi" 東京\n'
    assert all(m.usage is None for m in models)  # no usage chunk unless asked for
    lp = models[2].choices[0].logprobs
    assert lp is not None and lp.content is not None
    assert lp.content[0].logprob == -0.5 and len(lp.content[0].top_logprobs) == 2


def test_full_response_and_usage_count_prompts_once(strings: TokenStrings) -> None:
    plan = make_plan(Endpoint.CHAT, n=2)
    outputs = {0: ChoiceOutput(), 1: ChoiceOutput()}
    for out in outputs.values():
        for d in DELTAS:
            out.add(d)
    usage = usage_info(plan, outputs)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (3, 6, 9)
    assert usage.prompt_tokens_details == {"cached_tokens": 1}
    response = full_response(plan, outputs, strings)
    assert [c.message.content for c in response.choices] == ['he said "hi" 東京\n'] * 2  # type: ignore[union-attr]
