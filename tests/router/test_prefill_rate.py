"""router/prefill_rate.py and the registry's use of it: throughput from dispatch and
first-token times, with an explicit clock."""

from __future__ import annotations

import asyncio

import pytest

from router.config import Mode, Role, WorkerAddress
from router.policy import RouteCause, RouteDecision
from router.prefill_rate import PrefillCost, PrefillMeter
from router.registry import WorkerRegistry


def test_unmeasured_until_a_prefill_completes() -> None:
    m = PrefillMeter()
    assert m.cost() is None and m.progress_s(5.0) == 0.0
    m.started(1.0)
    assert m.cost() is None and m.progress_s(1.5) == pytest.approx(0.5)
    m.completed(1.5, 1000)
    assert rate(m) == pytest.approx(2000.0)
    assert m.progress_s(9.0) == 0.0  # idle: nothing of a queue to have worked on


def test_rate_is_tokens_over_busy_time_so_queueing_does_not_slow_it() -> None:
    # two prompts of 1,000 dispatched at once, done at 0.5 and 1.0 s: 2,000 tokens in 1 busy
    # second (the second one's TTFT of 1 s includes 0.5 s of waiting behind the first)
    m = PrefillMeter(memory=10**9)  # no decay: exact sums
    m.started(0.0)
    m.started(0.0)
    m.completed(0.5, 1000)
    assert m.progress_s(0.75) == pytest.approx(0.25)  # since the last completion
    m.completed(1.0, 1000)
    assert rate(m) == pytest.approx(2000.0)
    # idle gaps are not busy time: 3,000 tokens in 1.5 busy seconds
    m.started(10.0)
    m.completed(10.5, 1000)
    assert rate(m) == pytest.approx(2000.0)


def test_recent_prefills_weigh_more() -> None:
    m = PrefillMeter(memory=4)
    for i in range(40):  # 1,000 tok/s for a long while
        m.started(float(i))
        m.completed(i + 1.0, 1000)
    for i in range(40, 56):  # then 4,000 tok/s, for 4 memories
        m.started(float(i))
        m.completed(i + 0.25, 1000)
    assert 3500.0 < rate(m) <= 4000.0


def rate(m: PrefillMeter) -> float:
    cost = m.cost()
    assert cost is not None
    return cost.tokens_per_s


def test_per_prompt_overhead_is_fitted_from_prompts_of_several_lengths() -> None:
    """10 ms per prompt + 10,000 tok/s, one prompt at a time: 100 tokens take 20 ms, 1,000
    take 110 ms. The fit recovers both terms, so a long prompt is not priced at the short
    ones' rate (1,000 tok/s would put 3,000 tokens at 3 s instead of 0.31)."""
    m = PrefillMeter(memory=10**9)
    now = 0.0
    for tokens in [100, 1000, 300, 100, 2000, 100]:
        m.started(now)
        now += 0.01 + tokens / 10_000
        m.completed(now, tokens)
        now += 1.0  # idle between prompts
    cost = m.cost()
    assert cost is not None
    assert cost.per_prompt_s == pytest.approx(0.01) and cost.tokens_per_s == pytest.approx(1e4)
    assert cost.seconds(1, 3000) == pytest.approx(0.31)
    assert str(cost) == "10000 tok/s + 10.0 ms/prompt"


def test_one_prompt_length_is_a_plain_rate() -> None:
    m = PrefillMeter(memory=10**9)
    for i in range(4):
        m.started(float(i))
        m.completed(i + 0.5, 3000)
    cost = m.cost()
    assert cost is not None and cost.per_prompt_s == 0.0
    assert cost.tokens_per_s == pytest.approx(6000.0) and str(cost) == "6000 tok/s"


