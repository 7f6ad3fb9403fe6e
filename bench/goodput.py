"""Goodput sweep: Poisson arrivals at a list of rates against one OpenAI endpoint.

For each rate it reports SLO attainment (the share of requests meeting both the TTFT and the ITL
target), TTFT/ITL percentiles and throughput; goodput is the highest swept rate whose attainment
is >= 90 % (DistServe's definition). Run it once per deployment (disagg, collocated, auto), then
`plot` the result files together: attainment vs rate per mode, one panel per SLO pair.

    python -m bench.goodput run --url http://127.0.0.1:8000 --workload 3k150 \\
        --rates 0.5,1,2,4 --duration-s 60 --label disagg --out results/disagg.json
    python -m bench.goodput plot results/disagg.json results/collocated.json results/auto.json \\
        --out docs/goodput-3k150.png

Workloads (prompts are token ids, so no tokenizer is involved; EOS ignored, so every request
generates exactly OSL tokens):
    3k150      3,000 in / 150 out, no shared prefix (Dynamo's disaggregation benchmark)
    8k1k       8,192 in / 1,024 out, no shared prefix
    multiturn  conversations of 4 turns over a 1,024-token system prompt shared by all; turn k+1's
               prompt is turn k's prompt + a 150-token stand-in for the answer + a 128-token user
               message, so it shares everything but the last 278 tokens with a prompt seen before.
               Conversations arrive as a Poisson process at rate / turns; a conversation's next
               turn is sent when its previous one ends. `rate` is the nominal request rate.

A request meets the SLO when it completes, its TTFT <= the TTFT target and the p90 of its own
inter-token gaps <= the ITL target (per request, so one slow stream cannot hide among fast ones).
Two SLO pairs are scored from the same run: strict (--slo-ttft/--slo-itl, default 1 s / 20 ms,
the issue's targets) and loose (--slo-ttft-loose/--slo-itl-loose, default 2 s / 50 ms).
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.serve import (
    BenchConfig,
    RequestResult,
    first_model,
    nan_to_null,
    one_request,
    percentiles,
)

ATTAINMENT_GOAL = 0.9  # goodput: the highest rate with at least this share of good requests


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    isl: int  # prompt tokens of a request (multiturn: of the first turn)
    osl: int  # output tokens per request
    turns: int = 1  # requests per conversation, sent one after another
    shared_prefix: int = 0  # tokens of system prompt shared by every conversation
    user_tokens: int = 128  # multiturn: new user tokens per later turn

    def prompts(self, conversation: int, seed: int) -> list[list[int]]:
        """The prompts of one conversation's turns, reproducible from (seed, conversation).

        Each stream is seeded by a string naming the workload and its role: integer seeds
        collided (one workload's conversation 1 drew the same tokens as another's shared
        prefix of seed 1), so a server swept with two workloads back to back served prefix
        hits across them."""
        rng = random.Random(f"{self.name}/conversation/{seed}/{conversation}")
        shared = random.Random(f"{self.name}/shared/{seed}").choices(
            range(1000, 10000), k=self.shared_prefix
        )
        first = shared + rng.choices(range(1000, 10000), k=self.isl - self.shared_prefix)
        turns = [first]
        for _ in range(self.turns - 1):
            answer = rng.choices(range(1000, 10000), k=self.osl)
            user = rng.choices(range(1000, 10000), k=self.user_tokens)
            turns.append(turns[-1] + answer + user)
        return turns


WORKLOADS = {
    "3k150": Workload("3k150", isl=3000, osl=150),
    "8k1k": Workload("8k1k", isl=8192, osl=1024),
    "multiturn": Workload("multiturn", isl=1024 + 128, osl=150, turns=4, shared_prefix=1024),
}


@dataclass(frozen=True, slots=True)
class Slo:
    ttft_s: float
    itl_s: float  # bound on the p90 of a request's own inter-token gaps

    def met(self, result: RequestResult) -> bool:
        if not result.ok or not result.ttft_s <= self.ttft_s:
            return False
        return not result.itl_s or percentiles(result.itl_s)["p90"] <= self.itl_s


@dataclass(frozen=True, slots=True)
class SweepConfig:
    url: str
    model: str | None
    workload: Workload
    rates: tuple[float, ...]  # nominal requests/s, swept in this order
    duration_s: float  # arrivals span about this long at each rate
    min_requests: int
    max_requests: int
    strict: Slo
    loose: Slo
    label: str  # the deployment's name in tables and plots, e.g. "disagg"
    seed: int = 0
    timeout_s: float = 600.0
    warmup_requests: int = 2  # sent at once before the first rate, not scored

    def __post_init__(self) -> None:
        if not self.rates or any(not r > 0 for r in self.rates):
            raise ValueError("--rates must be a non-empty list of positive numbers")
        if not 0 < self.min_requests <= self.max_requests:
            raise ValueError("need 0 < --min-requests <= --max-requests")
        if not self.duration_s > 0:
            raise ValueError("--duration-s must be > 0")
        if self.warmup_requests < 0:
            raise ValueError("--warmup-requests must be >= 0")

    def conversations(self, rate: float) -> int:
        requests = min(self.max_requests, max(self.min_requests, round(rate * self.duration_s)))
        return max(1, math.ceil(requests / self.workload.turns))


def conversation_offsets_s(count: int, rate: float, turns: int, seed: int) -> list[float]:
    """Poisson start times: conversations arrive at rate / turns, so requests at ~rate."""
    rng = random.Random(seed + 7)
    t, offsets = 0.0, []
    for _ in range(count):
        offsets.append(t)
        t += rng.expovariate(rate / turns)
    return offsets


async def run_rate(
    client: httpx.AsyncClient, config: SweepConfig, model: str, rate: float, first: int = 0
) -> dict[str, Any]:
    """One rate's conversations, numbered from `first`: a sweep passes the count sent so far, so
    no prompt of an earlier rate comes again (it would be a prefix-cache hit, not a prefill)."""
    workload = config.workload
    count = config.conversations(rate)
    offsets = conversation_offsets_s(count, rate, workload.turns, config.seed)
    # one_request reads only osl and the timeout from this config
    request_config = BenchConfig(
        url=config.url, model=model, isl=workload.isl, osl=workload.osl, num_requests=1,
        concurrency=None, rate=rate, slo_ttft_s=None, slo_itl_s=None, timeout_s=config.timeout_s,
    )  # fmt: skip
    start = time.perf_counter()

    async def conversation(index: int, offset_s: float) -> list[RequestResult]:
        await asyncio.sleep(max(0.0, start + offset_s - time.perf_counter()))
        results = []
        for prompt in workload.prompts(first + index, config.seed):
            result = await one_request(client, request_config, model, prompt)
            results.append(result)
            if not result.ok:
                break  # the rest of a broken conversation is not sent
        return results

    nested = await asyncio.gather(*(conversation(i, o) for i, o in enumerate(offsets)))
    duration_s = time.perf_counter() - start
    return summarize_rate(config, rate, [r for rs in nested for r in rs], duration_s, start)


def summarize_rate(
    config: SweepConfig,
    rate: float,
    results: Sequence[RequestResult],
    duration_s: float,
    start: float,
) -> dict[str, Any]:
    """One rate's row; `start` (time.perf_counter()) is when its first request was due."""
    done = [r for r in results if r.ok]
    sent = max(1, len(results))
    # each request in send order: what a rate's attainment hides (when the misses were, and
    # where the router had them prefilled)
    detail = [
        {
            "sent_s": round(r.sent_at - start, 4),
            "ttft_s": round(r.ttft_s, 4) if r.ok else None,
            "itl_p90_s": round(percentiles(r.itl_s)["p90"], 4) if r.itl_s else None,
            "strict": config.strict.met(r),
            "route": r.route,
            "error": r.error,
        }
        for r in sorted(results, key=lambda r: r.sent_at)
    ]
    return {
        "rate": rate,
        "requests": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration_s,
        "achieved_rps": len(done) / duration_s,
        "output_token_throughput_tps": sum(r.output_tokens for r in done) / duration_s,
        "attainment_strict": sum(config.strict.met(r) for r in results) / sent,
        "attainment_loose": sum(config.loose.met(r) for r in results) / sent,
        "ttft_s": percentiles([r.ttft_s for r in done]),
        "itl_s": percentiles([gap for r in done for gap in r.itl_s]),
        "tpot_s": percentiles([r.tpot_s for r in done]),
        "per_request": detail,
    }


