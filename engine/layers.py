"""Neural-network building blocks shared by the decoder models (no KV, no scheduling)."""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import nn

from engine.config import RopeScaling

# Steps of at most this many tokens run the decoder through engine/triton_gemv.py (the
# GEMVs with the norms, SiLU and residual adds fused in); larger ones through cuBLAS' GEMMs.
# 1: at 2-8 rows cuBLAS reads the weights faster than those kernels (bench/gpu_gemv.py).
SMALL_BATCH_ROWS = 1


def fused() -> ModuleType:
    """engine.triton_fused, imported on first CUDA use: CPU-only installs have no triton."""
    from engine import triton_fused

    return triton_fused


def gemv() -> ModuleType:
    """engine.triton_gemv, imported on first CUDA use (as fused())."""
    from engine import triton_gemv

    return triton_gemv


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dim() == 2 and x.stride(-1) == 1:  # one Triton pass, same rounding
            out: torch.Tensor = fused().rms_norm(x, self.weight, self.eps)
            return out
        return self._forward_torch(x)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add fused with the norm."""
        if x.is_cuda and x.dim() == 2 and x.stride(-1) == 1 and residual.stride(-1) == 1:
            out: tuple[torch.Tensor, torch.Tensor] = fused().add_rms_norm(
                x, residual, self.weight, self.eps
            )
            return out
        s = x + residual
        return self._forward_torch(s), s

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        # computed in fp32 and cast back, as the reference (HF) implementation does
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def _inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3.x: leave high frequencies, divide low ones by `factor`, blend in between
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Non-interleaved (rotate-half) RoPE with a precomputed cos/sin table."""

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None
    ) -> None:
        super().__init__()
        inv_freq = _inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N]; q [N, Hq, D]; k [N, Hk, D]."""
        if q.is_cuda:  # one Triton pass per tensor, same rounding as below
            f = fused()
            return f.rope(positions, q, self.cos, self.sin), f.rope(
                positions, k, self.cos, self.sin
            )
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # [N, 1, D]
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
