"""bench/goodput.py: workloads, SLO scoring, goodput, table and plot (pure parts; a live sweep
is checked by hand against `tandem serve`, see docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import pytest

from bench.goodput import (
    WORKLOADS,
    Slo,
    SweepConfig,
    Workload,
    add_parser,
    config_from_args,
    conversation_offsets_s,
    format_table,
    goodput,
    main_plot,
    summarize_rate,
)
from bench.serve import RequestResult


def sweep_config(**kw: object) -> SweepConfig:
    base: dict[str, object] = {
        "url": "http://127.0.0.1:1", "model": "m", "workload": WORKLOADS["3k150"],
        "rates": (1.0, 2.0), "duration_s": 10.0, "min_requests": 5, "max_requests": 100,
        "strict": Slo(1.0, 0.02), "loose": Slo(2.0, 0.05), "label": "disagg",
    }  # fmt: skip
    return SweepConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_single_turn_workloads_have_exact_lengths_and_no_shared_prefix() -> None:
    w = WORKLOADS["3k150"]
    a, b = w.prompts(0, seed=0), w.prompts(1, seed=0)
    assert len(a) == 1 and len(a[0]) == 3000 and w.osl == 150
    assert a[0][:32] != b[0][:32]
    assert a == w.prompts(0, seed=0)
    assert (WORKLOADS["8k1k"].isl, WORKLOADS["8k1k"].osl) == (8192, 1024)


def test_multiturn_turns_extend_the_previous_prompt_over_a_shared_system_prompt() -> None:
    w = WORKLOADS["multiturn"]
    conv0, conv1 = w.prompts(0, seed=3), w.prompts(1, seed=3)
    assert len(conv0) == w.turns == 4
    assert conv0[0][:1024] == conv1[0][:1024]  # the system prompt is shared by all
    assert conv0[0][1024:] != conv1[0][1024:]
    for prev, nxt in itertools.pairwise(conv0):
        assert nxt[: len(prev)] == prev
        assert len(nxt) == len(prev) + w.osl + w.user_tokens


def test_no_prompt_of_one_workload_starts_like_another_workloads() -> None:
    """Sweeps of several workloads run back to back on one server: a shared first block
    would be a prefix-cache hit that the workload does not have."""
    starts = {
        (name, seed, c): tuple(w.prompts(c, seed)[0][:16])
        for name, w in WORKLOADS.items()
        for seed in (0, 1)
        for c in range(3)
    }
    by_start: dict[tuple[int, ...], set[tuple[str, int]]] = {}
    for (name, seed, _), start in starts.items():
        by_start.setdefault(start, set()).add((name, seed))
    # only multiturn's conversations of one seed share a start (their system prompt)
    assert all(len(owners) == 1 for owners in by_start.values())


def test_arrivals_and_request_counts_follow_the_rate() -> None:
    offsets = conversation_offsets_s(4000, rate=8.0, turns=4, seed=0)
    assert offsets == sorted(offsets) and offsets[0] == 0.0
    assert offsets[-1] / 3999 == pytest.approx(0.5, rel=0.1)  # conversations at rate / turns
    c = sweep_config()
    assert c.conversations(2.0) == 20 and c.conversations(0.1) == 5
    assert sweep_config(workload=WORKLOADS["multiturn"]).conversations(2.0) == 5
    assert sweep_config(max_requests=7).conversations(100.0) == 7
    with pytest.raises(ValueError):
        sweep_config(rates=())
    with pytest.raises(ValueError):
        sweep_config(rates=(0.0,))


def result(ttft: float, gaps: list[float], ok: bool = True, sent_at: float = 0.0) -> RequestResult:
    return RequestResult(
        ok=ok, prompt_tokens=3000, output_tokens=len(gaps) + 1, ttft_s=ttft,
        e2e_s=ttft + sum(gaps), itl_s=gaps, sent_at=sent_at, route="mode=auto; prefill=p0",
    )  # fmt: skip


def test_slo_uses_ttft_and_each_requests_own_itl_p90() -> None:
    slo = Slo(ttft_s=1.0, itl_s=0.02)
    assert slo.met(result(0.5, [0.01] * 20))
    assert not slo.met(result(1.5, [0.01] * 20))
    # mean ITL is fine (0.0145 s) but 5 of 20 gaps are slow: its p90 breaks the target
    assert not slo.met(result(0.5, [0.01] * 15 + [0.028] * 5))
    assert slo.met(result(0.5, [0.01] * 19 + [0.5]))  # one stall is within the p90
    assert not slo.met(result(0.1, [], ok=False))


def test_rate_summary_and_goodput() -> None:
    c = sweep_config()
    rows = [
        summarize_rate(c, 1.0, [result(0.2, [0.01] * 9)] * 10, duration_s=10.0, start=0.0),
        summarize_rate(
            c,
            2.0,
            [result(0.2, [0.01] * 9)] * 9 + [result(3.0, [0.01] * 9)],
            duration_s=10.0,
            start=0.0,
        ),
        summarize_rate(c, 4.0, [result(1.5, [0.03] * 9)] * 10, duration_s=10.0, start=0.0),
    ]
    assert [r["attainment_strict"] for r in rows] == [1.0, 0.9, 0.0]
    assert [r["attainment_loose"] for r in rows] == [1.0, 0.9, 1.0]
    assert goodput(rows, "attainment_strict") == 2.0
    assert goodput(rows, "attainment_loose") == 4.0
    assert rows[0]["achieved_rps"] == 1.0 and rows[0]["output_token_throughput_tps"] == 10.0
    failed = summarize_rate(c, 8.0, [result(0.1, [], ok=False)], duration_s=1.0, start=0.0)
    assert failed["attainment_strict"] == 0.0 and failed["failed"] == 1
    assert goodput([failed], "attainment_strict") == 0.0


def test_rate_rows_keep_each_request_in_send_order() -> None:
    late, early = result(3.0, [0.01] * 9, sent_at=101.5), result(0.2, [0.01] * 9, sent_at=100.25)
    row = summarize_rate(sweep_config(), 2.0, [late, early], duration_s=5.0, start=100.0)
    assert row["per_request"] == [
        {"sent_s": 0.25, "ttft_s": 0.2, "itl_p90_s": 0.01, "strict": True,
         "route": "mode=auto; prefill=p0", "error": ""},
        {"sent_s": 1.5, "ttft_s": 3.0, "itl_p90_s": 0.01, "strict": False,
         "route": "mode=auto; prefill=p0", "error": ""},
    ]  # fmt: skip


def test_cli_table_and_plot(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(
        ["goodput", "run", "--url", "http://h:1/v1", "--workload", "multiturn", "--rates",
         "0.5,1", "--label", "auto", "--isl", "600", "--osl", "16"]
    )  # fmt: skip
    c = config_from_args(args)
    assert c.url == "http://h:1" and c.rates == (0.5, 1.0) and c.label == "auto"
    # a shorter first turn keeps its 128-token user message: conversations start apart
    assert c.workload == Workload("multiturn", isl=600, osl=16, turns=4, shared_prefix=472)
    assert c.workload.prompts(0, 0)[0][472:] != c.workload.prompts(1, 0)[0][472:]
    assert (c.strict, c.loose) == (Slo(1.0, 0.02), Slo(2.0, 0.05))
    assert c.warmup_requests == 2  # one per worker of a pool of two
    bad = parser.parse_args(["goodput", "run", "--url", "u", "--workload", "3k150",
                             "--rates", "1,x", "--label", "l"])  # fmt: skip
    with pytest.raises(ValueError, match="rates"):
        config_from_args(bad)

    files = []
    for label, attain in (("disagg", [1.0, 0.95, 0.5]), ("collocated", [1.0, 0.6, 0.1])):
        rows = [
            {**summarize_rate(sweep_config(), rate, [result(0.2, [0.01])], 1.0, 0.0),
             "attainment_strict": a, "attainment_loose": a}
            for rate, a in zip((1.0, 2.0, 4.0), attain, strict=True)
        ]  # fmt: skip
        payload = {
            "label": label, "workload": {"name": "3k150"}, "slo_strict": {"ttft_s": 1.0,
            "itl_s": 0.02}, "slo_loose": {"ttft_s": 2.0, "itl_s": 0.05}, "rates": rows,
            "goodput_strict_rps": goodput(rows, "attainment_strict"),
            "goodput_loose_rps": goodput(rows, "attainment_loose"),
        }  # fmt: skip
        path = tmp_path / f"{label}.json"
        path.write_text(json.dumps(payload))
        files.append(path)
    table = format_table([json.loads(f.read_text()) for f in files])
    assert "goodput disagg: strict 2 req/s" in table
    assert "goodput collocated: strict 1 req/s" in table
    out = tmp_path / "plots" / "goodput.png"
    assert main_plot(argparse.Namespace(results=files, out=out)) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
