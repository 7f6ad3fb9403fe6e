"""The planner: sizes the prefill and decode pools to an SLO, in the manner of Dynamo's SLA
planner (anchors.md 1.4), and acts through the router's admin API like `tandem scale`.

Every interval:

    observe   two scrapes of the router's /metrics, one interval apart, give the load of the
              interval: finished requests/s, mean uncached prompt tokens (ISL), mean generated
              tokens (OSL), mean TTFT and ITL (`Observation.from_metrics`)
    plan      decide(observation, current target, state, config, recommend) -> Decision
              (pure: no I/O, no clock; every pool's action has a reason)
    act       PUT /admin/scale with the new sizes, unless nothing changed or --dry-run;
              export the decision as `tandem_planner_*` metrics and print one line

How `decide` sizes each pool:

- the capacity model (deploy/capacity.py `recommend`, from a `tandem profile`) gives the
  counts that carry the observed rate at this ISL/OSL within the TTFT/ITL targets, given the
  GPU budget;
- SLO correction: when the observed mean TTFT (ITL) misses its target although the model
  thinks the current prefill (decode) pool is big enough, the model is optimistic for this
  load: ask for one more worker of that pool (Dynamo corrects by the ratio observed/expected;
  we have no expected latency per count, so +1 per interval, bounded by the budget);
- hysteresis: scale up at once; scale down only after `scale_down_after` intervals in a row
  below the current size, then to the largest of those recommendations (as Kubernetes' HPA
  stabilization window does), so a dip does not drain a pool that the next burst needs;
- GPU budget: prefill GPUs + decode GPUs never exceed it. A pool held up by hysteresis gives
  way first (it is released to its recommendation early); what is still over is cut from the
  pool that grows.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.parser import text_string_to_metric_families

from deploy.reconcile import Target
from router.config import Role

log = logging.getLogger("tandem.planner")


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class Observation:
    """The load of one interval, from the router's counters (deltas between two scrapes)."""

    window_s: float
    rate_rps: float  # choices finished per second
    isl: float  # mean uncached prompt tokens per finished choice (0: none finished)
    osl: float  # mean generated tokens per finished choice
    ttft_s: float | None  # mean time to first token in the window; None: no sample
    itl_s: float | None  # mean inter-token latency

    @staticmethod
    def from_metrics(before: RouterCounters, after: RouterCounters, window_s: float) -> Observation:
        d = after.minus(before)
        return Observation(
            window_s=window_s,
            rate_rps=d.finished / window_s if window_s > 0 else 0.0,
            isl=max(d.prompt_tokens - d.cached_prompt_tokens, 0.0) / d.finished
            if d.finished
            else 0.0,
            osl=d.generation_tokens / d.finished if d.finished else 0.0,
            ttft_s=d.ttft_sum_s / d.ttft_count if d.ttft_count else None,
            itl_s=d.itl_sum_s / d.itl_count if d.itl_count else None,
        )


# the router's metrics the planner reads (router/metrics.py); a histogram's _count and _sum
_METRICS = {
    "finished": "tandem_router_request_prompt_tokens_count",
    "prompt_tokens": "tandem_router_prompt_tokens_total",
    "cached_prompt_tokens": "tandem_router_cached_prompt_tokens_total",
    "generation_tokens": "tandem_router_request_generation_tokens_sum",
    "ttft_sum_s": "tandem_router_time_to_first_token_seconds_sum",
    "ttft_count": "tandem_router_time_to_first_token_seconds_count",
    "itl_sum_s": "tandem_router_inter_token_latency_seconds_sum",
    "itl_count": "tandem_router_inter_token_latency_seconds_count",
}


@dataclass(frozen=True, slots=True)
class RouterCounters:
    """Cumulative counters of one scrape of the router's /metrics."""

    finished: float = 0.0  # choices with usage (their prompt/generation tokens are counted)
    prompt_tokens: float = 0.0
    cached_prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    ttft_sum_s: float = 0.0
    ttft_count: float = 0.0
    itl_sum_s: float = 0.0
    itl_count: float = 0.0

    @staticmethod
    def parse(text: str) -> RouterCounters:
        """From Prometheus text; ValueError naming what is missing (not a Tandem router?)."""
        samples = {
            s.name: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if not s.labels
        }
        missing = [name for name in _METRICS.values() if name not in samples]
        if missing:
            raise ValueError(f"the router's /metrics lacks {', '.join(missing)}")
        return RouterCounters(**{key: samples[name] for key, name in _METRICS.items()})

    def minus(self, earlier: RouterCounters) -> RouterCounters:
        """The change since `earlier`; a counter that went down (router restarted) restarts
        from zero, so its change is its value."""
        values = {}
        for key in _METRICS:
            now, then = getattr(self, key), getattr(earlier, key)
            values[key] = now - then if now >= then else now
        return RouterCounters(**values)


