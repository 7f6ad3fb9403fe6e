"""Online serving benchmark for any OpenAI-compatible endpoint (Tandem, vLLM, ...).

Every request is a streamed `/v1/completions` call (`--no-stream`: a whole JSON response, whose
TTFT is its E2E and which has no ITL) whose prompt is exactly ISL random token ids (a
list-of-ids prompt, so no tokenizer is involved and no prefix is shared), with
`max_tokens=OSL`, `ignore_eos=true` and `stream_options.include_usage`, so each request
generates exactly OSL tokens. Load is closed-loop (`--concurrency C`: C requests in flight)
or open-loop (`--rate R`: Poisson arrivals at R requests/s, optionally capped by C).

Metrics, all from the client's clock (time.perf_counter):
    TTFT   request sent -> first streamed chunk with a choice
    ITL    gaps between consecutive chunks with a choice, pooled over all requests
    TPOT   per request: (E2E - TTFT) / (output tokens - 1)
    E2E    request sent -> last byte
Goodput at the SLO: a request is good when TTFT <= --slo-ttft and its TPOT (its *mean*
inter-token latency, as in DistServe and `vllm bench serve --goodput tpot:`) <= --slo-itl;
goodput = good requests / benchmark duration.

Against a Tandem router the summary also has `router_overhead`: the router's own
`tandem_router_overhead[_cpu]_seconds` and `dispatch_seconds` histograms diffed around the
measured requests (bench/router_metrics.py; nothing else may use the router meanwhile).

    tandem bench serve --url http://127.0.0.1:8000 --isl 128 --osl 64 --concurrency 8 \\
        --num-requests 64 --slo-ttft 0.5 --slo-itl 0.05
    python -m bench.serve ...   (the same, without the tandem CLI)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from bench import router_metrics

PERCENTILES = (50, 90, 99)
ROUTE_HEADER = "x-tandem-route"  # the router's routing explanation (router/server.py)


@dataclass(frozen=True, slots=True)
class BenchConfig:
    url: str  # base URL, without /v1
    model: str | None  # None: the first id of GET /v1/models
    isl: int  # prompt tokens per request
    osl: int  # output tokens per request
    num_requests: int
    concurrency: int | None  # max requests in flight (None: unbounded, --rate only)
    rate: float | None  # Poisson arrivals per second (None: send as fast as concurrency allows)
    slo_ttft_s: float | None
    slo_itl_s: float | None
    seed: int = 0
    token_id_low: int = 1000  # prompt ids are drawn from [low, high): plain vocabulary entries
    token_id_high: int = 10000  # in any tokenizer with >= 10k tokens, no special tokens
    warmup_requests: int = 0
    timeout_s: float = 600.0
    stream: bool = True

    def __post_init__(self) -> None:
        if self.isl < 1 or self.osl < 1 or self.num_requests < 1:
            raise ValueError("--isl, --osl and --num-requests must be >= 1")
        if self.concurrency is None and self.rate is None:
            raise ValueError("give --concurrency C or --rate R (or both)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("--concurrency must be >= 1")
        if self.rate is not None and not self.rate > 0:
            raise ValueError("--rate must be > 0")
        if not 0 <= self.token_id_low < self.token_id_high:
            raise ValueError("need 0 <= token id low < high")


@dataclass(slots=True)
class RequestResult:
    ok: bool
    prompt_tokens: int = 0  # as the server counted them (usage)
    output_tokens: int = 0
    ttft_s: float = math.nan
    e2e_s: float = math.nan
    itl_s: list[float] = field(default_factory=list)  # gaps between chunks after the first
    error: str = ""
    sent_at: float = math.nan  # time.perf_counter() when it was sent
    route: str = ""  # the router's x-tandem-route header (where it was prefilled, and why)

    @property
    def tpot_s(self) -> float:
        if self.output_tokens < 2:
            return math.nan
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def make_prompts(config: BenchConfig, count: int, salt: int = 0) -> list[list[int]]:
    """`count` prompts of exactly ISL ids; seeded, so every run (and engine) gets the same."""
    rng = random.Random(config.seed * 1_000_003 + salt)
    lo, hi = config.token_id_low, config.token_id_high
    return [[rng.randrange(lo, hi) for _ in range(config.isl)] for _ in range(count)]


def arrival_offsets_s(config: BenchConfig) -> list[float]:
    """Send time of each request from the start; all zero without --rate (closed loop)."""
    if config.rate is None:
        return [0.0] * config.num_requests
    rng = random.Random(config.seed + 7)
    t, offsets = 0.0, []
    for _ in range(config.num_requests):
        offsets.append(t)
        t += rng.expovariate(config.rate)
    return offsets


async def one_request(
    client: httpx.AsyncClient, config: BenchConfig, model: str, prompt: list[int]
) -> RequestResult:
    body = {
        "model": model, "prompt": prompt, "max_tokens": config.osl, "temperature": 0.0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    if not config.stream:
        return await _one_whole(client, body, time.perf_counter())
    start = time.perf_counter()
    result = RequestResult(ok=False, sent_at=start)
    last: float | None = None
    chunks = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            result.route = response.headers.get(ROUTE_HEADER, "")
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = str(event["error"].get("message", event["error"]))
                    return result
                if event.get("usage"):
                    result.prompt_tokens = event["usage"]["prompt_tokens"]
                    result.output_tokens = event["usage"]["completion_tokens"]
                if not event.get("choices"):
                    continue
                chunks += 1
                if last is None:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                last = now
        result.e2e_s = time.perf_counter() - start
        result.output_tokens = result.output_tokens or chunks
        result.ok = last is not None
        if not result.ok:
            result.error = "no token streamed"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def _one_whole(
    client: httpx.AsyncClient, body: dict[str, Any], start: float
) -> RequestResult:
    """A non-streamed request: TTFT and E2E are both the time to the whole response."""
    del body["stream_options"]
    body["stream"] = False
    result = RequestResult(ok=False, sent_at=start)
    try:
        response = await client.post("/v1/completions", json=body)
        result.route = response.headers.get(ROUTE_HEADER, "")
        result.e2e_s = result.ttft_s = time.perf_counter() - start
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {response.text[:200]}"
            return result
        usage = response.json()["usage"]
        result.prompt_tokens = usage["prompt_tokens"]
        result.output_tokens = usage["completion_tokens"]
        result.ok = True
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def run(config: BenchConfig) -> dict[str, Any]:
    limits = httpx.Limits(
        max_connections=config.concurrency or 1000, max_keepalive_connections=None
    )
    timeout = httpx.Timeout(config.timeout_s, connect=30.0)
    async with httpx.AsyncClient(base_url=config.url, limits=limits, timeout=timeout) as client:
        model = config.model or await first_model(client)
        if config.warmup_requests:
            warm = make_prompts(config, config.warmup_requests, salt=1)
            await asyncio.gather(*(one_request(client, config, model, p) for p in warm))
        prompts = make_prompts(config, config.num_requests)
        offsets = arrival_offsets_s(config)
        before = await router_metrics.scrape(client)
        gate = asyncio.Semaphore(config.concurrency or config.num_requests)
        start = time.perf_counter()

        async def scheduled(prompt: list[int], offset_s: float) -> RequestResult:
            await asyncio.sleep(max(0.0, start + offset_s - time.perf_counter()))
            async with gate:
                return await one_request(client, config, model, prompt)

        results = await asyncio.gather(
            *(scheduled(p, o) for p, o in zip(prompts, offsets, strict=True))
        )
        duration_s = time.perf_counter() - start
        after = await router_metrics.scrape(client) if before is not None else None
    summary = summarize(config, model, list(results), duration_s)
    if before is not None and after is not None:
        summary["router_overhead"] = router_metrics.diff_quantiles(before, after, PERCENTILES)
    return summary


async def first_model(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """mean and p50/p90/p99 (linear interpolation, as numpy's default); NaN when empty."""
    clean = sorted(v for v in values if not math.isnan(v))
    out = {"mean": sum(clean) / len(clean) if clean else math.nan}
    for p in PERCENTILES:
        out[f"p{p}"] = _quantile(clean, p / 100) if clean else math.nan
    return out


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def is_good(result: RequestResult, config: BenchConfig) -> bool:
    if not result.ok:
        return False
    if config.slo_ttft_s is not None and not result.ttft_s <= config.slo_ttft_s:
        return False
    tpot = result.tpot_s
    return config.slo_itl_s is None or math.isnan(tpot) or tpot <= config.slo_itl_s


def summarize(
    config: BenchConfig, model: str, results: list[RequestResult], duration_s: float
) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    input_tokens = sum(r.prompt_tokens for r in done)
    summary: dict[str, Any] = {
        "config": asdict(config),
        "model": model,
        "duration_s": duration_s,
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "prompt_len_mismatches": sum(1 for r in done if r.prompt_tokens != config.isl),
        "output_len_mismatches": sum(1 for r in done if r.output_tokens != config.osl),
        "request_throughput_rps": len(done) / duration_s,
        "output_token_throughput_tps": output_tokens / duration_s,
        "total_token_throughput_tps": (input_tokens + output_tokens) / duration_s,
        "ttft_s": percentiles([r.ttft_s for r in done]),
        "itl_s": percentiles([gap for r in done for gap in r.itl_s]),
        "tpot_s": percentiles([r.tpot_s for r in done]),
        "e2e_s": percentiles([r.e2e_s for r in done]),
    }
    if config.slo_ttft_s is not None or config.slo_itl_s is not None:
        good = sum(1 for r in results if is_good(r, config))
        summary["goodput_rps"] = good / duration_s
        summary["slo_attainment"] = good / len(results)
    return summary


def format_table(summary: dict[str, Any]) -> str:
    c = summary["config"]
    load = f"concurrency {c['concurrency']}" if c["concurrency"] else ""
    if c["rate"]:
        load = f"rate {c['rate']}/s" + (f", {load}" if load else "")
    lines = [
        f"{summary['model']} @ {c['url']}  ISL {c['isl']} / OSL {c['osl']}  {load}",
        f"requests  {summary['completed']} ok, {summary['failed']} failed "
        f"in {summary['duration_s']:.2f} s",
        f"throughput  {summary['request_throughput_rps']:.2f} req/s  "
        f"{summary['output_token_throughput_tps']:.1f} out tok/s  "
        f"{summary['total_token_throughput_tps']:.1f} total tok/s",
        f"{'(ms)':<6}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for name in ("ttft_s", "itl_s", "tpot_s", "e2e_s"):
        row = summary[name]
        cells = "".join(f"{row[k] * 1000:>10.1f}" for k in ("mean", "p50", "p90", "p99"))
        lines.append(f"{name[:-2].upper():<6}{cells}")
    if "goodput_rps" in summary:
        lines.append(
            f"goodput  {summary['goodput_rps']:.2f} req/s "
            f"({summary['slo_attainment']:.0%} within TTFT <= {c['slo_ttft_s']} s, "
            f"TPOT <= {c['slo_itl_s']} s)"
        )
    for name, row in summary.get("router_overhead", {}).items():
        cells = "".join(f"{row[k] * 1000:>10.2f}" for k in ("mean", "p50", "p90", "p99"))
        lines.append(f"router {name:<13}{cells}  ({row['count']} requests)")
    for error in summary["errors"]:
        lines.append(f"error: {error}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name (default: first of /v1/models)")
    p.add_argument("--isl", type=int, required=True, help="prompt tokens per request")
    p.add_argument("--osl", type=int, required=True, help="output tokens per request")
    p.add_argument("--num-requests", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=None, help="max requests in flight")
    p.add_argument("--rate", type=float, default=None, help="Poisson arrivals, requests/s")
    p.add_argument("--slo-ttft", type=float, default=None, help="TTFT SLO, seconds")
    p.add_argument("--slo-itl", type=float, default=None, help="per-request mean ITL SLO, s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-requests", type=int, default=0)
    p.add_argument(
        "--token-id-range", type=int, nargs=2, default=(1000, 10000), metavar=("LOW", "HIGH"),
        help="prompt ids are drawn from [LOW, HIGH)",
    )  # fmt: skip
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument(
        "--no-stream",
        dest="stream",
        action="store_false",
        help="non-streamed requests (whole JSON responses)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON only")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `serve` on an argparse subparsers object (e.g. `tandem bench`)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve", help="online serving benchmark against an OpenAI endpoint",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_arguments(p)
    p.set_defaults(func=main)
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        url=args.url.rstrip("/").removesuffix("/v1"),
        model=args.model,
        isl=args.isl,
        osl=args.osl,
        num_requests=args.num_requests,
        concurrency=args.concurrency,
        rate=args.rate,
        slo_ttft_s=args.slo_ttft,
        slo_itl_s=args.slo_itl,
        seed=args.seed,
        token_id_low=args.token_id_range[0],
        token_id_high=args.token_id_range[1],
        warmup_requests=args.warmup_requests,
        timeout_s=args.timeout_s,
        stream=args.stream,
    )


def main(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"bench serve: {exc}", file=sys.stderr)
        return 2
    summary = asyncio.run(run(config))
    print(json.dumps(nan_to_null(summary), indent=2) if args.json else format_table(summary))
    return 0 if summary["failed"] == 0 else 1


def nan_to_null(value: Any) -> Any:
    """NaN (a metric with no samples) as null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: nan_to_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_to_null(v) for v in value]
    return value


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
