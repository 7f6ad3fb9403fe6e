"""CPU speed: every linear layer on oneDNN with weights prepacked once at load time.

torch's F.linear on CPU calls MKL sgemm on the plain [out, in] weight, re-blocking it on every
call; oneDNN's prepacked path (what vLLM's CPU build uses) measured 2.3-2.7x faster for every
SmolLM2 shape on the dev box (docs/benchmarks.md, "Where Tandem's time goes"). Results differ from
F.linear by float reassociation only (~1e-4 absolute on logits of ~20).
"""

from __future__ import annotations

import torch
from torch import nn

# The batch-size hint oneDNN picks its blocking for; any M runs, this is the common decode size.
PACK_BATCH_HINT = 64


class PackedLinear(nn.Module):
    """Drop-in for nn.Linear on CPU (fp32/bf16) holding a oneDNN-prepacked weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer(
            "packed", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)
        )
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, in_features] -> [N, out_features]."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear of a CPU model by a PackedLinear, in place; returns how many.

    Call after the weights are loaded: packing copies them.
    """
    count = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.device.type == "cpu":
                setattr(parent, name, PackedLinear(child.weight, child.bias))
                count += 1
    return count


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
    )
