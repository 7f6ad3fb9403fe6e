"""bench/agreement: strict vs tie-aware top-1 agreement and the disagreements' gaps in bf16 ulps."""

import torch

from bench.agreement import agreement, bf16_ulp, logits_agreement


def test_bf16_ulp_is_the_spacing_of_bf16_at_that_magnitude() -> None:
    v = torch.tensor([16.0, 31.0, 8.5, -20.0, 1.0])
    assert bf16_ulp(v).tolist() == [0.125, 0.125, 0.0625, 0.125, 2**-7]


def test_ties_count_as_tie_aware_agreement_but_not_strict() -> None:
    ref = torch.tensor(
        [
            [20.0, 20.0, 1.0],  # exact tie: argmax 0
            [20.0, 19.875, 1.0],  # 1 ulp apart
            [3.0, 10.0, 1.0],  # clear
            [20.0, 19.5, 1.0],  # 4 ulps
        ]
    ).bfloat16()
    picks = torch.tensor([1, 1, 1, 0])
    a = agreement(picks, ref)
    assert a["positions"] == 4
    assert a["strict"] == 0.5  # rows 2 and 3
    assert a["tie_aware"] == 0.75  # + row 0
    assert a["disagreements"] == 2
    assert a["ref_exact_ties"] == 1 and a["ref_within_1ulp"] == 2
    assert a["dis_ref_gap_ulps"] == {"0 (tie)": 1, "<=1": 1, "<=2": 0, "<=4": 0, ">4": 0}


def test_our_gap_is_measured_in_our_logits() -> None:
    ref = [torch.tensor([[20.0, 20.0], [5.0, 1.0]]).bfloat16()]
    ours = [torch.tensor([[19.875, 20.0], [5.0, 1.0]]).bfloat16()]
    a = logits_agreement(ours, ref)
    assert a["strict"] == 0.5 and a["tie_aware"] == 1.0
    assert a["dis_our_gap_ulps"]["<=1"] == 1
