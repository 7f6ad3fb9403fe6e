"""bench.relay_floor end to end on loopback: a real grpc.aio server subprocess streams to the
measured uvloop relay, which writes each message to a real TCP sink; every figure is positive."""

from __future__ import annotations

import json

import pytest

from bench import relay_floor


def test_two_periods_report_positive_floors(capsys: pytest.CaptureFixture[str]) -> None:
    relay_floor.main(["--periods-ms", "1,5", "--messages", "8", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["periods_ms"] == [1.0, 5.0]
    assert report["machine"]["cpu_count"] >= 1 and len(report["machine"]["loadavg_after"]) == 3
    assert [r["period_ms"] for r in report["results"]] == [1.0, 5.0]
    for r in report["results"]:
        assert r["messages"] == 8
        assert set(r["segment_cpu_us"]) == {"mean", "p50", "p90", "p99"}
        assert set(r["segment_wall_us"]) == {"mean", "p50", "p99"}
        assert all(v > 0 for v in r["segment_cpu_us"].values())
        assert all(v > 0 for v in r["segment_wall_us"].values())
        # the whole interval holds the segment plus the wakeup and grpc's receive path
        assert r["loop_cpu_per_message_us"] > r["segment_cpu_us"]["p50"] > 0
        assert r["process_cpu_per_message_us"] >= r["loop_cpu_per_message_us"]
        threads = r["threads_cpu_per_message_us"]
        assert threads["loop"] == r["loop_cpu_per_message_us"]
        assert all(v >= 0 for v in threads.values())
        assert r["stream64_loop_cpu_ms"] > r["stream64_segment_cpu_ms"] > 0


def test_table_has_one_row_per_period() -> None:
    report = relay_floor.run([2.0], messages=4, load_threads=0)
    assert len(relay_floor.format_table(report).splitlines()) == 3 + 1
