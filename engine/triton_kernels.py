"""Triton kernels for paged attention on the engine's block-major KV pool (CUDA only).

Every kernel reads the per-layer views that KVCache.layer() returns: k/v cache tensors of shape
[num_blocks, block_size, num_kv_heads, head_dim] with arbitrary strides (they are strided views
of the pool [num_blocks, layers, 2, block_size, kv_heads, head_dim]); the pool is never copied.

Kernels:
  store_kv          new K/V rows -> their slots (slot = block * block_size + offset; slot < 0:
                    a padding row of a CUDA-graph bucket, skipped)
  decode_attention  one query token per row, flash-decoding: the context is split over
                    `num_splits` programs per (row, kv head) and combined by a second kernel.
                    GQA: one program serves all query heads of a kv head, so each K/V byte is
                    read once per step (padded to 16 rows for tl.dot; the pad rows are free:
                    decode is bandwidth-bound).
  prefill_attention causal attention of prefill chunks over their whole context in the pool
                    (cached prefix + the chunk itself, already stored), varlen, one program per
                    (64-query tile, query head).

Units: sm_scale is 1/sqrt(head_dim); softmax runs in fp32 with exp2 (scores pre-multiplied by
log2(e)); outputs are written in the query dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.gpu_attention import PREFILL_BLOCK_M

LOG2E = 1.4426950408889634
# decode tile: tokens per loop iteration (head_dim 128 / <= 64), warps, pipeline stages.
# bench/gpu_kernels.py on an H200 (docs/benchmarks.md): (64, 4, 3) reads KV at 0.94 of copy
# bandwidth at batch 64 x 1536 tokens (32 tokens, 2 stages: 0.86) and 1.00 at batch 256.
DECODE_BLOCK_N = 64
DECODE_BLOCK_N_D64 = 64
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 3


def _dot_precision(q: torch.Tensor) -> str:
    # fp32 engines must match an fp32 reference token for token: no TF32 inside tl.dot
    return "ieee" if q.dtype == torch.float32 else "tf32"


@triton.jit
def _store_kv_kernel(
    K,
    V,
    KC,
    VC,
    slots,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_cb,
    stride_ct,
    stride_ch,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    n = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slots + n)
    if slot < 0:
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    d = tl.arange(0, HEAD_DIM)
    dst = blk * stride_cb + off * stride_ct + h * stride_ch + d
    tl.store(KC + dst, tl.load(K + n * stride_kn + h * stride_kh + d))
    tl.store(VC + dst, tl.load(V + n * stride_vn + h * stride_vh + d))


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v [N, Hk, D]; caches [NB, bs, Hk, D] (same strides for K and V); slot_mapping [N]."""
    n, hk, d = k.shape
    if n == 0:
        return
    assert k.stride(2) == 1 and v.stride(2) == 1 and k_cache.stride(3) == 1
    assert k_cache.stride() == v_cache.stride()
    _store_kv_kernel[(n, hk)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1],
        HEAD_DIM=d,
    )


