"""Reference-numerics versions of the decoder's elementwise blocks: transformers' Llama op
sequence in torch ops, on every device (EngineConfig.numerics="reference").

The fast blocks (layers.RMSNorm/RotaryEmbedding and llama.MLP: Triton on CUDA; cpu_layers on
CPU float32) round at the same points as transformers but not always the same way: the Triton
norms sum the squares in another order (a few ulps on 5e-6 of the outputs, measured on an H200).
These run the exact torch sequence of transformers' LlamaRMSNorm, apply_rotary_pos_emb and
LlamaMLP, so each output equals transformers' bit for bit on the same device:

  RMSNorm: x.float(); variance = x.pow(2).mean(-1, keepdim); x * rsqrt(variance + eps);
           weight * x.to(input dtype). The residual add first, in the model dtype
           (transformers' `hidden_states = residual + hidden_states`).
  RoPE:    q * cos + rotate_half(q) * sin with cos/sin cast to the model dtype.
  MLP:     down(silu(gate) * up), gate and up the halves of the fused projection (the fused GEMM
           equals the separate ones bit for bit: docs/benchmarks.md, issue 7 acceptance 1).

`use_reference_layers(model)` swaps them in after loading (as cpu_layers.use_cpu_kernels does);
weights and tables are shared, not copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers import RMSNorm, RotaryEmbedding
from engine.models.llama import MLP, CausalLM, DecoderLayer


class ReferenceRMSNorm(nn.Module):
    def __init__(self, norm: RMSNorm) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        variance = x32.pow(2).mean(-1, keepdim=True)
        x32 = x32 * torch.rsqrt(variance + self.eps)
        return self.weight * x32.to(dtype)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x): RMSNorm.add_forward's contract."""
        s = residual + x
        return self.forward(s), s


class ReferenceRotaryEmbedding(nn.Module):
    def __init__(self, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.cos = rotary.cos  # [max_positions, D] float32, shared
        self.sin = rotary.sin

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N]; q [N, Hq, D]; k [N, Hk, D] -> rotated copies."""
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # [N, 1, D]
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class ReferenceMLP(nn.Module):
    def __init__(self, mlp: MLP) -> None:
        super().__init__()
        self.gate_up_proj = mlp.gate_up_proj
        self.down_proj = mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def use_reference_layers(model: CausalLM) -> None:
    """Swap every norm (q/k norms included), the MLPs and the rotary embedding for their
    reference versions, in place. The linears stay nn.Linear (F.linear: cuBLAS / oneDNN)."""
    rotary: ReferenceRotaryEmbedding | None = None
    for layer in model.layers:
        assert isinstance(layer, DecoderLayer)
        attn = layer.self_attn
        for name in ("input_layernorm", "post_attention_layernorm"):
            layer.add_module(name, ReferenceRMSNorm(getattr(layer, name)))
        layer.add_module("mlp", ReferenceMLP(layer.mlp))
        if attn.q_norm is not None and attn.k_norm is not None:
            attn.add_module("q_norm", ReferenceRMSNorm(attn.q_norm))
            attn.add_module("k_norm", ReferenceRMSNorm(attn.k_norm))
        if rotary is None:  # one table for every layer, as in CausalLM
            rotary = ReferenceRotaryEmbedding(attn.rotary)
        attn.add_module("rotary", rotary)
    model.add_module("norm", ReferenceRMSNorm(model.norm))