def goodput(rows: Sequence[dict[str, Any]], key: str) -> float:
    """Highest swept rate whose attainment (rows[i][key]) is >= 90 %; 0.0 if none is."""
    return max((row["rate"] for row in rows if row[key] >= ATTAINMENT_GOAL), default=0.0)


async def sweep(config: SweepConfig) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=config.max_requests, max_keepalive_connections=None)
    timeout = httpx.Timeout(config.timeout_s, connect=30.0)
    async with httpx.AsyncClient(base_url=config.url, limits=limits, timeout=timeout) as client:
        model = config.model or await first_model(client)
        # warm-up, not scored: requests of the workload's shape sent at once, so that each
        # worker of a pool of two gets one (the router charges a dispatched prompt to its worker
        # at once). With a single warm-up request a collocated pair's second worker met its
        # first 8K prompts inside the first scored rate (issue 8: 61 % at 3 req/s, TTFT p50
        # 880 ms, against 100 % and 431 ms at 4.5 req/s in the same run; docs/benchmarks.md).
        warm_config = BenchConfig(
            url=config.url, model=model, isl=config.workload.isl, osl=config.workload.osl,
            num_requests=1, concurrency=1, rate=None, slo_ttft_s=None, slo_itl_s=None,
            timeout_s=config.timeout_s,
        )  # fmt: skip
        await asyncio.gather(
            *(
                one_request(
                    client,
                    warm_config,
                    model,
                    config.workload.prompts(10**6 + i, config.seed + 1)[0],
                )
                for i in range(config.warmup_requests)
            )
        )
        rows, sent = [], 0
        for rate in config.rates:
            row = await run_rate(client, config, model, rate, first=sent)
            sent += config.conversations(rate)
            rows.append(row)
            print(format_row(config.label, row), file=sys.stderr, flush=True)
    return {
        "label": config.label,
        "model": model,
        "url": config.url,
        "workload": asdict(config.workload),
        "slo_strict": asdict(config.strict),
        "slo_loose": asdict(config.loose),
        "duration_s_per_rate": config.duration_s,
        "seed": config.seed,
        "rates": rows,
        "goodput_strict_rps": goodput(rows, "attainment_strict"),
        "goodput_loose_rps": goodput(rows, "attainment_loose"),
    }


