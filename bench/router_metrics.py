"""Router overhead from a Tandem router's `/metrics`, diffed around one benchmark run.

`tandem_router_overhead_seconds` and `tandem_router_overhead_cpu_seconds` (docs/metrics.md) are
histograms observed once per request; the difference of two scrapes is the distribution of the
requests in between (nothing else may run against the router meanwhile). Percentiles are
interpolated linearly within a bucket, as Prometheus' histogram_quantile does, so they are no
finer than the bucket bounds (router/metrics.py). Any other server has no such series: None.
"""

from __future__ import annotations

import math

import httpx
from prometheus_client.parser import text_string_to_metric_families

SERIES = ("overhead", "overhead_cpu", "dispatch")  # tandem_router_<name>_seconds

Buckets = dict[str, dict[float, float]]  # series -> upper bound -> cumulative count; _SUM
_SUM = -1.0  # the key of a series' _sum (seconds) in its Buckets row


async def scrape(client: httpx.AsyncClient) -> Buckets | None:
    """The router's overhead histograms now; None when the server exports none."""
    try:
        response = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    wanted = {f"tandem_router_{name}_seconds": name for name in SERIES}
    out: Buckets = {}
    for family in text_string_to_metric_families(response.text):
        name = wanted.get(family.name)
        if name is None:
            continue
        row = {float(s.labels["le"]): s.value for s in family.samples if s.name.endswith("_bucket")}
        row[_SUM] = sum(s.value for s in family.samples if s.name.endswith("_sum"))
        out[name] = row
    return out if len(out) == len(SERIES) else None


def diff_quantiles(before: Buckets, after: Buckets, qs: tuple[int, ...]) -> dict[str, object]:
    """Per series: the request count, the exact mean (from _sum) and the percentiles `qs`, in
    seconds, of the requests in between."""
    out: dict[str, object] = {}
    for name in SERIES:
        bounds = sorted(b for b in after[name] if b != _SUM)
        counts = [after[name][b] - before[name].get(b, 0.0) for b in bounds]
        total = counts[-1]  # the +Inf bucket
        row: dict[str, float | int] = {"count": int(total)}
        row["mean"] = (after[name][_SUM] - before[name][_SUM]) / total if total else math.nan
        for q in qs:
            row[f"p{q}"] = _quantile(bounds, counts, total * q / 100) if total else math.nan
        out[name] = row
    return out


def _quantile(bounds: list[float], cumulative: list[float], rank: float) -> float:
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, cumulative, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower  # above the last finite bound: its bound is all that is known
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower
