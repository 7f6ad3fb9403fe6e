"""Paged attention over the KV pool with torch SDPA (CPU and any torch device).

Each layer first writes the step's new K/V into their slots, then attends:
  - decode rows (1 new token) in one batched SDPA call over their gathered, padded contexts;
  - each prefill chunk on its own: straight over its fresh K/V when it starts at position 0
    (no gather), else over its gathered context [0, num_computed + chunk) with a causal mask.
Gathering copies a row's blocks into a contiguous tensor: simple and device-neutral. On CPU in
float32 both skip the gather and SDPA: engine.cpu_kernels reads the pool in place for decode rows
and prefill chunks alike (chosen once by the model runner and carried in
`AttentionMetadata.decode_kernel`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine import cpu_kernels
from engine.gpu_attention import GpuAttentionMetadata, attend
from engine.reference_attention import ReferenceAttentionMetadata, reference_attention


@dataclass(frozen=True, slots=True)
class PrefillSpan:
    start: int  # first token of the chunk in the step's flat token dimension
    end: int
    num_computed_tokens: int  # context already in the pool before this chunk
    block_table: torch.Tensor  # [num_blocks_covering_context] long; unused when context is 0
    mask: torch.Tensor | None  # [1, 1, chunk, context] bool (True = attend); None: is_causal


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Built once per step by the model runner, shared by every layer."""

    slot_blocks: torch.Tensor  # [N] long: block id of each new token
    slot_offsets: torch.Tensor  # [N] long: offset inside that block
    num_decodes: int  # decode rows (1 new token each) are the first num_decodes tokens
    decode_block_tables: torch.Tensor | None  # [Bd, max_blocks] long (padded)
    decode_seq_lens: torch.Tensor | None  # [Bd] long: context incl. the new token
    # True (CPU, float32): engine.cpu_kernels writes the new K/V and runs the decode rows'
    # attention on the pool in place (decode_mask None); False: index_put writes, and decode
    # rows gather + SDPA with decode_mask [Bd, 1, 1, max_blocks * block_size] bool
    decode_kernel: bool
    decode_mask: torch.Tensor | None
    prefills: tuple[PrefillSpan, ...]
    # decode_kernel only: the prefill spans for cpu_kernels.paged_prefill_attention (their
    # PrefillSpan block_table/mask are then unused and left empty/None)
    prefill_tables: torch.Tensor | None = None  # [S, W] long (padded): span s's block table
    prefill_bounds: torch.Tensor | None = None  # [S, 3] long: (start, tokens, num_computed)


# What one step's forward carries to every layer: the torch/CPU metadata above, the Triton
# kernels' (engine/gpu_attention.py) or reference numerics' (engine/reference_attention.py)
StepAttention = AttentionMetadata | GpuAttentionMetadata | ReferenceAttentionMetadata


def _gather(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """cache [NB, bs, H, D], block_table [..., nb] -> [..., H, nb * bs, D] (a copy).

    index_select on dim 0 copies whole blocks (bs*H*D contiguous elements each); advanced
    indexing (`cache[table]`) walks element by element and is several times slower on CPU.
    """
    g = cache.index_select(0, block_table.flatten())  # [prod(...) * nb, bs, H, D]
    g = g.view(*block_table.shape[:-1], -1, *cache.shape[-2:])  # [..., nb * bs, H, D]
    return g.transpose(-3, -2)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: StepAttention,
) -> torch.Tensor:
    """q [N, Hq, D], k/v [N, Hk, D] for the step's new tokens -> output [N, Hq, D].

    Mutates k_cache / v_cache (the new tokens' slots) and nothing else.
    """
    if isinstance(meta, GpuAttentionMetadata):  # CUDA: Triton kernels on the pool in place
        return attend(q, k, v, k_cache, v_cache, meta)
    if isinstance(meta, ReferenceAttentionMetadata):  # numerics="reference", any device
        return reference_attention(q, k, v, k_cache, v_cache, meta)
    if meta.decode_kernel:
        cpu_kernels.kv_write(k, v, k_cache, v_cache, meta.slot_blocks, meta.slot_offsets)
    else:
        k_cache[meta.slot_blocks, meta.slot_offsets] = k
        v_cache[meta.slot_blocks, meta.slot_offsets] = v
    out = torch.empty_like(q)
    if meta.num_decodes and meta.decode_kernel:
        assert meta.decode_block_tables is not None and meta.decode_seq_lens is not None
        cpu_kernels.paged_decode_attention(
            q[: meta.num_decodes],
            k_cache,
            v_cache,
            meta.decode_block_tables,
            meta.decode_seq_lens,
            q.shape[-1] ** -0.5,  # SDPA's default scale
            out=out[: meta.num_decodes],
        )
    elif meta.num_decodes:
        assert meta.decode_block_tables is not None and meta.decode_mask is not None
        qd = q[: meta.num_decodes].unsqueeze(2)  # [Bd, Hq, 1, D]
        kd = _gather(k_cache, meta.decode_block_tables)  # [Bd, Hk, T, D]
        vd = _gather(v_cache, meta.decode_block_tables)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, enable_gqa=True)
        out[: meta.num_decodes] = od.squeeze(2)
    if meta.prefills and meta.decode_kernel:
        assert meta.prefill_tables is not None and meta.prefill_bounds is not None
        cpu_kernels.paged_prefill_attention(
            q, k_cache, v_cache, meta.prefill_tables, meta.prefill_bounds, q.shape[-1] ** -0.5, out
        )
        return out
    for span in meta.prefills:
        qp = q[span.start : span.end].transpose(0, 1)  # [Hq, L, D]
        if span.mask is None:
            kp = k[span.start : span.end].transpose(0, 1)  # [Hk, L, D]
            vp = v[span.start : span.end].transpose(0, 1)
            # 4-D on purpose: on CPU only 4-D inputs reach the flash kernel; 3-D ones take
            # the math fallback (3.7x slower at 256 tokens)
            op = F.scaled_dot_product_attention(
                qp.unsqueeze(0), kp.unsqueeze(0), vp.unsqueeze(0), is_causal=True, enable_gqa=True
            ).squeeze(0)
        else:
            context = span.mask.shape[-1]
            kp = _gather(k_cache, span.block_table)[:, :context]  # [Hk, ctx, D]
            vp = _gather(v_cache, span.block_table)[:, :context]
            op = F.scaled_dot_product_attention(
                qp.unsqueeze(0),
                kp.unsqueeze(0),
                vp.unsqueeze(0),
                attn_mask=span.mask,
                enable_gqa=True,
            ).squeeze(0)
        out[span.start : span.end] = op.transpose(0, 1)
    return out
