"""router/policy.py: pure routing decisions over literal snapshots."""

from __future__ import annotations

import dataclasses

import pytest

from router.config import Mode, PolicyConfig, Role
from router.policy import (
    RouteCause,
    RouteRequest,
    Unroutable,
    WorkerSnapshot,
    prefill_time_s,
    prefix_overlap,
    route,
    uncached_tokens,
)
from router.prefill_rate import PrefillCost

CFG = PolicyConfig(prefill_weight=1.0, local_prefill_max_tokens=64, prefill_budget_s=0.5)


def _cost(tokens_per_s: float, per_prompt_s: float) -> PrefillCost:
    """A model fitted on many prompts of every length the tests ask about."""
    return PrefillCost(tokens_per_s, per_prompt_s, prompts=32.0, mean_tokens=1e6)


def decode(worker_id: str, **kw: object) -> WorkerSnapshot:
    base = WorkerSnapshot(
        worker_id=worker_id, address=f"{worker_id}:1", role=Role.DECODE, healthy=True,
        block_size=16, max_model_len=4096, num_blocks_total=1000, num_blocks_free=1000,
    )  # fmt: skip
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def prefill(worker_id: str, **kw: object) -> WorkerSnapshot:
    return dataclasses.replace(decode(worker_id), role=Role.PREFILL, **kw)  # type: ignore[arg-type]


def req(num_tokens: int, seq: int = 0, **overlap: int) -> RouteRequest:
    return RouteRequest(num_tokens, overlap, seq)


def test_uncached_tokens_always_computes_the_last_prompt_token() -> None:
    assert uncached_tokens(100, 0, 16) == 100
    assert uncached_tokens(100, 3, 16) == 52
    assert uncached_tokens(64, 4, 16) == 1  # fully cached: the last token still runs
    assert uncached_tokens(1, 0, 16) == 1


def test_prefix_overlap_stops_at_the_first_miss() -> None:
    assert prefix_overlap([1, 2, 3, 4], {1, 2, 4}) == 2
    assert prefix_overlap([1, 2, 3], set()) == 0
    assert prefix_overlap([], {1}) == 0
    assert prefix_overlap([5, 1], {1}) == 0


def test_no_healthy_decode_worker_is_unroutable() -> None:
    with pytest.raises(Unroutable, match="no healthy decode worker"):
        route(req(10), [decode("d0", healthy=False), prefill("p0")], Mode.AUTO, CFG)
    with pytest.raises(Unroutable):
        route(req(10), [], Mode.COLLOCATED, CFG)


def test_prompt_longer_than_a_workers_context_skips_it() -> None:
    workers = [decode("d0", max_model_len=100), decode("d1", num_blocks_free=10)]
    assert route(req(200), workers, Mode.COLLOCATED, CFG).decode_worker_id == "d1"
    with pytest.raises(Unroutable):
        route(req(200), [decode("d0", max_model_len=200)], Mode.COLLOCATED, CFG)


def test_disagg_needs_a_prefill_worker_and_never_falls_back_silently() -> None:
    with pytest.raises(Unroutable, match="disagg"):
        route(req(10), [decode("d0"), prefill("p0", healthy=False)], Mode.DISAGG, CFG)


def test_disagg_picks_prefill_by_overlap_and_decode_by_load() -> None:
    workers = [
        decode("d0", inflight_kv_blocks=50),
        decode("d1", inflight_kv_blocks=10),
        prefill("p0"),
        prefill("p1"),
    ]
    d = route(req(320, p1=15, d0=20), workers, Mode.DISAGG, CFG)
    assert (d.decode_worker_id, d.prefill_worker_id) == ("d1", "p1")
    assert d.prefill_address == "p1:1"
    assert d.overlap_blocks == 15
    assert d.uncached_tokens == 320 - 15 * 16
    assert d.remote_prefill and d.cause is RouteCause.DISAGG
    header = d.header_value()
    assert "mode=disagg" in header and "decode=d1" in header and "prefill=p1" in header
    assert "overlap_blocks=15" in header and "p0=" in header  # the loser's cost is explained


