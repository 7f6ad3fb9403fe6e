"""The decoder for the Llama family (Llama 2/3.x, SmolLM2, Mistral), Qwen2/2.5 and Qwen3.

q/k/v and gate/up projections are fused into one matmul each (one GEMM instead of three or
two); the loader splices the checkpoint's separate tensors into them.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import StepAttention, paged_attention
from engine.config import ModelConfig
from engine.gpu_attention import GpuAttentionMetadata, attend_stored
from engine.kv_cache import KVCache
from engine.layers import SMALL_BATCH_ROWS, RMSNorm, RotaryEmbedding, fused, gemv


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj: nn.Module = nn.Linear(  # or column-parallel (engine/parallel.py)
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias
        )
        self.o_proj: nn.Module = nn.Linear(
            self.q_size, cfg.hidden_size, bias=False
        )  # or row-parallel
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary = rotary

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        meta: StepAttention,
        kv: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        o = paged_attention(q, k, v, kv[0], kv[1], meta)  # [N, Hq, D]
        return self.o_proj(o.reshape(n, self.q_size))

    def attend_small(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        meta: GpuAttentionMetadata,
        kv: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """qkv [N, q + 2 kv] (the fused projection's output) -> attention output [N, q_size],
        before o_proj; RoPE and the K/V store in one kernel."""
        n = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        r = self.rotary
        q = fused().rope_store_kv(positions, q, k, v, r.cos, r.sin, kv[0], kv[1], meta.slot_mapping)
        return attend_stored(q, kv[0], kv[1], meta).view(n, self.q_size)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj: nn.Module = nn.Linear(
            cfg.hidden_size, 2 * cfg.intermediate_size, bias=False
        )
        self.down_proj: nn.Module = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return self.down_proj(fused().silu_and_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        meta: StepAttention,
        kv: tuple[torch.Tensor, torch.Tensor],
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output (the embeddings for layer 0, residual None);
        residual: the running sum before it. Returns (this MLP's output, the running sum).
        Same adds in the same order as `x = x + attn(norm(x)); x = x + mlp(norm(x))`, with
        each add fused into the norm that follows it."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        a = self.self_attn(h, positions, meta, kv)
        h, residual = self.post_attention_layernorm.add_forward(a, residual)
        return self.mlp(h), residual

    def forward_small(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        meta: GpuAttentionMetadata,
        kv: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """h: the residual stream [N <= SMALL_BATCH_ROWS, hidden] -> the stream after this
        layer. The ops and bf16 rounding points of forward(), in 7 kernels instead of 12: the
        norms ride in the prologue of the GEMV that reads their output, SiLU-and-mul in the
        gate_up projection's epilogue, the residual adds in the epilogues of o_proj and down
        (triton_gemv); RoPE and the K/V store are one kernel. At batch 1 each kernel boundary
        is a few microseconds of idle memory bus, against ~100 us of weights per layer."""
        g = gemv()
        attn, mlp = self.self_attn, self.mlp
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        qkv = g.linear(h, attn.qkv_proj.weight, attn.qkv_proj.bias, norm=(ln1.weight, ln1.eps))
        o = attn.attend_small(qkv, positions, meta, kv)
        h = g.linear(o, attn.o_proj.weight, residual=h)
        act = g.linear(h, mlp.gate_up_proj.weight, norm=(ln2.weight, ln2.eps), silu_mul=True)
        out: torch.Tensor = g.linear(act, mlp.down_proj.weight, residual=h)
        return out


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rotary) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head: nn.Module | None = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, False)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: StepAttention,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        """input_ids, positions: [N] -> final hidden states [N, hidden]."""
        x = self.embed_tokens(input_ids)
        if isinstance(meta, GpuAttentionMetadata) and self._small_batch(x):
            for i, block in enumerate(self._decoder_layers()):  # x: the residual stream
                x = block.forward_small(x, positions, meta, kv_cache.layer(i))
            return self.norm(x)
        residual: torch.Tensor | None = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, positions, meta, kv_cache.layer(i), residual)
        if residual is None:  # no layers
            return self.norm(x)
        return self.norm.add_forward(x, residual)[0]

    def _small_batch(self, x: torch.Tensor) -> bool:
        """The GEMV path (DecoderLayer.forward_small): a CUDA step of few tokens, with plain
        linears (tensor parallelism's row-parallel all-reduce and tp_invariant's per-shard
        GEMMs take the GEMM path)."""
        return (
            x.is_cuda
            and x.shape[0] <= SMALL_BATCH_ROWS
            and all(
                isinstance(linear, nn.Linear)
                for block in self._decoder_layers()
                for linear in (
                    block.self_attn.qkv_proj,
                    block.self_attn.o_proj,
                    block.mlp.gate_up_proj,
                    block.mlp.down_proj,
                )
            )
        )

    def _decoder_layers(self) -> list[DecoderLayer]:
        return cast(list[DecoderLayer], list(self.layers))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [R, hidden] -> logits [R, vocab]."""
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return F.linear(hidden, self.embed_tokens.weight)
