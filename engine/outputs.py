"""What the engine reports per step and what the offline API returns per prompt."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.plan import TokenLogprob
from engine.request import FinishReason


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """One request's progress in one step (a delta, for streaming)."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_logprobs: tuple[TokenLogprob, ...]  # empty unless the request asked for logprobs
    text_delta: str  # "" when the engine has no tokenizer; stop strings already cut
    finished: bool
    finish_reason: FinishReason | None
    stop_reason: str | int | None
    num_prompt_tokens: int
    num_cached_tokens: int
    held_block_ids: tuple[int, ...] = ()  # prefill role: blocks pinned for the KV hand-off


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None


@dataclass(slots=True)
class GenerationResult:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
