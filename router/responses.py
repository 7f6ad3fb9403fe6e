"""Worker deltas -> OpenAI responses: whole (non-streamed) and as SSE chunks.

Pure formatting; `ChoiceOutput` accumulates one choice, `StreamFormatter` turns each Event
into `data: {...}\\n\\n` bytes as OpenAI (and vLLM) stream them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from router.convert import Delta, TokenLogprob, Usage
from router.errors import RouterError
from router.logprobs import TokenStrings, chat_logprobs, completion_logprobs
from router.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    UsageInfo,
)
from router.serving import Endpoint, Event, Plan

DONE = b"data: [DONE]\n\n"


@dataclass(slots=True)
class ChoiceOutput:
    """One choice, accumulated from its deltas."""

    text_parts: list[str] = field(default_factory=list)
    text_len: int = 0  # characters so far (completions logprobs text_offset)
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    usage: Usage | None = None

    def add(self, delta: Delta) -> None:
        self.text_parts.append(delta.text)
        self.text_len += len(delta.text)
        self.num_tokens += len(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason.value
            self.stop_reason = delta.stop_reason
            self.usage = delta.usage


def usage_info(plan: Plan, outputs: dict[int, ChoiceOutput]) -> UsageInfo:
    """Prompt tokens count once per prompt, completion tokens once per choice."""
    prompt_tokens = sum(plan.prompt_lens)
    completion_tokens = 0
    cached_by_prompt: dict[int, int] = {}
    for choice in plan.choices:
        out = outputs[choice.index]
        completion_tokens += out.usage.completion_tokens if out.usage else out.num_tokens
        cached = out.usage.cached_tokens if out.usage else 0
        cached_by_prompt[choice.prompt_index] = max(
            cached_by_prompt.get(choice.prompt_index, 0), cached
        )
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details={"cached_tokens": sum(cached_by_prompt.values())},
    )


def full_response(
    plan: Plan, outputs: dict[int, ChoiceOutput], strings: TokenStrings
) -> CompletionResponse | ChatCompletionResponse:
    usage = usage_info(plan, outputs)
    if plan.endpoint is Endpoint.COMPLETIONS:
        return CompletionResponse(
            id=plan.request_id,
            created=plan.created,
            model=plan.model,
            choices=[
                CompletionChoice(
                    index=i,
                    text="".join(out.text_parts),
                    logprobs=completion_logprobs(strings, out.logprobs, 0)
                    if plan.logprobs
                    else None,
                    finish_reason=out.finish_reason,
                    stop_reason=out.stop_reason,
                )
                for i, out in sorted(outputs.items())
            ],
            usage=usage,
        )
    return ChatCompletionResponse(
        id=plan.request_id,
        created=plan.created,
        model=plan.model,
        choices=[
            ChatChoice(
                index=i,
                message=ChatResponseMessage(content="".join(out.text_parts)),
                logprobs=ChatLogprobs(content=chat_logprobs(strings, out.logprobs))
                if plan.logprobs
                else None,
                finish_reason=out.finish_reason,
                stop_reason=out.stop_reason,
            )
            for i, out in sorted(outputs.items())
        ],
        usage=usage,
    )


class StreamFormatter:
    """SSE bytes for one streamed request; keeps the per-choice state usage needs."""

    def __init__(self, plan: Plan, strings: TokenStrings) -> None:
        self.plan = plan
        self.strings = strings
        self.outputs = {c.index: ChoiceOutput() for c in plan.choices}
        completions = plan.endpoint is Endpoint.COMPLETIONS
        kind = "text_completion" if completions else "chat.completion.chunk"
        request_id, model = json.dumps(plan.request_id), json.dumps(plan.model)
        self._head = (
            f'data: {{"id":{request_id},"object":"{kind}","created":{plan.created},'
            f'"model":{model},"choices":['
        ).encode()
        self._tail = b'],"usage":null}\n\n'

    def start(self) -> bytes:
        """Chat streams open with each choice's role (OpenAI and vLLM do); completions send
        nothing before the first token."""
        if self.plan.endpoint is not Endpoint.CHAT:
            return b""
        return b"".join(
            self._chat_chunk(ChatStreamChoice(index=c.index, delta=DeltaMessage(
                role="assistant", content=""), logprobs=None, finish_reason=None))
            for c in self.plan.choices
        )  # fmt: skip

    def event(self, event: Event) -> bytes:
        out = self.outputs[event.choice.index]
        text_offset = out.text_len
        delta = event.delta
        out.add(delta)
        finish = delta.finish_reason
        if not delta.text and finish is None and not (self.plan.logprobs and delta.logprobs):
            return b""  # e.g. text held back while a stop string may be matching
        # Hot path (once per token): the chunk is assembled from pre-rendered pieces, not a
        # pydantic model; tests check it validates as CompletionResponse/ChatCompletionChunk.
        logprobs = "null"
        if self.plan.logprobs:
            if self.plan.endpoint is Endpoint.COMPLETIONS:
                legacy = completion_logprobs(self.strings, delta.logprobs, text_offset)
                logprobs = legacy.model_dump_json()
            else:
                chat = ChatLogprobs(content=chat_logprobs(self.strings, delta.logprobs))
                logprobs = chat.model_dump_json()
        text = json.dumps(delta.text, ensure_ascii=False)
        if self.plan.endpoint is Endpoint.COMPLETIONS:
            choice = f'{{"index":{event.choice.index},"text":{text},"logprobs":{logprobs}'
        else:
            choice = (
                f'{{"index":{event.choice.index},"delta":{{"content":{text}}},"logprobs":{logprobs}'
            )
        if finish is None:
            choice += ',"finish_reason":null,"stop_reason":null}'
        else:
            stop = json.dumps(delta.stop_reason, ensure_ascii=False)
            choice += f',"finish_reason":"{finish.value}","stop_reason":{stop}}}'
        return self._head + choice.encode() + self._tail

    def end(self) -> bytes:
        """The usage chunk (when asked for) and [DONE]."""
        if not self.plan.include_usage:
            return DONE
        usage = usage_info(self.plan, self.outputs)
        if self.plan.endpoint is Endpoint.COMPLETIONS:
            chunk = CompletionResponse(
                id=self.plan.request_id, created=self.plan.created, model=self.plan.model,
                choices=[], usage=usage,
            )  # fmt: skip
            return _sse(chunk.model_dump_json()) + DONE
        chat = ChatCompletionChunk(
            id=self.plan.request_id, created=self.plan.created, model=self.plan.model,
            choices=[], usage=usage,
        )  # fmt: skip
        return _sse(chat.model_dump_json()) + DONE

    def _chat_chunk(self, choice: ChatStreamChoice) -> bytes:
        chunk = ChatCompletionChunk(
            id=self.plan.request_id, created=self.plan.created, model=self.plan.model,
            choices=[choice],
        )  # fmt: skip
        return _sse(chunk.model_dump_json())


def error_event(error: RouterError) -> bytes:
    """An error after the stream has started (status already 200): one event, then [DONE]."""
    return _sse(json.dumps(error.body())) + DONE


def _sse(data: str) -> bytes:
    return b"data: " + data.encode() + b"\n\n"
