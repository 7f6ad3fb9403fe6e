"""Paged attention on CUDA: the step's metadata for the Triton kernels (engine/triton_kernels.py).

The GPU model runner builds one GpuAttentionMetadata per step (or per CUDA-graph bucket, with
static tensors) and every layer reads it. Layout of the step's flat token dimension, as on CPU:
decode rows first (one token each), then prefill chunks.

This module imports torch only; the Triton kernels load on first use, so that CPU-only
installs (no triton) can import the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch


@dataclass(frozen=True, slots=True)
class GpuAttentionMetadata:
    # [N] int64: block_id * block_size + offset of each new token; < 0 for padding rows
    slot_mapping: torch.Tensor
    num_decodes: int  # rows [0, num_decodes) are decode rows (padding rows included)
    decode_block_tables: torch.Tensor  # [num_decodes, W] int32 (W >= any row's block count)
    decode_context_lens: torch.Tensor  # [num_decodes] int32, including the new token; 0: pad
    decode_num_splits: int  # context splits per (row, kv head); fixed per batch size
    # prefill chunks (num_prefill_tiles == 0 when none)
    prefill_tile_seq: torch.Tensor  # [T] int32
    prefill_tile_q0: torch.Tensor  # [T] int32
    prefill_q_start: torch.Tensor  # [P] int32
    prefill_q_len: torch.Tensor  # [P] int32
    prefill_num_computed: torch.Tensor  # [P] int32
    prefill_block_tables: torch.Tensor  # [P, W] int32

    @property
    def num_prefill_tiles(self) -> int:
        return int(self.prefill_tile_seq.shape[0])


# queries per prefill program (a tile never spans two chunks); the runner plans tiles with it
PREFILL_BLOCK_M = 64

_kernels: ModuleType | None = None


def kernels() -> ModuleType:
    global _kernels
    if _kernels is None:
        from engine import triton_kernels

        _kernels = triton_kernels
    return _kernels


def decode_num_splits(batch: int, num_kv_heads: int, num_sms: int) -> int:
    """Splits so that batch * kv_heads * splits covers the SMs about twice (max 32)."""
    return max(1, min(32, -(-2 * num_sms // (batch * num_kv_heads))))


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: GpuAttentionMetadata,
) -> torch.Tensor:
    """q [N, Hq, D], k/v [N, Hk, D] -> [N, Hq, D]. Writes the new tokens' K/V into the pool."""
    kernels().store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    return attend_stored(q, k_cache, v_cache, meta)


def attend_stored(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: GpuAttentionMetadata
) -> torch.Tensor:
    """attend() once the step's new K/V are already in the pool (triton_fused.rope_store_kv)."""
    kern = kernels()
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        kern.decode_attention(
            q[:nd],
            k_cache,
            v_cache,
            meta.decode_block_tables,
            meta.decode_context_lens,
            out[:nd],
            meta.decode_num_splits,
        )
    if meta.num_prefill_tiles:
        kern.prefill_attention(
            q,
            k_cache,
            v_cache,
            out,
            meta.prefill_tile_seq,
            meta.prefill_tile_q0,
            meta.prefill_q_start,
            meta.prefill_q_len,
            meta.prefill_num_computed,
            meta.prefill_block_tables,
        )
    return out
