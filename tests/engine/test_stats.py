"""StepStats: per-step token counts, batch size, preemptions, prefix-cache lookups and queue
times add up to what the requests cost, whatever the chunking, preemption or role."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.stats import StepStats


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


def _run(llm: LLM) -> list[StepStats]:
    stats = []
    while llm.engine.has_unfinished():
        llm.engine.step()
        assert llm.engine.last_step_stats is not None
        stats.append(llm.engine.last_step_stats)
    return stats


def _sum(stats: list[StepStats], name: str) -> int:
    return sum(getattr(s, name) for s in stats)


@pytest.mark.parametrize("budget", [2048, 16, 7])
def test_tokens_add_up_across_chunks(model_dir: Path, budget: int) -> None:
    llm = LLM(str(model_dir), tokenizer=False, num_blocks=64, max_num_batched_tokens=budget)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    llm.engine.add_request("a", _prompt(1, 40), params)
    llm.engine.add_request("b", _prompt(2, 21), params)
    stats = _run(llm)
    assert _sum(stats, "num_prefill_tokens") == 40 + 21
    assert _sum(stats, "num_decode_tokens") == 2 * (5 - 1)
    assert _sum(stats, "num_decode_rows") == 2 * (5 - 1)
    assert all(s.num_rows == s.num_prefill_rows + s.num_decode_rows for s in stats)
    assert all(s.duration_s > 0 for s in stats)
    assert _sum(stats, "num_prefix_query_tokens") == 61
    assert _sum(stats, "num_prefix_hit_tokens") == 0
    queue_times = [q for s in stats for q in s.queue_times_s]
    assert len(queue_times) == 2 and all(q >= 0 for q in queue_times)
    # an empty step says so
    assert llm.engine.step() == [] and llm.engine.last_step_stats is None


def test_prefix_hits_are_counted_once_per_request(model_dir: Path) -> None:
    llm = LLM(str(model_dir), tokenizer=False, num_blocks=64)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    prompt = _prompt(3, 40)
    llm.engine.add_request("first", prompt, params)
    _run(llm)
    llm.engine.add_request("again", prompt, params)
    stats = _run(llm)
    # the last prompt token always runs: (40 - 1) // 16 = 2 blocks hit
    assert _sum(stats, "num_prefix_query_tokens") == 40
    assert _sum(stats, "num_prefix_hit_tokens") == 32
    assert _sum(stats, "num_prefill_tokens") == 40 - 32


def test_preemption_counts_and_queue_time_once(model_dir: Path) -> None:
    # 6 blocks of 16 tokens: three 30-token prompts growing to 50 tokens cannot all fit
    llm = LLM(str(model_dir), tokenizer=False, num_blocks=6, max_model_len=64)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    for i in range(3):
        llm.engine.add_request(f"r{i}", _prompt(10 + i, 30), params)
    stats = _run(llm)
    preempted = _sum(stats, "num_preempted")
    assert preempted == llm.engine.scheduler.num_preemptions > 0
    assert sum(len(s.queue_times_s) for s in stats) == 3
    assert _sum(stats, "num_prefix_query_tokens") == 90
    # recompute after preemption is prefill work: more than the prompts alone
    assert _sum(stats, "num_prefill_tokens") > 90


def test_remote_prefilled_request_only_decodes(model_dir: Path) -> None:
    llm = LLM(str(model_dir), tokenizer=False, num_blocks=64)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompt = _prompt(4, 33)
    llm.engine.reserve_kv("r", prompt, params)
    llm.engine.first_token("r", 7)
    llm.engine.admit_prefilled("r")
    stats = _run(llm)
    assert _sum(stats, "num_prefill_tokens") == 0
    assert _sum(stats, "num_decode_tokens") == 6 - 1
    assert _sum(stats, "num_prefix_query_tokens") == 0
    assert all(not s.queue_times_s for s in stats)