def test_prefill_cost_is_dynamo_like_queued_plus_uncached() -> None:
    # p0 holds 10 of the 20 blocks but has 400 uncached tokens queued; p1 holds none, idle.
    # p0: (400 + 160) / 16 = 35 blocks; p1: 320 / 16 = 20 blocks -> p1
    workers = [decode("d0"), prefill("p0", inflight_prefill_tokens=400), prefill("p1")]
    d = route(req(320, p0=10), workers, Mode.DISAGG, CFG)
    assert d.prefill_worker_id == "p1"
    assert "p1 cost=20" in d.reason and "p0=35" in d.reason
    # with less queued on p0 the overlap wins: (100 + 160) / 16 = 16.25 < 20
    workers[1] = prefill("p0", inflight_prefill_tokens=100)
    assert route(req(320, p0=10), workers, Mode.DISAGG, CFG).prefill_worker_id == "p0"


def test_decode_load_is_the_larger_of_report_and_own_count() -> None:
    # d0 reports 900 blocks used; d1 reports none but the router has 300 in flight there
    workers = [decode("d0", num_blocks_free=100), decode("d1", inflight_kv_blocks=300)]
    assert workers[0].held_blocks == 900 and workers[1].held_blocks == 300
    assert route(req(16), workers, Mode.COLLOCATED, CFG).decode_worker_id == "d1"


def test_workers_without_free_blocks_for_the_prompt_are_a_last_resort() -> None:
    workers = [decode("d0", num_blocks_free=1), decode("d1", inflight_kv_blocks=500)]
    d = route(req(64), workers, Mode.COLLOCATED, CFG)
    assert d.decode_worker_id == "d1"  # d0 is cheaper but cannot hold 64 tokens in 1 block
    only = route(req(64), [decode("d0", num_blocks_free=1)], Mode.COLLOCATED, CFG)
    assert only.decode_worker_id == "d0" and "none has free blocks" in only.reason


def test_exact_ties_rotate_with_the_request_sequence() -> None:
    workers = [decode("d0"), decode("d1"), decode("d2")]
    chosen = [
        route(req(32, seq=s), workers, Mode.COLLOCATED, CFG).decode_worker_id for s in range(6)
    ]
    assert chosen == ["d0", "d1", "d2", "d0", "d1", "d2"]


def test_collocated_prefers_the_decode_worker_holding_the_prefix() -> None:
    workers = [decode("d0"), decode("d1"), prefill("p0")]
    d = route(req(640, d1=30), workers, Mode.COLLOCATED, CFG)
    assert d.decode_worker_id == "d1" and not d.remote_prefill
    assert d.overlap_blocks == 30 and d.uncached_tokens == 640 - 480
    assert d.header_value().startswith("mode=collocated; decode=d1; prefill=local;")
    assert d.cause is RouteCause.COLLOCATED


def test_auto_prefills_short_uncached_prompts_locally() -> None:
    workers = [decode("d0"), prefill("p0")]
    short = route(req(60), workers, Mode.AUTO, CFG)
    assert not short.remote_prefill and "uncached 60 <= 64 tokens, d0 idle" in short.reason
    assert short.cause is RouteCause.FEW_UNCACHED
    # long, but the decode worker caches all but 40 tokens of it: still local
    cached = route(req(1000, d0=60), workers, Mode.AUTO, CFG)
    assert not cached.remote_prefill and cached.uncached_tokens == 40


def test_auto_sends_short_prompts_remote_while_the_decode_worker_runs_requests() -> None:
    # A local prefill would stretch a step of the 3 running requests; the prefill worker is idle.
    workers = [decode("d0", num_inflight=3), prefill("p0", prefill_cost=_cost(1e4, 0.0))]
    d = route(req(60), workers, Mode.AUTO, CFG)
    assert d.prefill_worker_id == "p0" and d.cause is RouteCause.DECODE_BUSY
    assert "uncached 60 <= 64 tokens, d0 runs 3 requests; p0 idle" in d.reason
    # within budget: still remote
    p0 = prefill("p0", inflight_prefill_tokens=1000, prefill_cost=_cost(1e4, 0.0))
    d = route(req(60), [workers[0], p0], Mode.AUTO, CFG)
    assert d.remote_prefill and d.cause is RouteCause.DECODE_BUSY
    # prefill worker over budget and the decode worker sooner: local after all
    slow = prefill("p0", inflight_prefill_tokens=10_000, prefill_cost=_cost(1e4, 0.0))
    d = route(req(60), [workers[0], slow], Mode.AUTO, CFG)
    assert not d.remote_prefill and d.cause is RouteCause.PREFILL_SATURATED
    # no prefill worker: local
    d = route(req(60), [workers[0]], Mode.AUTO, CFG)
    assert not d.remote_prefill and d.cause is RouteCause.NO_PREFILL_WORKER


