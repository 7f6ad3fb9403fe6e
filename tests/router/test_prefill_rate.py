"""router/prefill_rate.py and the registry's use of it: throughput from dispatch and
first-token times, with an explicit clock."""

from __future__ import annotations

import asyncio

import pytest

from router.config import Mode, Role, WorkerAddress
from router.policy import RouteCause, RouteDecision
from router.prefill_rate import PrefillMeter
from router.registry import WorkerRegistry


def test_unmeasured_until_a_prefill_completes() -> None:
    m = PrefillMeter(min_tokens=1)
    assert m.tokens_per_s() is None and m.progress_s(5.0) == 0.0
    m.started(1.0, 1000)
    assert m.tokens_per_s() is None and m.progress_s(1.5) == pytest.approx(0.5)
    m.completed(1.5, 1000)
    assert m.tokens_per_s() == pytest.approx(2000.0)
    assert m.progress_s(9.0) == 0.0  # idle: nothing of a queue to have worked on


def test_rate_is_tokens_over_busy_time_so_queueing_does_not_slow_it() -> None:
    # two prompts of 1,000 dispatched at once, done at 0.5 and 1.0 s: 2,000 tokens in 1 busy
    # second (the second one's TTFT of 1 s includes 0.5 s of waiting behind the first)
    m = PrefillMeter(min_tokens=1, memory=10**9)  # no decay: exact sums
    m.started(0.0, 1000)
    m.started(0.0, 1000)
    m.completed(0.5, 1000)
    assert m.progress_s(0.75) == pytest.approx(0.25)  # since the last completion
    m.completed(1.0, 1000)
    assert m.tokens_per_s() == pytest.approx(2000.0)
    # idle gaps are not busy time: 3,000 tokens in 1.5 busy seconds
    m.started(10.0, 1000)
    m.completed(10.5, 1000)
    assert m.tokens_per_s() == pytest.approx(2000.0)


def test_recent_prefills_weigh_more() -> None:
    m = PrefillMeter(min_tokens=1, memory=4)
    for i in range(40):  # 1,000 tok/s for a long while
        m.started(float(i), 1000)
        m.completed(i + 1.0, 1000)
    for i in range(40, 56):  # then 4,000 tok/s, for 4 memories
        m.started(float(i), 1000)
        m.completed(i + 0.25, 1000)
    rate = m.tokens_per_s()
    assert rate is not None and 3500.0 < rate <= 4000.0


def test_short_prefills_are_not_measured() -> None:
    """A 100-token prompt's time is overhead: it neither counts nor makes the worker busy."""
    m = PrefillMeter(min_tokens=1024)
    m.started(0.0, 100)
    m.completed(0.05, 100)
    assert m.tokens_per_s() is None
    m.started(1.0, 100)
    m.started(1.0, 2000)
    assert m.progress_s(1.5) == pytest.approx(0.5)
    m.completed(1.02, 100)
    m.completed(2.0, 2000)
    assert m.tokens_per_s() == pytest.approx(2000.0)


def test_an_aborted_prefill_charges_its_time_to_the_next_completion() -> None:
    m = PrefillMeter(min_tokens=1, memory=10**9)
    m.started(0.0, 1000)
    m.started(0.0, 1000)
    m.dropped(0.5, 1000)
    m.completed(1.0, 1000)
    assert m.tokens_per_s() == pytest.approx(1000.0)


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

    async def scenario() -> dict[str, tuple[float | None, float]]:
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
            snap = {s.worker_id: (s.prefill_tokens_per_s, s.prefill_progress_s)
                    for s in reg.snapshot()}  # fmt: skip
            reg.finish(queued)
            reg.finish(remote)
            reg.finish(local)
            return snap
        finally:
            await reg.stop()

    snap = asyncio.run(scenario())
    assert snap["d0"][0] == pytest.approx(20_000.0) and snap["d0"][1] == 0.0
    assert snap["p0"][0] == pytest.approx(10_000.0) and snap["p0"][1] == pytest.approx(0.1)
