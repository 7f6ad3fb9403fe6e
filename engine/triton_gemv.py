"""Batch-1 linear layers for CUDA (Triton): y = x @ W^T for a few rows (M <= MAX_ROWS), with
the neighbouring elementwise op done in the same pass.

Why: a batch-1 decode step of an 8B model is a chain of ~12 kernels per layer, and each
launch boundary costs a few microseconds of an idle memory bus (the next kernel's ramp-up,
the last one's tail) on top of the bytes. Here each weight matrix is read once by a kernel
that also does what stood beside it:
  norm=(w, eps)   RMSNorm of x in the prologue (replaces the norm / add+norm kernel)
  silu_mul=True   W = [gate; up] (2I rows): each program reads gate row j and up row j and
                  writes silu(gate_j) * up_j, [M, I] (replaces silu_and_mul)
  residual=r      y + r in the epilogue (the residual add the next norm used to do)
so a decoder layer is 7 kernels instead of 12 (models/llama.py, DecoderLayer.forward_small).

Rounding follows the kernels they replace (engine/triton_fused.py, i.e. torch's bf16 order):
the normed x is rounded to the dtype before the weight multiply and again after it; gate and
up are rounded (the GEMM's output), silu(gate) is rounded before the multiply by up; y is
rounded before the residual add. What differs is only the fp32 summation order of the dot
products and of the norm's sum of squares.

Launch boundaries: each GEMV is a programmatic dependent launch (PDL, Hopper): its programs
start while the kernel before it drains and stream their first weight tile before waiting
for it (griddepcontrol), so consecutive GEMVs overlap ramp-up with tail.

Shape of the work: one program per BLOCK_N output rows of W, no split-K (no atomics, no
zero-init, deterministic): every program streams BLOCK_N full rows of W, 16-byte loads along
K. Measured on an H200 (bench/gpu_gemv.py, docs/benchmarks.md): at M = 1 this reads the
8B model's projections at 0.84-1.04 of copy bandwidth where cuBLAS reads them at 0.63-0.99;
at M = 2-8 cuBLAS is faster (each row is one more reduction per tile here), so the model
takes this path at batch 1 only (layers.SMALL_BATCH_ROWS).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

MAX_ROWS = 8  # the rows are unrolled in the kernel (one reduction per row and tile)
MAX_NORM_FEATURES = 16384  # the norm prologue loads a whole row at once


@triton.jit
def _accumulate(
    acc, w, X, NormW, rstd, kk, k_mask, M, stride_xm, M_PAD: tl.constexpr, NORM: tl.constexpr
):
    """acc[m, :] += w @ f(x[m, kk]) for every row m; w [BLOCK_N, BLOCK_K] in fp32."""
    rm = tl.arange(0, M_PAD)
    dt = X.dtype.element_ty
    if NORM:
        nw = tl.load(NormW + kk, mask=k_mask, other=0.0).to(tl.float32)
    for m in tl.static_range(M_PAD):
        x = tl.load(X + m * stride_xm + kk, mask=k_mask & (m < M), other=0.0).to(tl.float32)
        if NORM:
            r = tl.sum(tl.where(rm == m, rstd, 0.0), 0)
            x = (nw * (x * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        part = tl.sum(w * x[None, :], 1)  # [BLOCK_N]
        acc += tl.where(rm[:, None] == m, part[None, :], 0.0)
    return acc


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
    X_BLOCK: tl.constexpr,  # next_power_of_2(K) with NORM
    NORM: tl.constexpr,
    SILU_MUL: tl.constexpr,
    RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    # Programmatic dependent launch (launched with launch_pdl): the next GEMV's programs may
    # start once every program here has started; they prefetch their weights (which nothing
    # writes) and wait at gdc_wait for this grid to finish before reading x or the residual.
    gdc_launch_dependents()
    pid = tl.program_id(0).to(tl.int64)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rk = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, M_PAD)
    dt = Out.dtype.element_ty
    w_rows = W + rn[:, None] * K
    up_rows = W + (rn[:, None] + N) * K  # SILU_MUL: W is [gate (N rows); up (N rows)]

    # The first weight tile is requested before the norm's pass over x, so the memory bus is
    # busy while the program computes 1 / rms (the rest stream in the loop below).
    k_mask = rk < K
    wmask = n_mask[:, None] & k_mask[None, :]
    w_first = tl.load(w_rows + rk[None, :], mask=wmask, other=0.0)
    if SILU_MUL:  # noqa: SIM108 (a constexpr branch: no load at all without SILU_MUL)
        up_first = tl.load(up_rows + rk[None, :], mask=wmask, other=0.0)
    else:
        up_first = w_first  # unused
    gdc_wait()  # the previous kernel (x's and the residual's writer) has finished

    rstd = tl.zeros([M_PAD], dtype=tl.float32)
    if NORM:  # each row's 1 / rms over all of K: the row in one load (one L2 round trip)
        rx = tl.arange(0, X_BLOCK)
        for m in tl.static_range(M_PAD):
            xf = tl.load(X + m * stride_xm + rx, mask=(rx < K) & (m < M), other=0.0)
            xf = xf.to(tl.float32)
            rstd = tl.where(rm == m, tl.rsqrt(tl.sum(xf * xf, 0) / K + eps), rstd)

    acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    acc = _accumulate(
        acc, w_first.to(tl.float32), X, NormW, rstd, rk, k_mask, M, stride_xm, M_PAD, NORM
    )
    acc_up = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    if SILU_MUL:
        acc_up = _accumulate(
            acc_up, up_first.to(tl.float32), X, NormW, rstd, rk, k_mask, M, stride_xm, M_PAD, NORM
        )
    for k0 in range(BLOCK_K, K, BLOCK_K):
        kk = k0 + rk
        k_mask = kk < K
        wmask = n_mask[:, None] & k_mask[None, :]
        w = tl.load(w_rows + kk[None, :], mask=wmask, other=0.0).to(tl.float32)
        acc = _accumulate(acc, w, X, NormW, rstd, kk, k_mask, M, stride_xm, M_PAD, NORM)
        if SILU_MUL:
            u = tl.load(up_rows + kk[None, :], mask=wmask, other=0.0).to(tl.float32)
            acc_up = _accumulate(acc_up, u, X, NormW, rstd, kk, k_mask, M, stride_xm, M_PAD, NORM)

    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = acc.to(dt)
    if SILU_MUL:  # torch: gate and up rounded (GEMM output), silu(gate) rounded, product rounded
        g = y.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        y = (act * acc_up.to(dt).to(tl.float32)).to(dt)
    mask = (rm[:, None] < M) & n_mask[None, :]
    if RESIDUAL:  # torch: the GEMM's output is rounded, then added
        res = tl.load(Res + rm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0)
        y = (y.to(tl.float32) + res.to(tl.float32)).to(dt)
    tl.store(Out + rm[:, None] * stride_om + rn[None, :], y, mask=mask)


# (BLOCK_N, BLOCK_K, num_warps) by (N, K) of the Llama-3.1-8B projections at M = 1 (for the
# gate_up with silu_mul, N = intermediate: BLOCK_N gate rows + BLOCK_N up rows a program);
# other shapes take the default. bench/gpu_gemv.py on an H200, 2026-11-22.
_TILES: dict[tuple[int, int], tuple[int, int, int]] = {
    (6144, 4096): (4, 2048, 8),  # qkv, norm
    (4096, 4096): (2, 1024, 4),  # o_proj, residual
    (14336, 4096): (2, 2048, 4),  # gate_up, norm + silu_mul
    (4096, 14336): (4, 2048, 8),  # down, residual
}
_DEFAULT_TILE = (4, 1024, 4)


def tile_for(n: int, k: int) -> tuple[int, int, int]:
    return _TILES.get((n, k), _DEFAULT_TILE)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm: tuple[torch.Tensor, float] | None = None,
    silu_mul: bool = False,
    residual: torch.Tensor | None = None,
    tile: tuple[int, int, int] | None = None,
    pdl: bool = True,
) -> torch.Tensor:
    """x [M, K] -> [M, N] = f(x) @ weight^T (+ bias) (+ residual), weight [N, K] contiguous.

    norm = (RMSNorm weight [K], eps): f(x) = rms_norm(x), else x.
    silu_mul: weight is [gate; up], [2I, K]; returns silu(f(x) @ gate^T) * (f(x) @ up^T),
    [M, I] (no bias). M <= MAX_ROWS; x, residual with unit stride along features.
    pdl: launched as a programmatic dependent of the kernel before it (see the kernel)."""
    m, k = x.shape
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"triton_gemv.linear takes at most {MAX_ROWS} rows, got {m}")
    if weight.shape[1] != k or x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError(f"x {tuple(x.shape)} / weight {tuple(weight.shape)} do not match")
    if norm is not None and k > MAX_NORM_FEATURES:
        raise ValueError(f"the norm prologue holds a row in registers: K={k} > {MAX_NORM_FEATURES}")
    if silu_mul and (bias is not None or weight.shape[0] % 2):
        raise ValueError("silu_mul needs an even number of weight rows and no bias")
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
        X_BLOCK=triton.next_power_of_2(k) if norm is not None else 1,
        NORM=norm is not None,
        SILU_MUL=silu_mul,
        RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None,
        num_warps=warps,
        launch_pdl=pdl,
    )
    return out