def test_auto_sends_long_uncached_prompts_to_the_prefill_pool() -> None:
    workers = [decode("d0"), prefill("p0"), prefill("p1")]
    d = route(req(1000, p1=10), workers, Mode.AUTO, CFG)
    assert d.prefill_worker_id == "p1" and "uncached 1000 > 64" in d.reason
    assert d.cause is RouteCause.MANY_UNCACHED
    assert d.uncached_tokens == 1000 - 160


def test_prefill_time_counts_the_queue_less_the_work_already_done() -> None:
    # 10,000 tokens queued at 10,000 tok/s, 0.25 s of them done: 0.75 s, then 1,000 more: 0.1 s
    w = prefill("p0", inflight_prefill_tokens=10_000, prefill_progress_s=0.25)
    assert prefill_time_s(w, 1000, _cost(10_000.0, 0.0)) == pytest.approx(0.85)
    # progress beyond the estimate does not make the queue negative
    late = prefill("p0", inflight_prefill_tokens=1000, prefill_progress_s=5.0)
    assert prefill_time_s(late, 1000, _cost(10_000.0, 0.0)) == pytest.approx(0.1)
    # with 10 ms per prompt: 2 queued prompts add 20 ms, this one 10 ms
    two = prefill("p0", num_prefilling=2, inflight_prefill_tokens=10_000, prefill_progress_s=0.25)
    assert prefill_time_s(two, 1000, _cost(10_000.0, 0.01)) == pytest.approx(0.88)


def test_auto_stays_remote_while_the_prefill_estimate_fits_the_budget() -> None:
    # 3,000 tokens queued + 1,000 at 10,000 tok/s = 0.4 s <= 0.5 s: remote, even with an idle
    # decode worker that would be sooner (chunks stay out of the decode batch)
    workers = [
        decode("d0"),
        prefill("p0", inflight_prefill_tokens=3000, prefill_cost=_cost(1e4, 0.0)),
    ]
    d = route(req(1000), workers, Mode.AUTO, CFG)
    assert d.remote_prefill and d.cause is RouteCause.MANY_UNCACHED
    assert "p0 est 0.400 s at 10000 tok/s <= 0.5 s" in d.reason


def test_auto_spills_a_prompt_to_the_decode_worker_past_the_budget_in_time() -> None:
    # The same 5,000 queued tokens are 0.25 s on a fast prefill worker (remote) and 0.5 s on a
    # slow one (local): the rule is in seconds of measured work, not in tokens.
    fast = [
        decode("d0"),
        prefill("p0", inflight_prefill_tokens=5000, prefill_cost=_cost(2e4, 0.0)),
    ]
    assert route(req(1000), fast, Mode.AUTO, CFG).remote_prefill
    slow = [
        decode("d0"),
        prefill("p0", inflight_prefill_tokens=5000, prefill_cost=_cost(1e4, 0.0)),
    ]
    d = route(req(1000), slow, Mode.AUTO, CFG)
    assert not d.remote_prefill and d.cause is RouteCause.PREFILL_SATURATED
    # the decode worker never prefilled: assumed as fast as p0, idle: 0.1 s < 0.6 s
    assert "p0 est 0.600 s at 10000 tok/s > 0.5 s" in d.reason
    assert "local est 0.100 s at 10000 tok/s (assumed p0's)" in d.reason
    assert d.header_value().startswith("mode=auto; decode=d0; prefill=local;")
    assert "reason=prefill pool saturated:" in d.header_value()


def test_auto_keeps_a_prompt_remote_when_local_would_not_be_sooner() -> None:
    # p0: 0.6 s; d0 measured at 4,000 tok/s with 1,000 tokens of its own queued: 0.5 s -> local;
    # with 2,000 queued: 0.75 s -> remote after all
    p0 = prefill("p0", inflight_prefill_tokens=5000, prefill_cost=_cost(1e4, 0.0))
    busy = decode("d0", inflight_prefill_tokens=1000, prefill_cost=_cost(4000.0, 0.0))
    d = route(req(1000), [busy, p0], Mode.AUTO, CFG)
    assert not d.remote_prefill and "local est 0.500 s at 4000 tok/s (measured)" in d.reason
    busier = dataclasses.replace(busy, inflight_prefill_tokens=2000)
    d = route(req(1000), [busier, p0], Mode.AUTO, CFG)
    assert d.remote_prefill and d.cause is RouteCause.LOCAL_NOT_SOONER
    assert d.prefill_worker_id == "p0" and "local est 0.750 s" in d.reason


