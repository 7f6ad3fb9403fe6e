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
        finish = delta.finish_reason.value if delta.finish_reason is not None else None
        if not delta.text and finish is None and not (self.plan.logprobs and delta.logprobs):
            return b""  # e.g. text held back while a stop string may be matching
        if self.plan.endpoint is Endpoint.COMPLETIONS:
            choice = CompletionChoice(
                index=event.choice.index,
                text=delta.text,
                logprobs=completion_logprobs(self.strings, delta.logprobs, text_offset)
                if self.plan.logprobs
                else None,
                finish_reason=finish,
                stop_reason=delta.stop_reason,
            )
            return self._completion_chunk(choice)
        chat_choice = ChatStreamChoice(
            index=event.choice.index,
            delta=DeltaMessage(content=delta.text),
            logprobs=ChatLogprobs(content=chat_logprobs(self.strings, delta.logprobs))
            if self.plan.logprobs
            else None,
            finish_reason=finish,
            stop_reason=delta.stop_reason,
        )
        return self._chat_chunk(chat_choice)

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

    def _completion_chunk(self, choice: CompletionChoice) -> bytes:
        chunk = CompletionResponse(
            id=self.plan.request_id, created=self.plan.created, model=self.plan.model,
            choices=[choice],
        )  # fmt: skip
        return _sse(chunk.model_dump_json())

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
