"""Capacity model: how many prefill and decode workers a workload needs to meet its SLO.

Pure functions over a measured profile (`tandem profile`, deploy/profile.py); the only I/O is
the explicit `Profile.load`. `recommend()` is what `tandem plan` prints and what the planner
calls. The model follows Dynamo's SLA planner and DistServe (docs/capacity.md has the
derivation and a worked example computed by hand):

    S     = prefill_time(ISL)                       profile, linear interpolation
    t(b)  = decode_step_time(b, ctx = ISL + OSL/2)  profile, bilinear interpolation

    prefill worker   M/D/1 queue (Poisson arrivals, service S): mean TTFT = S + rho*S/(2(1-rho))
                     <= TTFT SLO  ->  rho_max = 2k/(1+2k), k = (TTFT - S)/S,
                     capacity = rho_max / S requests/s
    decode worker    largest batch b with t(b) <= ITL SLO (no extrapolation past the largest
                     profiled batch); capacity = b / (OSL * t(b)) requests/s
    collocated       chunked prefill shares each step: at rate lam the prefill work takes a
                     share u = lam*S of the time, stretching every decode step,
                     ITL = t(b)/(1-u), with b = lam*OSL*ITL in flight (Little's law), and
                     TTFT = S + t(b) + M/D/1 wait at utilisation u; capacity = the largest
                     lam meeting both SLOs

Workers are one GPU each. Rates are requests/s, times seconds. Averages, not percentiles: the
SLOs are met on the mean (as Dynamo's planner does); leave headroom for tails.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REQUIRED_KEYS = ("model", "device", "dtype", "block_size", "prefill", "decode")


# ---- inputs -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrefillPoint:
    input_len: int  # prompt tokens, none cached
    time_s: float  # prompt arrival to its first token, one request alone


@dataclass(frozen=True, slots=True)
class DecodePoint:
    batch_size: int  # requests decoding in one step
    context_len: int  # tokens of KV per request
    step_time_s: float  # one decode step (one token for each request)


@dataclass(frozen=True, slots=True)
class Profile:
    """A `tandem profile` result (the profile.json schema)."""

    model: str
    device: str
    dtype: str
    block_size: int
    prefill: tuple[PrefillPoint, ...]
    decode: tuple[DecodePoint, ...]

    def __post_init__(self) -> None:
        if not self.prefill or not self.decode:
            raise ValueError("a profile needs at least one prefill and one decode point")
        if any(p.input_len < 1 or not p.time_s > 0 for p in self.prefill):
            raise ValueError("prefill points need input_len >= 1 and time_s > 0")
        if any(d.batch_size < 1 or d.context_len < 1 or not d.step_time_s > 0 for d in self.decode):
            raise ValueError("decode points need batch_size, context_len >= 1, step_time_s > 0")

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> Profile:
        missing = [k for k in REQUIRED_KEYS if k not in raw]
        if missing:
            raise ValueError(f"not a profile: missing {missing}")
        prefill, decode = raw["prefill"], raw["decode"]
        if not isinstance(prefill, list) or not isinstance(decode, list):
            raise ValueError("profile prefill and decode must be lists")
        return cls(
            model=str(raw["model"]),
            device=str(raw["device"]),
            dtype=str(raw["dtype"]),
            block_size=int(str(raw["block_size"])),
            prefill=tuple(PrefillPoint(int(p["input_len"]), float(p["time_s"])) for p in prefill),
            decode=tuple(
                DecodePoint(int(d["batch_size"]), int(d["context_len"]), float(d["step_time_s"]))
                for d in decode
            ),
        )

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "device": self.device,
            "dtype": self.dtype,
            "block_size": self.block_size,
            "prefill": [{"input_len": p.input_len, "time_s": p.time_s} for p in self.prefill],
            "decode": [
                {"batch_size": d.batch_size, "context_len": d.context_len,
                 "step_time_s": d.step_time_s}
                for d in self.decode
            ],
        }  # fmt: skip

    # ---- the measured curves ----------------------------------------------------------------
    # Measured times are noisy (a loaded machine, a GPU bound by launch overhead, where more
    # work can take a hair less time). More tokens never cost less, so each curve is made
    # non-decreasing (a running maximum) before interpolating: noise can only make the model
    # more conservative, and extending an end segment never slopes down.

    def prefill_time_s(self, input_len: float) -> float:
        """Linear in input_len between points, extended along the end segments."""
        points = sorted((p.input_len, p.time_s) for p in self.prefill)
        if len(points) == 1:  # one point: proportional to the prompt length
            return points[0][1] * input_len / points[0][0]
        lens, times = [x for x, _ in points], _running_max([y for _, y in points])
        return max(_interp(lens, times, input_len), 1e-9)

    def decode_step_time_s(self, batch_size: float, context_len: float) -> float:
        """Linear in batch size at each profiled context, then linear in context between the
        two nearest profiled contexts (both extended along the end segments)."""
        contexts = sorted({d.context_len for d in self.decode})
        times = _running_max([self._at_context(c, batch_size) for c in contexts])
        return max(_interp(contexts, times, context_len), 1e-9)

    def _at_context(self, context_len: int, batch_size: float) -> float:
        points = sorted(
            (d.batch_size, d.step_time_s) for d in self.decode if d.context_len == context_len
        )
        batches, times = [x for x, _ in points], _running_max([y for _, y in points])
        return _interp(batches, times, batch_size)

    def extrapolations(self, input_len: float, context_len: float) -> list[str]:
        """Where a query at (input_len, context_len) leaves the measured range, in words."""
        notes = []
        longest = max(p.input_len for p in self.prefill)
        if input_len > longest:
            notes.append(f"ISL {input_len:g} > the longest profiled prompt {longest}")
        widest = max(d.context_len for d in self.decode)
        if context_len > widest:
            notes.append(f"context {context_len:g} > the longest profiled context {widest}")
        return notes

    @property
    def max_batch_size(self) -> int:
        return max(d.batch_size for d in self.decode)


@dataclass(frozen=True, slots=True)
class Workload:
    rate_rps: float  # requests/s arriving (Poisson)
    isl: float  # mean prompt tokens (uncached)
    osl: float  # mean output tokens

    def __post_init__(self) -> None:
        if self.rate_rps < 0 or self.isl < 1 or self.osl < 1:
            raise ValueError(f"need rate >= 0, isl >= 1, osl >= 1; got {self}")


@dataclass(frozen=True, slots=True)
class SLO:
    ttft_s: float  # mean time to first token
    itl_s: float  # mean inter-token latency

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.itl_s > 0):
            raise ValueError(f"SLO times must be > 0; got {self}")


# ---- per-worker capacities ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrefillCapacity:
    prompt_time_s: float  # S: one prompt of ISL tokens
    max_utilization: float  # rho_max: the busiest a worker may be and still meet TTFT
    rps: float  # requests/s one prefill worker serves within the TTFT SLO (0: none)


@dataclass(frozen=True, slots=True)
class DecodeCapacity:
    context_len: float  # ISL + OSL/2: the mean context over a request's decode
    batch_size: int  # largest batch whose step meets the ITL SLO (0: none does)
    step_time_s: float  # at that batch
    rps: float  # requests/s one decode worker serves within the ITL SLO (0: none)


@dataclass(frozen=True, slots=True)
class CollocatedCapacity:
    rps: float  # requests/s one worker doing both serves within both SLOs (0: none)
    batch_size: float  # mean requests decoding at that rate
    itl_s: float  # estimated mean ITL at that rate (prefill interference included)
    ttft_s: float  # estimated mean TTFT at that rate


def prefill_capacity(profile: Profile, workload: Workload, slo: SLO) -> PrefillCapacity:
    s = profile.prefill_time_s(workload.isl)
    if s >= slo.ttft_s:
        return PrefillCapacity(s, 0.0, 0.0)
    k = (slo.ttft_s - s) / s
    rho = 2 * k / (1 + 2 * k)
    return PrefillCapacity(s, rho, rho / s)


def decode_capacity(profile: Profile, workload: Workload, slo: SLO) -> DecodeCapacity:
    ctx = workload.isl + workload.osl / 2
    best = 0
    for b in range(1, profile.max_batch_size + 1):
        if profile.decode_step_time_s(b, ctx) <= slo.itl_s:
            best = b
    if best == 0:
        return DecodeCapacity(ctx, 0, profile.decode_step_time_s(1, ctx), 0.0)
    step_s = profile.decode_step_time_s(best, ctx)
    return DecodeCapacity(ctx, best, step_s, best / (workload.osl * step_s))


def collocated_at(
    profile: Profile, workload: Workload, rate_rps: float
) -> CollocatedCapacity | None:
    """The steady state of one collocated worker at `rate_rps`, or None if it has none (the
    work does not fit in time, or the batch outgrows the profile)."""
    s = profile.prefill_time_s(workload.isl)
    ctx = workload.isl + workload.osl / 2
    share = 1.0 - rate_rps * s  # of the time left to decode steps
    if share <= 0:
        return None
    b = 0.0
    for _ in range(200):  # b = lam * OSL * t(b) / share: a contraction where a steady state exists
        # a step runs at least one request (below one, the worker idles between steps)
        nxt = rate_rps * workload.osl * profile.decode_step_time_s(max(b, 1.0), ctx) / share
        if nxt > profile.max_batch_size:
            return None
        if abs(nxt - b) < 1e-9:
            b = nxt
            break
        b = nxt
    else:
        return None
    step_s = profile.decode_step_time_s(max(b, 1.0), ctx)
    wait_s = rate_rps * s * s / (2 * share)
    return CollocatedCapacity(rate_rps, b, step_s / share, s + step_s + wait_s)


def collocated_capacity(profile: Profile, workload: Workload, slo: SLO) -> CollocatedCapacity:
    def ok(rate: float) -> CollocatedCapacity | None:
        state = collocated_at(profile, workload, rate)
        if state is None or state.itl_s > slo.itl_s or state.ttft_s > slo.ttft_s:
            return None
        return state

    lo, hi = 0.0, 1.0 / profile.prefill_time_s(workload.isl)
    best = ok(lo)
    if best is None:
        return CollocatedCapacity(0.0, 0.0, math.inf, math.inf)
    for _ in range(100):  # feasibility falls monotonically with the rate
        mid = (lo + hi) / 2
        state = ok(mid)
        if state is not None:
            lo, best = mid, state
        else:
            hi = mid
    return best


# ---- the recommendation -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Recommendation:
    num_prefill: int  # disaggregated deployment: prefill workers
    num_decode: int  # and decode workers
    collocated_workers: int  # the alternative: workers that prefill and decode
    expected_goodput_rps: float  # of the preferred deployment: requests/s served within SLO
    reason: str
    preferred: str = "disagg"  # "disagg" | "collocated"
    disagg_goodput_rps: float = 0.0
    collocated_goodput_rps: float = 0.0
    prefill_rps_per_worker: float = 0.0
    decode_rps_per_worker: float = 0.0
    collocated_rps_per_worker: float = 0.0
    decode_batch_size: int = 0  # per decode worker at the ITL SLO


def recommend(
    profile: Profile, workload: Workload, slo: SLO, gpu_budget: int | None = None
) -> Recommendation:
    """Worker counts for `workload` within `slo`: the disaggregated split and the collocated
    alternative, each at least 1 per pool. Without a budget each is the fewest workers whose
    capacity covers the rate; with one (GPUs, one per worker) each is the split of at most that
    many with the highest goodput (then the fewest GPUs). The deployment using fewer GPUs (or,
    with a budget, serving more) is preferred; on a tie, collocated (no KV transfer)."""
    if gpu_budget is not None and gpu_budget < 1:
        raise ValueError(f"gpu_budget must be >= 1, got {gpu_budget}")
    p = prefill_capacity(profile, workload, slo)
    d = decode_capacity(profile, workload, slo)
    c = collocated_capacity(profile, workload, slo)
    rate = workload.rate_rps
    n_p, n_d = _workers(rate, p.rps), _workers(rate, d.rps)
    n_c = _workers(rate, c.rps)
    if gpu_budget is not None:
        n_p, n_d = _best_split(rate, p.rps, d.rps, gpu_budget)
        n_c = min(n_c, gpu_budget)
    disagg_goodput = float(min(rate, n_p * p.rps, n_d * d.rps))
    if gpu_budget is not None and gpu_budget < 2:
        disagg_goodput = 0.0  # two pools need two GPUs
    colloc_goodput = float(min(rate, n_c * c.rps))
    disagg_key = (-disagg_goodput, n_p + n_d, 1)
    colloc_key = (-colloc_goodput, n_c, 0)
    preferred = "collocated" if colloc_key <= disagg_key else "disagg"
    reason = _explain(profile, workload, slo, p, d, c, (n_p, n_d, n_c), preferred, gpu_budget)
    return Recommendation(
        num_prefill=n_p,
        num_decode=n_d,
        collocated_workers=n_c,
        expected_goodput_rps=float(colloc_goodput if preferred == "collocated" else disagg_goodput),
        reason=reason,
        preferred=preferred,
        disagg_goodput_rps=disagg_goodput,
        collocated_goodput_rps=colloc_goodput,
        prefill_rps_per_worker=p.rps,
        decode_rps_per_worker=d.rps,
        collocated_rps_per_worker=c.rps,
        decode_batch_size=d.batch_size,
    )


def _workers(rate_rps: float, per_worker_rps: float) -> int:
    """The fewest workers (>= 1) covering rate_rps; 1 when no worker meets the SLO at all."""
    if per_worker_rps <= 0:
        return 1
    return max(1, math.ceil(rate_rps / per_worker_rps - 1e-9))


def _best_split(rate: float, p_rps: float, d_rps: float, budget: int) -> tuple[int, int]:
    if budget < 2:
        return 1, 1  # disagg needs two GPUs: it cannot fit, its goodput is still computed
    need = (_workers(rate, p_rps), _workers(rate, d_rps))
    if sum(need) <= budget:
        return need
    splits = [(n, budget - n) for n in range(1, budget)]
    return max(splits, key=lambda s: (min(rate, s[0] * p_rps, s[1] * d_rps), -abs(s[0] - s[1])))


def _explain(
    profile: Profile,
    w: Workload,
    slo: SLO,
    p: PrefillCapacity,
    d: DecodeCapacity,
    c: CollocatedCapacity,
    counts: tuple[int, int, int],
    preferred: str,
    budget: int | None,
) -> str:
    n_p, n_d, n_c = counts
    parts = []
    if p.rps == 0:
        parts.append(
            f"a {w.isl:g}-token prefill takes {p.prompt_time_s:.3g} s >= TTFT SLO "
            f"{slo.ttft_s:g} s: no prefill worker meets it"
        )
    else:
        parts.append(
            f"prefill {p.prompt_time_s:.3g} s per {w.isl:g}-token prompt, <= "
            f"{p.max_utilization:.0%} busy for mean TTFT <= {slo.ttft_s:g} s: "
            f"{p.rps:.3g} req/s per worker"
        )
    if d.rps == 0:
        parts.append(
            f"one request alone steps in {d.step_time_s:.3g} s > ITL SLO {slo.itl_s:g} s at "
            f"context {d.context_len:g}: no decode worker meets it"
        )
    else:
        cap = " (the largest profiled batch)" if d.batch_size == profile.max_batch_size else ""
        parts.append(
            f"decode batch {d.batch_size}{cap} at context {d.context_len:g} steps in "
            f"{d.step_time_s:.3g} s <= ITL {slo.itl_s:g} s: {d.rps:.3g} req/s per worker"
        )
    if c.rps == 0:
        parts.append("collocated: no rate meets both SLOs")
    else:
        parts.append(
            f"collocated {c.rps:.3g} req/s per worker (batch {c.batch_size:.3g}, prefill "
            f"stretches ITL to {c.itl_s:.3g} s, TTFT {c.ttft_s:.3g} s)"
        )
    notes = profile.extrapolations(w.isl, d.context_len)
    if notes:
        parts.append("extrapolated: " + ", ".join(notes) + " (profile wider to be sure)")
    limit = f" within {budget} GPUs" if budget is not None else ""
    choice = (
        f"disagg {n_p}P+{n_d}D = {n_p + n_d} GPUs" if preferred == "disagg" else f"collocated {n_c}"
    )
    other = f"collocated {n_c}" if preferred == "disagg" else f"disagg {n_p}P+{n_d}D = {n_p + n_d}"
    return f"{choice}{limit} (vs {other}): " + "; ".join(parts)


def _running_max(ys: list[float]) -> list[float]:
    out: list[float] = []
    for y in ys:
        out.append(max(y, out[-1]) if out else y)
    return out


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear y(x) through sorted xs, extended along the first/last segment."""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_right(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
