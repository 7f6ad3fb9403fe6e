"""CPU float32 versions of the decoder's elementwise blocks, on engine.cpu_kernels.

Each torch version (layers.RMSNorm, layers.RotaryEmbedding, models.llama.MLP) makes several
passes over its activations with a fresh tensor per op (RMSNorm: float/pow/mean/rsqrt/mul/mul;
RoPE: a cos/sin gather per layer, mul/neg/cat/mul/add per tensor); these do one pass each.
`use_cpu_kernels(model)` swaps them in after loading, as cpu_linear.pack_linears does for the
linears; the weights and tables are shared, not copied. Numerics: RoPE is bit-identical, RMSNorm
and SiLU differ from torch by float reassociation / a 2-ulp exp.
"""

from __future__ import annotations

import torch
from torch import nn

from engine import cpu_kernels
from engine.layers import RMSNorm, RotaryEmbedding
from engine.models.llama import MLP, CausalLM, DecoderLayer


class CpuRMSNorm(nn.Module):
    def __init__(self, norm: RMSNorm) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, hidden] -> [N, hidden]."""
        return cpu_kernels.rms_norm(x, self.weight, self.eps)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): RMSNorm.add_forward's contract (llama.py), in one
        C pass (the torch add was a separate pass and op dispatch)."""
        return cpu_kernels.add_rms_norm(x, residual, self.weight, self.eps)


class CpuRotaryEmbedding(nn.Module):
    def __init__(self, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.cos = rotary.cos.contiguous()
        self.sin = rotary.sin.contiguous()

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N]; q [N, Hq, D]; k [N, Hk, D]: rotated in place and returned."""
        cpu_kernels.rope_(q, positions, self.cos, self.sin)
        cpu_kernels.rope_(k, positions, self.cos, self.sin)
        return q, k


class CpuMLP(nn.Module):
    def __init__(self, mlp: MLP) -> None:
        super().__init__()
        self.gate_up_proj = mlp.gate_up_proj
        self.down_proj = mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(cpu_kernels.silu_mul(self.gate_up_proj(x)))


def use_cpu_kernels(model: CausalLM) -> None:
    """Swap the hidden-size norms, the MLPs and the rotary embedding for their CPU-kernel
    versions, in place (float32 CPU models only). q_norm/k_norm (Qwen3) stay torch: they run on
    per-head views the norm kernel does not take."""
    rotary: CpuRotaryEmbedding | None = None
    for layer in model.layers:
        assert isinstance(layer, DecoderLayer)
        layer.add_module("input_layernorm", CpuRMSNorm(layer.input_layernorm))
        layer.add_module("post_attention_layernorm", CpuRMSNorm(layer.post_attention_layernorm))
        layer.add_module("mlp", CpuMLP(layer.mlp))
        if rotary is None:  # one table for every layer, as in CausalLM
            rotary = CpuRotaryEmbedding(layer.self_attn.rotary)
        layer.self_attn.add_module("rotary", rotary)
    model.add_module("norm", CpuRMSNorm(model.norm))