TABLE_HEADER = (
    f"{'mode':<12}{'rate':>7}{'done':>6}{'strict':>8}{'loose':>7}{'TTFT p50':>10}{'p90':>8}"
    f"{'p99':>8}{'ITL p50':>9}{'p90':>7}{'p99':>7}{'out tok/s':>11}"
)


def format_row(label: str, row: dict[str, Any]) -> str:
    def ms(stats: dict[str, float | None], key: str) -> float:
        value = stats[key]  # None once read back from JSON (no samples)
        return math.nan if value is None else value * 1000.0

    t, i = row["ttft_s"], row["itl_s"]
    return (
        f"{label:<12}{row['rate']:>7.2f}{row['completed']:>6}{row['attainment_strict']:>8.0%}"
        f"{row['attainment_loose']:>7.0%}{ms(t, 'p50'):>10.0f}{ms(t, 'p90'):>8.0f}"
        f"{ms(t, 'p99'):>8.0f}{ms(i, 'p50'):>9.1f}{ms(i, 'p90'):>7.1f}{ms(i, 'p99'):>7.1f}"
        f"{row['output_token_throughput_tps']:>11.1f}"
    )


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """All result files' rows (TTFT in ms, ITL in ms), then each mode's goodput."""
    first = results[0]
    s, lo = first["slo_strict"], first["slo_loose"]
    lines = [
        f"workload {first['workload']['name']}: strict SLO TTFT <= {s['ttft_s']} s, "
        f"ITL p90 <= {s['itl_s'] * 1000:g} ms; loose TTFT <= {lo['ttft_s']} s, "
        f"ITL p90 <= {lo['itl_s'] * 1000:g} ms",
        TABLE_HEADER,
    ]
    for result in results:
        lines += [format_row(result["label"], row) for row in result["rates"]]
    for result in results:
        lines.append(
            f"goodput {result['label']}: strict {result['goodput_strict_rps']:g} req/s, "
            f"loose {result['goodput_loose_rps']:g} req/s"
        )
        for row in result["rates"]:
            lines += [f"  error at rate {row['rate']:g}: {e[:200]}" for e in row["errors"]]
    return "\n".join(lines)


