"""`tandem plan`: how many prefill and decode workers a workload needs (deploy/capacity.py),
for a workload given on the command line or read from a live cluster.

    tandem plan --profile profile.json --rate 10 --isl 3000 --osl 150 --slo-ttft 0.5 --slo-itl 0.02
    tandem plan --profile profile.json --slo-ttft 0.5 --slo-itl 0.02 \\
        --from-prometheus http://127.0.0.1:9090            # Prometheus: rates over --window-s
    tandem plan ... --from-prometheus http://127.0.0.1:8000/metrics   # the router itself:
                                                                      # two scrapes --window-s apart

The workload is the router's finished choices: rate = choices/s, ISL and OSL = mean prompt and
generated tokens per choice (tandem_router_request_{prompt,generation}_tokens). Flags given
explicitly override what was read (e.g. plan for twice today's rate).
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, replace
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from deploy.capacity import SLO, Profile, Recommendation, Workload, recommend

PROMPT = "tandem_router_request_prompt_tokens"
GENERATION = "tandem_router_request_generation_tokens"
# every series the planner reads (tests check that a running cluster exports them)
PLANNER_METRICS = (f"{PROMPT}_count", f"{PROMPT}_sum", f"{GENERATION}_count", f"{GENERATION}_sum")


def promql(window_s: float) -> dict[str, str]:
    """The queries `--from-prometheus` runs against a Prometheus server."""
    w = f"{window_s:g}s"

    def mean(name: str) -> str:
        return f"sum(rate({name}_sum[{w}])) / sum(rate({name}_count[{w}]))"

    return {
        "rate_rps": f"sum(rate({PROMPT}_count[{w}]))",
        "isl": mean(PROMPT),
        "osl": mean(GENERATION),
    }


class NoTraffic(ValueError):
    """The window saw no finished request: there is no workload to plan for."""


def workload_from_prometheus(base_url: str, window_s: float, timeout_s: float = 10.0) -> Workload:
    values: dict[str, float] = {}
    for key, query in promql(window_s).items():
        url = f"{base_url.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": query})
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise ValueError(f"Prometheus refused {query!r}: {body.get('error', body)}")
        result = body["data"]["result"]
        value = float(result[0]["value"][1]) if result else float("nan")
        if not value == value or (key == "rate_rps" and value <= 0):  # NaN: 0/0
            raise NoTraffic(f"no finished requests in the last {window_s:g} s at {base_url}")
        values[key] = value
    return Workload(values["rate_rps"], values["isl"], values["osl"])


def router_counts(text: str) -> dict[str, float]:
    """The planner's series from a router's /metrics text."""
    found = {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in PLANNER_METRICS
    }
    missing = [name for name in PLANNER_METRICS if name not in found]
    if missing:
        raise ValueError(f"not a Tandem router's /metrics: {missing} missing")
    return found


def workload_from_counts(
    before: dict[str, float], after: dict[str, float], window_s: float
) -> Workload:
    delta = {name: after[name] - before[name] for name in PLANNER_METRICS}
    n = delta[f"{PROMPT}_count"]
    if n <= 0:
        raise NoTraffic(f"no request finished in {window_s:g} s")
    return Workload(n / window_s, delta[f"{PROMPT}_sum"] / n, delta[f"{GENERATION}_sum"] / n)


def workload_from_router(metrics_url: str, window_s: float, timeout_s: float = 10.0) -> Workload:
    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(metrics_url, timeout=timeout_s) as response:
            return router_counts(response.read().decode())

    before, start = scrape(), time.monotonic()
    time.sleep(window_s)
    after = scrape()
    return workload_from_counts(before, after, time.monotonic() - start)


def read_workload(url: str, window_s: float | None) -> tuple[Workload, str]:
    """From a Prometheus server (base URL) or a router's /metrics (a URL ending in /metrics)."""
    if urllib.parse.urlparse(url).path.rstrip("/").endswith("/metrics"):
        w = 10.0 if window_s is None else window_s
        return workload_from_router(url, w), f"router {url}, {w:g} s window"
    w = 300.0 if window_s is None else window_s
    return workload_from_prometheus(url, w), f"Prometheus {url}, {w:g} s window"