class Sizing(Protocol):
    """What the capacity model answers (deploy/capacity.py Recommendation has these)."""

    @property
    def num_prefill(self) -> int: ...
    @property
    def num_decode(self) -> int: ...
    @property
    def reason(self) -> str: ...


# (rate_rps, isl, osl, max_workers) -> sizing; the CLI binds the profile and the SLO.
# max_workers: the GPU budget in workers (the capacity model counts a worker as one GPU).
Recommender = Callable[[float, float, float, int], Sizing]


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    slo_ttft_s: float
    slo_itl_s: float
    gpu_budget: int  # GPUs for both pools together
    gpus_per_prefill: int = 1  # per worker (its tensor-parallel size)
    gpus_per_decode: int = 1
    min_prefill: int = 1  # disagg needs a prefill worker
    min_decode: int = 1
    scale_down_after: int = 3  # intervals in a row below the current size
    correct_slo_misses: bool = True

    def __post_init__(self) -> None:
        if not (self.slo_ttft_s > 0 and self.slo_itl_s > 0):
            raise ValueError("SLO targets must be > 0")
        if self.gpus_per_prefill < 1 or self.gpus_per_decode < 1:
            raise ValueError("gpus per worker must be >= 1")
        if self.min_prefill < 0 or self.min_decode < 1:
            raise ValueError("min_prefill must be >= 0 and min_decode >= 1")
        if self.scale_down_after < 1:
            raise ValueError(f"scale_down_after must be >= 1, got {self.scale_down_after}")
        floor = self.gpus(self.min_prefill, self.min_decode)
        if self.gpu_budget < floor:
            raise ValueError(f"gpu_budget {self.gpu_budget} < the minimum pools' {floor} GPUs")

    def gpus(self, num_prefill: int, num_decode: int) -> int:
        return num_prefill * self.gpus_per_prefill + num_decode * self.gpus_per_decode


@dataclass(frozen=True, slots=True)
class PlannerState:
    """What `decide` carries from one interval to the next."""

    # recommended sizes of the last intervals (oldest first, at most scale_down_after)
    recent: dict[Role, tuple[int, ...]] = field(default_factory=dict)
    isl: float = 0.0  # last known ISL/OSL, kept through intervals where nothing finished
    osl: float = 0.0


# ---------------------------------------------------------------- the decision


class Action(enum.Enum):
    UP = "up"
    DOWN = "down"
    HOLD = "hold"  # recommended fewer, waiting out the hysteresis
    STEADY = "steady"


@dataclass(frozen=True, slots=True)
class PoolDecision:
    role: Role
    current: int
    recommended: int  # model (+ SLO correction), within [min, budget]
    size: int  # decided
    action: Action
    reason: str


@dataclass(frozen=True, slots=True)
class Decision:
    prefill: PoolDecision
    decode: PoolDecision
    gpus: int  # of the decided sizes
    model_reason: str  # the capacity model's explanation
    state: PlannerState  # for the next interval

    @property
    def changed(self) -> bool:
        return any(p.size != p.current for p in self.pools)

    @property
    def pools(self) -> tuple[PoolDecision, PoolDecision]:
        return (self.prefill, self.decode)

    @property
    def target(self) -> Target:
        return Target(self.prefill.size, self.decode.size)

    def explain(self) -> str:
        parts = [
            f"{p.role.value} {p.current}->{p.size} ({p.action.value}: {p.reason})"
            for p in self.pools
        ]
        return "; ".join(parts) + f"; {self.gpus} GPUs"