def test_an_unphysical_fit_falls_back_to_the_plain_rate() -> None:
    # longer prompts came back sooner (noise, batching): no negative per-token time
    m = PrefillMeter(memory=10**9)
    for i, (tokens, secs) in enumerate([(100, 0.5), (2000, 0.1), (100, 0.4), (2000, 0.2)]):
        m.started(float(i))
        m.completed(i + secs, tokens)
    cost = m.cost()
    assert cost is not None and cost.per_prompt_s == 0.0
    assert cost.tokens_per_s == pytest.approx(4200 / 1.2)


def test_an_aborted_prefill_charges_its_time_to_the_next_completion() -> None:
    m = PrefillMeter(memory=10**9)
    m.started(0.0)
    m.started(0.0)
    m.dropped(0.5)
    m.completed(1.0, 1000)
    assert rate(m) == pytest.approx(1000.0)


def test_registry_measures_the_prefiller_of_each_ticket() -> None:
    """Remote prefills are charged to the prefill worker, local ones to the decode worker;
    the snapshot carries each one's rate and progress for the policy."""
    now = [0.0]

    def decision(prefill: str | None, tokens: int) -> RouteDecision:
        return RouteDecision(
            mode=Mode.AUTO, decode_worker_id="d0", decode_address="127.0.0.1:1",
            prefill_worker_id=prefill, prefill_address="127.0.0.1:2" if prefill else None,
            overlap_blocks=0, uncached_tokens=tokens, reason="test", cause=RouteCause.DISAGG,
        )  # fmt: skip

    async def scenario() -> dict[str, tuple[PrefillCost | None, float]]:
        reg = WorkerRegistry(
            [WorkerAddress("d0", "127.0.0.1:1", Role.DECODE),
             WorkerAddress("p0", "127.0.0.1:2", Role.PREFILL)],
            rpc_timeout_s=1, load_interval_s=60, health_interval_s=60, clock=lambda: now[0],
        )  # fmt: skip
        reg.start()  # nothing listens there: the polls fail, the accounting does not care
        try:
            remote = reg.begin("r1", decision("p0", 3000), 3000)
            local = reg.begin("r2", decision(None, 2000), 2000)
            now[0] = 0.1
            reg.add_tokens(local, 1)  # d0: 2,000 tokens in 0.1 s
            now[0] = 0.3
            reg.add_tokens(remote, 1)  # p0: 3,000 tokens in 0.3 s
            reg.add_tokens(remote, 1)  # later tokens do not count again
            queued = reg.begin("r3", decision("p0", 3000), 3000)
            now[0] = 0.4
            snap = {s.worker_id: (s.prefill_cost, s.prefill_progress_s)
                    for s in reg.snapshot()}  # fmt: skip
            reg.finish(queued)
            reg.finish(remote)
            reg.finish(local)
            return snap
        finally:
            await reg.stop()

    snap = asyncio.run(scenario())
    d0, p0 = snap["d0"][0], snap["p0"][0]
    assert d0 is not None and p0 is not None
    assert (d0.tokens_per_s, d0.per_prompt_s) == (pytest.approx(20_000.0), 0.0)
    assert snap["d0"][1] == 0.0
    assert (p0.tokens_per_s, p0.per_prompt_s) == (pytest.approx(10_000.0), 0.0)
    assert snap["p0"][1] == pytest.approx(0.1)


def test_a_model_covers_only_prompts_like_those_it_was_fitted_on() -> None:
    """Two short prefills are too few to judge any prompt by; many ~128-token ones judge
    prompts up to 4x their length, not an 8,000-token one (their time is mostly per-prompt)."""
    m = PrefillMeter()
    now = 0.0
    for i in range(8):
        m.started(now)
        now += 0.025
        m.completed(now, 128)
        if i == 1:
            two = m.cost()
            assert two is not None and two.prompts == pytest.approx(2.0, rel=0.05)
            assert not two.covers(128)
        now += 1.0
    cost = m.cost()
    assert cost is not None and cost.mean_tokens == pytest.approx(128)
    assert cost.covers(128) and cost.covers(512) and not cost.covers(8000)
