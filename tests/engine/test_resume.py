"""A migrated request (Engine.add_request with resume_output_token_ids) goes on exactly as the
uninterrupted one: the same tokens (greedy, and seeded with penalties), the same text deltas
(stop strings held back across the cut), the same finish; and bad resumptions are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.engine import Engine
from engine.outputs import RequestOutput

PROMPT = [100 + (13 * i) % 4000 for i in range(37)]
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(
    max_tokens=20, temperature=1.0, top_p=0.9, seed=99, frequency_penalty=0.5,
    repetition_penalty=1.2, ignore_eos=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def engine(tiny_chat_model_dir: Path) -> Engine:
    return LLM(str(tiny_chat_model_dir), num_blocks=128, max_model_len=256).engine


def run(
    engine: Engine, rid: str, params: SamplingParams, resume: tuple[int, ...] = ()
) -> list[RequestOutput]:
    engine.add_request(rid, PROMPT, params, resume_output_token_ids=resume)
    outs: list[RequestOutput] = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == rid]
    engine.check_integrity()
    assert engine.block_manager.num_used_blocks == 0
    return outs


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("cut", [1, 7, 19])
def test_resumed_request_continues_exactly(
    engine: Engine, params: SamplingParams, cut: int
) -> None:
    full = run(engine, f"full-{cut}", params)
    tokens = [o.new_token_ids[0] for o in full]
    assert len(tokens) == params.max_tokens
    rest = run(engine, f"rest-{cut}", params, tuple(tokens[:cut]))
    assert [o.new_token_ids[0] for o in rest] == tokens[cut:]
    assert [o.text_delta for o in rest] == [o.text_delta for o in full[cut:]]
    assert rest[-1].finish_reason == full[-1].finish_reason


def test_a_stop_string_spanning_the_cut_is_still_found(engine: Engine) -> None:
    full = run(engine, "s-full", GREEDY)
    text = "".join(o.text_delta for o in full)
    stop = text[len(text) // 2 : len(text) // 2 + 4]  # somewhere in the middle
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=[stop])
    ref = run(engine, "s-ref", params)
    assert ref[-1].stop_reason == stop
    tokens = [o.new_token_ids[0] for o in ref]
    for cut in range(1, len(tokens)):
        rest = run(engine, f"s-{cut}", params, tuple(tokens[:cut]))
        assert [o.text_delta for o in rest] == [o.text_delta for o in ref[cut:]]
        assert rest[-1].stop_reason == stop


def test_bad_resumptions_are_refused(engine: Engine) -> None:
    with pytest.raises(ValueError, match="no room"):
        engine.add_request("b1", PROMPT, GREEDY, resume_output_token_ids=[5] * 20)
    with pytest.raises(ValueError, match=r"in \[0,"):
        engine.add_request("b2", PROMPT, GREEDY, resume_output_token_ids=[10**9])
    stops = SamplingParams(max_tokens=20, temperature=0.0)
    eos = next(iter(engine.eos_token_ids))
    with pytest.raises(ValueError, match="stop token"):
        engine.add_request("b3", PROMPT, stops, resume_output_token_ids=[5, eos])
    assert not engine.has_unfinished() and not engine.streams