def test_auto_local_estimate_counts_only_the_uncached_part_on_each_side() -> None:
    # 1,600 tokens; d0 caches 60 blocks (960), p0 none. p0: 0.6 + 0.16 s; d0: 640 / 1e4 s
    workers = [
        decode("d0"),
        prefill("p0", inflight_prefill_tokens=6000, prefill_cost=_cost(1e4, 0.0)),
    ]
    d = route(req(1600, d0=60), workers, Mode.AUTO, CFG)
    assert not d.remote_prefill and d.uncached_tokens == 640
    assert "p0 est 0.760 s" in d.reason and "local est 0.064 s" in d.reason


def test_auto_judges_a_long_prompt_by_the_prefill_workers_model_when_its_own_is_short() -> None:
    # d0's model: 2 prefills of ~128 tokens (1,000 tok/s: mostly its step time per prompt),
    # which does not cover 3,000 tokens: d0 is assumed p0's 30,000 tok/s (0.1 s) against p0's
    # queue (0.5 + 0.1 s, over the 0.5 s budget) -> local. A model fitted on long prompts is
    # its own: 3 s, not sooner -> remote.
    p0 = prefill("p0", inflight_prefill_tokens=15_000, prefill_cost=_cost(3e4, 0.0))
    short = PrefillCost(1000.0, 0.0, prompts=2.0, mean_tokens=128.0)
    d = route(req(3000), [decode("d0", prefill_cost=short), p0], Mode.AUTO, CFG)
    assert not d.remote_prefill and d.cause is RouteCause.PREFILL_SATURATED
    assert "local est 0.100 s at 30000 tok/s (assumed p0's)" in d.reason
    long = PrefillCost(1000.0, 0.0, prompts=32.0, mean_tokens=3000.0)
    d = route(req(3000), [decode("d0", prefill_cost=long), p0], Mode.AUTO, CFG)
    assert d.remote_prefill and d.cause is RouteCause.LOCAL_NOT_SOONER
    assert "local est 3.000 s at 1000 tok/s (measured)" in d.reason


def test_auto_never_bypasses_an_idle_prefill_worker() -> None:
    # measured slow (1,000 tok/s: 1 s for this prompt, over budget) but idle: remote, which is
    # how its rate is measured again; the decode batch pays nothing for it
    workers = [
        decode("d0", prefill_cost=_cost(1e5, 0.0)),
        prefill("p0", prefill_cost=_cost(1e3, 0.0)),
    ]
    d = route(req(1000), workers, Mode.AUTO, CFG)
    assert d.remote_prefill and d.cause is RouteCause.MANY_UNCACHED and "p0 idle" in d.reason


def test_auto_sends_remote_before_the_prefill_rate_is_measured() -> None:
    workers = [decode("d0"), prefill("p0", inflight_prefill_tokens=10**6)]
    d = route(req(1000), workers, Mode.AUTO, CFG)
    assert d.remote_prefill and d.cause is RouteCause.MANY_UNCACHED
    assert "p0 prefill rate not measured yet" in d.reason


def test_auto_prefills_locally_when_no_prefill_worker_is_healthy() -> None:
    absent = route(req(1000), [decode("d0"), prefill("p0", healthy=False)], Mode.AUTO, CFG)
    assert not absent.remote_prefill and "no healthy prefill worker" in absent.reason
    assert absent.cause is RouteCause.NO_PREFILL_WORKER


def test_policy_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        PolicyConfig(prefill_weight=-1)
    with pytest.raises(ValueError):
        PolicyConfig(local_prefill_max_tokens=-1)
    with pytest.raises(ValueError):
        PolicyConfig(prefill_budget_s=0)


def test_worker_specs_parse_and_validate() -> None:
    from router.config import WorkerAddress, parse_workers

    assert parse_workers("d0=127.0.0.1:5, d1=localhost:6", Role.DECODE) == (
        WorkerAddress("d0", "127.0.0.1:5", Role.DECODE),
        WorkerAddress("d1", "localhost:6", Role.DECODE),
    )
    assert parse_workers("", Role.PREFILL) == ()
    for bad in ("d0", "d0=host", "=h:1", "d0=h:x", "dé=h:1", "d 0=h:1"):
        with pytest.raises(ValueError):
            parse_workers(bad, Role.DECODE)
