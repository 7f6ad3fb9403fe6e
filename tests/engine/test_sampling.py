"""Sampler and stop behaviour through the engine, on a tiny random model (token ids only)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.plan import ScheduledRow
from engine.request import FinishReason
from engine.sampler import Sampler

PROMPT = list(range(10, 40))


@pytest.fixture(scope="module")
def llm(tiny_model_dirs: dict[str, Path]) -> LLM:
    return LLM(str(tiny_model_dirs["llama"]), tokenizer=False, num_blocks=512)


def _tokens(llm: LLM, params: SamplingParams, prompt: list[int] = PROMPT) -> list[int]:
    (r,) = llm.generate([prompt], params)
    return r.outputs[0].token_ids


def test_top_k_1_is_greedy(llm: LLM) -> None:
    greedy = _tokens(llm, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    top1 = _tokens(llm, SamplingParams(max_tokens=16, temperature=1.5, top_k=1, ignore_eos=True))
    assert top1 == greedy


def test_seed_reproducible_and_seeds_differ(llm: LLM) -> None:
    a = _tokens(llm, SamplingParams(max_tokens=16, temperature=1.0, seed=1, ignore_eos=True))
    b = _tokens(llm, SamplingParams(max_tokens=16, temperature=1.0, seed=1, ignore_eos=True))
    c = _tokens(llm, SamplingParams(max_tokens=16, temperature=1.0, seed=2, ignore_eos=True))
    assert a == b
    assert a != c


def test_logit_bias_forces_a_token(llm: LLM) -> None:
    params = SamplingParams(max_tokens=5, temperature=0.0, logit_bias={77: 100.0}, ignore_eos=True)
    assert _tokens(llm, params) == [77] * 5


def test_stop_token_ids_and_min_tokens(llm: LLM) -> None:
    greedy = _tokens(llm, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    stop_id = greedy[0]
    (r,) = llm.generate(
        [PROMPT], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(stop_id,))
    )
    out = r.outputs[0]
    assert out.token_ids == [stop_id]
    assert out.finish_reason is FinishReason.STOP and out.stop_reason == stop_id
    # min_tokens bans the stop id until 4 tokens exist
    params = SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(stop_id,), min_tokens=4)
    tokens = _tokens(llm, params)
    assert len(tokens) >= 4
    assert stop_id not in tokens[:3]


def test_max_tokens_and_length_reason(llm: LLM) -> None:
    (r,) = llm.generate([PROMPT], SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True))
    assert len(r.outputs[0].token_ids) == 7
    assert r.outputs[0].finish_reason is FinishReason.LENGTH


def test_n_children_share_prompt_and_differ(llm: LLM) -> None:
    (r,) = llm.generate(
        [PROMPT], SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=9, ignore_eos=True)
    )
    assert [o.index for o in r.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in r.outputs}) == 3
    llm.engine.check_integrity()


def test_logprobs_are_raw_distribution(llm: LLM) -> None:
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=3, ignore_eos=True)
    (r,) = llm.generate([PROMPT], params)
    out = r.outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 6
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.token_id == tok
        assert len(lp.top) == 3
        assert lp.top[0][0] == tok  # greedy picks the top token
        assert math.isclose(lp.logprob, lp.top[0][1], abs_tol=1e-6)
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]


def _row(sp: SamplingParams, history: tuple[tuple[int, ...], tuple[int, ...]] | None = None):
    return ScheduledRow("r", (1,), 0, (0,), True, sp, 0, history)


def test_penalties_match_reference_formula() -> None:
    sampler = Sampler(8, torch.device("cpu"), seed=0)
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0, 1.0, -2.0, 0.2]])
    sp = SamplingParams(
        temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0
    )
    row = _row(sp, ((0, 1), (3, 3, 5)))
    processed = sampler._process(logits.clone(), [row])[0]
    expected = logits[0].clone()
    for t in (0, 1, 3, 5):  # repetition: prompt and output
        expected[t] = expected[t] / 2.0 if expected[t] > 0 else expected[t] * 2.0
    expected[3] -= 0.25 * 2 + 0.5
    expected[5] -= 0.25 * 1 + 0.5
    assert torch.allclose(processed, expected)


def test_top_p_and_min_p_restrict_support() -> None:
    sampler = Sampler(4, torch.device("cpu"), seed=0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen_p = {
        sampler(logits, [_row(SamplingParams(temperature=1.0, top_p=0.7))])[0][0]
        for _ in range(200)
    }
    assert seen_p == {0, 1}
    seen_m = {
        sampler(logits, [_row(SamplingParams(temperature=1.0, min_p=0.5))])[0][0]
        for _ in range(200)
    }
    assert seen_m == {0, 1}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1.0},
        {"top_p": 0.0},
        {"top_k": -1},
        {"min_p": 1.5},
        {"max_tokens": 0},
        {"n": 0},
        {"logprobs": 21},
        {"presence_penalty": 3.0},
        {"repetition_penalty": 0.0},
        {"stop": ("",)},
        {"min_tokens": 5, "max_tokens": 2},
        {"logit_bias": {1: 101.0}},
    ],
)
def test_bad_sampling_params_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_bad_requests_are_rejected(llm: LLM) -> None:
    params = SamplingParams(max_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        llm.engine.add_request("x", [], params)
    with pytest.raises(ValueError, match="token ids"):
        llm.engine.add_request("x", [10**6], params)
    with pytest.raises(ValueError, match="room"):
        llm.engine.add_request("x", [5] * 5000, params)
    with pytest.raises(ValueError, match="tokenizer"):
        llm.engine.add_request("x", [5], SamplingParams(stop=("a",)))
    assert not llm.engine.has_unfinished()