def decide(
    obs: Observation,
    current: Target,
    state: PlannerState,
    config: PlannerConfig,
    recommend: Recommender,
) -> Decision:
    """The pool sizes for the next interval (pure)."""
    isl = obs.isl if obs.rate_rps > 0 and obs.isl >= 1 else max(state.isl, 1.0)
    osl = obs.osl if obs.rate_rps > 0 and obs.osl >= 1 else max(state.osl, 1.0)
    max_workers = config.gpu_budget // max(config.gpus_per_prefill, config.gpus_per_decode)
    sizing = recommend(obs.rate_rps, isl, osl, max_workers)
    wanted = {Role.PREFILL: sizing.num_prefill, Role.DECODE: sizing.num_decode}
    notes: dict[Role, list[str]] = {role: [] for role in Role}
    if config.correct_slo_misses:
        misses = {Role.PREFILL: (obs.ttft_s, config.slo_ttft_s, "TTFT"),
                  Role.DECODE: (obs.itl_s, config.slo_itl_s, "ITL")}  # fmt: skip
        for role, (seen, slo, name) in misses.items():
            cur = current.of(role)
            if seen is not None and seen > slo and wanted[role] <= cur:
                wanted[role] = cur + 1
                notes[role].append(
                    f"{name} {seen * 1e3:.0f} ms > SLO {slo * 1e3:.0f} ms: one more than {cur}"
                )
    minimum = {Role.PREFILL: config.min_prefill, Role.DECODE: config.min_decode}
    gpus_per = {Role.PREFILL: config.gpus_per_prefill, Role.DECODE: config.gpus_per_decode}
    for role in Role:  # within [min, what the budget leaves once the other pool has its min]
        others = sum(minimum[o] * gpus_per[o] for o in Role if o is not role)
        most = (config.gpu_budget - others) // gpus_per[role]
        wanted[role] = min(max(wanted[role], minimum[role]), most)

    recent = {
        role: (*state.recent.get(role, ()), wanted[role])[-config.scale_down_after :]
        for role in Role
    }
    sizes: dict[Role, int] = {}
    actions: dict[Role, Action] = {}
    for role in Role:
        cur, want, window = current.of(role), wanted[role], recent[role]
        if want > cur:
            sizes[role], actions[role] = want, Action.UP
            notes[role].insert(0, f"wants {want}")
        elif want == cur:
            sizes[role], actions[role] = cur, Action.STEADY
            notes[role].insert(0, "at the recommendation")
        elif len(window) == config.scale_down_after and all(w < cur for w in window):
            sizes[role], actions[role] = max(window), Action.DOWN
            notes[role].insert(0, f"below {cur} for {len(window)} intervals")
        else:
            below = _trailing_below(window, cur)
            sizes[role], actions[role] = cur, Action.HOLD
            notes[role].insert(0, f"wants {want}, {below}/{config.scale_down_after} "
                                  "intervals below")  # fmt: skip

    # the budget: held pools give way first, then the growing pool is cut back
    for role in Role:
        if config.gpus(sizes[Role.PREFILL], sizes[Role.DECODE]) <= config.gpu_budget:
            break
        if actions[role] is Action.HOLD:
            sizes[role], actions[role] = wanted[role], Action.DOWN
            notes[role].append("released early for the GPU budget")
    for role in sorted(Role, key=lambda r: actions[r] is not Action.UP):  # growing pools first
        over = config.gpus(sizes[Role.PREFILL], sizes[Role.DECODE]) - config.gpu_budget
        if over > 0 and sizes[role] > minimum[role]:
            cut = min(math.ceil(over / gpus_per[role]), sizes[role] - minimum[role])
            sizes[role] -= cut
            notes[role].append(f"cut by {cut} to fit {config.gpu_budget} GPUs")
            current_size = current.of(role)
            actions[role] = (
                Action.UP if sizes[role] > current_size
                else Action.DOWN if sizes[role] < current_size
                else Action.STEADY
            )  # fmt: skip

    pools = [
        PoolDecision(
            role, current.of(role), wanted[role], sizes[role], actions[role], "; ".join(notes[role])
        )
        for role in Role
    ]
    by_role = {p.role: p for p in pools}
    return Decision(
        prefill=by_role[Role.PREFILL],
        decode=by_role[Role.DECODE],
        gpus=config.gpus(sizes[Role.PREFILL], sizes[Role.DECODE]),
        model_reason=sizing.reason,
        state=PlannerState(recent=recent, isl=isl, osl=osl),
    )


def _trailing_below(values: Iterable[int], limit: int) -> int:
    """How many of the last values, in a row, are below limit."""
    n = 0
    for v in values:
        n = n + 1 if v < limit else 0
    return n


# ---------------------------------------------------------------- metrics


