"""Small-batch linear layers for CUDA (Triton): y = x @ W^T for M <= SMALL_M rows, with the
neighbouring elementwise op done in the same pass.

Why: a batch-1 decode step of an 8B model is a chain of ~12 kernels per layer, and each
launch boundary costs a few microseconds of an idle memory bus (the next kernel's ramp-up,
the last one's tail) on top of the bytes. Here each weight matrix is read once by a kernel
that also does what stood beside it:
  norm=(w, eps)   RMSNorm of x in the prologue (replaces the norm / add+norm kernel)
  silu=True       x = [gate | up], silu(gate) * up in the prologue (replaces silu_and_mul)
  residual=r      y + r in the epilogue (the residual add the next norm used to do)
so a decoder layer is 7 kernels instead of 12 (models/llama.py, DecoderLayer.forward_small).

Rounding follows the kernels they replace (engine/triton_fused.py, i.e. torch's bf16 order):
the normed x is rounded to the dtype before the weight multiply and again after it, silu(gate)
is rounded before the multiply by up, y is rounded before the residual add. What differs is
only the fp32 summation order of the dot products and of the norm's sum of squares.

Shape of the work: one program per BLOCK_N output columns, no split-K (no atomics, no
zero-init, deterministic): every program streams BLOCK_N full rows of W, 16-byte loads along
K. The tile per shape comes from bench/gpu_gemv.py on an H200 (docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.layers import SMALL_BATCH_ROWS as SMALL_M


@triton.jit
def _gemv_kernel(
    X,
    W,
    Out,
    NormW,
    Res,
    Bias,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    stride_rm,
    eps,
    M_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORM: tl.constexpr,
    SILU: tl.constexpr,
    RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rk = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, M_PAD)
    dt = Out.dtype.element_ty
    w_rows = W + rn[:, None] * K

    rstd = tl.zeros([M_PAD], dtype=tl.float32)
    if NORM:  # each row's 1 / rms over all of K (x is a few KiB, from L2)
        for m in tl.static_range(M_PAD):
            ss = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + rk
                xv = tl.load(X + m * stride_xm + kk, mask=(kk < K) & (m < M), other=0.0)
                xf = xv.to(tl.float32)
                ss += xf * xf
            r = tl.rsqrt(tl.sum(ss, 0) / K + eps)
            rstd = tl.where(rm == m, r, rstd)

    acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_mask = kk < K
        w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        w = w.to(tl.float32)
        if NORM:
            nw = tl.load(NormW + kk, mask=k_mask, other=0.0).to(tl.float32)
        for m in tl.static_range(M_PAD):
            xmask = k_mask & (m < M)
            if SILU:  # X row = [gate (K) | up (K)]
                g = tl.load(X + m * stride_xm + kk, mask=xmask, other=0.0).to(tl.float32)
                u = tl.load(X + m * stride_xm + K + kk, mask=xmask, other=0.0).to(tl.float32)
                act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
                x = (act * u).to(dt).to(tl.float32)
            else:
                x = tl.load(X + m * stride_xm + kk, mask=xmask, other=0.0).to(tl.float32)
                if NORM:
                    r = tl.sum(tl.where(rm == m, rstd, 0.0), 0)
                    x = (nw * (x * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
            part = tl.sum(w * x[None, :], 1)  # [BLOCK_N]
            acc += tl.where(rm[:, None] == m, part[None, :], 0.0)

    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = acc.to(dt)
    mask = (rm[:, None] < M) & n_mask[None, :]
    if RESIDUAL:  # torch: the GEMM's output is rounded, then added
        res = tl.load(Res + rm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0)
        y = (y.to(tl.float32) + res.to(tl.float32)).to(dt)
    tl.store(Out + rm[:, None] * stride_om + rn[None, :], y, mask=mask)


# (BLOCK_N, BLOCK_K, num_warps) by (N, K) of the Llama-3.1-8B projections at M = 1;
# others take the default. bench/gpu_gemv.py, H200, 2026-11-22.
_TILES: dict[tuple[int, int], tuple[int, int, int]] = {}
_DEFAULT_TILE = (4, 1024, 4)


def tile_for(n: int, k: int) -> tuple[int, int, int]:
    return _TILES.get((n, k), _DEFAULT_TILE)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm: tuple[torch.Tensor, float] | None = None,
    silu: bool = False,
    residual: torch.Tensor | None = None,
    tile: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """x [M, K] (or [M, 2K] with silu) -> [M, N] = f(x) @ weight^T (+ bias) (+ residual).

    weight [N, K] contiguous, M <= SMALL_M; x, residual with unit stride along features.
    norm = (RMSNorm weight [K], eps): f(x) = rms_norm(x); silu: f([g | u]) = silu(g) * u."""
    m = x.shape[0]
    n, k = weight.shape
    if m > SMALL_M:
        raise ValueError(f"triton_gemv.linear takes at most {SMALL_M} rows, got {m}")
    if norm is not None and silu:
        raise ValueError("norm and silu prologues are exclusive")
    if x.shape[1] != (2 * k if silu else k) or x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError(f"x {tuple(x.shape)} / weight {tuple(weight.shape)} do not match")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if residual is not None and (residual.shape != out.shape or residual.stride(1) != 1):
        raise ValueError(f"residual {tuple(residual.shape)} must be [{m}, {n}]")
    block_n, block_k, warps = tile or tile_for(n, k)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        out,
        norm[0] if norm is not None else x,
        residual if residual is not None else out,
        bias if bias is not None else out,
        m,
        n,
        k,
        x.stride(0),
        out.stride(0),
        residual.stride(0) if residual is not None else 0,
        norm[1] if norm is not None else 0.0,
        M_PAD=triton.next_power_of_2(m),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        NORM=norm is not None,
        SILU=silu,
        RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None,
        num_warps=warps,
    )
    return out
