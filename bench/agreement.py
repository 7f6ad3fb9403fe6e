"""Top-1 agreement of a set of picks with reference logits, strict and tie-aware, and how close
the reference's logits were wherever the two disagree (issue 7, acceptance 1).

Both transformers and Tandem produce bf16 logits in bf16 mode (the tied lm_head's GEMM output is
rounded to bf16). At logits of 8-32 the bf16 spacing (one "ulp" below) is 0.0625-0.125, so the
reference's top two are often exactly equal; torch.argmax then takes the lower token id. Where the
reference's maximum is tied, any other implementation's rounding decides which side it lands on.

- strict: our pick == the reference's argmax (the acceptance's metric);
- tie-aware: our pick is one of the reference's exactly tied maxima (reported beside strict,
  never instead of it);
- for each disagreement: the reference's gap between its top-1 and our pick, in bf16 ulps of its
  top-1 (0 = exact tie), and, when our logits are given, our gap between our pick and the
  reference's top-1 in our ulps.
"""

from __future__ import annotations

from typing import Any

import torch

# disagreement gap buckets, in ulps: exact tie, then (lo, hi] ranges
BUCKETS = (("0 (tie)", -1.0, 0.0), ("<=1", 0.0, 1.0), ("<=2", 1.0, 2.0), ("<=4", 2.0, 4.0))


def bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    """The bf16 spacing at |v| (8 significant bits): 2**(e-8) for v = m * 2**e, 0.5 <= |m| < 1."""
    _, e = torch.frexp(v.float())
    return torch.ldexp(torch.ones_like(v, dtype=torch.float32), e - 8)


def _histogram(gaps: torch.Tensor) -> dict[str, int]:
    out = {}
    for name, lo, hi in BUCKETS:
        out[name] = int(((gaps > lo) & (gaps <= hi)).sum())
    out[">4"] = int((gaps > BUCKETS[-1][2]).sum())
    return out


def agreement(
    picks: torch.Tensor, ref: torch.Tensor, ours: torch.Tensor | None = None
) -> dict[str, Any]:
    """picks [P] token ids; ref [P, V] reference logits (bf16 values, any float dtype); ours
    [P, V] the logits our picks came from (optional). Returns a JSON-able dict."""
    ref = ref.float()
    picks = picks.to(ref.device).long()
    top = ref.argmax(-1)  # the lowest id among tied maxima, as torch.argmax everywhere
    top2 = ref.topk(2, dim=-1).values
    ulp = bf16_ulp(top2[:, 0])
    margin = (top2[:, 0] - top2[:, 1]) / ulp  # reference's own top-1/top-2 gap, ulps
    at_pick = ref.gather(1, picks[:, None])[:, 0]
    strict = picks == top
    tie_aware = at_pick == top2[:, 0]
    dis = ~strict
    hf_gap = ((top2[:, 0] - at_pick) / ulp)[dis]
    out: dict[str, Any] = {
        "positions": int(picks.numel()),
        "strict": float(strict.float().mean()),
        "tie_aware": float(tie_aware.float().mean()),
        "disagreements": int(dis.sum()),
        "ref_exact_ties": int((margin == 0).sum()),  # over all positions
        "ref_within_1ulp": int((margin <= 1).sum()),
        "dis_ref_gap_ulps": _histogram(hf_gap),
    }
    if ours is not None:
        ours = ours.float().to(ref.device)
        mine = ours.gather(1, picks[:, None])[:, 0]
        theirs = ours.gather(1, top[:, None])[:, 0]
        out["dis_our_gap_ulps"] = _histogram(((mine - theirs) / bf16_ulp(mine))[dis])
    return out


def logits_agreement(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> dict[str, Any]:
    """Per text [L, V] logits of both sides -> agreement() over all positions."""
    o, r = torch.cat(ours), torch.cat(ref)
    return agreement(o.argmax(-1), r, o)


def summary(a: dict[str, Any]) -> str:
    """One line: strict, tie-aware, and where the disagreements sit in the reference's ulps."""
    gaps = ", ".join(f"{k}: {v}" for k, v in a["dis_ref_gap_ulps"].items())
    return (
        f"strict {a['strict']:.4f}  tie-aware {a['tie_aware']:.4f}  ({a['positions']} pos.; "
        f"{a['disagreements']} disagree, reference gap in ulps {gaps}; reference top-2 tied at "
        f"{a['ref_exact_ties']}, within 1 ulp at {a['ref_within_1ulp']} positions)"
    )