class PlannerMetrics:
    """Every metric the planner exports, prefix `tandem_planner_`."""

    def __init__(self, config: PlannerConfig, dry_run: bool) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.workers = Gauge("tandem_planner_workers", "Pool size decided (the target set)",
                             ["role"], registry=r)  # fmt: skip
        self.recommended = Gauge(
            "tandem_planner_recommended_workers",
            "Pool size the capacity model (plus SLO correction) asked for, before hysteresis",
            ["role"], registry=r,
        )  # fmt: skip
        self.decisions = Counter(
            "tandem_planner_decisions", "Planner decisions per pool, by action (up, down, "
            "hold, steady)", ["role", "action"], registry=r,
        )  # fmt: skip
        self.last = Info("tandem_planner_last_decision", "The last decision's reason, per pool",
                         ["role"], registry=r)  # fmt: skip
        self.observed = Gauge(
            "tandem_planner_observed", "The last interval's load: rate_rps, isl_tokens, "
            "osl_tokens, ttft_seconds, itl_seconds", ["quantity"], registry=r,
        )  # fmt: skip
        self.slo = Gauge("tandem_planner_slo_seconds", "The planner's targets", ["quantity"],
                         registry=r)  # fmt: skip
        self.gpus = Gauge("tandem_planner_gpus", "GPUs of the decided pools", registry=r)
        self.budget = Gauge("tandem_planner_gpu_budget", "The GPU budget", registry=r)
        self.dry_run = Gauge("tandem_planner_dry_run", "1: decisions are not applied", registry=r)
        self.errors = Counter("tandem_planner_errors", "Intervals that failed (router "
                              "unreachable, bad metrics, scale refused)", registry=r)  # fmt: skip
        self.slo.labels("ttft").set(config.slo_ttft_s)
        self.slo.labels("itl").set(config.slo_itl_s)
        self.budget.set(config.gpu_budget)
        self.dry_run.set(1 if dry_run else 0)

    def record(self, obs: Observation, decision: Decision) -> None:
        self.observed.labels("rate_rps").set(obs.rate_rps)
        self.observed.labels("isl_tokens").set(decision.state.isl)
        self.observed.labels("osl_tokens").set(decision.state.osl)
        if obs.ttft_s is not None:
            self.observed.labels("ttft_seconds").set(obs.ttft_s)
        if obs.itl_s is not None:
            self.observed.labels("itl_seconds").set(obs.itl_s)
        for p in decision.pools:
            self.workers.labels(p.role.value).set(p.size)
            self.recommended.labels(p.role.value).set(p.recommended)
            self.decisions.labels(p.role.value, p.action.value).inc()
            self.last.labels(p.role.value).info({"action": p.action.value, "reason": p.reason})
        self.gpus.set(decision.gpus)


# ---------------------------------------------------------------- the loop


class Scaler(Protocol):
    """The part of deploy/admin_client.AdminClient the planner uses."""

    def metrics_text(self) -> str: ...
    def current_target(self) -> Target: ...
    def set_scale(self, prefill: int, decode: int, reason: str = "") -> object: ...


class PlannerLoop:
    def __init__(
        self,
        scaler: Scaler,
        config: PlannerConfig,
        recommend: Recommender,
        metrics: PlannerMetrics,
        dry_run: bool = False,
        clock: Callable[[], float] = time.monotonic,
        out: Callable[[str], None] = print,
    ) -> None:
        self.scaler = scaler
        self.config = config
        self.recommend = recommend
        self.metrics = metrics
        self.dry_run = dry_run
        self.clock = clock
        self.out = out
        self.state = PlannerState()
        self._last: tuple[float, RouterCounters] | None = None

    def step(self) -> Decision | None:
        """One interval: None on the first call (it only takes the first scrape)."""
        now = self.clock()
        counters = RouterCounters.parse(self.scaler.metrics_text())
        last, self._last = self._last, (now, counters)
        if last is None:
            return None
        obs = Observation.from_metrics(last[1], counters, now - last[0])
        current = self.scaler.current_target()
        decision = decide(obs, current, self.state, self.config, self.recommend)
        self.state = decision.state
        self.metrics.record(obs, decision)
        applied = "would set" if self.dry_run else "set"
        verb = applied if decision.changed else "keep"
        ttft = "-" if obs.ttft_s is None else f"{obs.ttft_s * 1e3:.0f}ms"
        itl = "-" if obs.itl_s is None else f"{obs.itl_s * 1e3:.1f}ms"
        self.out(
            f"planner: {obs.rate_rps:.2f} req/s isl {decision.state.isl:.0f} osl "
            f"{decision.state.osl:.0f} ttft {ttft} itl {itl} -> {verb} prefill "
            f"{decision.prefill.size} decode {decision.decode.size} | {decision.explain()}"
        )
        if self.dry_run:  # the capacity model's own explanation, for whoever tunes the SLO
            self.out(f"  model: {decision.model_reason}")
        if decision.changed and not self.dry_run:
            self.scaler.set_scale(
                decision.prefill.size, decision.decode.size, f"planner: {decision.explain()}"
            )
        return decision

    def run(self, stop: threading.Event, interval_s: float) -> None:
        next_s = self.clock()
        while not stop.is_set():
            try:
                self.step()
            except Exception as exc:  # the next interval may work: the router may be back
                self.metrics.errors.inc()
                log.warning("planner interval failed: %s: %s", type(exc).__name__, exc)
            next_s += interval_s
            stop.wait(max(0.0, next_s - self.clock()))