def plot(results: Sequence[dict[str, Any]], out: Path) -> None:
    """Attainment vs rate, one line per result (mode), one panel per SLO pair."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here or on CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, slo_key in zip(
        axes, ("attainment_strict", "attainment_loose"), ("slo_strict", "slo_loose"), strict=True
    ):
        for result in results:
            rates = [row["rate"] for row in result["rates"]]
            ax.plot(rates, [row[key] * 100 for row in result["rates"]], "o-", label=result["label"])
        slo = results[0][slo_key]
        ax.axhline(ATTAINMENT_GOAL * 100, color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"TTFT <= {slo['ttft_s']} s, ITL p90 <= {slo['itl_s'] * 1000:g} ms")
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("SLO attainment (%)")
    axes[0].legend()
    fig.suptitle(f"{results[0]['workload']['name']}: SLO attainment vs rate")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="goodput_command", required=True)
    run = sub.add_parser("run", help="sweep rates against one endpoint, write a result JSON")
    run.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    run.add_argument("--model", default=None, help="model name (default: first of /v1/models)")
    run.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    run.add_argument("--isl", type=int, default=None, help="override the workload's prompt length")
    run.add_argument("--osl", type=int, default=None, help="override the workload's output length")
    run.add_argument("--rates", required=True, help="comma-separated request rates, req/s")
    run.add_argument("--duration-s", type=float, default=60.0, help="arrival span per rate")
    run.add_argument("--min-requests", type=int, default=20)
    run.add_argument("--max-requests", type=int, default=2000)
    run.add_argument("--slo-ttft", type=float, default=1.0)
    run.add_argument("--slo-itl", type=float, default=0.020)
    run.add_argument("--slo-ttft-loose", type=float, default=2.0)
    run.add_argument("--slo-itl-loose", type=float, default=0.050)
    run.add_argument("--label", required=True, help="this deployment's name, e.g. disagg")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--timeout-s", type=float, default=600.0)
    run.add_argument(
        "--warmup-requests", type=int, default=2,
        help="unscored requests sent at once before the first rate (one per worker of a pool)",
    )  # fmt: skip
    run.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    run.set_defaults(func=main_run)
    show = sub.add_parser("plot", help="table + attainment-vs-rate PNG from result JSONs")
    show.add_argument("results", type=Path, nargs="+")
    show.add_argument("--out", type=Path, required=True, help="PNG path")
    show.set_defaults(func=main_plot)


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    workload = WORKLOADS[args.workload]
    if args.isl is not None or args.osl is not None:
        isl = args.isl if args.isl is not None else workload.isl
        workload = Workload(
            name=workload.name,
            isl=isl,
            osl=args.osl if args.osl is not None else workload.osl,
            turns=workload.turns,
            # a shorter first turn keeps its own user message: the shared system prompt shrinks
            # (else every conversation's first turn would be the same prompt, all cache hits)
            shared_prefix=max(0, min(workload.shared_prefix, isl - workload.user_tokens)),
            user_tokens=workload.user_tokens,
        )
    if workload.isl < 1 or workload.osl < 1:
        raise ValueError("--isl and --osl must be >= 1")
    try:
        rates = tuple(float(r) for r in args.rates.split(","))
    except ValueError:
        raise ValueError(f"--rates: not a list of numbers: {args.rates!r}") from None
    return SweepConfig(
        url=args.url.rstrip("/").removesuffix("/v1"),
        model=args.model,
        workload=workload,
        rates=rates,
        duration_s=args.duration_s,
        min_requests=args.min_requests,
        max_requests=args.max_requests,
        strict=Slo(args.slo_ttft, args.slo_itl),
        loose=Slo(args.slo_ttft_loose, args.slo_itl_loose),
        label=args.label,
        seed=args.seed,
        timeout_s=args.timeout_s,
        warmup_requests=args.warmup_requests,
    )


def main_run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"bench goodput: {exc}", file=sys.stderr)
        return 2
    print(TABLE_HEADER, file=sys.stderr)
    result = sweep_sync(config)
    text = json.dumps(nan_to_null(result), indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    print(format_table([result]), file=sys.stderr)
    return 0


def sweep_sync(config: SweepConfig) -> dict[str, Any]:
    return asyncio.run(sweep(config))


def main_plot(args: argparse.Namespace) -> int:
    results = [json.loads(path.read_text()) for path in args.results]
    names = {r["workload"]["name"] for r in results}
    if len(names) != 1:
        print(f"bench goodput plot: results mix workloads {sorted(names)}", file=sys.stderr)
        return 2
    print(format_table(results))
    plot(results, args.out)
    print(f"plot: {args.out}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `goodput` on an argparse subparsers object (e.g. `tandem bench`)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "goodput", help="SLO attainment and goodput over a sweep of Poisson rates",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_arguments(p)
    return p


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m bench.goodput", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_arguments(parser)
    parsed = parser.parse_args()
    sys.exit(parsed.func(parsed))
