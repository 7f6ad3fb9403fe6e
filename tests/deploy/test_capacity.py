"""deploy/capacity.py: the worked example of docs/capacity.md, computed by hand there, and the
model's edges (interpolation, infeasible SLOs, budgets, who wins when)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from deploy.capacity import (
    SLO,
    Profile,
    Workload,
    collocated_at,
    collocated_capacity,
    decode_capacity,
    prefill_capacity,
    recommend,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "capacity.md"
WORKLOAD = Workload(rate_rps=10, isl=3000, osl=150)
SLO_EXAMPLE = SLO(ttft_s=0.5, itl_s=0.02)


@pytest.fixture(scope="module")
def example() -> Profile:
    """The hand-made profile, read from the doc's worked example (so the doc cannot drift)."""
    block = re.search(r"```json\n(.*?)```", DOC.read_text(), re.S)
    assert block is not None, "docs/capacity.md lost its example profile"
    return Profile.from_dict(json.loads(block.group(1)))


def test_the_worked_example_gives_the_hand_computed_counts(example: Profile) -> None:
    p = prefill_capacity(example, WORKLOAD, SLO_EXAMPLE)
    assert p.prompt_time_s == pytest.approx(0.16)
    assert p.max_utilization == pytest.approx(4.25 / 5.25)
    assert p.rps == pytest.approx(5.06, abs=0.005)
    d = decode_capacity(example, WORKLOAD, SLO_EXAMPLE)
    assert d.context_len == 3075 and d.batch_size == 12
    assert d.step_time_s == pytest.approx(0.01978)
    assert d.rps == pytest.approx(4.04, abs=0.005)
    c = collocated_capacity(example, WORKLOAD, SLO_EXAMPLE)
    assert c.rps == pytest.approx(0.5 / 0.28225, rel=1e-6)  # the closed form
    assert c.itl_s == pytest.approx(0.02, rel=1e-6)
    assert c.batch_size == pytest.approx(5.31, abs=0.005)
    assert c.ttft_s == pytest.approx(0.206, abs=0.0005)

    rec = recommend(example, WORKLOAD, SLO_EXAMPLE)
    assert (rec.num_prefill, rec.num_decode, rec.collocated_workers) == (2, 3, 6)
    assert rec.preferred == "disagg"
    assert rec.expected_goodput_rps == rec.disagg_goodput_rps == 10
    assert rec.collocated_goodput_rps == 10
    assert rec.reason.startswith("disagg 2P+3D = 5 GPUs (vs collocated 6)")


def test_the_worked_example_within_four_gpus(example: Profile) -> None:
    rec = recommend(example, WORKLOAD, SLO_EXAMPLE, gpu_budget=4)
    assert (rec.num_prefill, rec.num_decode, rec.collocated_workers) == (2, 2, 4)
    assert rec.preferred == "disagg"
    assert rec.expected_goodput_rps == pytest.approx(8.09, abs=0.005)
    assert rec.collocated_goodput_rps == pytest.approx(7.09, abs=0.005)


def test_the_doc_states_the_same_results() -> None:
    text = DOC.read_text()
    for fact in ("**2 prefill workers**", "**3 decode workers**", "**6 collocated workers**",
                 "**2 prefill + 2 decode, goodput 8.09 req/s**"):  # fmt: skip
        assert fact in text, fact


