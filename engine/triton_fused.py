"""Fused elementwise kernels for CUDA (Triton): RMSNorm, RoPE (alone, or with the K/V store),
SiLU-and-mul.

Why: a decode step of an 8B model at batch 1 runs ~40 small kernels per layer through torch's
elementwise ops (RMSNorm alone is 6); at ~2-3 us each that is ~3 ms per step, as much as
reading the weights. These kernels do each op in one pass.

Rounding matches the torch code they replace (and Hugging Face's): every intermediate that
torch rounds to the model dtype is rounded here too, in the same order, so bf16 results agree
with the eager path up to fp32 reassociation inside the RMSNorm reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, W, Out, stride_x, stride_o, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, 0) / N
    y = (x * tl.rsqrt(var + eps)).to(Out.dtype.element_ty)
    w = tl.load(W + cols, mask=mask)
    out = (w.to(tl.float32) * y.to(tl.float32)).to(Out.dtype.element_ty)
    tl.store(Out + row * stride_o + cols, out, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [N, D] (last dim contiguous) -> weight * (x / rms(x)), in x's dtype."""
    n, d = x.shape
    out = torch.empty((n, d), dtype=x.dtype, device=x.device)
    if n:
        block = triton.next_power_of_2(d)
        _rms_norm_kernel[(n,)](
            x,
            weight,
            out,
            x.stride(0),
            d,
            d,
            eps,
            BLOCK=block,
            num_warps=min(16, block // 256 or 1),
        )
    return out


@triton.jit
def _add_rms_norm_kernel(X, R, W, Out, ResOut, stride_x, stride_r, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    dt = Out.dtype.element_ty
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to(dt)  # torch: the residual sum is rounded, then normalised
    tl.store(ResOut + row * N + cols, s, mask=mask)
    s32 = s.to(tl.float32)
    var = tl.sum(s32 * s32, 0) / N
    y = (s32 * tl.rsqrt(var + eps)).to(dt)
    w = tl.load(W + cols, mask=mask)
    tl.store(Out + row * N + cols, (w.to(tl.float32) * y.to(tl.float32)).to(dt), mask=mask)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [N, D] -> (rms_norm(x + residual), x + residual), one pass."""
    n, d = x.shape
    out = torch.empty((n, d), dtype=x.dtype, device=x.device)
    res = torch.empty((n, d), dtype=x.dtype, device=x.device)
    if n:
        block = triton.next_power_of_2(d)
        warps = min(16, max(1, block // 256))
        _add_rms_norm_kernel[(n,)](
            x,
            residual,
            weight,
            out,
            res,
            x.stride(0),
            residual.stride(0),
            d,
            eps,
            BLOCK=block,
            num_warps=warps,
        )
    return out, res


# ROPE_NO_FMA: the RoPE kernels are compiled without FP fusion. With it (Triton's default),
# `(x1 * c).to(bf16).to(f32) + (...)` became one fused multiply-add: LLVM narrows the product
# and the sum to bf16 ops (exact for bf16 inputs), then contracts them into an FMA, which
# skips the product's rounding. Measured on an H200 (bench/gpu_numerics, SmolLM2 on
# transformers' own q/k): 16% of RoPE outputs differed from transformers' (2.4% by more than
# one bf16 ulp); every other elementwise kernel here has no multiply feeding an add.


@triton.jit
def _rope_kernel(
    X,
    Out,
    positions,
    Cos,
    Sin,
    stride_xn,
    stride_xh,
    num_heads,
    HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions + n)
    h = tl.arange(0, HEADS_PAD)
    hmask = h < num_heads
    j = tl.arange(0, HALF)
    # cos/sin tables are fp32 [max_pos, 2*HALF] with equal halves; torch rounds them to x's dtype
    c = tl.load(Cos + pos * 2 * HALF + j).to(Out.dtype.element_ty).to(tl.float32)
    s = tl.load(Sin + pos * 2 * HALF + j).to(Out.dtype.element_ty).to(tl.float32)
    src = X + n * stride_xn + h[:, None] * stride_xh + j[None, :]
    x1 = tl.load(src, mask=hmask[:, None]).to(tl.float32)
    x2 = tl.load(src + HALF, mask=hmask[:, None]).to(tl.float32)
    dt = Out.dtype.element_ty
    # torch: x * cos + rotate_half(x) * sin, each product rounded, then the sum rounded
    o1 = (x1 * c[None, :]).to(dt).to(tl.float32) + (-x2 * s[None, :]).to(dt).to(tl.float32)
    o2 = (x2 * c[None, :]).to(dt).to(tl.float32) + (x1 * s[None, :]).to(dt).to(tl.float32)
    dst = Out + n * num_heads * 2 * HALF + h[:, None] * 2 * HALF + j[None, :]
    tl.store(dst, o1.to(dt), mask=hmask[:, None])
    tl.store(dst + HALF, o2.to(dt), mask=hmask[:, None])


def rope(
    positions: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """x [N, H, D] (last dim contiguous), positions [N], cos/sin [max_pos, D] fp32 -> a new
    contiguous [N, H, D] tensor, rotate-half RoPE applied."""
    n, h, d = x.shape
    out = torch.empty((n, h, d), dtype=x.dtype, device=x.device)
    if n:
        _rope_kernel[(n,)](
            x,
            out,
            positions,
            cos,
            sin,
            x.stride(0),
            x.stride(1),
            h,
            HEADS_PAD=triton.next_power_of_2(h),
            HALF=d // 2,
            num_warps=4,
            enable_fp_fusion=False,  # see ROPE_NO_FMA
        )
    return out


@triton.jit
def _rope_store_kv_kernel(
    Q,
    K,
    V,
    QOut,
    KC,
    VC,
    positions,
    slots,
    Cos,
    Sin,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_cb,
    stride_ct,
    stride_ch,
    num_q_heads,
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions + n)
    h = tl.arange(0, HEADS_PAD)
    j = tl.arange(0, HALF)
    dt = QOut.dtype.element_ty
    # cos/sin tables are fp32 [max_pos, 2*HALF] with equal halves; torch rounds them to x's dtype
    c = tl.load(Cos + pos * 2 * HALF + j).to(dt).to(tl.float32)[None, :]
    s = tl.load(Sin + pos * 2 * HALF + j).to(dt).to(tl.float32)[None, :]
    if tl.program_id(1) == 0:  # query heads -> QOut [N, Hq, D]
        hmask = (h < num_q_heads)[:, None]
        src = Q + n * stride_qn + h[:, None] * stride_qh + j[None, :]
        dst = QOut + n * num_q_heads * 2 * HALF + h[:, None] * 2 * HALF + j[None, :]
    else:  # key heads -> their slot in the pool (slot < 0: a padding row, nothing written)
        slot = tl.load(slots + n)
        hmask = ((h < num_kv_heads) & (slot >= 0))[:, None]
        src = K + n * stride_kn + h[:, None] * stride_kh + j[None, :]
        cache = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct
        cache += h[:, None] * stride_ch + j[None, :]
        dst = KC + cache
        vsrc = V + n * stride_vn + h[:, None] * stride_vh + j[None, :]
        tl.store(VC + cache, tl.load(vsrc, mask=hmask), mask=hmask)
        tl.store(VC + cache + HALF, tl.load(vsrc + HALF, mask=hmask), mask=hmask)
    x1 = tl.load(src, mask=hmask).to(tl.float32)
    x2 = tl.load(src + HALF, mask=hmask).to(tl.float32)
    # torch: x * cos + rotate_half(x) * sin, each product rounded, then the sum rounded
    o1 = (x1 * c).to(dt).to(tl.float32) + (-x2 * s).to(dt).to(tl.float32)
    o2 = (x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)
    tl.store(dst, o1.to(dt), mask=hmask)
    tl.store(dst + HALF, o2.to(dt), mask=hmask)


def rope_store_kv(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """rope + store_kv in one launch (what three kernels did: rope(q), rope(k), store_kv).
    q [N, Hq, D], k/v [N, Hk, D] (last dim contiguous); caches [NB, bs, Hk, D] with the
    same strides. Returns rope(q) as a new contiguous [N, Hq, D]; rope(k) and v go to
    their slots (slot_mapping [N]; < 0 skipped)."""
    n, hq, d = q.shape
    hk = k.shape[1]
    out = torch.empty((n, hq, d), dtype=q.dtype, device=q.device)
    if n == 0:
        return out
    assert q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    _rope_store_kv_kernel[(n, 2)](
        q,
        k,
        v,
        out,
        k_cache,
        v_cache,
        positions,
        slot_mapping,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        hq,
        hk,
        BLOCK_SIZE=k_cache.shape[1],
        HEADS_PAD=triton.next_power_of_2(max(hq, hk)),
        HALF=d // 2,
        num_warps=4,
        enable_fp_fusion=False,  # see ROPE_NO_FMA
    )
    return out


@triton.jit
def _silu_and_mul_kernel(X, Out, stride_x, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    dt = Out.dtype.element_ty
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # torch rounds silu(gate) first
    tl.store(Out + row * inter + cols, (act * u).to(dt), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [N, 2I] = [gate | up] -> silu(gate) * up, [N, I]."""
    n, two_i = x.shape
    i = two_i // 2
    out = torch.empty((n, i), dtype=x.dtype, device=x.device)
    if n:
        block = 1024
        _silu_and_mul_kernel[(n, triton.cdiv(i, block))](
            x, out, x.stride(0), i, BLOCK=block, num_warps=4
        )
    return out
