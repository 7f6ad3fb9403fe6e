"""Overlapped steps (async_scheduling: step N+1 scheduled and launched before step N's tokens
are read) give the same tokens, finishes and logprobs as the synchronous loop, and leak no
block. Run on CPU, where `launch` computes at once but the loop, the pending tokens, the
token_on_device rows, the dropped rows of finished / aborted / preempted requests and the
one-step-late outputs are the same code as on the GPU."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.plan import StepPlan
from engine.request import FinishReason

EOS = 2  # tiny models' eos_token_id


def _prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]


def _params() -> list[SamplingParams]:
    return [
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=17, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True),
        # EOS can end it early, at an unknown step: its row of the next step is wasted
        SamplingParams(max_tokens=30, temperature=1.2, seed=11),
        SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0.0, min_tokens=6, logprobs=3, seed=2),
        SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=25, temperature=0.7, stop_token_ids=(7, 9, 11), seed=3),
    ]


def _run(model_dir: Path, overlap: bool, **kw: object) -> list[tuple[object, ...]]:
    llm = LLM(str(model_dir), tokenizer=False, async_scheduling=overlap, **kw)  # type: ignore[arg-type]
    params = _params()
    prompts = _prompts(3, [5, 40, 17, 64, 3, 33, 90, 12, 50])
    reqs = [(p, params[i % len(params)]) for i, p in enumerate(prompts)]
    results = llm.generate([p for p, _ in reqs], [sp for _, sp in reqs])
    llm.engine.check_integrity()
    assert llm.engine.block_manager.num_used_blocks == 0
    assert llm.engine.in_flight is None
    out = []
    for r in results:
        o = r.outputs[0]
        lps = tuple((lp.token_id, round(lp.logprob, 5)) for lp in o.logprobs or ())
        out.append((tuple(o.token_ids), o.finish_reason, lps))
    return out


@pytest.mark.parametrize(
    "kw",
    [
        {"num_blocks": 256},
        {"num_blocks": 256, "max_num_batched_tokens": 24},  # chunked prefill beside decodes
        {"num_blocks": 24, "max_num_batched_tokens": 64},  # preemption while a step is in flight
        {"num_blocks": 256, "max_num_seqs": 3},
    ],
    ids=["plain", "chunked", "preempting", "few_seqs"],
)
def test_same_outputs_as_synchronous(tiny_model_dirs: dict[str, Path], kw: dict[str, object]):
    model_dir = tiny_model_dirs["llama"]
    assert _run(model_dir, True, **kw) == _run(model_dir, False, **kw)


def test_rows_read_their_token_on_the_device(tiny_model_dirs: dict[str, Path]) -> None:
    """A decoding request runs every step (its token read a step late), and its outputs come
    one step after the step that sampled them."""
    llm = LLM(str(tiny_model_dirs["llama"]), tokenizer=False, async_scheduling=True)
    engine = llm.engine
    plans: list[StepPlan] = []
    launch = engine.runner.launch

    def spy(plan: StepPlan):  # type: ignore[no-untyped-def]
        plans.append(plan)
        return launch(plan)

    engine.runner.launch = spy  # type: ignore[method-assign]
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    engine.add_request("a", _prompts(1, [10])[0], greedy)
    got: list[list[int]] = []
    while engine.has_unfinished():
        got.append([t for o in engine.step() for t in o.new_token_ids])
    # launch: prefill, 3 decodes (the 4th token ends it by length: never scheduled ahead)
    assert [len(p.rows) for p in plans] == [1, 1, 1, 1]
    assert [p.rows[0].token_on_device for p in plans] == [False, True, True, True]
    assert [len(g) for g in got] == [0, 1, 1, 1, 1]  # outputs one step late
    assert engine.block_manager.num_used_blocks == 0


def test_abort_while_in_flight(tiny_model_dirs: dict[str, Path]) -> None:
    llm = LLM(str(tiny_model_dirs["llama"]), tokenizer=False, async_scheduling=True)
    engine = llm.engine
    greedy = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(_prompts(2, [8, 20, 30])):
        engine.add_request(f"r{i}", p, greedy)
    for _ in range(4):
        engine.step()
    assert engine.in_flight is not None
    engine.abort("r1")  # its row is in the step in flight: the result is dropped
    seen: dict[str, int] = {}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id != "r1"
            seen[o.request_id] = seen.get(o.request_id, 0) + len(o.new_token_ids)
    engine.check_integrity()
    assert engine.block_manager.num_used_blocks == 0
    assert set(seen) == {"r0", "r2"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_same_outputs_as_synchronous_on_gpu(tiny_model_dirs: dict[str, Path], eager: bool) -> None:
    """fp32 only: the two loops batch steps differently (a finished request's blocks and seat
    come back one step later when overlapped), and bf16 GEMMs are not batch-invariant."""
    kw = {"device": "cuda", "dtype": "float32", "enforce_eager": eager}
    kw["max_num_batched_tokens"] = 24
    for blocks in (256, 24):
        model_dir = tiny_model_dirs["llama"]
        assert _run(model_dir, True, num_blocks=blocks, **kw) == _run(
            model_dir, False, num_blocks=blocks, **kw
        )


def test_stop_strings_finish_the_same(tiny_chat_model_dir: Path) -> None:
    """A stop string is found when the outputs are processed, one step late: the request's
    row of the step in flight is dropped, and text, tokens and reason are the synchronous
    loop's."""
    prompts = ["Tell me a story", "List some colours", "Why is the sky"]
    free = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    sync = LLM(str(tiny_chat_model_dir), async_scheduling=False)
    texts = [r.outputs[0].text for r in sync.generate(prompts, free)]
    stops = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=(t[8:11],))
             for t in texts]  # fmt: skip
    want = sync.generate(prompts, stops)
    over = LLM(str(tiny_chat_model_dir), async_scheduling=True)
    got = over.generate(prompts, stops)
    key = [(o.text, tuple(o.token_ids), o.finish_reason, o.stop_reason)
           for r in want for o in r.outputs]  # fmt: skip
    assert [(o.text, tuple(o.token_ids), o.finish_reason, o.stop_reason)
            for r in got for o in r.outputs] == key  # fmt: skip
    assert all(o.finish_reason is FinishReason.STOP for r in got for o in r.outputs)
    assert over.engine.block_manager.num_used_blocks == 0