def test_tandem_plan_prints_the_example(example: Profile, tmp_path: Path, capsys) -> None:
    from deploy.cli import main

    path = tmp_path / "example.json"
    path.write_text(json.dumps(example.to_dict()))
    argv = ["plan", "--profile", str(path), "--rate", "10", "--isl", "3000", "--osl", "150",
            "--slo-ttft", "0.5", "--slo-itl", "0.02"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "recommended  disaggregated: 2 prefill + 3 decode workers (5 GPUs)" in out
    assert "alternative  collocated: 6 workers (6 GPUs)" in out
    assert main([*argv, "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)["recommendation"]
    assert (rec["num_prefill"], rec["num_decode"], rec["collocated_workers"]) == (2, 3, 6)


def test_interpolation_is_linear_and_extends_the_end_segments(example: Profile) -> None:
    assert example.prefill_time_s(750) == pytest.approx(0.0475)
    assert example.prefill_time_s(8000) == pytest.approx(0.41)  # beyond: the last segment
    assert example.decode_step_time_s(40, 3000) == pytest.approx(0.01 + 40 * 0.0008)
    assert example.decode_step_time_s(0, 1000) == pytest.approx(0.01)


def test_a_prefill_slower_than_the_ttft_slo_has_no_goodput(example: Profile) -> None:
    rec = recommend(example, Workload(5, 4000, 100), SLO(ttft_s=0.2, itl_s=0.05))
    assert rec.prefill_rps_per_worker == 0 and rec.disagg_goodput_rps == 0
    assert "no prefill worker meets it" in rec.reason
    assert rec.num_prefill >= 1  # still a deployable answer


def test_an_itl_below_one_request_step_has_no_decode_capacity(example: Profile) -> None:
    d = decode_capacity(example, WORKLOAD, SLO(ttft_s=1.0, itl_s=0.005))
    assert d.batch_size == 0 and d.rps == 0
    rec = recommend(example, WORKLOAD, SLO(ttft_s=1.0, itl_s=0.005))
    assert rec.expected_goodput_rps == 0 and rec.collocated_rps_per_worker == 0


def test_tight_ttft_loose_itl_favours_collocation(example: Profile) -> None:
    # rho_max small (TTFT close to S) and a/ITL small: collocated is no worse, and wins ties
    rec = recommend(example, Workload(10, 3000, 150), SLO(ttft_s=0.2, itl_s=0.1))
    assert rec.preferred == "collocated"
    assert rec.collocated_workers <= rec.num_prefill + rec.num_decode


def test_collocated_steady_state_obeys_littles_law(example: Profile) -> None:
    state = collocated_at(example, WORKLOAD, 1.0)
    assert state is not None
    assert state.batch_size == pytest.approx(1.0 * WORKLOAD.osl * state.itl_s)
    assert collocated_at(example, WORKLOAD, 1 / 0.16) is None  # prefill alone fills the time


def test_zero_rate_still_keeps_one_worker_per_pool(example: Profile) -> None:
    rec = recommend(example, Workload(0, 3000, 150), SLO_EXAMPLE)
    assert (rec.num_prefill, rec.num_decode, rec.collocated_workers) == (1, 1, 1)
    assert rec.expected_goodput_rps == 0


def test_profile_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing"):
        Profile.from_dict({"model": "m"})
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"model": "m", "device": "cpu", "dtype": "float32",
                                "block_size": 16, "prefill": [{"input_len": 10, "time_s": 0.1}],
                                "decode": [{"batch_size": 1, "context_len": 10,
                                            "step_time_s": 0.01}]}))  # fmt: skip
    one = Profile.load(path)
    assert one.prefill_time_s(20) == pytest.approx(0.2)  # one point: proportional
    assert math.isclose(one.decode_step_time_s(1, 99), 0.01)
    with pytest.raises(ValueError):
        Workload(1, 0, 10)
    with pytest.raises(ValueError):
        recommend(one, Workload(1, 10, 10), SLO(1, 1), gpu_budget=0)


def test_the_measured_h100_profile_gives_what_the_doc_says() -> None:
    h100 = Profile.load(DOC.parent / "profiles" / "llama-3.1-8b-h100.json")
    workload = Workload(rate_rps=20, isl=1500, osl=200)
    tight = recommend(h100, workload, SLO(ttft_s=0.3, itl_s=0.06))
    assert (tight.num_prefill, tight.num_decode, tight.collocated_workers) == (2, 2, 8)
    assert tight.preferred == "disagg" and tight.decode_batch_size == 128
    assert "(the largest profiled batch)" in tight.reason
    loose = recommend(h100, workload, SLO(ttft_s=0.3, itl_s=0.08))
    assert (loose.num_prefill + loose.num_decode, loose.collocated_workers) == (4, 4)
    assert loose.preferred == "collocated"
    # noise is ironed out: more tokens never cost less
    times = [h100.decode_step_time_s(b, 2048) for b in (1, 8, 32, 64, 128)]
    assert times == sorted(times)
    # beyond the profiled contexts the reason says so
    far = recommend(h100, Workload(20, 3000, 150), SLO(0.5, 0.08))
    assert "context 3075 > the longest profiled context 2048" in far.reason
