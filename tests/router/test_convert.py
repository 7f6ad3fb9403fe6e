"""router/convert.py (pydantic <-> proto), KV event folding, logprob formatting."""

from __future__ import annotations

from pathlib import Path

import pytest

from proto import tandem_pb2 as pb
from router import convert
from router.config import Limits
from router.convert import Delta, FinishReason, TokenLogprob, Usage
from router.errors import InvalidRequest
from router.logprobs import TokenStrings, chat_logprobs, completion_logprobs
from router.protocol import ChatCompletionRequest, CompletionRequest
from router.registry import apply_kv_event
from runtime.tokenizer import Tokenizer


def completion(**kw: object) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **kw})


def test_sampling_to_proto_maps_every_field() -> None:
    req = completion(
        temperature=0.5, top_p=0.9, top_k=7, min_p=0.1, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.2, logit_bias={"5": -100, "7": 2.5},
        stop=["a", "bc"], stop_token_ids=[3], include_stop_str_in_output=True,
        ignore_eos=True, min_tokens=2, skip_special_tokens=False,
    )  # fmt: skip
    msg = convert.sampling_to_proto(req, max_tokens=10, logprobs=3, seed=42)
    assert msg.max_tokens == 10 and msg.min_tokens == 2
    assert msg.temperature == pytest.approx(0.5) and msg.top_p == pytest.approx(0.9)
    assert msg.top_k == 7 and msg.min_p == pytest.approx(0.1)
    assert msg.presence_penalty == 0.5 and msg.frequency_penalty == -0.5
    assert msg.repetition_penalty == pytest.approx(1.2)
    assert dict(msg.logit_bias) == {5: -100.0, 7: 2.5}
    assert list(msg.stop) == ["a", "bc"] and list(msg.stop_token_ids) == [3]
    assert msg.include_stop_str_in_output and msg.ignore_eos and msg.keep_special_tokens
    assert msg.seed == 42 and msg.logprobs == 3


def test_sampling_defaults_leave_optionals_unset() -> None:
    msg = convert.sampling_to_proto(completion(top_k=-1), max_tokens=16, logprobs=None, seed=None)
    for name in ("temperature", "top_p", "repetition_penalty", "seed", "logprobs"):
        assert not msg.HasField(name), name  # the worker applies the neutral default
    assert msg.top_k == 0 and not msg.keep_special_tokens
    assert convert.sampling_to_proto(completion(stop="x"), max_tokens=1, logprobs=0, seed=None).stop
    assert convert.sampling_to_proto(completion(), max_tokens=1, logprobs=0, seed=None).HasField(
        "logprobs"
    )


