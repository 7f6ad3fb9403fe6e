"""The edge between the HTTP models and the wire: validated pydantic -> proto, proto -> Delta.

Sampling values are checked here with the engine's rules (engine/sampling_params.py; the router
may not import it), so a bad value is a 400 from the router, never an error from a worker.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from proto import tandem_pb2 as pb
from router.config import Limits
from router.errors import InvalidRequest
from router.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

MAX_LOGPROBS = 20  # engine/sampling_params.py MAX_LOGPROBS; OpenAI's chat API allows 20
MAX_N = 128
RESERVED_TEMPLATE_KWARGS = frozenset(
    {"self", "messages", "add_generation_prompt", "tools", "chat_template"}
)
_INT64 = 2**63
_UINT32 = 2**32


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


_FINISH_FROM_PROTO = {
    pb.FINISH_REASON_STOP: FinishReason.STOP,
    pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    pb.FINISH_REASON_ABORT: FinishReason.ABORT,
}


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True, slots=True)
class Delta:
    """One GenerateResponse, as the router uses it."""

    token_ids: tuple[int, ...]  # new since the previous delta
    text: str  # their text, stop strings already cut by the worker
    logprobs: tuple[TokenLogprob, ...]  # one per token id when asked for, else empty
    finish_reason: FinishReason | None  # set on the last delta only
    stop_reason: str | int | None  # the stop string or stop token id that ended the request
    usage: Usage | None  # on the last delta


def delta_from_proto(msg: pb.GenerateResponse) -> Delta:
    """Once per worker message: keep it cheap (no logprob work when none were asked for)."""
    finish: FinishReason | None = None
    stop_reason: str | int | None = None
    usage: Usage | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    if msg.logprobs:
        logprobs = tuple(
            TokenLogprob(
                lp.token_id, lp.logprob, tuple(zip(lp.top_token_ids, lp.top_logprobs, strict=True))
            )
            for lp in msg.logprobs
        )
    if msg.finished:
        finish = _FINISH_FROM_PROTO.get(msg.finish_reason, FinishReason.ABORT)
        if msg.stop_string:
            stop_reason = msg.stop_string
        elif msg.HasField("stop_token_id"):
            stop_reason = msg.stop_token_id
        u = msg.usage
        usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
    return Delta(
        token_ids=tuple(msg.token_ids),
        text=msg.text,
        logprobs=logprobs,
        finish_reason=finish,
        stop_reason=stop_reason,
        usage=usage,
    )


def validate_sampling(req: SamplingFields, vocab_size: int) -> None:
    """Raise InvalidRequest (with the offending param) for any value the engine would refuse."""
    if not 1 <= req.n <= MAX_N:
        _bad("n", f"n must be in [1, {MAX_N}], got {req.n}")
    if req.temperature is not None and not req.temperature >= 0.0:
        _bad("temperature", f"temperature must be >= 0, got {req.temperature}")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        _bad("top_p", f"top_p must be in (0, 1], got {req.top_p}")
    if req.top_k is not None and req.top_k < -1:
        _bad("top_k", f"top_k must be >= 0 (0 or -1 disables it), got {req.top_k}")
    if req.min_p is not None and not 0.0 <= req.min_p <= 1.0:
        _bad("min_p", f"min_p must be in [0, 1], got {req.min_p}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None and not -2.0 <= value <= 2.0:
            _bad(name, f"{name} must be in [-2, 2], got {value}")
    if req.repetition_penalty is not None and not req.repetition_penalty > 0.0:
        _bad("repetition_penalty", f"repetition_penalty must be > 0, got {req.repetition_penalty}")
    if req.seed is not None and not -_INT64 <= req.seed < _INT64:
        _bad("seed", f"seed must fit in int64, got {req.seed}")
    if req.min_tokens < 0:
        _bad("min_tokens", f"min_tokens must be >= 0, got {req.min_tokens}")
    for token_id, bias in (req.logit_bias or {}).items():
        _token_id(token_id, vocab_size, "logit_bias")
        if not -100.0 <= bias <= 100.0:
            _bad("logit_bias", f"logit_bias[{token_id}] must be in [-100, 100], got {bias}")
    if any(not s for s in stop_strings(req)):
        _bad("stop", "stop strings must be non-empty")
    for stop_id in req.stop_token_ids or ():
        if not 0 <= stop_id < vocab_size:
            _bad("stop_token_ids", f"stop token id {stop_id} is outside [0, {vocab_size})")
    if req.stream_options is not None and not req.stream:
        _bad("stream_options", "stream_options may only be set when stream is true")


def validate_completion(req: CompletionRequest) -> None:
    if req.echo:
        _bad("echo", "echo is not supported")
    if req.suffix is not None:
        _bad("suffix", "suffix is not supported")
    if req.best_of is not None and req.best_of != req.n:
        _bad("best_of", "best_of is not supported (only best_of == n)")
    if req.max_tokens is not None and req.max_tokens < 1:
        _bad("max_tokens", f"max_tokens must be >= 1, got {req.max_tokens}")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        _bad("logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}], got {req.logprobs}")


def validate_chat(req: ChatCompletionRequest) -> None:
    if not req.messages:
        _bad("messages", "messages must be a non-empty list")
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(req, name)
        if value is not None and value < 1:
            _bad(name, f"{name} must be >= 1, got {value}")
    if req.top_logprobs is not None:
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            _bad("top_logprobs", f"top_logprobs must be in [0, {MAX_LOGPROBS}]")
        if not req.logprobs:
            _bad("top_logprobs", "top_logprobs needs logprobs set to true")
    if req.tools or req.tool_choice not in (None, "none"):
        _bad("tools", "tool calling is not supported")
    if req.response_format is not None and req.response_format.get("type") != "text":
        _bad("response_format", "only response_format {'type': 'text'} is supported")
    reserved = RESERVED_TEMPLATE_KWARGS.intersection(req.chat_template_kwargs or {})
    if reserved:
        # `chat_template` would run a client's own template (vLLM refuses it unless told to
        # trust request templates); the others are the router's own arguments.
        _bad("chat_template_kwargs", f"chat_template_kwargs may not set {sorted(reserved)}")


def stop_strings(req: SamplingFields) -> list[str]:
    if req.stop is None:
        return []
    return [req.stop] if isinstance(req.stop, str) else list(req.stop)


def check_prompt_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    if not ids:
        _bad(param, "the prompt must not be empty")
    for token_id in ids:
        if not 0 <= token_id < vocab_size:
            _bad(param, f"token id {token_id} is outside the vocabulary [0, {vocab_size})")


def resolve_max_tokens(
    requested: int | None,
    num_prompt_tokens: int,
    max_model_len: int,
    limits: Limits,
    param: str,
    prompt_param: str = "prompt",
) -> int:
    """Output token budget; the prompt plus it must fit the context (vLLM's message) and both
    must be within the router's limits."""
    if num_prompt_tokens >= max_model_len:
        _bad(
            prompt_param,
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt has {num_prompt_tokens} tokens, leaving no room for output.",
        )
    if limits.max_prompt_tokens is not None and num_prompt_tokens > limits.max_prompt_tokens:
        _bad(
            prompt_param,
            f"the prompt has {num_prompt_tokens} tokens; this server accepts at most "
            f"{limits.max_prompt_tokens}",
        )
    room = max_model_len - num_prompt_tokens
    if requested is None:
        if limits.max_output_tokens is None:
            return room
        return min(room, limits.max_output_tokens)
    if limits.max_output_tokens is not None and requested > limits.max_output_tokens:
        _bad(
            param, f"{param} must be <= {limits.max_output_tokens} on this server, got {requested}"
        )
    if num_prompt_tokens + requested > max_model_len:
        _bad(
            param,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the "
            f"prompt, {requested} for the completion). Reduce the prompt or {param}.",
        )
    return requested


def completion_max_tokens(req: CompletionRequest, limits: Limits) -> int | None:
    """The completion's max_tokens: OpenAI's default (16) when the client gives none, which
    is no ask of the client's, so it is lowered to the server's output limit, never refused."""
    if "max_tokens" in req.model_fields_set or limits.max_output_tokens is None:
        return req.max_tokens
    return None if req.max_tokens is None else min(req.max_tokens, limits.max_output_tokens)


def check_num_choices(num_choices: int, limits: Limits) -> None:
    if num_choices > limits.max_choices:
        _bad(
            "n",
            f"the request asks for {num_choices} choices (prompts x n); this server accepts "
            f"at most {limits.max_choices}",
        )


def sampling_to_proto(
    req: SamplingFields, *, max_tokens: int, logprobs: int | None, seed: int | None
) -> pb.SamplingParams:
    """The wire SamplingParams of one choice (validate_sampling must have passed)."""
    if req.min_tokens > max_tokens:
        _bad("min_tokens", f"min_tokens ({req.min_tokens}) must be <= max_tokens ({max_tokens})")
    params = pb.SamplingParams(
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=max(req.top_k or 0, 0),
        min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty,
        logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
        stop=stop_strings(req),
        stop_token_ids=req.stop_token_ids or [],
        include_stop_str_in_output=req.include_stop_str_in_output,
        ignore_eos=req.ignore_eos,
        keep_special_tokens=not req.skip_special_tokens,
    )
    if seed is not None:
        params.seed = seed
    if logprobs is not None:
        params.logprobs = logprobs
    return params


def child_seed(seed: int | None, index: int) -> int | None:
    """Choice `index` of a seeded request samples with seed + index (as the offline LLM does)."""
    if seed is None:
        return None
    return (seed + index + _INT64) % (2 * _INT64) - _INT64  # wraps within int64


def generate_request(
    request_id: str,
    prompt_ids: Sequence[int],
    sampling: pb.SamplingParams,
    prefill_worker_id: str | None,
    prefill_address: str | None,
    deadline_unix_s: float,
    output_interval: int,
) -> pb.GenerateRequest:
    plan = pb.PrefillPlan()
    if prefill_worker_id is None:
        plan.local.SetInParent()
    else:
        plan.remote.prefill_worker_id = prefill_worker_id
        plan.remote.prefill_address = prefill_address or ""
    return pb.GenerateRequest(
        request_id=request_id,
        prompt_token_ids=prompt_ids,
        sampling=sampling,
        prefill=plan,
        deadline_unix_s=deadline_unix_s,
        output_interval=output_interval,
    )


def _token_id(text: str, vocab_size: int, param: str) -> int:
    try:
        token_id = int(text)
    except ValueError:
        _bad(param, f"{param} keys must be token ids, got {text!r}")
    if not 0 <= token_id < min(vocab_size, _UINT32):
        _bad(param, f"{param} token id {token_id} is outside the vocabulary [0, {vocab_size})")
    return token_id


def _bad(param: str, message: str) -> NoReturn:
    raise InvalidRequest(message, param=param)
