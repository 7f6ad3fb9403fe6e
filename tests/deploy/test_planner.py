"""The planner: decide() on a load ramp with a synthetic capacity model (pure), the budget as
an invariant, metrics parsing against the router's real metric names, and one loop test."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from deploy.planner import (
    Action,
    Observation,
    PlannerConfig,
    PlannerLoop,
    PlannerMetrics,
    PlannerState,
    RouterCounters,
    decide,
)
from deploy.reconcile import Target
from router.admission import Admission
from router.config import RouterConfig
from router.metrics import RouterMetrics
from router.registry import WorkerRegistry

PREFILL_RPS = 2.0  # per worker, in the synthetic model
DECODE_RPS = 1.0


@dataclass(frozen=True)
class Sizing:
    num_prefill: int
    num_decode: int
    reason: str


def synthetic(rate_rps: float, isl: float, osl: float, max_workers: int) -> Sizing:
    """A capacity model that ignores the budget: decide() must enforce it."""
    p = max(1, math.ceil(rate_rps / PREFILL_RPS - 1e-9))
    d = max(1, math.ceil(rate_rps / DECODE_RPS - 1e-9))
    return Sizing(p, d, f"{rate_rps} rps -> {p}P {d}D")


def obs(rate: float, ttft: float | None = 0.1, itl: float | None = 0.01) -> Observation:
    return Observation(window_s=10, rate_rps=rate, isl=200, osl=50, ttft_s=ttft, itl_s=itl)


CONFIG = PlannerConfig(slo_ttft_s=0.5, slo_itl_s=0.05, gpu_budget=8, scale_down_after=3)


def run(rates: list[float], start: Target, config: PlannerConfig = CONFIG) -> list[Target]:
    state, current, sizes = PlannerState(), start, []
    for rate in rates:
        decision = decide(obs(rate), current, state, config, synthetic)
        state, current = decision.state, decision.target
        sizes.append(current)
        assert decision.gpus <= config.gpu_budget
    return sizes


def test_a_ramp_scales_the_pool_that_needs_it_in_the_same_interval() -> None:
    sizes = run([0.5, 1.5, 3.5, 5.0], Target(1, 1))
    assert sizes[0] == Target(1, 1)
    assert sizes[1] == Target(1, 2)  # decode-bound load: only decode grows
    assert sizes[2] == Target(2, 4)
    assert sizes[3] == Target(3, 5)  # 8 GPUs: the whole budget


def test_beyond_the_budget_the_growing_pools_are_cut_to_fit() -> None:
    decision = decide(obs(20.0), Target(3, 5), PlannerState(), CONFIG, synthetic)
    assert decision.gpus <= 8
    assert decision.prefill.size + decision.decode.size == 8
    assert "to fit 8 GPUs" in decision.explain()


def test_scale_down_waits_for_n_intervals_below_then_takes_the_window_max() -> None:
    sizes = run([5.0, 2.0, 0.5, 3.0, 1.0, 1.0, 0.5, 0.5], Target(1, 1))
    assert sizes[0] == Target(3, 5)
    assert sizes[1:3] == [Target(3, 5)] * 2  # held: fewer wanted for 1, then 2 intervals
    # third interval below: down to the largest of the last three recommendations
    # (prefill 1, 1, 2; decode 2, 1, 3), not to the last one alone
    assert sizes[3] == Target(2, 3)
    assert sizes[4:6] == [Target(2, 3)] * 2
    assert sizes[6:] == [Target(1, 1)] * 2


def test_hold_reasons_count_the_intervals() -> None:
    state = PlannerState()
    d1 = decide(obs(0.5), Target(3, 5), state, CONFIG, synthetic)
    assert d1.decode.action is Action.HOLD and d1.target == Target(3, 5)
    assert "1/3 intervals below" in d1.decode.reason
    d2 = decide(obs(0.5), Target(3, 5), d1.state, CONFIG, synthetic)
    d3 = decide(obs(0.5), Target(3, 5), d2.state, CONFIG, synthetic)
    assert "2/3" in d2.decode.reason
    assert d3.decode.action is Action.DOWN and d3.target == Target(1, 1)


def test_a_held_pool_gives_way_to_the_budget() -> None:
    config = PlannerConfig(slo_ttft_s=0.5, slo_itl_s=0.05, gpu_budget=6, scale_down_after=3)

    # prefill was sized for more load; now the same rate needs decode (not prefill) capacity
    def skewed(rate: float, isl: float, osl: float, max_workers: int) -> Sizing:
        return Sizing(1, 5, "decode-heavy")

    decision = decide(obs(5.0), Target(3, 3), PlannerState(), config, skewed)
    assert decision.target == Target(1, 5)
    assert decision.prefill.action is Action.DOWN
    assert "released early" in decision.prefill.reason


def test_an_slo_miss_adds_a_worker_to_the_pool_that_misses() -> None:
    slow_ttft = decide(obs(0.5, ttft=0.9), Target(1, 1), PlannerState(), CONFIG, synthetic)
    assert slow_ttft.target == Target(2, 1)
    assert "TTFT 900 ms > SLO 500 ms" in slow_ttft.prefill.reason
    slow_itl = decide(obs(0.5, itl=0.2), Target(1, 1), PlannerState(), CONFIG, synthetic)
    assert slow_itl.target == Target(1, 2)


def test_no_traffic_keeps_the_last_isl_osl_and_shrinks_after_the_window() -> None:
    idle = Observation(window_s=10, rate_rps=0, isl=0, osl=0, ttft_s=None, itl_s=None)
    state = PlannerState(isl=300, osl=80)
    decision = decide(idle, Target(2, 2), state, CONFIG, synthetic)
    assert (decision.state.isl, decision.state.osl) == (300, 80)
    assert decision.target == Target(2, 2)  # held


def test_config_refuses_a_budget_below_the_minimum_pools() -> None:
    with pytest.raises(ValueError, match="gpu_budget"):
        PlannerConfig(slo_ttft_s=1, slo_itl_s=1, gpu_budget=3, gpus_per_prefill=2,
                      gpus_per_decode=2)  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    rates=st.lists(st.floats(min_value=0, max_value=50), min_size=1, max_size=12),
    budget=st.integers(min_value=2, max_value=12),
    gpus_p=st.integers(min_value=1, max_value=2),
    start=st.tuples(st.integers(1, 6), st.integers(1, 6)),
)
def test_never_beyond_the_budget(
    rates: list[float], budget: int, gpus_p: int, start: tuple[int, int]
) -> None:
    if budget < gpus_p + 1:
        return
    config = PlannerConfig(slo_ttft_s=0.5, slo_itl_s=0.05, gpu_budget=budget,
                           gpus_per_prefill=gpus_p)  # fmt: skip
    state, current = PlannerState(), Target(*start)
    for rate in rates:
        decision = decide(obs(rate, ttft=0.9), current, state, config, synthetic)
        assert config.gpus(decision.prefill.size, decision.decode.size) <= budget
        assert decision.prefill.size >= 1 and decision.decode.size >= 1
        state, current = decision.state, decision.target


# ---------------------------------------------------------------- metrics and the loop


def router_metrics() -> RouterMetrics:
    registry = WorkerRegistry([], rpc_timeout_s=1, load_interval_s=1, health_interval_s=1)
    config = RouterConfig(Path("tiny"), "tiny", decode_workers=())
    return RouterMetrics(registry, config, Admission(config.admission))


def finish(m: RouterMetrics, n: int, isl: int, cached: int, osl: int, ttft: float) -> None:
    """What the router records for n finished choices (router/serving.py)."""
    for _ in range(n):
        m.prompt_tokens.inc(isl)
        m.cached_prompt_tokens.inc(cached)
        m.request_prompt_tokens.observe(isl)
        m.request_generation_tokens.observe(osl)
        m.generation_tokens.inc(osl)
        m.ttft_s.observe(ttft)
        for _ in range(osl - 1):
            m.itl_s.observe(0.02)


def test_observation_from_the_routers_real_metrics() -> None:
    m = router_metrics()
    before = RouterCounters.parse(generate_latest(m.registry).decode())
    finish(m, 20, isl=300, cached=100, osl=40, ttft=0.25)
    after = RouterCounters.parse(generate_latest(m.registry).decode())
    o = Observation.from_metrics(before, after, window_s=10)
    assert o.rate_rps == pytest.approx(2.0)
    assert o.isl == pytest.approx(200)  # uncached
    assert o.osl == pytest.approx(40)
    assert o.ttft_s == pytest.approx(0.25)
    assert o.itl_s == pytest.approx(0.02)
    with pytest.raises(ValueError, match="lacks"):
        RouterCounters.parse("# nothing here\n")


class FakeScaler:
    def __init__(self, metrics: RouterMetrics, target: Target) -> None:
        self.metrics, self.target, self.calls = metrics, target, []

    def metrics_text(self) -> str:
        return generate_latest(self.metrics.registry).decode()

    def current_target(self) -> Target:
        return self.target

    def set_scale(self, prefill: int, decode: int, reason: str = "") -> object:
        self.calls.append((prefill, decode))
        self.target = Target(prefill, decode)
        return None


@pytest.mark.parametrize("dry_run", [False, True])
def test_the_loop_scales_within_one_interval_and_exports_why(dry_run: bool) -> None:
    m = router_metrics()
    scaler = FakeScaler(m, Target(1, 1))
    now = [0.0]
    lines: list[str] = []
    metrics = PlannerMetrics(CONFIG, dry_run)
    loop = PlannerLoop(scaler, CONFIG, synthetic, metrics, dry_run=dry_run,
                       clock=lambda: now[0], out=lines.append)  # fmt: skip
    assert loop.step() is None  # the first scrape
    for rate, expected in [(0.5, (1, 1)), (3.0, (2, 3))]:
        finish(m, int(rate * 10), isl=100, cached=0, osl=8, ttft=0.1)
        now[0] += 10
        decision = loop.step()
        assert decision is not None
        assert (decision.prefill.size, decision.decode.size) == expected
    if dry_run:
        assert scaler.calls == [] and "would set prefill 2 decode 3" in lines[-2]
        assert lines[-1] == "  model: 3.0 rps -> 2P 3D"
    else:
        assert scaler.calls == [(2, 3)] and "-> set prefill 2 decode 3" in lines[-1]
    text = generate_latest(metrics.registry).decode()
    assert 'tandem_planner_workers{role="decode"} 3.0' in text
    assert 'tandem_planner_decisions_total{action="up",role="decode"} 1.0' in text
    assert 'tandem_planner_last_decision_info{action="up"' in text
    assert f"tandem_planner_dry_run {1.0 if dry_run else 0.0}" in text


def test_the_real_capacity_model_plugs_in() -> None:
    capacity = pytest.importorskip("deploy.capacity")
    profile = capacity.Profile.from_dict({
        "model": "synthetic", "device": "cpu", "dtype": "float32", "block_size": 16,
        "prefill": [{"input_len": 128, "time_s": 0.05}, {"input_len": 1024, "time_s": 0.4}],
        "decode": [{"batch_size": b, "context_len": c, "step_time_s": 0.01 + 0.001 * b}
                   for b in (1, 8, 32) for c in (256, 2048)],
    })  # fmt: skip
    slo = capacity.SLO(ttft_s=1.0, itl_s=0.03)

    def real(rate: float, isl: float, osl: float, max_workers: int) -> object:
        w = capacity.Workload(rate, isl, osl)
        return capacity.recommend(profile, w, slo, gpu_budget=max_workers)

    config = PlannerConfig(slo_ttft_s=1.0, slo_itl_s=0.03, gpu_budget=6)
    state, current = PlannerState(), Target(1, 1)
    sizes = []
    for rate in (0.5, 4.0, 12.0, 40.0):
        decision = decide(obs(rate), current, state, config, real)
        assert decision.gpus <= 6
        state, current = decision.state, decision.target
        sizes.append(current)
    assert sizes[0] == Target(1, 1)
    assert sizes[-1].prefill + sizes[-1].decode == 6
    assert sizes[-1].prefill > 1 and sizes[-1].decode > 1