def test_decode_role_with_a_step_in_flight(tiny_model_dirs: dict[str, Path]) -> None:
    """Decode role, overlapped: a request is reserved and admitted while another one's step
    is in flight; both give the tokens of a single synchronous engine."""
    model_dir = str(tiny_model_dirs["llama"])
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    a, b = _prompts(9, [20, 37])
    single = LLM(model_dir, tokenizer=False, num_blocks=64)
    want = [r.outputs[0].token_ids for r in single.generate([a, b], params)]

    prefill = LLM(model_dir, tokenizer=False, num_blocks=64, async_scheduling=True)
    first_params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    prefill.engine.add_request("b", b, first_params, hold_kv_on_finish=True)
    outs = []
    while prefill.engine.has_unfinished():
        outs += prefill.engine.step()
    (out_b,) = outs

    decode = LLM(model_dir, tokenizer=False, num_blocks=64, async_scheduling=True)
    engine = decode.engine
    engine.add_request("a", a, params)
    tokens: dict[str, list[int]] = {"a": [], "b": []}
    for _ in range(3):
        for o in engine.step():
            tokens[o.request_id] += o.new_token_ids
    assert engine.in_flight is not None
    engine.reserve_kv("b", b, params)
    engine.runner.kv_cache.write_blocks(
        engine.scheduler.reserved["b"],
        prefill.engine.runner.kv_cache.read_blocks(list(out_b.held_block_ids)),
    )
    prefill.engine.release_kv("b")
    tokens["b"] += engine.first_token("b", out_b.new_token_ids[0]).new_token_ids
    engine.admit_prefilled("b")
    while engine.has_unfinished():
        for o in engine.step():
            tokens[o.request_id] += o.new_token_ids
    assert [tokens["a"], tokens["b"]] == want
    engine.check_integrity()
    assert engine.block_manager.num_used_blocks == 0
