"""bench/serve.py: load shapes, statistics and goodput (pure parts; the live run is in
tests/router/test_e2e.py)."""

from __future__ import annotations

import argparse
import math

import pytest

from bench.serve import (
    BenchConfig,
    RequestResult,
    add_parser,
    arrival_offsets_s,
    config_from_args,
    format_table,
    is_good,
    make_prompts,
    percentiles,
    summarize,
)


def config(**kw: object) -> BenchConfig:
    base: dict[str, object] = {
        "url": "http://127.0.0.1:1", "model": "m", "isl": 8, "osl": 4, "num_requests": 5,
        "concurrency": 2, "rate": None, "slo_ttft_s": 0.5, "slo_itl_s": 0.1,
    }  # fmt: skip
    return BenchConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_prompts_have_exactly_isl_ids_and_are_reproducible() -> None:
    prompts = make_prompts(config(), 3)
    assert [len(p) for p in prompts] == [8, 8, 8]
    assert all(1000 <= t < 10000 for p in prompts for t in p)
    assert prompts == make_prompts(config(), 3)
    assert prompts != make_prompts(config(seed=1), 3)
    assert len({tuple(p) for p in prompts}) == 3


def test_poisson_arrivals_only_with_a_rate() -> None:
    assert arrival_offsets_s(config()) == [0.0] * 5
    offsets = arrival_offsets_s(config(rate=100.0, num_requests=2000))
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    assert offsets[-1] / 1999 == pytest.approx(0.01, rel=0.1)  # mean gap 1 / rate


def test_percentiles_interpolate_like_numpy() -> None:
    stats = percentiles([4.0, 1.0, 3.0, 2.0, math.nan])
    assert stats == {"mean": 2.5, "p50": 2.5, "p90": pytest.approx(3.7), "p99": pytest.approx(3.97)}
    assert math.isnan(percentiles([])["p50"])


def test_goodput_uses_ttft_and_per_request_mean_itl() -> None:
    fast = RequestResult(ok=True, prompt_tokens=8, output_tokens=4, ttft_s=0.2, e2e_s=0.5)
    assert fast.tpot_s == pytest.approx(0.1)
    slow_itl = RequestResult(ok=True, prompt_tokens=8, output_tokens=4, ttft_s=0.2, e2e_s=0.8)
    slow_ttft = RequestResult(ok=True, prompt_tokens=8, output_tokens=4, ttft_s=0.6, e2e_s=0.7)
    failed = RequestResult(ok=False, error="HTTP 503")
    c = config()
    assert [is_good(r, c) for r in (fast, slow_itl, slow_ttft, failed)] == [
        True, False, False, False,
    ]  # fmt: skip
    summary = summarize(c, "m", [fast, slow_itl, slow_ttft, failed], duration_s=2.0)
    assert summary["completed"] == 3 and summary["failed"] == 1
    assert summary["goodput_rps"] == 0.5 and summary["slo_attainment"] == 0.25
    assert summary["request_throughput_rps"] == 1.5
    assert summary["output_token_throughput_tps"] == 6.0
    assert summary["total_token_throughput_tps"] == 18.0
    assert summary["errors"] == ["HTTP 503"]
    table = format_table(summary)
    assert "goodput  0.50 req/s" in table and "TTFT" in table


def test_cli_wiring_and_validation() -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(
        ["serve", "--url", "http://h:1/v1/", "--isl", "128", "--osl", "64", "--rate", "2",
         "--num-requests", "10", "--json"]
    )  # fmt: skip
    c = config_from_args(args)
    assert (c.url, c.isl, c.osl, c.rate, c.concurrency) == ("http://h:1", 128, 64, 2.0, None)
    assert args.func.__name__ == "main" and args.json
    with pytest.raises(ValueError):
        config(concurrency=None, rate=None)
    with pytest.raises(ValueError):
        config(isl=0)


def test_router_overhead_quantiles_from_two_scrapes() -> None:
    """Bucket counts and _sum diffed between scrapes; percentiles interpolated in a bucket."""
    from bench.router_metrics import _SUM, SERIES, diff_quantiles

    inf = float("inf")
    before = {name: {0.001: 1.0, 0.002: 1.0, inf: 1.0, _SUM: 0.0005} for name in SERIES}
    # 10 new requests: 4 below 1 ms, 6 in (1, 2] ms; their sum is 14 ms
    after = {name: {0.001: 5.0, 0.002: 11.0, inf: 11.0, _SUM: 0.0145} for name in SERIES}
    got = diff_quantiles(before, after, (50, 90))["overhead"]
    assert isinstance(got, dict)
    assert got["count"] == 10
    assert abs(got["mean"] - 0.0014) < 1e-12
    assert abs(got["p50"] - (0.001 + 0.001 * (5 - 4) / 6)) < 1e-12
    assert abs(got["p90"] - (0.001 + 0.001 * (9 - 4) / 6)) < 1e-12