def test_child_seeds_are_seed_plus_index_within_int64() -> None:
    assert convert.child_seed(None, 3) is None
    assert [convert.child_seed(10, i) for i in range(3)] == [10, 11, 12]
    assert convert.child_seed(2**63 - 1, 1) == -(2**63)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 0}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"seed": 2**64}, "seed"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"logit_bias": {"100": 1}}, "logit_bias"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [100]}, "stop_token_ids"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_validate_sampling_names_the_bad_param(fields: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        convert.validate_sampling(completion(**fields), vocab_size=100)
    assert info.value.param == param
    assert info.value.status_code == 400


def test_validate_completion_and_chat() -> None:
    for fields, param in [
        ({"echo": True}, "echo"),
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 21}, "logprobs"),
    ]:
        with pytest.raises(InvalidRequest) as info:
            convert.validate_completion(completion(**fields))
        assert info.value.param == param
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    for fields, param in [
        ({"messages": []}, "messages"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs=true
        ({"logprobs": True, "top_logprobs": 30}, "top_logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"chat_template_kwargs": {"chat_template": "{{ 7 * 7 }}"}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"self": 1}}, "chat_template_kwargs"),
    ]:
        with pytest.raises(InvalidRequest) as info:
            convert.validate_chat(ChatCompletionRequest.model_validate({**chat, **fields}))
        assert info.value.param == param


def test_resolve_max_tokens_against_the_context() -> None:
    none = Limits()
    assert convert.resolve_max_tokens(None, 10, 100, none, "max_tokens") == 90
    assert convert.resolve_max_tokens(90, 10, 100, none, "max_tokens") == 90
    with pytest.raises(InvalidRequest, match="maximum context length is 100"):
        convert.resolve_max_tokens(91, 10, 100, none, "max_tokens")
    with pytest.raises(InvalidRequest) as info:
        convert.resolve_max_tokens(None, 100, 100, none, "max_completion_tokens", "messages")
    assert info.value.param == "messages"


def test_resolve_max_tokens_within_the_limits() -> None:
    limits = Limits(max_prompt_tokens=96, max_output_tokens=8)
    assert convert.resolve_max_tokens(None, 10, 100, limits, "max_tokens") == 8  # the default
    assert convert.resolve_max_tokens(None, 95, 100, limits, "max_tokens") == 5  # the context
    assert convert.resolve_max_tokens(8, 10, 100, limits, "max_tokens") == 8
    with pytest.raises(InvalidRequest, match="must be <= 8") as info:
        convert.resolve_max_tokens(9, 10, 100, limits, "max_completion_tokens")
    assert info.value.param == "max_completion_tokens"
    with pytest.raises(InvalidRequest, match="at most 96") as info:
        convert.resolve_max_tokens(1, 97, 100, limits, "max_tokens", "messages")
    assert info.value.param == "messages"


def test_generate_request_carries_the_prefill_plan() -> None:
    sampling = pb.SamplingParams(max_tokens=4)
    local = convert.generate_request("r1", [1, 2], sampling, None, None, 5.0, 1)
    assert local.prefill.WhichOneof("where") == "local"
    assert local.request_id == "r1" and list(local.prompt_token_ids) == [1, 2]
    assert local.deadline_unix_s == 5.0 and local.sampling.max_tokens == 4
    remote = convert.generate_request("r2", [1], sampling, "p0", "127.0.0.1:9", 0.0, 4)
    assert remote.prefill.WhichOneof("where") == "remote"
    assert remote.prefill.remote.prefill_worker_id == "p0"
    assert remote.prefill.remote.prefill_address == "127.0.0.1:9"
    assert (local.output_interval, remote.output_interval) == (1, 4)


def test_delta_from_proto() -> None:
    msg = pb.GenerateResponse(
        request_id="r", token_ids=[5, 6], text="ab", finished=True,
        finish_reason=pb.FINISH_REASON_STOP, stop_token_id=6,
        logprobs=[
            pb.TokenLogprob(
                token_id=5, logprob=-0.5, top_token_ids=[5, 9], top_logprobs=[-0.5, -1]
            ),
            pb.TokenLogprob(token_id=6, logprob=-0.25),
        ],
        usage=pb.Usage(prompt_tokens=3, completion_tokens=2, cached_tokens=1),
    )  # fmt: skip
    assert convert.delta_from_proto(msg) == Delta(
        token_ids=(5, 6),
        text="ab",
        logprobs=(TokenLogprob(5, -0.5, ((5, -0.5), (9, -1.0))), TokenLogprob(6, -0.25, ())),
        finish_reason=FinishReason.STOP,
        stop_reason=6,
        usage=Usage(3, 2, 1),
    )
    partial = convert.delta_from_proto(pb.GenerateResponse(token_ids=[1], text="x"))
    assert partial.finish_reason is None and partial.usage is None
    stopped = pb.GenerateResponse(finished=True, finish_reason=pb.FINISH_REASON_STOP)
    stopped.stop_string = "END"
    assert convert.delta_from_proto(stopped).stop_reason == "END"
    length = pb.GenerateResponse(finished=True, finish_reason=pb.FINISH_REASON_LENGTH)
    assert convert.delta_from_proto(length).finish_reason is FinishReason.LENGTH


def test_kv_events_fold_into_the_hash_set() -> None:
    cached = {1, 2}
    apply_kv_event(cached, pb.KVEvent(cleared=True, stored_block_hashes=[7, 8]))
    assert cached == {7, 8}  # a snapshot: what was there before is gone
    apply_kv_event(cached, pb.KVEvent(stored_block_hashes=[9], removed_block_hashes=[7]))
    assert cached == {8, 9}


def test_token_strings_and_bytes_rebuild_the_text(smollm2_dir: Path) -> None:
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    strings = TokenStrings(tokenizer)
    text = "Héllo wörld, 東京! <|im_end|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    raw = b"".join(strings.get(i)[1] for i in ids)
    assert raw.decode() == text
    assert strings.get(ids[0])[0] == "H"
    lps = [TokenLogprob(i, -1.0, ((i, -1.0),)) for i in ids[:3]]
    legacy = completion_logprobs(strings, lps, text_offset=4)
    assert legacy.text_offset[0] == 4
    assert legacy.tokens == [strings.get(i)[0] for i in ids[:3]]
    assert legacy.token_logprobs == [-1.0] * 3
    assert all(len(top) == 1 for top in legacy.top_logprobs if top is not None)
    chat = chat_logprobs(strings, lps)
    assert [c.bytes for c in chat] == [list(strings.get(i)[1]) for i in ids[:3]]
    assert chat[0].top_logprobs[0].token == chat[0].token