# ---- command line ---------------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `tandem plan` on the CLI's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "plan",
        help="recommend prefill/decode worker counts for a workload and SLO",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--profile", required=True, help="profile.json from `tandem profile`")
    p.add_argument("--rate", type=float, help="requests/s")
    p.add_argument("--isl", type=float, help="mean prompt tokens")
    p.add_argument("--osl", type=float, help="mean output tokens")
    p.add_argument("--slo-ttft", type=float, required=True, help="mean TTFT target, seconds")
    p.add_argument("--slo-itl", type=float, required=True, help="mean ITL target, seconds")
    p.add_argument("--gpu-budget", type=int, help="at most this many GPUs (one per worker)")
    p.add_argument(
        "--from-prometheus", metavar="URL",
        help="read rate/ISL/OSL from a Prometheus server or a router's /metrics URL",
    )  # fmt: skip
    p.add_argument(
        "--window-s", type=float,
        help="averaging window (default: 300 for Prometheus, 10 for a router's /metrics)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the recommendation as JSON")
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args: argparse.Namespace) -> int:
    profile = Profile.load(args.profile)
    source = "command line"
    if args.from_prometheus:
        workload, source = read_workload(args.from_prometheus, args.window_s)
        overrides = {"rate_rps": args.rate, "isl": args.isl, "osl": args.osl}
        workload = replace(workload, **{k: v for k, v in overrides.items() if v is not None})
    else:
        missing = [f for f in ("rate", "isl", "osl") if getattr(args, f) is None]
        if missing:
            raise ValueError(f"give --{', --'.join(missing)} or --from-prometheus")
        workload = Workload(args.rate, args.isl, args.osl)
    slo = SLO(args.slo_ttft, args.slo_itl)
    rec = recommend(profile, workload, slo, args.gpu_budget)
    if args.json:
        out = {"workload": asdict(workload), "slo": asdict(slo), "source": source}
        print(json.dumps({**out, "recommendation": asdict(rec)}, indent=2))
    else:
        print(format_recommendation(profile, workload, slo, rec, source, args.gpu_budget))
    return 0


def format_recommendation(
    profile: Profile,
    workload: Workload,
    slo: SLO,
    rec: Recommendation,
    source: str,
    gpu_budget: int | None = None,
) -> str:
    disagg = (
        f"disaggregated: {rec.num_prefill} prefill + {rec.num_decode} decode workers "
        f"({rec.num_prefill + rec.num_decode} GPUs), goodput {rec.disagg_goodput_rps:.3g} req/s"
    )
    if rec.prefill_rps_per_worker == 0 or rec.decode_rps_per_worker == 0:
        disagg = "disaggregated: cannot meet the SLO at any size (see reason)"
    n = rec.collocated_workers
    colloc = (
        f"collocated: {n} worker{'s' if n != 1 else ''} ({n} GPU{'s' if n != 1 else ''}), "
        f"goodput {rec.collocated_goodput_rps:.3g} req/s"
    )
    if rec.collocated_rps_per_worker == 0:
        colloc = "collocated: cannot meet the SLO at any size (see reason)"
    first, second = (disagg, colloc) if rec.preferred == "disagg" else (colloc, disagg)
    budget = f", at most {gpu_budget} GPUs" if gpu_budget is not None else ""
    lines = [
        f"workload   {workload.rate_rps:.4g} req/s, ISL {workload.isl:.4g}, OSL "
        f"{workload.osl:.4g} tokens ({source})",
        f"SLO        mean TTFT <= {slo.ttft_s:g} s, mean ITL <= {slo.itl_s:g} s{budget}",
        f"profile    {profile.model} on {profile.device} ({profile.dtype})",
        f"per worker prefill {rec.prefill_rps_per_worker:.3g} req/s, decode "
        f"{rec.decode_rps_per_worker:.3g} req/s (batch {rec.decode_batch_size}), collocated "
        f"{rec.collocated_rps_per_worker:.3g} req/s",
        f"recommended  {first}",
        f"alternative  {second}",
        f"reason     {rec.reason}",
    ]
    return "\n".join(lines)