@triton.jit
def _decode_split_kernel(
    Q,
    KC,
    VC,
    block_tables,
    context_lens,
    Acc,  # [B, Hq, S, D] fp32, unnormalised
    ML,  # [B, Hq, S, 2] fp32: running max (log2 domain) and sum
    qk_scale,  # sm_scale * log2(e)
    stride_qb,
    stride_qh,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_bt,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    num_splits = tl.num_programs(2)
    ctx = tl.load(context_lens + b)
    per_split = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
    start = s * per_split
    end = tl.minimum(start + per_split, ctx)

    g = tl.arange(0, GROUP_PAD)
    gmask = g < GROUP
    heads = kvh * GROUP + g
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None])

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for t0 in range(start, end, BLOCK_N):
        offs = t0 + tl.arange(0, BLOCK_N)
        tmask = offs < end
        page = tl.load(block_tables + b * stride_bt + offs // BLOCK_SIZE, mask=tmask, other=0)
        addr = page.to(tl.int64) * stride_cb + (offs % BLOCK_SIZE) * stride_ct + kvh * stride_ch
        k = tl.load(KC + addr[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        qk = (
            tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        )  # [GROUP_PAD, BLOCK_N]
        qk = tl.where(tmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(VC + addr[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    hq = tl.num_programs(1) * GROUP
    row = (b * hq + heads) * num_splits + s  # [GROUP_PAD]
    tl.store(Acc + row[:, None] * HEAD_DIM + d[None, :], acc, mask=gmask[:, None])
    tl.store(ML + row * 2, m_i, mask=gmask)
    tl.store(ML + row * 2 + 1, l_i, mask=gmask)


@triton.jit
def _decode_reduce_kernel(
    Acc,
    ML,
    Out,
    stride_ob,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    hq = tl.num_programs(1)
    s = tl.arange(0, SPLITS_PAD)
    smask = s < NUM_SPLITS
    d = tl.arange(0, HEAD_DIM)
    row = (b * hq + h) * NUM_SPLITS + s
    m = tl.load(ML + row * 2, mask=smask, other=float("-inf"))
    l_s = tl.load(ML + row * 2 + 1, mask=smask, other=0.0)
    m_max = tl.max(m, 0)
    # empty splits (and padding rows, whose splits are all empty) carry m = -inf: weight 0
    w = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)
    acc = tl.load(Acc + row[:, None] * HEAD_DIM + d[None, :], mask=smask[:, None], other=0.0)
    num = tl.sum(acc * w[:, None], 0)
    den = tl.sum(l_s * w, 0)
    out = tl.where(den > 0, num / den, 0.0)
    tl.store(Out + b * stride_ob + h * stride_oh + d, out.to(Out.dtype.element_ty))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    out: torch.Tensor,
    num_splits: int,
    block_n: int | None = None,
    num_warps: int = DECODE_NUM_WARPS,
    num_stages: int = DECODE_NUM_STAGES,
) -> None:
    """q [B, Hq, D]; block_tables [B, W] int32; context_lens [B] int32 (0: a padding row,
    output 0); writes out [B, Hq, D]. num_splits is fixed per batch size (CUDA graphs).
    block_n / num_warps / num_stages: tile shape (defaults tuned by bench/gpu_kernels.py)."""
    b, hq, d = q.shape
    hk = k_cache.shape[2]
    group = hq // hk
    acc = torch.empty((b, hq, num_splits, d), dtype=torch.float32, device=q.device)
    ml = torch.empty((b, hq, num_splits, 2), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(b, hk, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        acc,
        ml,
        (d**-0.5) * LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_N=block_n or (DECODE_BLOCK_N_D64 if d <= 64 else DECODE_BLOCK_N),
        DOT_PRECISION=_dot_precision(q),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    _decode_reduce_kernel[(b, hq)](
        acc,
        ml,
        out,
        out.stride(0),
        out.stride(1),
        NUM_SPLITS=num_splits,
        SPLITS_PAD=triton.next_power_of_2(num_splits),
        HEAD_DIM=d,
        num_warps=4,
    )


@triton.jit
def _prefill_kernel(
    Q,
    KC,
    VC,
    Out,
    tile_seq,  # [T] int32: which prefill sequence a query tile belongs to
    tile_q0,  # [T] int32: first query of the tile, relative to the chunk
    q_start,  # [P] int32: first row of the chunk in the step's flat token dimension
    q_len,  # [P] int32
    num_computed,  # [P] int32: context already cached before the chunk
    block_tables,  # [P, W] int32
    qk_scale,
    stride_qn,
    stride_qh,
    stride_on,
    stride_oh,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    p = tl.load(tile_seq + t)
    q0 = tl.load(tile_q0 + t)
    row0 = tl.load(q_start + p)
    n = tl.load(q_len + p)
    cached = tl.load(num_computed + p)

    mi = q0 + tl.arange(0, BLOCK_M)
    mmask = mi < n
    q_pos = cached + mi  # absolute positions of the tile's queries
    d = tl.arange(0, HEAD_DIM)
    rows = (row0 + mi).to(tl.int64)
    q = tl.load(Q + rows[:, None] * stride_qn + h * stride_qh + d[None, :], mask=mmask[:, None])

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    kv_end = tl.minimum(cached + q0 + BLOCK_M, cached + n)  # causal: last key of the tile
    for t0 in range(0, kv_end, BLOCK_N):
        offs = t0 + tl.arange(0, BLOCK_N)
        nmask = offs < kv_end
        page = tl.load(block_tables + p * stride_bt + offs // BLOCK_SIZE, mask=nmask, other=0)
        addr = page.to(tl.int64) * stride_cb + (offs % BLOCK_SIZE) * stride_ct + kvh * stride_ch
        k = tl.load(KC + addr[:, None] + d[None, :], mask=nmask[:, None], other=0.0)
        # [BLOCK_M, BLOCK_N]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        causal = (offs[None, :] <= q_pos[:, None]) & nmask[None, :]
        qk = tl.where(causal, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # rows beyond the chunk (mmask False) may see no key: keep their arithmetic finite
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        pr = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(pr, 1)
        v = tl.load(VC + addr[:, None] + d[None, :], mask=nmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        Out + rows[:, None] * stride_on + h * stride_oh + d[None, :],
        out.to(Out.dtype.element_ty),
        mask=mmask[:, None],
    )


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    tile_seq: torch.Tensor,
    tile_q0: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    num_computed: torch.Tensor,
    block_tables: torch.Tensor,
) -> None:
    """q, out [N, Hq, D] (the whole step's rows; only the chunks' rows are written)."""
    num_tiles = tile_seq.shape[0]
    if num_tiles == 0:
        return
    _, hq, d = q.shape
    hk = k_cache.shape[2]
    _prefill_kernel[(num_tiles, hq)](
        q,
        k_cache,
        v_cache,
        out,
        tile_seq,
        tile_q0,
        q_start,
        q_len,
        num_computed,
        block_tables,
        (d**-0.5) * LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=hq // hk,
        HEAD_DIM=d,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=PREFILL_BLOCK_M,
        BLOCK_N=64,
        DOT_PRECISION=_dot_precision(q),
        num_warps=4,
        num_stages=2,
    )
